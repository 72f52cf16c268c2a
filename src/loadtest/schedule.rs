//! Open-model arrival schedules: when each new session should start, decided up front
//! from the stages, never paced by responses (a slow server must not slow the arrivals,
//! or the test hides the very stall it should show).

use std::time::Duration;

/// One stage: `rate` new sessions per second at its start, changing linearly to `ramp_to`
/// (if given) by its end.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub duration: Duration,
    pub rate: f64,
    pub ramp_to: Option<f64>,
}

/// Intended start offsets of every session, from the start of the run.
pub fn arrivals(stages: &[Stage]) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut offset = 0.0f64;
    for stage in stages {
        let t_total = stage.duration.as_secs_f64();
        let (r0, r1) = (
            stage.rate.max(0.0),
            stage.ramp_to.unwrap_or(stage.rate).max(0.0),
        );
        // Sessions started by time t within the stage: N(t) = r0·t + (r1 − r0)·t²/(2T).
        let n_total = (r0 + r1) / 2.0 * t_total;
        let slope = if t_total > 0.0 {
            (r1 - r0) / t_total
        } else {
            0.0
        };
        let mut k = 1.0;
        while k <= n_total + 1e-9 {
            // Solve N(t) = k − ½ (the k-th arrival sits mid-interval) for t.
            let target = k - 0.5;
            let t = if slope.abs() < 1e-12 {
                target / r0
            } else {
                (-r0 + (r0 * r0 + 2.0 * slope * target).max(0.0).sqrt()) / slope
            };
            if t.is_finite() && t <= t_total {
                out.push(Duration::from_secs_f64(offset + t));
            }
            k += 1.0;
        }
        offset += t_total;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(secs: u64, rate: f64, ramp_to: Option<f64>) -> Stage {
        Stage {
            duration: Duration::from_secs(secs),
            rate,
            ramp_to,
        }
    }

    #[test]
    fn a_constant_rate_is_evenly_spaced() {
        let a = arrivals(&[stage(2, 100.0, None)]);
        assert_eq!(a.len(), 200);
        assert_eq!(a[0], Duration::from_millis(5));
        assert_eq!(a[1] - a[0], Duration::from_millis(10));
    }

    #[test]
    fn a_ramp_delivers_its_average_rate_and_accelerates() {
        // 200/s → 2,000/s over 10 s: 11,000 sessions, denser at the end.
        let a = arrivals(&[stage(10, 200.0, Some(2000.0))]);
        assert!((a.len() as f64 - 11_000.0).abs() <= 1.0, "{}", a.len());
        let first_second = a.iter().filter(|t| **t < Duration::from_secs(1)).count();
        let last_second = a.iter().filter(|t| **t >= Duration::from_secs(9)).count();
        assert!((first_second as f64 - 290.0).abs() < 5.0, "{first_second}");
        assert!((last_second as f64 - 1910.0).abs() < 5.0, "{last_second}");
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn stages_follow_each_other() {
        let a = arrivals(&[stage(1, 10.0, None), stage(1, 20.0, None)]);
        assert_eq!(a.len(), 30);
        assert!(a[9] < Duration::from_secs(1) && a[10] > Duration::from_secs(1));
    }
}
