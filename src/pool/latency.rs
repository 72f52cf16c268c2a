//! Latency, lock-free: the per-backend peak-EWMA estimate selection reads ([`PeakEwma`]),
//! and the pool-wide histogram for the autoscaler's p99 ([`LatencyHistogram`]: 4 buckets
//! per power of two of microseconds, ≤ 19% relative error, one atomic increment per
//! request).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::nanos_since_epoch;

/// How fast the peak-EWMA latency estimate forgets a peak (linkerd2-proxy's default).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// Peak-sensitive moving average of response latency (Finagle/linkerd "peak EWMA"): jumps
/// to a new peak at once and decays with time constant [`EWMA_DECAY`], towards lower
/// samples when there are some and towards zero when the backend sits idle, so a backend
/// that was slow once is tried again later instead of being shunned forever (tower's
/// `PeakEwma` does the same). Updates race without locks; a lost sample only makes the
/// estimate slightly older.
#[derive(Debug)]
pub struct PeakEwma {
    /// Estimate in nanoseconds, stored as `f64` bits; 0 until the first sample.
    value_ns: AtomicU64,
    /// When the estimate was last updated, nanoseconds since [`epoch`].
    stamp_ns: AtomicU64,
}

impl PeakEwma {
    pub(super) fn new() -> Self {
        Self {
            value_ns: AtomicU64::new(0f64.to_bits()),
            stamp_ns: AtomicU64::new(nanos_since_epoch(Instant::now())),
        }
    }

    /// The estimate as last stored, in nanoseconds (0: no sample yet).
    pub fn get_ns(&self) -> f64 {
        f64::from_bits(self.value_ns.load(Ordering::Relaxed))
    }

    /// The estimate at `now_ns` (nanoseconds since [`epoch`]), decayed for the idle time
    /// since the last sample. 0 means no sample yet.
    pub fn at(&self, now_ns: u64) -> f64 {
        let value = self.get_ns();
        let elapsed = now_ns.saturating_sub(self.stamp_ns.load(Ordering::Relaxed));
        if elapsed == 0 || value == 0.0 {
            return value;
        }
        value * decay_factor(elapsed as f64 / EWMA_DECAY_NS)
    }

    /// Feeds one observed latency.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let now_ns = nanos_since_epoch(now);
        let rtt_ns = rtt.as_nanos() as f64;
        let prev = self.get_ns();
        let next = if rtt_ns > prev || prev == 0.0 {
            rtt_ns
        } else {
            let elapsed = now_ns.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
            let w = (-elapsed / EWMA_DECAY_NS).exp();
            prev * w + rtt_ns * (1.0 - w)
        };
        self.value_ns.store(next.to_bits(), Ordering::Relaxed);
        self.stamp_ns.store(now_ns, Ordering::Relaxed);
    }
}

const EWMA_DECAY_NS: f64 = EWMA_DECAY.as_nanos() as f64;

/// `e^-x`, cheaply for the common case: on a busy backend the last sample is micro- to
/// milliseconds old, `x` is tiny and the second-order Taylor term is exact to 1e-9.
fn decay_factor(x: f64) -> f64 {
    if x < 1e-3 {
        1.0 - x + 0.5 * x * x
    } else {
        (-x).exp()
    }
}

/// Buckets: 4 per octave over 2^0..2^31 µs (up to ~36 minutes).
pub const BUCKETS: usize = 128;

/// Cumulative counts per bucket.
#[derive(Debug)]
pub struct LatencyHistogram {
    counts: [AtomicU64; BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Bucket of a latency in microseconds.
fn bucket(us: u64) -> usize {
    if us < 4 {
        return us as usize;
    }
    let octave = 63 - us.leading_zeros() as usize; // ≥ 2
    let sub = ((us >> (octave - 2)) & 0b11) as usize;
    (octave * 4 + sub).min(BUCKETS - 1)
}

/// Upper bound of a bucket in microseconds.
fn upper_us(b: usize) -> u64 {
    if b < 4 {
        return b as u64 + 1;
    }
    let (octave, sub) = (b / 4, (b % 4) as u64);
    ((4 + sub + 1) << (octave - 2)) - 1
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of the cumulative counts.
    pub fn snapshot(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// The `q` quantile (0..=1) of the requests counted between two snapshots, as the upper
/// bound of its bucket; `None` when nothing was counted.
pub fn quantile_between(before: &[u64], after: &[u64], q: f64) -> Option<Duration> {
    let diff: Vec<u64> = after
        .iter()
        .zip(before.iter().chain(std::iter::repeat(&0)))
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let total: u64 = diff.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (b, n) in diff.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(Duration::from_micros(upper_us(b)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values_within_a_fifth() {
        for us in [1u64, 3, 4, 5, 7, 8, 100, 999, 1000, 20_000, 1_000_000] {
            let b = bucket(us);
            assert!(
                upper_us(b) >= us,
                "{us} above its bucket's bound {}",
                upper_us(b)
            );
            assert!(
                upper_us(b) as f64 <= us as f64 * 1.25 + 1.0,
                "{us}: bound {}",
                upper_us(b)
            );
        }
    }

    #[test]
    fn p99_of_a_window_sees_the_slow_tail() {
        let h = LatencyHistogram::default();
        for _ in 0..1000 {
            h.record(Duration::from_millis(2));
        }
        let before = h.snapshot();
        for _ in 0..980 {
            h.record(Duration::from_millis(2));
        }
        for _ in 0..20 {
            h.record(Duration::from_millis(400));
        }
        let p99 = quantile_between(&before, &h.snapshot(), 0.99).unwrap();
        assert!(
            p99 >= Duration::from_millis(400) && p99 < Duration::from_millis(500),
            "{p99:?}"
        );
        let p50 = quantile_between(&before, &h.snapshot(), 0.5).unwrap();
        assert!(p50 < Duration::from_millis(3), "{p50:?}");
        assert_eq!(quantile_between(&h.snapshot(), &h.snapshot(), 0.99), None);
    }
}
