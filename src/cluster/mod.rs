//! Several surge instances in front of one shop, coordinated through etcd: every instance
//! serves every blade, exactly one (the leader) orders and releases.
//!
//! - **Leadership** is a key created under this process's lease in a transaction
//!   ([`keys::leader`]); it is held while the lease is renewed. Every write the leader
//!   makes for the autoscaler goes through [`Cluster::fenced_put`], a transaction that
//!   first checks the leadership key is still bound to this lease, so a leader that was
//!   paused past its lease (GC pause, SIGSTOP, partition) writes nothing after waking.
//!   The autoscaler fences its provider calls the same way ([`Cluster::fence`]).
//! - **Demand**: each instance publishes its meter [`Reading`] under a key bound to its
//!   lease; the leader sizes the pool from their sum ([`merge`]). A member that stops
//!   publishing drops out when its lease expires; a stale reading holds the size.
//! - **Operator intent** (drains, maintenance, removals, nodes added by hand, the pause)
//!   is written to etcd and watched by every instance ([`Intents`]): it reaches them all
//!   and survives restarts, reloads and upgrades.
//! - **Roles** ([`Roles`]): the leader publishes what it made of each provisioned node
//!   (serving, spare, draining), so that the other instances' pools follow its scale-up
//!   and scale-in.
//!
//! The types and pure functions here are always built; the etcd adapter only with the
//! `cluster` cargo feature (etcd-client needs `protoc` to build). Without it [`Cluster`]
//! is a type with no values: a standalone surge never has one.
//!
//! Owns: the etcd key layout, election, fencing, publishing and watching. Must not: know
//! the pool or decide scaling (`autoscale` asks who leads and what the cluster sees;
//! `serve` applies watched intent to the pool).

#[cfg(feature = "cluster")]
mod etcd;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[cfg(feature = "cluster")]
pub use etcd::Cluster;

/// What can go wrong talking to the cluster store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// etcd did not answer, or refused the call.
    #[error("etcd: {0}")]
    Store(String),
    /// The leadership key is no longer bound to this process's lease: another instance
    /// leads (or nobody does), and this one must not write.
    #[error("not the leader any more (leadership key gone or taken over): write refused")]
    Fenced,
    /// A record in etcd is not what surge writes.
    #[error("etcd key {key}: not a surge record: {reason}")]
    Corrupt { key: String, reason: String },
}

/// The key layout, under `/surge/<cluster name>/`.
pub mod keys {
    /// The leadership key: bound to the leader's lease.
    pub fn leader(prefix: &str) -> String {
        format!("{prefix}/leader")
    }
    /// Published readings, one per process: `members/<instance>/<lease>`.
    pub fn members(prefix: &str) -> String {
        format!("{prefix}/members/")
    }
    pub fn member(prefix: &str, instance: &str, lease: i64) -> String {
        format!("{prefix}/members/{instance}/{lease:016x}")
    }
    /// Operator intent: `intent/node/<id>`, `intent/static/<id>`, `intent/paused`.
    pub fn intents(prefix: &str) -> String {
        format!("{prefix}/intent/")
    }
    pub fn node_intent(prefix: &str, id: &str) -> String {
        format!("{prefix}/intent/node/{id}")
    }
    pub fn static_node(prefix: &str, id: &str) -> String {
        format!("{prefix}/intent/static/{id}")
    }
    pub fn paused(prefix: &str) -> String {
        format!("{prefix}/intent/paused")
    }
    /// The leader's order ledger (fenced writes only).
    pub fn ledger(prefix: &str) -> String {
        format!("{prefix}/autoscaler/ledger")
    }
    /// The leader's roles of provisioned nodes (fenced writes only).
    pub fn roles(prefix: &str) -> String {
        format!("{prefix}/autoscaler/roles")
    }
    /// A waiting-room ticket used to enter (on any instance), under a lease that ends
    /// after the ticket does: `tickets/<subject>`.
    pub fn ticket(prefix: &str, subject: &str) -> String {
        format!("{prefix}/tickets/{subject}")
    }
    /// The prefix of a cluster named `name`.
    pub fn prefix(name: &str) -> String {
        format!("/surge/{name}")
    }
}

/// A leadership term: this process's lease, and the revision its leadership key was
/// created at. A new term after a loss is a new value, so the autoscaler knows to take
/// over afresh (re-read the ledger and the roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    pub lease: i64,
    pub revision: i64,
}

/// One process's meter, as it publishes it every autoscaler tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub instance: String,
    pub pid: u32,
    /// When it was taken (Unix milliseconds, the publisher's clock).
    pub at_ms: u64,
    /// New connections per second (the scaling signal: first requests counted).
    pub connection_rate: f64,
    pub request_rate: f64,
    /// Requests in flight to in-service nodes.
    pub in_flight: u64,
    /// In-service nodes in this process's pool.
    pub in_service: usize,
    /// The latency histogram's counts over the meter window (bucket by bucket).
    pub latency: Vec<u64>,
    /// Whether the meter's window was full.
    pub fresh: bool,
    /// Provisioned nodes this process may still send work to, or has work in flight on:
    /// the leader releases none of them.
    #[serde(default)]
    pub busy: Vec<String>,
    /// This process's waiting line and new visitors (see `autoscale::policy::Line`).
    #[serde(default)]
    pub line: LineReading,
}

/// One process's waiting line and new visitors, summed by the leader: the line's length
/// is the cluster's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LineReading {
    /// Visitors waiting in line (door not held), plus requests waiting for room.
    pub waiting: u64,
    /// Visitors held in line by hand.
    pub held: u64,
    pub arrived_per_second: f64,
    pub let_in_per_second: f64,
    pub shed_per_second: f64,
    /// New visitors a node takes on per second, as this instance measured it.
    #[serde(default)]
    pub per_node: Option<f64>,
}

/// The cluster's demand: the sum of every member's reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Demand {
    pub connection_rate: f64,
    pub request_rate: f64,
    pub in_flight: u64,
    /// Summed latency histogram counts over the window.
    pub latency: Vec<u64>,
    /// Members whose readings were summed.
    pub members: usize,
    /// Whether every reading was fresh and recent: if not, the size must be held.
    pub fresh: bool,
    /// Members with a stale reading, in words (for the status page).
    pub stale: Vec<String>,
    /// Every member's line, summed.
    pub line: LineReading,
}

/// Sums `readings` taken by `now_ms`; a reading older than `max_age` (or not fresh)
/// makes the demand stale, and so does having none.
pub fn merge(readings: &[Reading], now_ms: u64, max_age: Duration) -> Demand {
    let mut d = Demand {
        fresh: !readings.is_empty(),
        ..Demand::default()
    };
    let max_age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    for r in readings {
        let age = now_ms.saturating_sub(r.at_ms);
        if !r.fresh || age > max_age_ms {
            d.fresh = false;
            d.stale.push(format!(
                "{} (pid {}): reading {} old{}",
                r.instance,
                r.pid,
                humantime::format_duration(Duration::from_millis(age)),
                if r.fresh {
                    ""
                } else {
                    ", meter window not full"
                }
            ));
        }
        d.members += 1;
        d.connection_rate += r.connection_rate;
        d.request_rate += r.request_rate;
        d.in_flight += r.in_flight;
        d.line.waiting += r.line.waiting;
        d.line.held += r.line.held;
        d.line.arrived_per_second += r.line.arrived_per_second;
        d.line.let_in_per_second += r.line.let_in_per_second;
        d.line.shed_per_second += r.line.shed_per_second;
        // Each instance sheds against the whole pool's slots as if alone: the lowest
        // estimate of what a node takes on is the one that does not overbook it.
        if let Some(p) = r.line.per_node {
            d.line.per_node = Some(d.line.per_node.map_or(p, |q| q.min(p)));
        }
        if d.latency.len() < r.latency.len() {
            d.latency.resize(r.latency.len(), 0);
        }
        for (sum, n) in d.latency.iter_mut().zip(&r.latency) {
            *sum += n;
        }
    }
    d
}

/// An operator's standing instruction for one node, applied by every instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeIntent {
    /// No new work; carts bound to it until `timeout`.
    Draining {
        #[serde(with = "humantime_serde")]
        timeout: Duration,
    },
    /// Out of rotation at once.
    Maintenance,
    /// Drained, then out of the pool (and its server released by the leader).
    Removed {
        #[serde(with = "humantime_serde")]
        timeout: Duration,
    },
    /// Taken back into service by an operator (an undrain): the autoscaler never drains
    /// it for scale-in again, and the leader's roles do not move it.
    Kept,
}

/// A node an operator added by hand (`POST /v1/nodes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticNode {
    pub address: SocketAddr,
    pub weight: u32,
}

/// Every instance's view of the operators' intent, as last read from etcd. Ordered maps:
/// instances apply them in the same order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Intents {
    pub nodes: BTreeMap<String, NodeIntent>,
    pub statics: BTreeMap<String, StaticNode>,
    /// The autoscaler's pause switch, if an operator set it through the cluster.
    pub paused: Option<bool>,
    /// Whether the view has been read from etcd at least once.
    pub loaded: bool,
}

impl Intents {
    /// Applies one record (`value` `None`: deleted) under the intent prefix; keys that
    /// are not surge's are an error, the rest of the view unchanged.
    pub fn apply(
        &mut self,
        prefix: &str,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), ClusterError> {
        let rest = key
            .strip_prefix(&keys::intents(prefix))
            .ok_or_else(|| corrupt(key, "outside the intent prefix"))?;
        if rest == "paused" {
            self.paused = match value {
                Some(v) => Some(parse(key, v)?),
                None => None,
            };
        } else if let Some(id) = rest.strip_prefix("node/") {
            match value {
                Some(v) => {
                    self.nodes.insert(id.to_owned(), parse(key, v)?);
                }
                None => {
                    self.nodes.remove(id);
                }
            }
        } else if let Some(id) = rest.strip_prefix("static/") {
            match value {
                Some(v) => {
                    self.statics.insert(id.to_owned(), parse(key, v)?);
                }
                None => {
                    self.statics.remove(id);
                }
            }
        } else {
            return Err(corrupt(key, "unknown intent key"));
        }
        Ok(())
    }
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(value).map_err(|e| corrupt(key, &e.to_string()))
}

fn corrupt(key: &str, reason: &str) -> ClusterError {
    ClusterError::Corrupt {
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

/// What the leader made of a provisioned node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// In service, or warming up toward it.
    Serving,
    /// A warm spare: no traffic.
    Standby,
    /// Being drained by the autoscaler, and why (its words: `scale_in`, `vanished`,
    /// `broken`).
    Draining,
}

/// One provisioned node in the leader's pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleEntry {
    pub id: String,
    pub address: SocketAddr,
    pub zone: String,
    pub device_id: String,
    pub role: Role,
    /// While draining: why (`scale_in`, `vanished`, `broken`), for a leader taking over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// The leader's provisioned nodes, published after every round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Roles {
    /// The instance that published it.
    pub leader: String,
    /// When (Unix milliseconds).
    pub at_ms: u64,
    pub nodes: Vec<RoleEntry>,
}

/// A member as `GET /v1/cluster` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub instance: String,
    pub lease: i64,
    pub reading: Option<Reading>,
}

/// The cluster as this process sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub name: String,
    pub instance: String,
    /// Who holds the leadership key (instance name), if anyone.
    pub leader: Option<String>,
    /// Whether this process leads.
    pub leading: bool,
    pub lease: Option<i64>,
    pub lease_ttl: Duration,
    /// Since the lease was last renewed.
    pub renewed_ago: Option<Duration>,
    pub members: Vec<Member>,
    /// The latest error talking to etcd, if the latest call failed.
    pub error: Option<String>,
}

/// Milliseconds since the Unix epoch of `t`.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Without the `cluster` feature: no value of this type exists, and every method is
/// unreachable, so callers need no feature gates of their own.
#[cfg(not(feature = "cluster"))]
#[derive(Debug)]
pub enum Cluster {}

#[cfg(not(feature = "cluster"))]
#[allow(clippy::unused_async)]
impl Cluster {
    pub fn instance(&self) -> &str {
        match *self {}
    }
    pub fn lease_ttl(&self) -> Duration {
        match *self {}
    }
    pub fn leading(&self) -> Option<Term> {
        match *self {}
    }
    pub async fn fence(&self, _term: Term) -> Result<(), ClusterError> {
        match *self {}
    }
    pub async fn fenced_put(
        &self,
        _term: Term,
        _puts: Vec<(String, Vec<u8>)>,
    ) -> Result<(), ClusterError> {
        match *self {}
    }
    pub async fn publish(&self, _reading: &Reading) -> Result<(), ClusterError> {
        match *self {}
    }
    pub async fn readings(&self) -> Result<Vec<Reading>, ClusterError> {
        match *self {}
    }
    pub async fn ledger(&self) -> Result<Option<Vec<u8>>, ClusterError> {
        match *self {}
    }
    pub async fn roles(&self) -> Result<Option<Roles>, ClusterError> {
        match *self {}
    }
    pub fn ledger_key(&self) -> String {
        match *self {}
    }
    pub fn roles_key(&self) -> String {
        match *self {}
    }
    pub fn intents(&self) -> tokio::sync::watch::Receiver<Intents> {
        match *self {}
    }
    pub async fn set_node_intent(
        &self,
        _id: &str,
        _intent: Option<NodeIntent>,
    ) -> Result<(), ClusterError> {
        match *self {}
    }
    pub async fn set_static(
        &self,
        _id: &str,
        _node: Option<StaticNode>,
    ) -> Result<(), ClusterError> {
        match *self {}
    }
    pub async fn set_paused(&self, _paused: bool) -> Result<(), ClusterError> {
        match *self {}
    }
    pub async fn view(&self) -> View {
        match *self {}
    }
    pub async fn leave(&self) {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(instance: &str, at_ms: u64, rate: f64, latency: Vec<u64>) -> Reading {
        Reading {
            instance: instance.into(),
            pid: 1,
            at_ms,
            connection_rate: rate,
            request_rate: rate * 2.0,
            in_flight: 3,
            in_service: 2,
            latency,
            fresh: true,
            busy: Vec::new(),
            line: LineReading::default(),
        }
    }

    #[test]
    fn demand_is_the_sum_and_stale_readings_hold() {
        let now = 100_000;
        let both = [
            reading("lb-1", now - 500, 100.0, vec![1, 2, 3]),
            reading("lb-2", now - 900, 50.0, vec![0, 1]),
        ];
        let d = merge(&both, now, Duration::from_secs(2));
        assert!(d.fresh);
        assert_eq!(d.members, 2);
        assert!((d.connection_rate - 150.0).abs() < 1e-9);
        assert!((d.request_rate - 300.0).abs() < 1e-9);
        assert_eq!(d.in_flight, 6);
        assert_eq!(d.latency, vec![1, 3, 3]);

        let old = [
            reading("lb-1", now - 500, 100.0, vec![]),
            reading("lb-2", now - 5_000, 50.0, vec![]),
        ];
        let d = merge(&old, now, Duration::from_secs(2));
        assert!(!d.fresh, "a reading 5 s old must hold the size");
        assert_eq!(d.stale.len(), 1);
        assert!(d.stale[0].starts_with("lb-2"), "{:?}", d.stale);

        let mut warming = reading("lb-1", now, 1.0, vec![]);
        warming.fresh = false;
        assert!(!merge(&[warming], now, Duration::from_secs(2)).fresh);
        assert!(
            !merge(&[], now, Duration::from_secs(2)).fresh,
            "no reading at all"
        );
    }

    #[test]
    fn intents_follow_puts_and_deletes_and_refuse_strangers() {
        let prefix = keys::prefix("shop");
        let mut i = Intents::default();
        let drain = serde_json::to_vec(&NodeIntent::Draining {
            timeout: Duration::from_secs(60),
        })
        .unwrap();
        i.apply(&prefix, &keys::node_intent(&prefix, "web-2"), Some(&drain))
            .unwrap();
        i.apply(&prefix, &keys::paused(&prefix), Some(b"true"))
            .unwrap();
        let node = serde_json::to_vec(&StaticNode {
            address: "127.0.0.1:81".parse().unwrap(),
            weight: 2,
        })
        .unwrap();
        i.apply(&prefix, &keys::static_node(&prefix, "web-9"), Some(&node))
            .unwrap();
        assert_eq!(
            i.nodes.get("web-2"),
            Some(&NodeIntent::Draining {
                timeout: Duration::from_secs(60)
            })
        );
        assert_eq!(i.paused, Some(true));
        assert_eq!(i.statics.get("web-9").map(|s| s.weight), Some(2));
        i.apply(&prefix, &keys::node_intent(&prefix, "web-2"), None)
            .unwrap();
        assert!(i.nodes.is_empty());
        let err = i
            .apply(&prefix, &format!("{prefix}/intent/other"), Some(b"1"))
            .unwrap_err();
        assert!(err.to_string().contains("unknown intent key"), "{err}");
        let err = i
            .apply(&prefix, &keys::node_intent(&prefix, "x"), Some(b"{"))
            .unwrap_err();
        assert!(matches!(err, ClusterError::Corrupt { .. }));
        assert_eq!(i.statics.len(), 1, "a bad record changes nothing else");
    }
}
