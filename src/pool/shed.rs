//! Load shedding while capacity is on its way: a per-node concurrency limit, a short
//! bounded wait, then 503 with `Retry-After`. Checkout and cart requests get headroom
//! above the limit, so when the shop is full it turns away browsers before buyers.
//!
//! The decision is pure ([`admits`]); the proxy does the waiting, woken when a request
//! gives its room back ([`Admission::room`]) or the pool changes, never by polling.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

pub use crate::config::ShedConfig;

/// Whether one more request fits: `in_flight` admitted requests on `in_service` nodes.
pub fn admits(cfg: &ShedConfig, in_flight: u64, in_service: usize, priority: bool) -> bool {
    if cfg.max_in_flight_per_node == 0 {
        return true;
    }
    let mut capacity = in_service as u64 * u64::from(cfg.max_in_flight_per_node);
    if priority {
        capacity += capacity * u64::from(cfg.priority_headroom_percent) / 100;
    }
    in_flight < capacity
}

/// Whether `path` is a priority path.
pub fn is_priority(cfg: &ShedConfig, path: &str) -> bool {
    cfg.priority_prefixes
        .iter()
        .any(|p| path.starts_with(p.as_str()))
}

/// Pool-wide admission counters.
#[derive(Debug, Default)]
pub struct Admission {
    /// Requests admitted and not finished.
    pub in_flight: AtomicU64,
    /// Requests waiting for room.
    pub waiting: AtomicU64,
    /// Requests shed (answered 503 by surge).
    pub shed: AtomicU64,
    /// Woken once per request that ends while others wait for room.
    pub room: Notify,
}

/// Holds one admitted request; dropping it frees the room.
#[derive(Debug)]
pub struct Admitted(Arc<Admission>);

impl Admitted {
    pub fn new(admission: Arc<Admission>) -> Self {
        admission.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(admission)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        // SeqCst pairs with a waiter's "count myself waiting, then look for room": either
        // the waiter sees the room freed here, or this sees the waiter and wakes one.
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.0.waiting.load(Ordering::SeqCst) > 0 {
            self.0.room.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> ShedConfig {
        ShedConfig {
            max_in_flight_per_node: 10,
            queue_timeout: Duration::from_millis(100),
            queue_size: 100,
            priority_prefixes: vec!["/checkout".into(), "/cart".into()],
            priority_headroom_percent: 20,
        }
    }

    #[test]
    fn browsing_is_shed_before_buying() {
        let c = cfg();
        assert!(admits(&c, 19, 2, false));
        assert!(!admits(&c, 20, 2, false));
        assert!(admits(&c, 23, 2, true), "checkout has 20% headroom");
        assert!(!admits(&c, 24, 2, true));
        assert!(!admits(&c, 0, 0, true), "no node, no room");
        assert!(is_priority(&c, "/checkout/pay") && !is_priority(&c, "/catalog"));
        let off = ShedConfig {
            max_in_flight_per_node: 0,
            ..cfg()
        };
        assert!(admits(&off, u64::MAX - 1, 0, false));
    }
}
