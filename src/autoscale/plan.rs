//! What the reconciler should do this round: a pure function of what it observed (the
//! provider's inventory per zone, with completeness, and direct look-ups of servers the
//! inventory no longer shows), the pool, the order ledger, its own memory, the desired
//! size and the time. No runtime, no provider, no clock: table tests feed inputs and check
//! the actions.
//!
//! The accountant's rules, each a place below:
//! - a server leaves the pool only when confirmed gone (a direct look-up says so) or when
//!   missing from `missing_limit` consecutive complete listings, and even then it is
//!   drained, never dropped;
//! - an order counts as supply from before it is sent until its server is seen (or its
//!   deadline passes and a last look-up by its request tag finds nothing);
//! - orders stop at the budget, with the reason said;
//! - scale-in drains the node whose paid hour ends soonest, and a drained or spare node is
//!   released only within `release_margin` of the end of its paid hour (Elastic Metal
//!   bills by started hour: releasing earlier saves nothing and costs a new order's lead
//!   time if the load comes back); until then it waits as a spare;
//! - an operator's undrain or maintenance takes a node out of scale-in for good;
//! - an order on its way is never cancelled: delivered, it is a spare like any other.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use super::ledger::{Order, OrderState};
use crate::pool::{Origin, State};
use crate::provider::{Device, DeviceState, REQUEST_TAG};

/// Most servers ordered in one round; a spike orders over a few rounds, not all at once.
pub const MAX_ORDERS_PER_ROUND: usize = 8;

/// One hour of Elastic Metal billing.
const BILLING_HOUR: Duration = Duration::from_secs(3600);

/// The provider's inventory in one zone, as one round listed it.
#[derive(Debug, Clone, Default)]
pub struct ZoneListing {
    pub zone: String,
    /// Servers carrying the pool's tag, deduplicated by id.
    pub devices: Vec<Device>,
    /// Whether the listing can be trusted to hold every server: it answered, every page
    /// came, and `total_count` held still between pages.
    pub complete: bool,
}

/// A direct look-up of a server a complete listing did not show.
#[derive(Debug, Clone, PartialEq)]
pub enum LookUp {
    /// The server exists: the listing was wrong.
    Present(Device),
    /// 404, or a deleting/gone state: the server is really gone.
    Gone,
    /// The look-up failed; nothing is known.
    Unknown,
}

/// One pool member, as the plan needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: String,
    pub state: State,
    pub origin: Origin,
    /// How long it has been in `state`.
    pub in_state_for: Duration,
    /// While draining: whether the drain is over.
    pub drain_done: bool,
    /// Whether its latest health checks passed (for spares, which health never moves).
    pub healthy: bool,
    /// Why its latest failed health check failed.
    pub last_probe_error: Option<String>,
}

/// A provisioned node surge knows the server of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub zone: String,
    pub device_id: String,
}

/// Why the reconciler drains a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainWhy {
    /// Scale-in: release (or park) it once drained.
    ScaleIn,
    /// Its server is gone at the provider: remove it from the pool once drained.
    Vanished,
    /// Its server failed at the provider: release it once drained.
    Broken,
}

/// A release asked of the provider and not confirmed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Releasing {
    pub zone: String,
    /// Failed delete calls so far.
    pub failures: u32,
    /// Not before this instant (back-off after a failed delete).
    pub next_try: Option<Instant>,
}

/// What the reconciler remembers between rounds (updated by apply).
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// Provisioned nodes by backend id.
    pub known: HashMap<String, Known>,
    /// Drains this reconciler started, by backend id.
    pub draining: HashMap<String, DrainWhy>,
    /// Nodes an operator took back from a scale-in: never picked for scale-in again.
    pub operator_kept: HashSet<String>,
    /// Servers being released, by device id.
    pub releasing: HashMap<String, Releasing>,
    /// Consecutive complete listings each known node was missing from.
    pub missing: HashMap<String, u32>,
    /// Whether a complete inventory has been adopted once (see [`adopt_as_spare`]).
    pub adopted_once: bool,
    /// No order before this instant (back-off after a round in which no zone could take
    /// one).
    pub next_order_at: Option<Instant>,
    /// Delivered servers not yet proven healthy (their bootstrap is under way).
    pub booting: HashSet<String>,
    /// Bootstraps that failed in a row.
    pub bootstrap_failures: u32,
    /// The latest bootstrap failure, in words.
    pub last_bootstrap_error: Option<String>,
}

/// Spending limits (`[autoscale.budget]`); `None`: no limit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Budget {
    pub max_orders_per_hour: Option<usize>,
    pub max_servers: Option<usize>,
    pub max_price_per_hour: Option<f64>,
}

/// The plan's knobs.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Port the frontend listens on on each server.
    pub blade_port: u16,
    /// Warm spares to keep.
    pub standby: usize,
    /// Deadline for carts bound to a node being drained.
    pub drain_timeout: Duration,
    /// Complete listings a known node may be missing from before it is drained.
    pub missing_limit: u32,
    /// An order not seen in a listing by then is looked up by its tag one last time.
    pub order_deadline: Duration,
    /// An order that got no answer (no device id) not seen by then is looked up by its
    /// tag (see `autoscale.unanswered_order_wait`).
    pub unanswered_order_wait: Duration,
    /// A drained or spare surplus node is released only this close to the end of its
    /// paid hour.
    pub release_margin: Duration,
    /// A provisioned node down (failing health checks) this long is released.
    pub down_release_after: Duration,
    pub budget: Budget,
    /// Whether blades are reached on a private network (their private address) rather
    /// than their public one.
    pub private_network: bool,
    /// A delivered server not healthy this long after delivery has failed its bootstrap.
    pub bootstrap_timeout: Duration,
    /// Bootstrap failures in a row that stop orders.
    pub bootstrap_failure_limit: u32,
}

/// Everything one round's plan is made from.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// In-service nodes the policy wants.
    pub desired: usize,
    pub zones: &'a [ZoneListing],
    /// Look-ups of known servers missing from complete listings, by device id.
    pub looked_up: &'a HashMap<String, LookUp>,
    /// Private addresses of delivered servers, by device id (with a private network).
    pub addresses: &'a HashMap<String, IpAddr>,
    pub nodes: &'a [Node],
    pub ledger: &'a [Order],
    pub memory: &'a Memory,
    pub rules: &'a Rules,
    /// The price per hour of the offer, as last seen (for the budget), if known.
    pub offer_price: Option<f64>,
    pub now: Instant,
    pub wall: SystemTime,
}

/// Something to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Add a delivered server to the pool (warming, or as a spare).
    Adopt {
        id: String,
        known: Known,
        addr: SocketAddr,
        spare: bool,
        /// When the vendor created the server (for the ledger, if it has no order for
        /// it: a server found running, ordered before the ledger existed).
        created_at: Option<SystemTime>,
        /// Its `surge-request` tag, if any.
        request_id: Option<String>,
    },
    /// Put a spare into service.
    Promote { id: String },
    /// Order `count` servers, for `reason`.
    Order { count: usize, reason: String },
    /// Start draining a node.
    Drain { id: String, why: DrainWhy },
    /// Keep a drained surplus node as a spare until its paid hour nearly ends.
    Park { id: String },
    /// Release a server to the provider; then the node (if any) leaves the pool.
    Release {
        device_id: String,
        zone: String,
        node: Option<String>,
        why: String,
    },
    /// Remove a drained node whose server is gone.
    Remove { id: String },
    /// The ledger order's server is in the inventory.
    Seen {
        request_id: String,
        device_id: String,
    },
    /// The order's deadline passed unseen: look it up by its request tag one last time.
    LookUpOrder { request_id: String, zone: String },
    /// A release is confirmed: the server is no longer in the inventory.
    Released { device_id: String },
    /// A known node was missing from a complete listing once more.
    Missing { id: String },
    /// A known node is back in the listing (or found by a look-up).
    Present { id: String },
    /// An operator took a node back from a scale-in drain.
    OperatorKept { id: String },
    /// A node left the pool by other means: forget it.
    Forget { id: String },
    /// A delivered server passed its health checks: its bootstrap worked.
    Booted { id: String },
    /// A delivered server was not healthy by its deadline.
    BootFailed { id: String, error: String },
}

/// What the round saw, for the status page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub in_service: usize,
    /// On its way to service: warming nodes, undelivered servers, unseen orders.
    pub pending: usize,
    pub standby: usize,
    pub draining: usize,
    /// Servers the provider runs for this pool.
    pub devices: usize,
    /// Everything counted as capacity: in service, on its way, spares.
    pub supply: usize,
    /// Why no (or fewer) orders were placed though more were wanted, when a limit did it.
    pub budget_reached: Option<String>,
    /// Set when bootstraps keep failing and orders stopped: why, in words.
    pub bootstrap_alarm: Option<String>,
    /// Things an operator should know, in words.
    pub notes: Vec<String>,
}

/// The plan: actions in the order they are to be applied, and what was seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub summary: Summary,
}

/// The backend id a provisioned server gets in the pool.
pub fn backend_id(device: &Device) -> String {
    backend_id_of(&device.id)
}

/// The backend id of the server with vendor id `device_id`.
pub fn backend_id_of(device_id: &str) -> String {
    format!("bm-{}", device_id.chars().take(8).collect::<String>())
}

/// Whether a delivered server joining the pool becomes a spare. Normally when the pool
/// already has (or is getting) the desired in-service count. On the first adoption, the
/// servers a previous surge ran were serving shoppers (their carts bound to them), and the
/// desired count of a process just started only knows the static nodes: all but
/// `standby` of them go back into service.
pub fn adopt_as_spare(
    first_adoption: bool,
    toward_service: usize,
    desired: usize,
    spares_so_far: usize,
    standby: usize,
) -> bool {
    if first_adoption {
        spares_so_far < standby
    } else {
        toward_service >= desired
    }
}

/// When the hour being paid for a server placed at `since` ends, seen at `wall`.
pub fn paid_hour_ends(since: SystemTime, wall: SystemTime) -> SystemTime {
    let age = wall.duration_since(since).unwrap_or_default();
    let hours = age.as_secs() / BILLING_HOUR.as_secs() + 1;
    since + BILLING_HOUR * u32::try_from(hours).unwrap_or(u32::MAX)
}

/// Whether a surplus server placed at `since` may be released at `wall`: within
/// `margin` of the end of its paid hour.
pub fn release_due(since: SystemTime, wall: SystemTime, margin: Duration) -> bool {
    paid_hour_ends(since, wall)
        .duration_since(wall)
        .is_ok_and(|left| left <= margin)
}

/// The round's plan.
pub fn plan(i: &Inputs<'_>) -> Plan {
    let mut r = Round::new(i);
    let unseen_orders = r.orders_seen();
    r.releases_confirmed();
    let removed_by_operator = r.nodes_gone();
    let scale_in_draining = r.drains_finished();
    let expired = r.bootstraps();
    r.bootstrap_alarm();
    let mut count = r.deliveries(&expired, &removed_by_operator);
    r.release_long_down();
    r.promote_spares(&mut count, &expired);
    let supply = count.in_service + count.pending + unseen_orders + count.spares;
    let s = &mut r.p.summary;
    s.in_service = count.in_service;
    s.pending = count.pending + unseen_orders;
    s.standby = count.spares;
    s.supply = supply;
    s.draining = i.memory.draining.len();
    r.scale_up(supply);
    r.scale_in(supply, count.in_service, scale_in_draining);
    r.p
}

/// The pool's capacity as the round counts it.
struct Count {
    in_service: usize,
    /// In service or warming within its bootstrap deadline.
    toward_service: usize,
    /// Delivered but not yet in service, or still being delivered.
    pending: usize,
    spares: usize,
}

/// One round of planning: the inputs, views of them the steps share, and the plan as it
/// grows.
struct Round<'a> {
    i: &'a Inputs<'a>,
    m: &'a Memory,
    all_complete: bool,
    nodes: HashMap<&'a str, &'a Node>,
    /// Every device with its zone, deduplicated by id (a zone listed twice, a page
    /// repeated while the list changed).
    devices: Vec<(&'a ZoneListing, &'a Device)>,
    by_id: HashMap<&'a str, &'a Device>,
    p: Plan,
}

impl<'a> Round<'a> {
    fn new(i: &'a Inputs<'a>) -> Self {
        let mut seen_ids = HashSet::new();
        let devices: Vec<(&ZoneListing, &Device)> = i
            .zones
            .iter()
            .flat_map(|z| z.devices.iter().map(move |d| (z, d)))
            .filter(|(_, d)| seen_ids.insert(d.id.as_str()))
            .collect();
        let mut p = Plan::default();
        p.summary.devices = devices.len();
        Self {
            i,
            m: i.memory,
            all_complete: i.zones.iter().all(|z| z.complete),
            nodes: i.nodes.iter().map(|n| (n.id.as_str(), n)).collect(),
            by_id: devices.iter().map(|(_, d)| (d.id.as_str(), *d)).collect(),
            devices,
            p,
        }
    }

    fn zone_complete(&self, zone: &str) -> bool {
        self.i.zones.iter().any(|z| z.zone == zone && z.complete)
    }

    /// When a server was placed, for billing: its order's time, else now (unknown: the
    /// hour is taken as just started, the conservative choice for keeping it).
    fn placed_at(&self, device_id: &str) -> SystemTime {
        self.i
            .ledger
            .iter()
            .find(|o| o.device_id.as_deref() == Some(device_id))
            .map_or(self.i.wall, |o| o.placed_at)
    }

    fn act(&mut self, action: Action) {
        self.p.actions.push(action);
    }

    fn note(&mut self, note: String) {
        self.p.summary.notes.push(note);
    }

    /// Step 1, the ledger: orders seen, orders past their deadline looked up. How many orders
    /// are not seen yet (they count as supply).
    fn orders_seen(&mut self) -> usize {
        let i = self.i;
        let mut unseen_orders = 0;
        for o in i.ledger.iter().filter(|o| o.state == OrderState::Placed) {
            let found = self
                .devices
                .iter()
                .find(|(_, d)| d.tag(REQUEST_TAG) == Some(o.request_id.as_str()))
                .map(|(_, d)| d.id.clone());
            if let Some(device_id) = found {
                self.act(Action::Seen {
                    request_id: o.request_id.clone(),
                    device_id,
                });
                continue;
            }
            let wait = if o.device_id.is_none() {
                i.rules.unanswered_order_wait
            } else {
                i.rules.order_deadline
            };
            if i.wall
                .duration_since(o.placed_at)
                .is_ok_and(|age| age >= wait)
            {
                // Counted this round still: the look-up's answer decides the next one.
                self.act(Action::LookUpOrder {
                    request_id: o.request_id.clone(),
                    zone: o.zone.clone(),
                });
            }
            // Otherwise on its way: the vendor's list may lag its create.
            unseen_orders += 1;
        }
        unseen_orders
    }

    /// Step 2, releases in flight: confirmed once the server is no longer listed; retried on
    /// their back-off otherwise.
    fn releases_confirmed(&mut self) {
        let (i, m) = (self.i, self.m);
        for (device_id, r) in &m.releasing {
            let listed = self.by_id.get(device_id.as_str()).copied();
            match listed {
                None if self.zone_complete(&r.zone) => self.act(Action::Released {
                    device_id: device_id.clone(),
                }),
                Some(d) if matches!(d.state, DeviceState::Deleting | DeviceState::Gone) => self
                    .act(Action::Released {
                        device_id: device_id.clone(),
                    }),
                Some(_) if r.next_try.is_none_or(|t| i.now >= t) => self.act(Action::Release {
                    device_id: device_id.clone(),
                    zone: r.zone.clone(),
                    node: None,
                    why: format!("retrying the release (attempt {})", r.failures + 1),
                }),
                _ => {}
            }
        }
    }

    /// Step 3, known nodes the inventory no longer shows: drained (never dropped) once
    /// confirmed gone or missing too often. Servers whose node an operator removed
    /// (admin `DELETE`: drained, then out of the pool) are released, not adopted again:
    /// their ids.
    fn nodes_gone(&mut self) -> HashSet<&'a str> {
        let m = self.m;
        let mut removed_by_operator: HashSet<&str> = HashSet::new();
        for (id, k) in &m.known {
            let Some(node) = self.nodes.get(id.as_str()).copied() else {
                if !m.draining.contains_key(id) {
                    if self.by_id.contains_key(k.device_id.as_str())
                        && !m.releasing.contains_key(&k.device_id)
                    {
                        removed_by_operator.insert(k.device_id.as_str());
                        self.act(Action::Release {
                            device_id: k.device_id.clone(),
                            zone: k.zone.clone(),
                            node: None,
                            why: format!("its node {id} was removed by an operator"),
                        });
                    }
                    self.act(Action::Forget { id: id.clone() });
                }
                continue;
            };
            self.node_present_or_missing(id, k, node);
        }
        removed_by_operator
    }

    /// A known node's server: listed (or found by a look-up), or missing once more;
    /// drained when confirmed gone or missing from `missing_limit` complete listings.
    fn node_present_or_missing(&mut self, id: &String, k: &Known, node: &Node) {
        let (i, m) = (self.i, self.m);
        let listed = self.by_id.contains_key(k.device_id.as_str());
        let present = listed || matches!(i.looked_up.get(&k.device_id), Some(LookUp::Present(_)));
        if present {
            if m.missing.contains_key(id) {
                self.act(Action::Present { id: id.clone() });
            }
            return;
        }
        if !self.zone_complete(&k.zone) || m.draining.contains_key(id) {
            return;
        }
        let gone = i.looked_up.get(&k.device_id) == Some(&LookUp::Gone);
        let misses = m.missing.get(id).copied().unwrap_or(0) + 1;
        if gone || misses >= i.rules.missing_limit {
            self.note(format!(
                "server {} of node {id} is gone at the provider ({}); draining the node",
                k.device_id,
                if gone {
                    "confirmed by a look-up".to_owned()
                } else {
                    format!("missing from {misses} complete listings")
                }
            ));
            if node.state != State::Draining {
                self.act(Action::Drain {
                    id: id.clone(),
                    why: DrainWhy::Vanished,
                });
            }
        } else {
            self.act(Action::Missing { id: id.clone() });
            self.note(format!(
                "server {} of node {id} missing from the listing ({misses} of {}); kept",
                k.device_id, i.rules.missing_limit
            ));
        }
    }

    /// Step 3a, drains that finished: removed, released, or parked as a spare until the paid
    /// hour ends; an operator's hand on a drain makes the node theirs. Whether a
    /// scale-in drain is still under way.
    fn drains_finished(&mut self) -> bool {
        let (i, m) = (self.i, self.m);
        let mut scale_in_draining = false;
        for (id, why) in &m.draining {
            let Some(node) = self.nodes.get(id.as_str()).copied() else {
                self.act(Action::Forget { id: id.clone() });
                continue;
            };
            if node.state != State::Draining {
                // Undrained or put in maintenance by an operator: theirs now.
                self.act(Action::OperatorKept { id: id.clone() });
                continue;
            }
            if !node.drain_done {
                scale_in_draining |= *why == DrainWhy::ScaleIn;
                continue;
            }
            let action = match (why, m.known.get(id)) {
                (DrainWhy::Vanished, _) | (_, None) => Action::Remove { id: id.clone() },
                (DrainWhy::Broken, Some(k)) => Action::Release {
                    device_id: k.device_id.clone(),
                    zone: k.zone.clone(),
                    node: Some(id.clone()),
                    why: "its server failed".into(),
                },
                (DrainWhy::ScaleIn, Some(k))
                    if release_due(
                        self.placed_at(&k.device_id),
                        i.wall,
                        i.rules.release_margin,
                    ) =>
                {
                    Action::Release {
                        device_id: k.device_id.clone(),
                        zone: k.zone.clone(),
                        node: Some(id.clone()),
                        why: "scaled in; its paid hour is ending".into(),
                    }
                }
                (DrainWhy::ScaleIn, Some(_)) => Action::Park { id: id.clone() },
            };
            self.act(action);
        }
        scale_in_draining
    }

    /// Step 3b, bootstraps: a delivered server proves itself healthy by its deadline, or it is
    /// released (it never served: nothing to drain) and counted as a failure. The nodes
    /// whose deadline passed.
    fn bootstraps(&mut self) -> HashSet<&'a str> {
        let (i, m) = (self.i, self.m);
        let mut expired: HashSet<&str> = HashSet::new();
        for id in &m.booting {
            let Some(n) = self.nodes.get(id.as_str()).copied() else {
                continue;
            };
            let booted = n.state == State::InService || (n.state == State::Standby && n.healthy);
            if booted {
                self.act(Action::Booted { id: id.clone() });
                continue;
            }
            if !matches!(n.state, State::Warming | State::Standby)
                || n.in_state_for < i.rules.bootstrap_timeout
            {
                continue;
            }
            let error = n
                .last_probe_error
                .clone()
                .unwrap_or_else(|| "no health check answered".into());
            expired.insert(id.as_str());
            if let Some(k) = m.known.get(id) {
                self.act(Action::Release {
                    device_id: k.device_id.clone(),
                    zone: k.zone.clone(),
                    node: Some(id.clone()),
                    why: format!(
                        "not healthy within {} of delivery (last check: {error})",
                        humantime::format_duration(i.rules.bootstrap_timeout)
                    ),
                });
            }
            self.act(Action::BootFailed {
                id: id.clone(),
                error,
            });
        }
        expired
    }

    /// Orders stop while delivered servers keep failing their bootstrap: said once, with
    /// the last error.
    fn bootstrap_alarm(&mut self) {
        let (i, m) = (self.i, self.m);
        let actions = &self.p.actions;
        let failures = m.bootstrap_failures
            + actions
                .iter()
                .filter(|a| matches!(a, Action::BootFailed { .. }))
                .count() as u32;
        let booted_now = actions.iter().any(|a| matches!(a, Action::Booted { .. }));
        if failures < i.rules.bootstrap_failure_limit || booted_now {
            return;
        }
        let last = actions
            .iter()
            .rev()
            .find_map(|a| match a {
                Action::BootFailed { error, .. } => Some(error.clone()),
                _ => None,
            })
            .or_else(|| m.last_bootstrap_error.clone())
            .unwrap_or_default();
        self.p.summary.bootstrap_alarm = Some(format!(
            "bootstrap is failing: {failures} delivered servers in a row were not healthy within {}; no more orders until one is (last error: {last})",
            humantime::format_duration(i.rules.bootstrap_timeout)
        ));
    }

    /// Step 4, delivered servers join the pool (as spares first, if spares are short); failed
    /// ones are drained or released. The capacity counted on the way.
    fn deliveries(&mut self, expired: &HashSet<&str>, removed: &HashSet<&str>) -> Count {
        let (i, m) = (self.i, self.m);
        let count = |s: State| {
            i.nodes
                .iter()
                .filter(|n| n.state == s && !expired.contains(n.id.as_str()))
                .count()
        };
        // Warming nodes count as capacity on its way only until their bootstrap deadline.
        let mut c = Count {
            in_service: count(State::InService),
            toward_service: count(State::InService) + count(State::Warming),
            pending: count(State::Warming),
            spares: count(State::Standby),
        };
        let first_adoption = !m.adopted_once;
        for (z, d) in self.devices.clone() {
            if m.releasing.contains_key(&d.id) || removed.contains(d.id.as_str()) {
                continue;
            }
            match d.state {
                DeviceState::Ready => self.delivered(z, d, first_adoption, &mut c),
                DeviceState::Requested | DeviceState::Provisioning | DeviceState::Installing => {
                    c.pending += 1
                }
                DeviceState::Failed if z.complete => self.failed(z, d),
                DeviceState::Failed | DeviceState::Deleting | DeviceState::Gone => {}
            }
        }
        c
    }

    /// A ready server not in the pool: adopted (warming, or as a spare) once it has a
    /// usable address; released if it has none by the order deadline.
    fn delivered(&mut self, z: &ZoneListing, d: &Device, first_adoption: bool, c: &mut Count) {
        let i = self.i;
        let id = backend_id(d);
        if self.nodes.contains_key(id.as_str()) || self.m.draining.contains_key(&id) {
            return;
        }
        let address = if i.rules.private_network {
            i.addresses.get(&d.id).copied()
        } else {
            d.address
        };
        let Some(ip) = address.filter(usable_address) else {
            // Counted as on its way (it is billed and may get an address), not ordered
            // again; released if it never becomes usable.
            c.pending += 1;
            let since = self.placed_at(&d.id);
            if i.wall.duration_since(since).unwrap_or_default() >= i.rules.order_deadline {
                self.act(Action::Release {
                    device_id: d.id.clone(),
                    zone: z.zone.clone(),
                    node: None,
                    why: "ready but without a usable address past the order deadline".into(),
                });
            } else {
                self.note(format!(
                    "server {} is ready but has no usable address yet",
                    d.id
                ));
            }
            return;
        };
        let spare = adopt_as_spare(
            first_adoption,
            c.toward_service,
            i.desired,
            c.spares,
            i.rules.standby,
        );
        self.act(Action::Adopt {
            id,
            known: Known {
                zone: z.zone.clone(),
                device_id: d.id.clone(),
            },
            addr: SocketAddr::new(ip, i.rules.blade_port),
            spare,
            created_at: d.created_at,
            request_id: d.tag(REQUEST_TAG).map(str::to_owned),
        });
        if spare {
            c.spares += 1;
        } else {
            c.toward_service += 1;
            c.pending += 1;
        }
    }

    /// A server the vendor says failed: drained first if it serves, else released.
    fn failed(&mut self, z: &ZoneListing, d: &Device) {
        let id = backend_id(d);
        match self.nodes.get(id.as_str()).copied() {
            // Serving or warming: drained first, released once drained.
            Some(n) if matches!(n.state, State::InService | State::Warming) => {
                self.note(format!(
                    "server {} of node {id} failed ({}); draining it before release",
                    d.id, d.vendor_status
                ));
                if !self.m.draining.contains_key(&id) {
                    self.act(Action::Drain {
                        id,
                        why: DrainWhy::Broken,
                    });
                }
            }
            Some(n) if n.state == State::Draining => {}
            node => self.act(Action::Release {
                device_id: d.id.clone(),
                zone: z.zone.clone(),
                node: node.map(|_| id),
                why: format!("the server failed ({})", d.vendor_status),
            }),
        }
    }

    /// Provisioned nodes down for `down_release_after`: released.
    fn release_long_down(&mut self) {
        let (i, m) = (self.i, self.m);
        for n in i.nodes.iter().filter(|n| {
            n.origin == Origin::Provisioned
                && n.state == State::Down
                && n.in_state_for >= i.rules.down_release_after
        }) {
            let Some(k) = m.known.get(&n.id) else {
                continue;
            };
            if !m.releasing.contains_key(&k.device_id) {
                self.act(Action::Release {
                    device_id: k.device_id.clone(),
                    zone: k.zone.clone(),
                    node: Some(n.id.clone()),
                    why: format!(
                        "down for {}",
                        humantime::format_duration(Duration::from_secs(n.in_state_for.as_secs()))
                    ),
                });
            }
        }
    }

    /// Step 5, spares first: in service within this round.
    fn promote_spares(&mut self, c: &mut Count, expired: &HashSet<&str>) {
        let i = self.i;
        let mut promotable = i.nodes.iter().filter(|n| n.state == State::Standby);
        while i.desired > c.in_service + c.pending {
            let Some(n) = promotable.next_back() else {
                break;
            };
            self.act(Action::Promote { id: n.id.clone() });
            // A spare past its bootstrap deadline was not counted as one.
            if !expired.contains(n.id.as_str()) {
                c.spares = c.spares.saturating_sub(1);
            }
            c.in_service += 1;
        }
    }

    /// Step 6, scale up, within the budget: what is on its way counts, so a slow delivery or a
    /// lagging list is not ordered twice.
    fn scale_up(&mut self, supply: usize) {
        let i = self.i;
        let target = i.desired + i.rules.standby;
        if !self.all_complete
            || target <= supply
            || self.m.next_order_at.is_some_and(|t| i.now < t)
            || self.p.summary.bootstrap_alarm.is_some()
        {
            return;
        }
        let wanted = (target - supply).min(MAX_ORDERS_PER_ROUND);
        let (allowed, limit) = within_budget(wanted, i);
        if let Some(limit) = limit {
            self.p.summary.budget_reached = Some(limit);
        }
        if allowed > 0 {
            self.act(Action::Order {
                count: allowed,
                reason: format!(
                    "{} wanted ({} in service + standby {}), {supply} in service, on the way or spare",
                    target, i.desired, i.rules.standby
                ),
            });
        }
    }

    /// Step 7, scale in, cheapest first, billing-aware; never while a listing is incomplete or
    /// another scale-in drain is under way.
    fn scale_in(&mut self, supply: usize, in_service: usize, scale_in_draining: bool) {
        let (i, m) = (self.i, self.m);
        let target = i.desired + i.rules.standby;
        if !self.all_complete || supply <= target || scale_in_draining {
            return;
        }
        let mut surplus = self.release_surplus_spares(supply - target);
        // An order on its way is never cancelled because the count went down: it was
        // placed for a reason, its hour is paid, and it becomes a spare when delivered
        // (released like any spare, on the billing clock). It covers surplus meanwhile.
        let on_the_way = self
            .devices
            .iter()
            .filter(|(_, d)| {
                matches!(
                    d.state,
                    DeviceState::Requested | DeviceState::Provisioning | DeviceState::Installing
                ) && !m.releasing.contains_key(&d.id)
            })
            .count();
        surplus = surplus.saturating_sub(on_the_way);
        if surplus == 0 || i.desired >= in_service {
            return;
        }
        // The node whose paid hour ends soonest: it is the cheapest to let go.
        let candidate = i
            .nodes
            .iter()
            .filter(|n| {
                n.state == State::InService
                    && n.origin == Origin::Provisioned
                    && !m.operator_kept.contains(&n.id)
                    && !m.draining.contains_key(&n.id)
            })
            .filter_map(|n| m.known.get(&n.id).map(|k| (n, k)))
            .min_by_key(|(_, k)| paid_hour_ends(self.placed_at(&k.device_id), i.wall));
        if let Some((n, _)) = candidate {
            self.act(Action::Drain {
                id: n.id.clone(),
                why: DrainWhy::ScaleIn,
            });
        }
    }

    /// Spares beyond `standby` cover the surplus first; each is released when its paid
    /// hour is ending and kept otherwise (paid for anyway, ready at once if the load
    /// comes back). The surplus left.
    fn release_surplus_spares(&mut self, mut surplus: usize) -> usize {
        let (i, m) = (self.i, self.m);
        let spare_ids: Vec<&str> = i
            .nodes
            .iter()
            .filter(|n| n.state == State::Standby && n.origin == Origin::Provisioned)
            .map(|n| n.id.as_str())
            .collect();
        let extra_spares = spare_ids.len().saturating_sub(i.rules.standby);
        for id in spare_ids.iter().take(extra_spares.min(surplus)) {
            let Some(k) = m.known.get(*id) else { continue };
            if release_due(self.placed_at(&k.device_id), i.wall, i.rules.release_margin) {
                self.act(Action::Release {
                    device_id: k.device_id.clone(),
                    zone: k.zone.clone(),
                    node: Some((*id).to_owned()),
                    why: "surplus spare; its paid hour is ending".into(),
                });
            }
            surplus -= 1;
        }
        surplus
    }
}

/// How many of `wanted` orders the budget allows, and the limit that cut them, in words.
fn within_budget(wanted: usize, i: &Inputs<'_>) -> (usize, Option<String>) {
    let b = &i.rules.budget;
    let mut allowed = wanted;
    let mut limit = None;
    let mut cap = |n: usize, why: String| {
        if n < allowed {
            allowed = n;
            limit = Some(why);
        }
    };
    let billed: Vec<&Order> = i.ledger.iter().filter(|o| o.billed()).collect();
    if let Some(max) = b.max_orders_per_hour {
        let placed = i
            .ledger
            .iter()
            .filter(|o| o.state != OrderState::Refused)
            .filter(|o| {
                i.wall
                    .duration_since(o.placed_at)
                    .is_ok_and(|a| a < BILLING_HOUR)
            })
            .count();
        cap(
            max.saturating_sub(placed),
            format!("budget: {placed} servers ordered in the last hour, at most {max}"),
        );
    }
    if let Some(max) = b.max_servers {
        cap(
            max.saturating_sub(billed.len()),
            format!(
                "budget: {} servers provisioned, at most {max}",
                billed.len()
            ),
        );
    }
    if let Some(max) = b.max_price_per_hour {
        let now: f64 = billed.iter().map(|o| o.price_per_hour).sum();
        match i.offer_price.filter(|p| *p > 0.0) {
            Some(price) => {
                let room = ((max - now) / price + 1e-9).floor().max(0.0) as usize;
                cap(
                    room,
                    format!("budget: {now:.2}/h spent on servers, at most {max:.2}/h ({price:.2}/h each)"),
                );
            }
            None if now >= max => cap(0, format!("budget: {now:.2}/h, at most {max:.2}/h")),
            None => {}
        }
    }
    (allowed, limit)
}

/// Whether a server's address can carry traffic (not unspecified, not multicast).
fn usable_address(ip: &IpAddr) -> bool {
    !ip.is_unspecified() && !ip.is_multicast()
}

#[cfg(test)]
mod tests;
