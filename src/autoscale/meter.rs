//! Turns the pool's traffic counters (written lock-free by the proxy) into rates over a
//! sliding window. The request path pays nothing for it: the meter reads the counters once
//! per autoscaler tick.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::policy::{Line, Observations};
use crate::pool::waiting::SessionCost;
use crate::pool::{shed, Pool, State};

/// The share of the shop's pace at which the waiting room lets its line in (see
/// [`Meter::per_node`]).
const ROOM_PACE: f64 = 0.8;

/// One reading of the cumulative counters.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    connections: u64,
    requests: u64,
    /// Cumulative latency histogram counts.
    latency: Vec<u64>,
    /// New visitors so far: let in straight, given a place in line, or turned away.
    arrived: u64,
    /// New visitors the pool took on so far (straight in, or served from the line).
    let_in: u64,
    /// Requests shed so far.
    shed: u64,
}

/// Sliding-window rates of new connections and requests.
#[derive(Debug)]
pub struct Meter {
    /// Rates are averaged over this much history.
    window: Duration,
    /// The short window a step in new connections shows in first.
    fast_window: Duration,
    samples: VecDeque<Sample>,
    /// Requests shed so far, at the last reading.
    shed: u64,
    /// What one shopper let in costs the shop, over the window.
    cost: SessionCost,
}

impl Meter {
    pub fn new(window: Duration) -> Self {
        Self::with_fast_window(window, Duration::from_secs(1))
    }

    /// A meter that also reads the connection rate over `fast_window`.
    pub fn with_fast_window(window: Duration, fast_window: Duration) -> Self {
        Self {
            window,
            fast_window: fast_window.min(window),
            samples: VecDeque::new(),
            shed: 0,
            cost: SessionCost::new(window),
        }
    }

    /// The per-second rate of one counter over the last `fast_window` (from the newest
    /// sample at least that old; the whole history while there is less).
    fn recent(&self, counter: impl Fn(&Sample) -> u64) -> f64 {
        let Some(last) = self.samples.back() else {
            return 0.0;
        };
        let first = self
            .samples
            .iter()
            .rev()
            .find(|s| last.at.saturating_duration_since(s.at) >= self.fast_window)
            .or(self.samples.front());
        match first {
            Some(f) if last.at > f.at => {
                counter(last).saturating_sub(counter(f)) as f64
                    / last.at.duration_since(f.at).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// The line over the short window: who came, who was let in, who was shed, and who
    /// waits now (the room as last tidied, plus requests waiting for room).
    fn line(&self, pool: &Pool) -> Line {
        let room = pool.traffic.waiting.as_ref();
        // Every place, let in or not: a holder let in is still at its waiting page until
        // it comes back.
        let in_line = room.map_or(0, |r| r.places() as u64);
        let held = room.is_some_and(|r| r.held());
        let queued = pool.traffic.admission.waiting.load(Ordering::Relaxed);
        Line {
            waiting: if held { queued } else { in_line + queued },
            held: if held { in_line } else { 0 },
            arrived_per_second: self.recent(|s| s.arrived),
            let_in_per_second: self.recent(|s| s.let_in),
            shed_per_second: self.recent(|s| s.shed),
            per_node: self.per_node(pool),
        }
    }

    /// New visitors one in-service node can take on per second: the newcomers' share of
    /// a node's `pool.shed` slots over what one shopper holds (see
    /// [`SessionCost`]). `None` without shedding or before it is measured.
    fn per_node(&self, pool: &Pool) -> Option<f64> {
        let shed = pool.settings().shed.as_ref()?;
        let slots = shed::capacity(shed, 1, shed::Class::Newcomer) as f64;
        // The waiting room lets the line in at four fifths of that pace: it counts each
        // holder let in for half its cost until it is back, half a reload on average
        // (see `proxy::admission`, `room_for_newcomers`).
        let pace = if pool.traffic.waiting.is_some() {
            ROOM_PACE
        } else {
            1.0
        };
        self.cost.slot_seconds().map(|s| slots * pace / s)
    }

    /// The latency histogram's counts over the current window, bucket by bucket (what a
    /// cluster member publishes, for the leader to merge).
    pub fn latency_window(&self) -> Vec<u64> {
        match (self.samples.front(), self.samples.back()) {
            (Some(first), Some(last)) => last
                .latency
                .iter()
                .zip(first.latency.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The cumulative counters at `now`.
    fn read(pool: &Pool, now: Instant) -> Sample {
        let t = &pool.traffic;
        let a = &t.admission;
        // Arrivals: fresh places, and newcomers turned away at the line's bound. Taken
        // on: holders served (not the cutoff's moves: some let in never come back).
        let (room_arrived, room_served) = t.waiting.as_ref().map_or((0, 0), |r| {
            (
                r.counters.arrived.load(Ordering::Relaxed)
                    + r.counters.full.load(Ordering::Relaxed),
                r.counters.spent.load(Ordering::Relaxed),
            )
        });
        let straight_in = a.newcomers_in.load(Ordering::Relaxed);
        Sample {
            at: now,
            connections: t.scaling.counted.load(Ordering::Relaxed),
            requests: t.requests.load(Ordering::Relaxed),
            latency: t.latency.snapshot(),
            arrived: straight_in + room_arrived + a.newcomers_turned_away.load(Ordering::Relaxed),
            let_in: straight_in + room_served,
            shed: a.shed.load(Ordering::Relaxed),
        }
    }

    /// Reads the counters at `now` and returns the observations. Until the samples span
    /// half a window, the observations are marked not fresh.
    pub fn observe(&mut self, pool: &Pool, now: Instant) -> Observations {
        let sample = Self::read(pool, now);
        self.cost.observe(
            now,
            sample.let_in,
            pool.traffic.admission.in_flight.load(Ordering::Relaxed),
        );
        self.samples.push_back(sample);
        // Keep one sample at least a window old, so the rate spans the whole window.
        while self
            .samples
            .get(1)
            .is_some_and(|s| now.saturating_duration_since(s.at) >= self.window)
        {
            self.samples.pop_front();
        }
        let table = pool.snapshot();
        let in_service: Vec<_> = table
            .members()
            .iter()
            .filter(|m| m.state == State::InService)
            .collect();
        let in_flight: u64 = in_service
            .iter()
            .map(|m| u64::from(m.backend.in_flight()))
            .sum();
        let in_flight_per_node = in_flight as f64 / in_service.len().max(1) as f64;
        let t = &pool.traffic;
        let admission = &t.admission;
        let shed = admission.shed.load(Ordering::Relaxed);
        // Shoppers in the waiting room are demand the pool turned away, like sheds; but
        // not while an operator holds the door (a pre-queue is not a full shop).
        let queued = t
            .waiting
            .as_ref()
            .is_some_and(|room| !room.held() && room.waiting() > 0);
        let at_limit = shed > self.shed || admission.waiting.load(Ordering::Relaxed) > 0 || queued;
        self.shed = shed;
        let recent_connection_rate = self.recent(|s| s.connections);
        let line = self.line(pool);
        match (self.samples.front(), self.samples.back()) {
            (Some(first), Some(last))
                if last.at.saturating_duration_since(first.at) >= self.window / 2
                    && self.samples.len() >= 2 =>
            {
                let secs = last.at.duration_since(first.at).as_secs_f64();
                Observations {
                    connection_rate: (last.connections - first.connections) as f64 / secs,
                    request_rate: (last.requests - first.requests) as f64 / secs,
                    in_flight_per_node,
                    p99: crate::pool::latency::quantile_between(
                        &first.latency,
                        &last.latency,
                        0.99,
                    ),
                    fresh: true,
                    recent_connection_rate,
                    at_limit,
                    line,
                }
            }
            _ => Observations {
                connection_rate: 0.0,
                request_rate: 0.0,
                in_flight_per_node,
                p99: None,
                fresh: false,
                recent_connection_rate,
                at_limit,
                line,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Algorithm;
    use crate::pool::{Backend, Origin};
    use std::sync::Arc;

    /// A pool of one static backend (what the meter reads is its traffic counters).
    fn one_backend_pool() -> Pool {
        Pool::new(
            crate::pool::testing::settings(Algorithm::P2cEwma),
            vec![Arc::new(Backend::new(
                "b",
                "127.0.0.1:1".parse().unwrap(),
                1,
                Origin::Static,
            ))],
        )
    }

    #[test]
    fn the_last_second_shows_a_step_and_shedding_marks_the_limit() {
        let pool = one_backend_pool();
        let mut meter = Meter::with_fast_window(Duration::from_secs(10), Duration::from_secs(1));
        let t0 = Instant::now();
        let mut last = meter.observe(&pool, t0);
        // 10 s at 20/s, then one second at 200/s, read every 200 ms.
        for i in 1..=55u64 {
            let per_tick = if i > 50 { 40 } else { 4 };
            pool.traffic
                .scaling
                .counted
                .fetch_add(per_tick, Ordering::Relaxed);
            last = meter.observe(&pool, t0 + Duration::from_millis(200 * i));
        }
        assert!(
            (last.recent_connection_rate - 200.0).abs() < 1.0,
            "{}",
            last.recent_connection_rate
        );
        assert!(last.connection_rate < 40.0, "{}", last.connection_rate);
        assert!(!last.at_limit);
        pool.traffic.admission.shed.fetch_add(1, Ordering::Relaxed);
        assert!(meter.observe(&pool, t0 + Duration::from_secs(12)).at_limit);
        assert!(
            !meter
                .observe(&pool, t0 + Duration::from_millis(12_200))
                .at_limit,
            "only new sheds count"
        );
    }

    #[test]
    fn rates_cover_the_window_and_start_stale() {
        let pool = one_backend_pool();
        let mut meter = Meter::new(Duration::from_secs(2));
        let t0 = Instant::now();
        assert!(!meter.observe(&pool, t0).fresh);
        for i in 1..=20u64 {
            pool.traffic
                .scaling
                .counted
                .fetch_add(50, Ordering::Relaxed);
            let o = meter.observe(&pool, t0 + Duration::from_millis(200 * i));
            if i >= 5 {
                assert!(o.fresh, "tick {i}");
                assert!(
                    (o.connection_rate - 250.0).abs() < 1.0,
                    "tick {i}: {}",
                    o.connection_rate
                );
            }
        }
    }
}
