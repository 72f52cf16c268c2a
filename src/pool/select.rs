//! Selection: which backend gets a request. Pure functions over one table snapshot.
//!
//! Order of precedence for one request:
//! 1. the route cookie names a backend that still accepts bound requests (in service, or
//!    draining before its deadline) → that backend, so a cart never leaves the frontend
//!    that holds it;
//! 2. the request carries a cart cookie but no usable route → consistent hashing of the
//!    cart over in-service backends (pingora-ketama, nginx's ring), so every surge instance
//!    agrees and adding a backend moves only ~1/N of unbound carts;
//! 3. otherwise the pool's algorithm: power of two choices on peak-EWMA latency × in-flight
//!    (default) or smooth weighted round robin.
//!
//! A request being retried names the backend to avoid; every step skips it. Every step
//! also skips a backend at the per-node ceiling (`pool.node_max_in_flight`), so one
//! client pinning itself (by a cart cookie it chose) cannot pile requests onto one blade;
//! a cart *bound* to a backend at its ceiling is not moved (the blade holds the cart),
//! the request is refused for a moment instead ([`NoPick::BoundNodeFull`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pingora_ketama::{Bucket, Continuum};

use super::{Backend, Member, PoolSettings, State, Table};
use crate::config::Algorithm;

/// What the proxy knows about a request when it asks for a backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pick<'a> {
    /// Value of the cart cookie, when the request has one.
    pub sticky_key: Option<&'a [u8]>,
    /// Value of the route cookie: the id of the backend the cart is bound to.
    pub route: Option<&'a str>,
    /// A backend that just failed this request; a retry must go elsewhere.
    pub avoid: Option<&'a Backend>,
    /// When the request arrived, in nanoseconds since the pool's epoch
    /// ([`super::nanos_since_epoch`]): latency estimates decay up to this instant and a
    /// draining backend's deadline is checked against it. The proxy already reads the
    /// clock per request, so selection never reads it again.
    pub now_ns: u64,
}

/// Why no backend was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPick {
    /// No backend can take a new request (none in service, or all at their ceiling).
    Nothing,
    /// The backend holding the request's cart is at its in-flight ceiling.
    BoundNodeFull,
}

/// Longest sequence smooth weighted round robin precomputes; larger weight sums are scaled
/// down, which keeps publishing cheap at the cost of weight precision.
const MAX_RR_SEQUENCE: u64 = 16_384;

/// How many ring points to walk past avoided backends before giving up on the ring.
const RING_PROBES: usize = 64;

/// Per-snapshot selection structures, built once when a table is published.
#[derive(Debug, Default)]
pub struct Selector {
    /// Indices (into the members) of backends taking new requests.
    eligible: Vec<u32>,
    /// Effective weight of each `eligible` entry (slow start applied).
    weights: Vec<u32>,
    /// Smooth-weighted-round-robin order of member indices (round-robin pools only).
    rr: Vec<u32>,
    /// Consistent-hash ring over in-service backends (sticky pools only).
    ring: Option<Ring>,
    /// Requests one backend may have in flight before it is skipped; 0: no ceiling.
    ceiling: u32,
}

struct Ring {
    /// Shared with the previous table when the in-service set did not change: building a
    /// ring of 1,024 backends costs milliseconds, a publish should not.
    continuum: Arc<(Vec<SocketAddr>, Continuum)>,
    /// Member index of each address on the ring, for this snapshot.
    by_addr: HashMap<SocketAddr, u32>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("backends", &self.continuum.0.len())
            .finish()
    }
}

impl Selector {
    pub(super) fn build(
        members: &[Member],
        weights: &[u32],
        settings: &PoolSettings,
        previous: Option<&Selector>,
    ) -> Self {
        let mut eligible = Vec::new();
        let mut eligible_weights = Vec::new();
        for (i, (m, &w)) in members.iter().zip(weights).enumerate() {
            if m.state == State::InService && w > 0 {
                eligible.push(i as u32);
                eligible_weights.push(w);
            }
        }
        let rr = match settings.algorithm {
            Algorithm::RoundRobin => smooth_wrr_sequence(&eligible, &eligible_weights),
            Algorithm::P2cEwma => Vec::new(),
        };
        let ring = settings.sticky.as_ref().map(|_| {
            let mut addrs: Vec<SocketAddr> = eligible
                .iter()
                .map(|&i| members[i as usize].backend.addr)
                .collect();
            addrs.sort_unstable();
            let continuum = match previous.and_then(|p| p.ring.as_ref()) {
                Some(prev) if prev.continuum.0 == addrs => prev.continuum.clone(),
                _ => {
                    // Equal weights on the ring: it only places unbound carts, and 160
                    // points per backend keep the spread within a few percent.
                    let buckets: Vec<Bucket> = addrs.iter().map(|&a| Bucket::new(a, 1)).collect();
                    Arc::new((addrs, Continuum::new(&buckets)))
                }
            };
            let by_addr = eligible
                .iter()
                .map(|&i| (members[i as usize].backend.addr, i))
                .collect();
            Ring { continuum, by_addr }
        });
        Self {
            eligible,
            weights: eligible_weights,
            rr,
            ring,
            ceiling: settings.node_max_in_flight,
        }
    }

    /// Number of backends taking new requests.
    pub fn eligible_len(&self) -> usize {
        self.eligible.len()
    }
}

/// Picks a member index for `req` from `table`, or says why nothing can take it.
pub fn pick(table: &Table, req: &Pick<'_>, rr_cursor: &AtomicUsize) -> Result<usize, NoPick> {
    let members = table.members();
    let sel = &table.select;
    let full = |i: usize| sel.ceiling != 0 && members[i].backend.in_flight() >= sel.ceiling;
    let skip = |i: usize| {
        req.avoid
            .is_some_and(|a| std::ptr::eq(a, Arc::as_ptr(&members[i].backend)))
            || full(i)
    };
    if let Some(route) = req.route {
        if let Some(&i) = table.by_id.get(route) {
            if members[i].accepts_bound(req.now_ns) {
                if !skip(i) {
                    return Ok(i);
                }
                if full(i) {
                    return Err(NoPick::BoundNodeFull);
                }
            }
        }
    }
    if let (Some(key), Some(ring)) = (req.sticky_key, &sel.ring) {
        let found = ring
            .continuum
            .1
            .node_iter(key)
            .take(RING_PROBES)
            .filter_map(|addr| ring.by_addr.get(addr))
            .map(|&i| i as usize)
            .find(|&i| !skip(i));
        if let Some(i) = found {
            return Ok(i);
        }
    }
    let picked = if sel.rr.is_empty() {
        p2c(members, sel, req.now_ns, skip)
    } else {
        round_robin(sel, rr_cursor, skip)
    };
    match picked {
        Some(i) if !skip(i) => Ok(i),
        // Both choices (or every probe) skipped: any backend that can take it.
        _ => sel
            .eligible
            .iter()
            .map(|&i| i as usize)
            .find(|&i| !skip(i))
            .ok_or(NoPick::Nothing),
    }
}

/// Power of two random choices: of two distinct random backends, the one with the lower
/// cost `(in_flight + 1) × latency / weight`. Cheaper than least-loaded over all backends
/// and immune to the herding a global minimum causes. A backend with no latency sample yet
/// is assumed as fast as the other, so in-flight decides: neither shunned nor flooded.
fn p2c(
    members: &[Member],
    sel: &Selector,
    now_ns: u64,
    avoided: impl Fn(usize) -> bool,
) -> Option<usize> {
    let n = sel.eligible.len();
    match n {
        0 => None,
        1 => {
            let i = sel.eligible[0] as usize;
            (!avoided(i)).then_some(i)
        }
        _ => {
            // Two distinct indices from one random draw (Lemire's multiply-shift, no modulo).
            let r = fastrand::u64(..);
            let a = (((r & 0xffff_ffff) * n as u64) >> 32) as usize;
            let mut b = (((r >> 32) * (n as u64 - 1)) >> 32) as usize;
            if b >= a {
                b += 1;
            }
            let (ia, ib) = (sel.eligible[a] as usize, sel.eligible[b] as usize);
            match (avoided(ia), avoided(ib)) {
                (true, _) => return Some(ib),
                (_, true) => return Some(ia),
                _ => {}
            }
            let (ba, bb) = (&members[ia].backend, &members[ib].backend);
            let (mut la, mut lb) = (ba.latency.at(now_ns), bb.latency.at(now_ns));
            if la == 0.0 || lb == 0.0 {
                // One or both unmeasured: compare on load alone.
                (la, lb) = (la.max(lb).max(1.0), la.max(lb).max(1.0));
            }
            let cost_a = (f64::from(ba.in_flight()) + 1.0) * la;
            let cost_b = (f64::from(bb.in_flight()) + 1.0) * lb;
            // cost_a / w_a <= cost_b / w_b, without dividing.
            let (wa, wb) = (f64::from(sel.weights[a]), f64::from(sel.weights[b]));
            if cost_a * wb <= cost_b * wa {
                Some(ia)
            } else {
                Some(ib)
            }
        }
    }
}

fn round_robin(
    sel: &Selector,
    cursor: &AtomicUsize,
    avoided: impl Fn(usize) -> bool,
) -> Option<usize> {
    let len = sel.rr.len();
    let start = cursor.fetch_add(1, Ordering::Relaxed);
    (0..len.min(RING_PROBES))
        .map(|k| sel.rr[(start + k) % len] as usize)
        .find(|&i| !avoided(i))
}

/// nginx's smooth weighted round robin, unrolled into one period: each backend appears
/// `weight` times, spread out rather than in bursts (weights 5,1,1 give a a b a c a a).
pub fn smooth_wrr_sequence(ids: &[u32], weights: &[u32]) -> Vec<u32> {
    if ids.is_empty() {
        return Vec::new();
    }
    let gcd = weights.iter().copied().fold(0, gcd);
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x / gcd.max(1))).collect();
    let sum: u64 = w.iter().sum();
    if sum > MAX_RR_SEQUENCE {
        for x in &mut w {
            *x = (*x * MAX_RR_SEQUENCE / sum).max(1);
        }
    }
    let total: i64 = w.iter().map(|&x| x as i64).sum();
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for k in 0..current.len() {
            current[k] += w[k] as i64;
            // Strictly greater: ties go to the first backend, as in nginx.
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        seq.push(ids[best]);
    }
    seq
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_wrr_matches_nginx_order() {
        let seq = smooth_wrr_sequence(&[0, 1, 2], &[5, 1, 1]);
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn smooth_wrr_reduces_by_gcd_and_keeps_ratios() {
        let seq = smooth_wrr_sequence(&[7, 9], &[200, 400]);
        assert_eq!(seq.len(), 3);
        assert_eq!(seq.iter().filter(|&&i| i == 9).count(), 2);
    }

    #[test]
    fn smooth_wrr_caps_long_sequences() {
        let ids: Vec<u32> = (0..100).collect();
        let weights: Vec<u32> = (0..100).map(|i| 1000 - i).collect();
        let seq = smooth_wrr_sequence(&ids, &weights);
        assert!(seq.len() as u64 <= MAX_RR_SEQUENCE + 100);
        assert!(ids.iter().all(|i| seq.contains(i)));
    }
}
