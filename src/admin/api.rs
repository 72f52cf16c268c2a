//! The admin API's JSON documents, as serde types shared by the server (which writes
//! them), [`super::client`] (which reads them) and the tests that walk the OpenAPI
//! document. One definition per shape, so the three cannot drift apart.

use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::autoscale;
use crate::pool::{Member, Origin, State};

/// `{"error": kind, "detail": text}`: every refusal and failure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable kind: `not_found`, `conflict`, `unauthorized`...
    pub error: String,
    /// What happened, in words for the operator.
    pub detail: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Alive {
    pub status: String,
}

/// `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    pub ready: bool,
    pub proxy_listening: bool,
    pub in_service: usize,
}

/// One node: `GET /v1/nodes/{id}` and the answers of every node action.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    /// `IP:port` the node is reached at.
    pub address: String,
    /// `warming`, `in_service`, `draining`, `down`, `maint` or `standby`.
    pub state: String,
    pub weight: u32,
    /// Requests on the node right now.
    pub in_flight: u32,
    /// Requests ever sent to it.
    pub requests: u64,
    /// Requests that ended in a connect error, timeout or 5xx.
    pub failures: u64,
    /// `failures / requests` (0 without requests).
    pub error_rate: f64,
    /// Peak-EWMA response-head latency, milliseconds.
    pub latency_ewma_ms: f64,
    pub health: Health,
    /// While draining: when bound carts stop reaching it (RFC 3339).
    pub drain_deadline: Option<String>,
    /// While draining: whether the drain is over (nothing in flight, or deadline passed).
    pub drain_done: Option<bool>,
    /// `static`, `local` or `provisioned`.
    pub origin: String,
}

/// Active health-check streaks of a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
}

impl Node {
    /// The node as the API shows it at `now`.
    pub fn of(m: &Member, now: Instant) -> Self {
        let b = &m.backend;
        let requests = b.requests();
        let (ok_probes, failed_probes) = b.probe_streak();
        let drain_deadline = m.drain_deadline.map(|d| {
            let wall = SystemTime::now() + d.saturating_duration_since(now);
            humantime::format_rfc3339_seconds(wall).to_string()
        });
        Self {
            id: b.id.to_string(),
            address: b.addr.to_string(),
            state: m.state.as_str().to_owned(),
            weight: b.weight,
            in_flight: b.in_flight(),
            requests,
            failures: b.failures(),
            error_rate: if requests == 0 {
                0.0
            } else {
                b.failures() as f64 / requests as f64
            },
            latency_ewma_ms: b.latency.get_ns() / 1e6,
            health: Health {
                consecutive_successes: ok_probes,
                consecutive_failures: failed_probes,
            },
            drain_deadline,
            drain_done: (m.state == State::Draining).then(|| m.drain_is_over(now)),
            origin: match b.origin {
                Origin::Static => "static",
                Origin::Local => "local",
                Origin::Provisioned => "provisioned",
            }
            .to_owned(),
        }
    }
}

/// `POST /v1/session`: the admin token, traded for the status page's session cookie.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    pub token: String,
}

/// `POST /v1/nodes/{id}/drain` (every field optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Deadline for bound carts, like `"300s"`; `admin.default_drain_timeout` if absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Drain even if fewer than `admin.min_in_service` nodes would stay in service.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/nodes`: a static node to add.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewNode {
    /// Defaults to one made from the address.
    #[serde(default)]
    pub id: Option<String>,
    /// `IP:port`.
    pub address: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// `GET /v1/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeList {
    pub pool: String,
    /// The table snapshot's generation (grows with every change).
    pub generation: u64,
    pub nodes: Vec<Node>,
}

/// `POST /v1/config/reload` and `POST /v1/upgrade` when a new process serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandedOver {
    pub result: String,
}

/// `POST /v1/tls/reload`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsReload {
    /// Whether every listener took its new certificates.
    pub reloaded: bool,
    pub listeners: Vec<ListenerReload>,
}

/// One TLS listener's reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerReload {
    pub listener: String,
    pub ok: bool,
    /// What was loaded, or why it was refused (file and reason).
    pub detail: String,
}

/// `GET /v1/autoscaler`: desired and actual size, what the meter saw, recent decisions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoscalerStatus {
    pub paused: bool,
    /// In-service nodes the policy wants.
    pub desired: usize,
    /// A scheduled event raising the minimum now.
    pub scheduled_min: Option<ScheduledMin>,
    pub in_service: usize,
    /// Servers ordered or delivered, not yet in service.
    pub ordered: usize,
    pub standby: usize,
    pub draining: usize,
    /// Servers the provider runs for this pool.
    pub provider_servers: usize,
    pub observations: Option<Observed>,
    /// Problems met in the last round, in words.
    pub errors: Vec<String>,
    /// Things an operator should know from the last round (servers missing from a
    /// listing, spares kept until their paid hour ends...).
    pub notes: Vec<String>,
    /// Why orders are held back, when the budget does it (shedding takes over).
    pub budget_reached: Option<String>,
    /// Set while bootstraps keep failing and orders are stopped: why, with the last
    /// health-check error.
    pub bootstrap_alarm: Option<String>,
    /// What the servers cost, in the offer's currency.
    pub cost: CostView,
    /// Orders not yet seen in the provider's inventory (counted as on their way).
    pub orders_on_the_way: Vec<OrderView>,
    /// Servers released before they ever served, since start (failed deliveries, nodes
    /// removed by an operator first; never an order cancelled because the count fell).
    #[serde(default)]
    pub released_unserved: u64,
    /// Servers with a `surge-pool` tag this surge does not manage (other pool names,
    /// zones not ordered from): still billed, never released by surge.
    pub unmanaged: Vec<UnmanagedView>,
    /// Newest first.
    pub decisions: Vec<DecisionView>,
}

/// The cost of the provisioned servers (Elastic Metal bills by started hour).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostView {
    /// Servers ordered and not released.
    pub servers: usize,
    /// Their hourly prices added up.
    pub per_hour: f64,
    /// Spent since this process started.
    pub since_start: f64,
    /// Spent since midnight in `autoscale.budget.timezone`.
    pub today: f64,
}

/// A server surge sees but does not manage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnmanagedView {
    pub zone: String,
    pub device_id: String,
    pub name: String,
    pub pool_tag: String,
    pub why: String,
}

/// One order of the ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderView {
    /// Its `surge-request` tag.
    pub request_id: String,
    pub zone: String,
    /// RFC 3339.
    pub placed_at: String,
    pub device_id: Option<String>,
    /// Why it was ordered.
    pub reason: String,
}

/// The minimum a scheduled event imposes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduledMin {
    pub min: usize,
    pub event: String,
}

/// What the meter saw in the last round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Observed {
    pub connections_per_second: f64,
    pub requests_per_second: f64,
    pub in_flight_per_node: f64,
    pub p99_ms: Option<f64>,
    /// Whether the figures are recent and complete (stale ones scale nothing).
    pub fresh: bool,
    /// New connections counted for scaling since start (the per-client share capped).
    #[serde(default)]
    pub connections_counted: u64,
    /// Visitors waiting in line (or requests waiting for room) now.
    #[serde(default)]
    pub waiting: u64,
    /// New visitors per second, and those the pool took on, over the short window.
    #[serde(default)]
    pub arrived_per_second: f64,
    #[serde(default)]
    pub let_in_per_second: f64,
}

/// One decision that changed the desired or current size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecisionView {
    /// RFC 3339.
    pub at: String,
    pub current: usize,
    pub desired: usize,
    /// `up`, `down` or `hold`.
    pub direction: String,
    /// Why, in words.
    pub reasons: Vec<String>,
}

/// `GET /v1/autoscaler/history`: the autoscaler's counts once a second over the last
/// ten minutes, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoscalerHistory {
    pub samples: Vec<HistorySample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistorySample {
    /// RFC 3339, UTC, milliseconds.
    pub at: String,
    pub desired: usize,
    pub in_service: usize,
    pub ordered: usize,
}

impl AutoscalerHistory {
    pub fn of(shared: &autoscale::Shared) -> Self {
        Self {
            samples: shared
                .status()
                .samples
                .iter()
                .map(|s| HistorySample {
                    at: humantime::format_rfc3339_millis(s.at).to_string(),
                    desired: s.desired,
                    in_service: s.in_service,
                    ordered: s.ordered,
                })
                .collect(),
        }
    }
}

impl AutoscalerStatus {
    /// The document for the running autoscaler's current status.
    pub fn of(shared: &autoscale::Shared, pool: &crate::pool::Pool) -> Self {
        let s = shared.status();
        let counted = pool
            .traffic
            .scaling
            .counted
            .load(std::sync::atomic::Ordering::Relaxed);
        Self {
            paused: shared.is_paused(),
            desired: s.desired,
            scheduled_min: s.scheduled.map(|(min, event)| ScheduledMin { min, event }),
            in_service: s.report.in_service,
            ordered: s.report.pending,
            standby: s.report.standby,
            draining: s.report.draining,
            provider_servers: s.report.devices,
            observations: s.observations.map(|o| Observed {
                connections_per_second: o.connection_rate,
                requests_per_second: o.request_rate,
                in_flight_per_node: o.in_flight_per_node,
                p99_ms: o.p99.map(crate::telemetry::millis),
                fresh: o.fresh,
                connections_counted: counted,
                waiting: o.line.waiting + o.line.held,
                arrived_per_second: o.line.arrived_per_second,
                let_in_per_second: o.line.let_in_per_second,
            }),
            errors: s.report.errors.iter().map(ToString::to_string).collect(),
            notes: s.report.notes,
            budget_reached: s.report.budget_reached,
            bootstrap_alarm: s.report.bootstrap_alarm,
            cost: CostView {
                servers: s.cost.servers,
                per_hour: s.cost.per_hour,
                since_start: s.cost.since_start,
                today: s.cost.today,
            },
            released_unserved: s.report.released_unserved,
            orders_on_the_way: s
                .report
                .orders
                .iter()
                .filter(|o| o.in_flight())
                .map(|o| OrderView {
                    request_id: o.request_id.clone(),
                    zone: o.zone.clone(),
                    placed_at: humantime::format_rfc3339_seconds(o.placed_at).to_string(),
                    device_id: o.device_id.clone(),
                    reason: o.reason.clone(),
                })
                .collect(),
            unmanaged: s
                .report
                .unmanaged
                .iter()
                .map(|u| UnmanagedView {
                    zone: u.zone.clone(),
                    device_id: u.device_id.clone(),
                    name: u.name.clone(),
                    pool_tag: u.pool_tag.clone(),
                    why: u.why.clone(),
                })
                .collect(),
            decisions: s
                .decisions
                .iter()
                .rev()
                .map(|(at, d)| DecisionView {
                    at: humantime::format_rfc3339_seconds(*at).to_string(),
                    current: d.current,
                    desired: d.desired,
                    direction: d.direction().to_owned(),
                    reasons: d.reasons.iter().map(ToString::to_string).collect(),
                })
                .collect(),
        }
    }
}

/// `GET /v1/cluster`: who leads, the members and their latest readings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    /// The cluster's name (`cluster.name`).
    pub name: String,
    /// This instance.
    pub instance: String,
    /// Who holds the leadership key, if anyone.
    pub leader: Option<String>,
    /// Whether this process leads (orders and releases).
    pub leading: bool,
    /// This process's lease (hex), if it has one.
    pub lease: Option<String>,
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Since this process's lease was last renewed.
    #[serde(default, with = "humantime_serde")]
    pub renewed_ago: Option<Duration>,
    pub members: Vec<ClusterMember>,
    /// The latest error talking to etcd, if the latest call failed.
    pub error: Option<String>,
}

/// One process of the cluster and its latest published reading.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterMember {
    pub instance: String,
    pub pid: Option<u32>,
    pub lease: String,
    /// Age of its latest reading.
    #[serde(default, with = "humantime_serde")]
    pub reading_age: Option<Duration>,
    pub connection_rate: Option<f64>,
    pub request_rate: Option<f64>,
    pub in_flight: Option<u64>,
    pub in_service: Option<usize>,
}

impl ClusterView {
    pub fn of(v: &crate::cluster::View) -> Self {
        let now = crate::cluster::unix_ms(SystemTime::now());
        Self {
            name: v.name.clone(),
            instance: v.instance.clone(),
            leader: v.leader.clone(),
            leading: v.leading,
            lease: v.lease.map(|l| format!("{l:x}")),
            lease_ttl: v.lease_ttl,
            renewed_ago: v.renewed_ago,
            members: v
                .members
                .iter()
                .map(|m| ClusterMember {
                    instance: m.instance.clone(),
                    pid: m.reading.as_ref().map(|r| r.pid),
                    lease: format!("{:x}", m.lease),
                    reading_age: m
                        .reading
                        .as_ref()
                        .map(|r| Duration::from_millis(now.saturating_sub(r.at_ms))),
                    connection_rate: m.reading.as_ref().map(|r| r.connection_rate),
                    request_rate: m.reading.as_ref().map(|r| r.request_rate),
                    in_flight: m.reading.as_ref().map(|r| r.in_flight),
                    in_service: m.reading.as_ref().map(|r| r.in_service),
                })
                .collect(),
            error: v.error.clone(),
        }
    }
}

/// `GET /v1/waiting-room`: the line of new visitors held while the shop is full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitingRoom {
    /// The door held by hand (a pre-queue): nobody new is let in.
    pub held: bool,
    /// Visitors waiting now.
    pub queued: usize,
    /// Visitors let in per second over the last minute.
    pub admitted_per_second: f64,
    /// How long the first in line has waited, in seconds.
    pub longest_wait_seconds: f64,
}

impl WaitingRoom {
    pub fn of(room: &crate::pool::waiting::Room) -> Self {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let s = room.status(now_ms);
        Self {
            held: s.held_by_hand,
            queued: s.queued,
            admitted_per_second: s.admitted_per_second,
            longest_wait_seconds: s.longest_wait.as_secs_f64(),
        }
    }
}
