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

/// Who a request comes from, for admission: when the shop is full, newcomers wait (or
/// are turned away) first, shoppers already in keep being served, and cart and checkout
/// have headroom beyond that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// No cart, no admission cookie: a new visitor.
    Newcomer,
    /// A shopper already in: a cart cookie, or the admission cookie surge set.
    Admitted,
    /// A cart or checkout path.
    Priority,
}

impl Class {
    pub fn label(self) -> &'static str {
        match self {
            Class::Newcomer => "newcomer",
            Class::Admitted => "admitted",
            Class::Priority => "priority",
        }
    }
}

/// Whether one more request of `class` fits: `in_flight` admitted requests on
/// `in_service` nodes. Newcomers fit below the limit less `admitted_reserve_percent`,
/// shoppers already in up to the limit, priority paths up to the limit plus headroom.
pub fn admits(cfg: &ShedConfig, in_flight: u64, in_service: usize, class: Class) -> bool {
    cfg.max_in_flight_per_node == 0 || in_flight < capacity(cfg, in_service, class)
}

/// Requests of `class` that fit on `in_service` nodes (with shedding on).
pub fn capacity(cfg: &ShedConfig, in_service: usize, class: Class) -> u64 {
    let limit = in_service as u64 * u64::from(cfg.max_in_flight_per_node);
    match class {
        Class::Newcomer => limit - limit * u64::from(cfg.admitted_reserve_percent.min(100)) / 100,
        Class::Admitted => limit,
        Class::Priority => limit + limit * u64::from(cfg.priority_headroom_percent) / 100,
    }
}

/// Whether `path` is a priority path: one of the prefixes, matched on whole path
/// segments after percent-decoding and dot-segment removal (RFC 3986 §5.2.4), so that
/// `/cartoon` or `/checkout/../catalog` cannot claim checkout's headroom.
pub fn is_priority(cfg: &ShedConfig, path: &str) -> bool {
    if cfg.priority_prefixes.is_empty() {
        return false;
    }
    let path = normalized(path);
    cfg.priority_prefixes.iter().any(|prefix| {
        let prefix = prefix.trim_end_matches('/');
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// The value of one hexadecimal digit.
fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// `path` percent-decoded (bytes that are not UTF-8 stay encoded) with `.` and `..`
/// segments removed.
fn normalized(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                decoded.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let text = String::from_utf8(decoded).unwrap_or_else(|_| path.to_owned());
    let mut out: Vec<&str> = Vec::new();
    for segment in text.split('/').skip(1) {
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
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
    /// New visitors let straight into the shop (no place in line needed): with the
    /// room's let-ins, the sessions the pool took on.
    pub newcomers_in: AtomicU64,
    /// New visitors turned away without a place in line (no waiting room, or not a page
    /// load): with the room's fresh places and `newcomers_in`, the sessions that came.
    pub newcomers_turned_away: AtomicU64,
    /// Woken once per request that ends while others wait for room.
    pub room: Notify,
}

/// Counts one request as waiting for room while it lives: however the wait ends
/// (admitted, shed, or the request dropped, say an HTTP/2 stream reset), the count goes
/// back down.
#[derive(Debug)]
pub struct Waiting<'a>(&'a Admission);

impl<'a> Waiting<'a> {
    /// Counts one more waiting request; also returns how many waited before it.
    pub fn start(admission: &'a Admission) -> (Self, u64) {
        let before = admission.waiting.fetch_add(1, Ordering::SeqCst);
        (Self(admission), before)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
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
            admitted_queue_timeout: Duration::from_millis(100),
            queue_size: 100,
            priority_prefixes: vec!["/checkout".into(), "/cart".into()],
            priority_headroom_percent: 20,
            admitted_reserve_percent: 25,
            admission_cookie: "surge_admit".into(),
            session_duration: Duration::from_secs(1800),
        }
    }

    #[test]
    fn priority_paths_are_whole_segments_after_normalization() {
        let c = cfg();
        for yes in [
            "/checkout",
            "/checkout/pay",
            "/cart",
            "/cart/",
            "/catalog/../cart/add",
            "/%63art/x",
            "/./checkout",
        ] {
            assert!(is_priority(&c, yes), "{yes}");
        }
        for no in [
            "/cartoon",
            "/checkout/../catalog",
            "/catalog",
            "/",
            "/checkoutx",
            "/%2e%2e/catalog",
        ] {
            assert!(!is_priority(&c, no), "{no}");
        }
    }

    #[test]
    fn a_wait_that_ends_any_way_is_uncounted() {
        let a = Admission::default();
        {
            let (_w1, before) = Waiting::start(&a);
            assert_eq!(before, 0);
            let (_w2, before) = Waiting::start(&a);
            assert_eq!(before, 1);
            assert_eq!(a.waiting.load(Ordering::SeqCst), 2);
        }
        // Both dropped without being admitted (a reset stream): nothing leaks.
        assert_eq!(a.waiting.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn newcomers_wait_first_then_browsing_then_buying() {
        let c = cfg();
        // Two nodes of 10: newcomers below 15 (25% kept for shoppers already in).
        assert!(admits(&c, 14, 2, Class::Newcomer));
        assert!(!admits(&c, 15, 2, Class::Newcomer));
        assert!(admits(&c, 19, 2, Class::Admitted));
        assert!(!admits(&c, 20, 2, Class::Admitted));
        assert!(
            admits(&c, 23, 2, Class::Priority),
            "checkout has 20% headroom"
        );
        assert!(!admits(&c, 24, 2, Class::Priority));
        assert!(!admits(&c, 0, 0, Class::Priority), "no node, no room");
        assert!(is_priority(&c, "/checkout/pay") && !is_priority(&c, "/catalog"));
        let off = ShedConfig {
            max_in_flight_per_node: 0,
            ..cfg()
        };
        assert!(admits(&off, u64::MAX - 1, 0, Class::Newcomer));
    }
}
