//! Connection and request-rate limits, shared by every worker: a global cap on open
//! shopper connections, a per-client-address cap, and a per-address request rate.
//!
//! Per-address counts use `pingora-limits`' count-min sketches (`Inflight`, `Rate`):
//! fixed memory whatever the number of addresses, lock-free, and they can only
//! over-estimate, so a flood from many addresses cannot grow a map or make surge let
//! a heavy client through.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora_limits::inflight::{Guard, Inflight};
use pingora_limits::rate::Rate;

use crate::config::ProxyConfig;
use crate::pool::signal::client_key;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `proxy.max_connections` reached.
    Global,
    /// `proxy.max_connections_per_ip` reached for this address.
    PerIp,
    /// `proxy.max_new_connections_per_second_per_ip` reached for this address.
    ConnectionRate,
}

impl Refusal {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Global => "global",
            Refusal::PerIp => "per_ip",
            Refusal::ConnectionRate => "connection_rate",
        }
    }
}

/// The limits of one proxy (all listeners, all workers).
pub struct Limits {
    max_connections: usize,
    open: AtomicUsize,
    per_ip: Option<(Inflight, usize)>,
    rate: Option<(Rate, u32)>,
    /// New connections per second per client (IPv6: per /64) and the limit.
    new_connections: Option<(Rate, u32)>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("max_connections", &self.max_connections)
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Holds one connection's place in the counts; gives it back when dropped.
pub struct ConnPermit {
    limits: Arc<Limits>,
    _per_ip: Option<Guard>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether one more (the `count`-th, counting itself) is allowed under `limit`.
fn within(count: usize, limit: usize) -> bool {
    count <= limit
}

impl Limits {
    pub fn new(cfg: &ProxyConfig) -> Self {
        Self {
            max_connections: cfg.max_connections,
            open: AtomicUsize::new(0),
            per_ip: (cfg.max_connections_per_ip > 0)
                .then(|| (Inflight::new(), cfg.max_connections_per_ip)),
            rate: (cfg.requests_per_second_per_ip > 0).then(|| {
                (
                    Rate::new(Duration::from_secs(1)),
                    cfg.requests_per_second_per_ip,
                )
            }),
            new_connections: (cfg.max_new_connections_per_second_per_ip > 0).then(|| {
                (
                    Rate::new(Duration::from_secs(1)),
                    cfg.max_new_connections_per_second_per_ip,
                )
            }),
        }
    }

    /// Shopper connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a new connection from `ip`, or says why it must be refused. An IPv6 client
    /// counts by its /64: one subscriber or host usually holds a whole /64, and counting
    /// single addresses would let it open a limit's worth from each of 2^64.
    pub fn admit_connection(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refusal> {
        let ip = client_key(ip);
        if let Some((rate, limit)) = &self.new_connections {
            let this_second = rate.observe(&ip, 1);
            if !within(
                usize::try_from(this_second).unwrap_or(usize::MAX),
                *limit as usize,
            ) {
                return Err(Refusal::ConnectionRate);
            }
        }
        let now = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        if !within(now, self.max_connections) {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Global);
        }
        let per_ip = match &self.per_ip {
            Some((inflight, limit)) => {
                let (guard, count) = inflight.incr(ip, 1);
                if !within(usize::try_from(count).unwrap_or(usize::MAX), *limit) {
                    drop(guard);
                    self.open.fetch_sub(1, Ordering::Relaxed);
                    return Err(Refusal::PerIp);
                }
                Some(guard)
            }
            None => None,
        };
        Ok(ConnPermit {
            limits: self.clone(),
            _per_ip: per_ip,
        })
    }

    /// Counts one request from `ip` (IPv6: its /64); `false` when it is over its rate.
    pub fn allow_request(&self, ip: IpAddr) -> bool {
        match &self.rate {
            Some((rate, limit)) => {
                let in_this_second = rate.observe(&client_key(ip), 1);
                within(
                    usize::try_from(in_this_second).unwrap_or(usize::MAX),
                    *limit as usize,
                )
            }
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(global: usize, per_ip: usize, rps: u32) -> Arc<Limits> {
        let mut cfg = crate::config::Config::parse(
            crate::config::EMBEDDED_DEFAULT,
            std::path::Path::new("surge.toml"),
        )
        .expect("embedded config")
        .proxy;
        cfg.max_connections = global;
        cfg.max_connections_per_ip = per_ip;
        cfg.requests_per_second_per_ip = rps;
        Arc::new(Limits::new(&cfg))
    }

    #[test]
    fn connections_are_capped_globally_and_per_address_and_given_back() {
        let l = limits(3, 2, 0);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = l.admit_connection(a).expect("first");
        let a2 = l.admit_connection(a).expect("second");
        assert_eq!(l.admit_connection(a).err(), Some(Refusal::PerIp));
        let b1 = l.admit_connection(b).expect("other address");
        assert_eq!(l.admit_connection(b).err(), Some(Refusal::Global));
        assert_eq!(l.open(), 3);
        drop(a1);
        assert_eq!(l.open(), 2);
        let a3 = l.admit_connection(a).expect("room again after one closed");
        drop((a2, a3, b1));
        assert_eq!(l.open(), 0);
    }

    #[test]
    fn an_ipv6_client_counts_by_its_slash_64() {
        let l = limits(100, 2, 3);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let next_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _a = l.admit_connection(a).expect("first");
        let _b = l.admit_connection(same_64).expect("second");
        assert_eq!(l.admit_connection(a).err(), Some(Refusal::PerIp));
        assert_eq!(
            l.admit_connection("2001:db8:1:2:dead:beef::1".parse().unwrap())
                .err(),
            Some(Refusal::PerIp),
            "another address of the same /64 shares the limit"
        );
        let _c = l
            .admit_connection(next_64)
            .expect("another /64 has its own");
        let allowed = [a, same_64, a, same_64, a]
            .iter()
            .filter(|ip| l.allow_request(**ip))
            .count();
        assert_eq!(allowed, 3, "the request rate is per /64 too");
        assert!(l.allow_request(next_64));
    }

    #[test]
    fn the_request_rate_is_limited_per_address() {
        let l = limits(10, 0, 5);
        let a: IpAddr = [10, 0, 0, 1].into();
        let allowed = (0..8).filter(|_| l.allow_request(a)).count();
        assert_eq!(allowed, 5);
        assert!(l.allow_request([10, 0, 0, 2].into()), "others unaffected");
        let unlimited = limits(10, 0, 0);
        assert!((0..1000).all(|_| unlimited.allow_request(a)));
    }
}

/// A budget for request bodies held in memory across every connection of the process
/// (`proxy.max_buffered_body_bytes`): surge reads a body whole before forwarding it, so
/// without it many slow uploads at once could take all the memory there is.
#[derive(Debug)]
pub struct BodyBudget {
    limit: u64,
    used: AtomicU64,
    /// Woken whenever bytes are given back, while someone waits (the request path
    /// takes no lock otherwise).
    room: tokio::sync::Notify,
    waiting: AtomicUsize,
}

/// Bytes of the budget one request holds; given back when dropped.
#[derive(Debug)]
pub struct BodyReservation {
    budget: Arc<BodyBudget>,
    bytes: u64,
}

impl BodyBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
            room: tokio::sync::Notify::new(),
            waiting: AtomicUsize::new(0),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.limit)
            })
            .is_ok()
    }

    /// Takes `bytes`, waiting up to `wait` for room; `None` if there was none in time.
    pub async fn reserve(self: &Arc<Self>, bytes: u64, wait: Duration) -> Option<BodyReservation> {
        if self.try_take(bytes) {
            return Some(BodyReservation {
                budget: self.clone(),
                bytes,
            });
        }
        let until = tokio::time::Instant::now() + wait;
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let got = loop {
            let room = self.room.notified();
            let mut room = std::pin::pin!(room);
            room.as_mut().enable();
            if self.try_take(bytes) {
                break true;
            }
            if tokio::time::timeout_at(until, room).await.is_err() {
                break false;
            }
        };
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        got.then(|| BodyReservation {
            budget: self.clone(),
            bytes,
        })
    }
}

impl BodyReservation {
    /// Grows the reservation to `bytes` (a chunked body turned out larger than first
    /// reserved); `false` if the budget has no room for it now.
    pub fn grow_to(&mut self, bytes: u64) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        if self.budget.try_take(bytes - self.bytes) {
            self.bytes = bytes;
            true
        } else {
            false
        }
    }
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        if self.budget.waiting.load(Ordering::Acquire) > 0 {
            self.budget.room.notify_waiters();
        }
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[tokio::test]
    async fn the_budget_waits_briefly_then_refuses_and_gives_back_on_drop() {
        let b = BodyBudget::new(100);
        let first = b.reserve(60, Duration::ZERO).await.expect("room");
        assert!(b.reserve(50, Duration::from_millis(20)).await.is_none());
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.reserve(50, Duration::from_secs(5)).await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        assert!(waiter.await.unwrap(), "room given back wakes a waiter");
        let mut r = b.reserve(10, Duration::ZERO).await.expect("room");
        assert!(r.grow_to(40));
        assert!(!r.grow_to(101), "past the limit");
        assert!(r.grow_to(100), "up to the limit");
        drop(r);
        assert_eq!(b.used(), 0);
    }
}
