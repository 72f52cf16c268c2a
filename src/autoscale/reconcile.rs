//! Drives the provider toward the desired size, in three steps per round:
//!
//! 1. **observe**: the inventory of every zone (with completeness), and a direct look-up
//!    of every known server a complete listing no longer shows;
//! 2. **plan** ([`super::plan`], pure): what to adopt, promote, order, drain, park and
//!    release, from the observations, the pool, the order ledger and this reconciler's
//!    memory;
//! 3. **apply**: the actions through the provider and the pool, outcomes recorded in the
//!    ledger (on disk) and the memory.
//!
//! It never touches static or demo nodes, never undrains anything, and only finishes
//! drains it started itself: a node an operator drained stays drained, and a node an
//! operator took back from a scale-in is left alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::fence::Gate;
use super::ledger::{Ledger, Order, OrderState};
use super::plan::{
    self, Action, DrainWhy, Inputs, Known, LookUp, Memory, Node, Releasing, Rules, ZoneListing,
};
use super::problem::Problem;
use crate::cluster::{Role, RoleEntry, Roles};
use crate::pool::{Backend, Origin, Pool};
use crate::provider::{
    backoff, new_request_id, CreateSpec, DeviceState, Provider, ProviderError, Stock, POOL_TAG,
    REQUEST_TAG,
};

pub use super::plan::backend_id;

#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// Pool name, also the `surge-pool` tag value.
    pub pool: String,
    /// Offer name to order.
    pub offer: String,
    /// The plan's rules (standby, drain timeout, deadlines, budget...).
    pub rules: Rules,
    /// Back-off after a round in which no zone could take an order.
    pub order_backoff_base: Duration,
    pub order_backoff_max: Duration,
    /// Back-off of a failed release, doubled per failure up to `order_backoff_max`.
    pub release_backoff_base: Duration,
    /// Cloud-init user-data and SSH keys sent with every order.
    pub bootstrap: Option<crate::config::BootstrapConfig>,
    /// Private network blades are attached to and reached on (`None`: public addresses).
    pub private_network: Option<String>,
    /// The blades are on the shop's own network (MAAS), reached on their own address:
    /// nothing crosses the Internet, so that is not warned about.
    pub own_network: bool,
    /// `{{proxy_address}}` for the user-data.
    pub proxy_address: String,
}

/// What one round saw and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Nodes in service (all origins).
    pub in_service: usize,
    /// Ordered or delivered servers not yet in service, and orders not yet seen.
    pub pending: usize,
    /// Warm spares ready to be promoted.
    pub standby: usize,
    /// Spares promoted into service this round.
    pub promoted: usize,
    /// Servers the provider runs for this pool.
    pub devices: usize,
    pub ordered: usize,
    pub released: usize,
    pub draining: usize,
    /// The budget limit that held orders back, in words.
    pub budget_reached: Option<String>,
    /// Why orders stopped because bootstraps keep failing.
    pub bootstrap_alarm: Option<String>,
    /// Things an operator should know (servers missing from a listing, kept spares...).
    pub notes: Vec<String>,
    /// Problems met (the status page and the log show them in words).
    pub errors: Vec<Problem>,
    /// The ledger's orders, for the cost view.
    pub orders: Vec<Order>,
    /// Servers with a `surge-pool` tag that this reconciler does not manage (another
    /// pool name, or this pool's tag in a zone not ordered from): never released by
    /// surge, shown so that someone decides.
    pub unmanaged: Vec<Unmanaged>,
    /// Servers released before they ever served, since this process started (a failed
    /// delivery, a node an operator removed first): never because the count went down.
    pub released_unserved: u64,
}

/// A server surge sees but does not manage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmanaged {
    pub zone: String,
    pub device_id: String,
    pub name: String,
    /// The value of its `surge-pool` tag.
    pub pool_tag: String,
    /// Why it is not managed, in words.
    pub why: String,
}

/// How often every server of the zones (not only this pool's) is listed for unmanaged
/// ones.
const UNMANAGED_SCAN_EVERY: Duration = Duration::from_secs(60);

pub struct Reconciler<P> {
    pool: Arc<Pool>,
    /// Providers, one per zone, in order of preference.
    zones: Vec<(String, P)>,
    cfg: ReconcileConfig,
    memory: Memory,
    ledger: Ledger,
    /// Consecutive rounds in which no order could be placed.
    order_failures: u32,
    /// The offer's price per hour, as last seen.
    offer_price: Option<f64>,
    /// Zones only watched for unmanaged servers (`provider.watch_zones`).
    watched: Vec<(String, P)>,
    /// The last scan for unmanaged servers, and when the next is due.
    unmanaged: Vec<Unmanaged>,
    next_scan: Option<Instant>,
    /// In a cluster: the leadership term its writes are fenced by.
    gate: Option<Gate>,
    /// In a cluster: provisioned nodes other instances may still send work to, and by
    /// whom (their releases wait).
    busy_elsewhere: HashMap<String, Vec<String>>,
    /// See [`Report::released_unserved`].
    released_unserved: u64,
}

impl<P: Provider> Reconciler<P> {
    pub fn new(
        pool: Arc<Pool>,
        zones: Vec<(String, P)>,
        cfg: ReconcileConfig,
        ledger: Ledger,
    ) -> Self {
        let offer_price = ledger
            .orders
            .iter()
            .rev()
            .find(|o| o.price_per_hour > 0.0)
            .map(|o| o.price_per_hour);
        Self {
            pool,
            zones,
            cfg,
            memory: Memory::default(),
            ledger,
            order_failures: 0,
            offer_price,
            watched: Vec::new(),
            unmanaged: Vec::new(),
            next_scan: None,
            gate: None,
            busy_elsewhere: HashMap::new(),
            released_unserved: 0,
        }
    }

    /// In a cluster: the ledger and the roles are written to etcd within `gate`'s term,
    /// and nothing is ordered without that write.
    pub fn fenced(mut self, gate: Gate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Nodes an operator gave an instruction for through the cluster: the operator's,
    /// never picked for scale-in (as an undrain makes a node here).
    pub fn set_operator_nodes(&mut self, ids: impl IntoIterator<Item = String>) {
        self.memory.operator_kept.extend(ids);
    }

    /// Which provisioned nodes other instances may still send work to (from their
    /// readings): their releases wait until those instances are done with them.
    pub fn set_busy_elsewhere(&mut self, busy: HashMap<String, Vec<String>>) {
        self.busy_elsewhere = busy;
    }

    /// What this leader made of its provisioned nodes, for the other instances to follow.
    pub fn roles(&self, leader: &str, wall: SystemTime) -> Roles {
        let table = self.pool.snapshot();
        let nodes = table
            .members()
            .iter()
            .filter(|m| m.backend.origin == Origin::Provisioned)
            .filter_map(|m| {
                let id = m.backend.id.to_string();
                let known = self.memory.known.get(&id)?;
                let role = match m.state {
                    crate::pool::State::Standby => Role::Standby,
                    crate::pool::State::Draining | crate::pool::State::Maint => Role::Draining,
                    _ => Role::Serving,
                };
                let why = self.memory.draining.get(&id).map(|w| {
                    match w {
                        DrainWhy::ScaleIn => "scale_in",
                        DrainWhy::Vanished => "vanished",
                        DrainWhy::Broken => "broken",
                    }
                    .to_owned()
                });
                Some(RoleEntry {
                    id,
                    address: m.backend.addr,
                    zone: known.zone.clone(),
                    device_id: known.device_id.clone(),
                    role,
                    why,
                })
            })
            .collect();
        Roles {
            leader: leader.to_owned(),
            at_ms: crate::cluster::unix_ms(wall),
            nodes,
        }
    }

    /// Writes this leader's ledger and roles to etcd (fenced), after a round.
    pub async fn publish(
        &self,
        leader: &str,
        wall: SystemTime,
    ) -> Result<(), crate::cluster::ClusterError> {
        let Some(gate) = &self.gate else {
            return Ok(());
        };
        let roles = serde_json::to_vec(&self.roles(leader, wall)).unwrap_or_default();
        let c = gate.cluster();
        gate.put(vec![
            (c.ledger_key(), self.ledger.to_json()),
            (c.roles_key(), roles),
        ])
        .await
    }

    /// The pool as the plan sees it (for a cluster member's reading).
    pub fn pool_nodes(&self, now: Instant) -> Vec<Node> {
        self.nodes(now)
    }

    /// Starts a leadership term: the memory is rebuilt from the previous leader's roles
    /// (the provisioned nodes this pool follows, the drains it had started) and its
    /// ledger is taken over, so nothing it ordered is ordered again and no drain of its
    /// is mistaken for an operator's.
    pub fn take_over(&mut self, ledger: Option<&[u8]>, roles: Option<&Roles>) -> Vec<Problem> {
        let mut problems = Vec::new();
        self.memory = Memory::default();
        self.order_failures = 0;
        self.next_scan = None;
        if let Some(json) = ledger {
            if let Err(e) = self.ledger.take_over(json) {
                problems.push(Problem::LedgerNotTakenOver {
                    error: e.to_string(),
                });
            }
        }
        let table = self.pool.snapshot_full();
        if let Some(roles) = roles {
            for e in roles.nodes.iter().filter(|e| table.get(&e.id).is_some()) {
                self.memory.known.insert(
                    e.id.clone(),
                    Known {
                        zone: e.zone.clone(),
                        device_id: e.device_id.clone(),
                    },
                );
                let why = match e.why.as_deref() {
                    Some("scale_in") => Some(DrainWhy::ScaleIn),
                    Some("vanished") => Some(DrainWhy::Vanished),
                    Some("broken") => Some(DrainWhy::Broken),
                    _ => None,
                };
                if let (Role::Draining, Some(why)) = (e.role, why) {
                    self.memory.draining.insert(e.id.clone(), why);
                }
            }
        }
        // Nodes this pool already serves were adopted by an earlier leader.
        self.memory.adopted_once = !self.memory.known.is_empty();
        problems
    }

    /// Starts again after another process ran the autoscaler for a while (a successor
    /// that then died): its orders are merged in from the ledger file, and the memory is
    /// rebuilt by adopting the provider's servers as at start, so nothing it ordered is
    /// ordered again or left unknown.
    pub fn resume(&mut self) -> Vec<Problem> {
        let theirs = match self.ledger.reread() {
            Ok(bytes) => bytes,
            Err(e) => {
                return vec![Problem::LedgerNotReread {
                    error: e.to_string(),
                }]
            }
        };
        self.take_over(theirs.as_deref(), None)
    }

    /// The follower's view of this reconciler: its pool, its inventory and its ledger
    /// (see [`super::follow::round`]). Its memory is the leader's and is dropped: a
    /// later term starts from the roles.
    pub(super) fn as_follower(&mut self) -> Following<'_, P> {
        self.memory = Memory::default();
        Following { r: self }
    }

    /// Also watches `zones` (not ordered from) for servers carrying this pool's tag.
    pub fn watching(mut self, zones: Vec<(String, P)>) -> Self {
        self.watched = zones;
        self
    }

    /// Lists every server of every zone (ordered from or watched) and keeps those with a
    /// `surge-pool` tag this reconciler does not manage; warns once about each new one.
    async fn scan_unmanaged(&mut self, report: &mut Report) {
        let mut found = Vec::new();
        let managed_zones: Vec<&str> = self.zones.iter().map(|(z, _)| z.as_str()).collect();
        for (zone, provider) in self.zones.iter().chain(&self.watched) {
            let listing = match provider.inventory("").await {
                Ok(l) => l,
                Err(e) => {
                    report.errors.push(Problem::ScanUnmanaged {
                        zone: zone.clone(),
                        error: e,
                    });
                    continue;
                }
            };
            for d in listing.devices {
                let Some(tag) = d.tag(POOL_TAG) else { continue };
                let why = if tag != self.cfg.pool {
                    format!(
                        "tagged for pool `{tag}`, this surge runs pool `{}`",
                        self.cfg.pool
                    )
                } else if !managed_zones.contains(&zone.as_str()) {
                    format!("this pool's server in zone {zone}, which is not in provider.zones")
                } else {
                    continue;
                };
                found.push(Unmanaged {
                    zone: zone.clone(),
                    device_id: d.id.clone(),
                    name: d.name.clone(),
                    pool_tag: tag.to_owned(),
                    why,
                });
            }
        }
        for u in &found {
            if !self.unmanaged.iter().any(|o| o.device_id == u.device_id) {
                tracing::warn!(device = %u.device_id, zone = %u.zone, name = %u.name, why = %u.why, "server not managed by this surge (still billed; surge never releases it)");
            }
        }
        self.unmanaged = found;
    }

    /// One round toward `desired` in-service nodes.
    pub async fn step(&mut self, desired: usize, now: Instant) -> Report {
        self.step_at(desired, now, SystemTime::now()).await
    }

    /// [`Reconciler::step`] at wall-clock time `wall` (billing hours, order deadlines).
    pub async fn step_at(&mut self, desired: usize, now: Instant, wall: SystemTime) -> Report {
        let mut report = Report::default();
        let seen = self.observe(now, &mut report).await;
        let zones = &seen.zones;
        let nodes = self.nodes(now);
        let plan = plan::plan(&Inputs {
            desired,
            zones,
            looked_up: &seen.looked_up,
            addresses: &seen.addresses,
            nodes: &nodes,
            ledger: &self.ledger.orders,
            memory: &self.memory,
            rules: &self.cfg.rules,
            offer_price: self.offer_price,
            now,
            wall,
        });
        let s = &plan.summary;
        report.in_service = s.in_service;
        report.pending = s.pending;
        report.standby = s.standby;
        report.devices = s.devices;
        report.budget_reached = s.budget_reached.clone();
        report.bootstrap_alarm = s.bootstrap_alarm.clone();
        if let Some(alarm) = &s.bootstrap_alarm {
            metrics::gauge!(crate::telemetry::names::AUTOSCALER_BOOTSTRAP_ALARM).set(1.0);
            tracing::error!(%alarm, "bootstrap alarm");
        } else {
            metrics::gauge!(crate::telemetry::names::AUTOSCALER_BOOTSTRAP_ALARM).set(0.0);
        }
        report.notes = s.notes.clone();
        if self.cfg.private_network.is_none() && !self.cfg.own_network {
            report.notes.push(
                "blades are reached on their public addresses (provider.public_addresses = true): frontend traffic crosses the Internet".into(),
            );
        }
        if let Some(limit) = &s.budget_reached {
            metrics::counter!(crate::telemetry::names::AUTOSCALER_BUDGET_REACHED).increment(1);
            tracing::warn!(%limit, "orders held back by the budget; shedding takes over");
        }
        self.apply(plan.actions, now, wall, &mut report).await;
        self.attach(&seen.unattached, &mut report).await;
        if zones.iter().all(|z| z.complete) {
            self.memory.adopted_once = true;
        }
        if let Err(e) = self.ledger.save(wall) {
            report.errors.push(Problem::Ledger {
                error: e.to_string(),
            });
        }
        report.draining = self.memory.draining.len();
        report.orders = self.ledger.orders.clone();
        report.unmanaged = self.unmanaged.clone();
        for e in &report.errors {
            tracing::warn!(error = %e, "reconciler");
        }
        report.released_unserved = self.released_unserved;
        report
    }

    /// What a leading round reads from the provider, all of it here (it writes only in
    /// `apply` and `attach`): the servers of other pools now and then, the offer's price
    /// once, every zone's inventory with look-ups of missing servers, and the private
    /// addresses of delivered servers.
    async fn observe(&mut self, now: Instant, report: &mut Report) -> Observed {
        if self.next_scan.is_none_or(|t| now >= t) {
            self.scan_unmanaged(report).await;
            self.next_scan = Some(now + UNMANAGED_SCAN_EVERY);
        }
        if self.offer_price.is_none() {
            // Once, for the cost of servers found running (no order in the ledger).
            if let Some((_, provider)) = self.zones.first() {
                if let Ok(offers) = provider.offers().await {
                    self.offer_price = offers
                        .into_iter()
                        .find(|o| o.name == self.cfg.offer)
                        .and_then(|o| o.price_per_hour);
                }
            }
        }
        let (zones, looked_up) = self.inventory(report).await;
        let (addresses, unattached) = self.private_addresses(&zones, report).await;
        Observed {
            zones,
            looked_up,
            addresses,
            unattached,
        }
    }

    /// The inventory of every zone, and look-ups of known servers a complete listing
    /// did not show.
    async fn inventory(&self, report: &mut Report) -> (Vec<ZoneListing>, HashMap<String, LookUp>) {
        let tag = format!("{POOL_TAG}={}", self.cfg.pool);
        let mut zones = Vec::with_capacity(self.zones.len());
        for (zone, provider) in &self.zones {
            match provider.inventory(&tag).await {
                Ok(listing) => {
                    if !listing.complete {
                        report
                            .errors
                            .push(Problem::ListingIncomplete { zone: zone.clone() });
                    }
                    zones.push(ZoneListing {
                        zone: zone.clone(),
                        devices: listing.devices,
                        complete: listing.complete,
                    });
                }
                Err(e) => {
                    report.errors.push(Problem::Listing {
                        zone: zone.clone(),
                        error: e,
                    });
                    zones.push(ZoneListing {
                        zone: zone.clone(),
                        devices: Vec::new(),
                        complete: false,
                    });
                }
            }
        }
        let mut looked_up = HashMap::new();
        for k in self.memory.known.values() {
            let Some(listing) = zones.iter().find(|z| z.zone == k.zone && z.complete) else {
                continue;
            };
            if listing.devices.iter().any(|d| d.id == k.device_id) {
                continue;
            }
            let Some(provider) = self.provider(&k.zone) else {
                continue;
            };
            let found = match provider.get(&k.device_id).await {
                Ok(d) if matches!(d.state, DeviceState::Deleting | DeviceState::Gone) => {
                    LookUp::Gone
                }
                Ok(d) => LookUp::Present(d),
                Err(ProviderError::NotFound(_)) => LookUp::Gone,
                Err(e) => {
                    report.errors.push(Problem::LookUpServer {
                        device_id: k.device_id.clone(),
                        error: e,
                    });
                    LookUp::Unknown
                }
            };
            looked_up.insert(k.device_id.clone(), found);
        }
        (zones, looked_up)
    }

    /// The private addresses of delivered servers not yet in the pool (with a private
    /// network; one look-up per server, until it is adopted), and those not attached to
    /// the network yet (zone, server).
    async fn private_addresses(
        &self,
        zones: &[ZoneListing],
        report: &mut Report,
    ) -> (HashMap<String, std::net::IpAddr>, Vec<(String, String)>) {
        let (mut out, mut unattached) = (HashMap::new(), Vec::new());
        let Some(network) = &self.cfg.private_network else {
            return (out, unattached);
        };
        let table = self.pool.snapshot_full();
        for z in zones {
            let Some(provider) = self.provider(&z.zone) else {
                continue;
            };
            for d in z.devices.iter().filter(|d| d.state == DeviceState::Ready) {
                if table.get(&plan::backend_id(d)).is_some() {
                    continue;
                }
                match provider.private_address(&d.id, network).await {
                    Ok(Some(ip)) => {
                        out.insert(d.id.clone(), ip);
                    }
                    // Not attached (the order's answer was lost before surge could, or
                    // the attach failed): attached in this round's apply.
                    Ok(None) => unattached.push((z.zone.clone(), d.id.clone())),
                    Err(e) => report.errors.push(Problem::PrivateAddress {
                        device_id: d.id.clone(),
                        error: e,
                    }),
                }
            }
        }
        (out, unattached)
    }

    /// Attaches delivered servers to the private network; their address shows next
    /// round. A server this round released (one that never got a usable address) is
    /// left alone.
    async fn attach(&self, unattached: &[(String, String)], report: &mut Report) {
        let Some(network) = &self.cfg.private_network else {
            return;
        };
        for (zone, device_id) in unattached {
            if self.memory.releasing.contains_key(device_id) {
                continue;
            }
            let Some(provider) = self.provider(zone) else {
                continue;
            };
            if let Err(e) = provider.attach(device_id, network).await {
                report.errors.push(Problem::Attach {
                    device_id: device_id.clone(),
                    network: network.clone(),
                    error: e,
                });
            }
        }
    }

    /// The pool as the plan sees it.
    fn nodes(&self, now: Instant) -> Vec<Node> {
        let table = self.pool.snapshot();
        table
            .members()
            .iter()
            .map(|m| Node {
                id: m.backend.id.to_string(),
                state: m.state,
                origin: m.backend.origin,
                in_state_for: now.saturating_duration_since(m.since),
                drain_done: m.drain_is_over(now),
                healthy: {
                    let (ok, failed) = m.backend.probe_streak();
                    ok > 0 && failed == 0
                },
                last_probe_error: m.backend.last_probe_error(),
            })
            .collect()
    }

    fn provider(&self, zone: &str) -> Option<&P> {
        self.zones.iter().find(|(z, _)| z == zone).map(|(_, p)| p)
    }

    /// Runs the plan's actions in order.
    async fn apply(
        &mut self,
        actions: Vec<Action>,
        now: Instant,
        wall: SystemTime,
        report: &mut Report,
    ) {
        for action in actions {
            match action {
                adopt @ Action::Adopt { .. } => self.adopt(adopt, wall, report),
                Action::Promote { id } => {
                    if self.pool.promote(&id) {
                        tracing::info!(backend = %id, "standby promoted into service");
                        report.promoted += 1;
                    }
                }
                Action::Order { count, reason } => {
                    for _ in 0..count {
                        if !self.order_one(&reason, now, wall, report).await {
                            break;
                        }
                    }
                }
                Action::Drain { id, why } => {
                    match self.pool.drain(&id, self.cfg.rules.drain_timeout) {
                        Ok(_) => {
                            tracing::info!(backend = %id, ?why, "draining");
                            self.memory.draining.insert(id, why);
                        }
                        Err(e) => report.errors.push(Problem::Drain {
                            id,
                            error: e.to_string(),
                        }),
                    }
                }
                Action::Park { id } => {
                    if self.pool.park(&id) {
                        tracing::info!(backend = %id, "scaled in: kept as a spare until its paid hour nearly ends");
                    }
                    self.memory.draining.remove(&id);
                }
                Action::Release {
                    device_id,
                    zone,
                    node,
                    why,
                } => {
                    if let Some(others) = node.as_ref().and_then(|id| self.busy_elsewhere.get(id)) {
                        report.notes.push(format!(
                            "release of {} ({why}) waits: {} may still send it work",
                            node.as_deref().unwrap_or_default(),
                            others.join(", ")
                        ));
                        continue;
                    }
                    self.release(&device_id, &zone, node, &why, now, wall, report)
                        .await
                }
                Action::Remove { id } => {
                    if self.pool.remove(&id).is_ok() {
                        tracing::info!(backend = %id, "node whose server is gone removed after its drain");
                    }
                    self.forget(&id);
                }
                Action::Seen {
                    request_id,
                    device_id,
                } => {
                    if let Some(o) = self.ledger.get_mut(&request_id) {
                        o.state = OrderState::Seen;
                        o.device_id = Some(device_id);
                    }
                }
                Action::LookUpOrder { request_id, zone } => {
                    self.look_up_order(&request_id, &zone, report).await
                }
                Action::Released { device_id } => {
                    self.memory.releasing.remove(&device_id);
                }
                Action::Missing { id } => *self.memory.missing.entry(id).or_insert(0) += 1,
                Action::Present { id } => {
                    self.memory.missing.remove(&id);
                }
                Action::OperatorKept { id } => {
                    tracing::info!(backend = %id, "operator took the node back from scale-in; leaving it alone");
                    self.memory.draining.remove(&id);
                    self.memory.operator_kept.insert(id);
                }
                Action::Forget { id } => self.forget(&id),
                Action::Booted { id } => {
                    self.memory.booting.remove(&id);
                    if self.memory.bootstrap_failures > 0 {
                        tracing::info!(backend = %id, "a bootstrap succeeded; ordering resumes");
                    }
                    self.memory.bootstrap_failures = 0;
                }
                Action::BootFailed { id, error } => {
                    self.memory.booting.remove(&id);
                    self.memory.bootstrap_failures += 1;
                    metrics::counter!(crate::telemetry::names::AUTOSCALER_BOOTSTRAP_FAILURES)
                        .increment(1);
                    report.errors.push(Problem::Bootstrap {
                        id,
                        in_a_row: self.memory.bootstrap_failures,
                        error: error.clone(),
                    });
                    self.memory.last_bootstrap_error = Some(error);
                }
            }
        }
    }

    /// A delivered server into the pool (warming, or as a spare), and into the ledger if
    /// it has no order there: a server with no order (ordered before the ledger existed,
    /// or by hand with this pool's tag) still costs money. An order counted as not placed
    /// whose server showed after all is that order again, not a second one beside it.
    fn adopt(&mut self, adopt: Action, wall: SystemTime, report: &mut Report) {
        let Action::Adopt {
            id,
            known,
            addr,
            spare,
            created_at,
            request_id,
        } = adopt
        else {
            return;
        };
        let revived = request_id.as_deref().and_then(|r| {
            self.ledger
                .get_mut(r)
                .filter(|o| o.state == OrderState::Lost && o.device_id.is_none())
        });
        if let Some(o) = revived {
            o.state = OrderState::Seen;
            o.device_id = Some(known.device_id.clone());
        } else if self.ledger.by_device(&known.device_id).is_none() {
            self.ledger.orders.push(Order {
                request_id: request_id.unwrap_or_else(|| format!("adopted-{}", known.device_id)),
                zone: known.zone.clone(),
                offer: self.cfg.offer.clone(),
                placed_at: created_at.unwrap_or(wall),
                device_id: Some(known.device_id.clone()),
                state: OrderState::Seen,
                price_per_hour: self.offer_price.unwrap_or(0.0),
                released_at: None,
                reason: "found running at the provider and adopted".into(),
            });
        }
        let backend = Arc::new(Backend::new(&id, addr, 1, Origin::Provisioned));
        let added = if spare {
            self.pool.add_standby(backend)
        } else {
            self.pool.add(backend)
        };
        match added {
            Ok(()) => {
                tracing::info!(backend = %id, %addr, zone = %known.zone, standby = spare, "delivered server joins the pool");
                self.memory.booting.insert(id.clone());
                self.memory.known.insert(id, known);
            }
            Err(e) => report.errors.push(Problem::AddNode {
                id,
                error: e.to_string(),
            }),
        }
    }

    /// An order past its deadline looked up by its request tag: seen after all, or lost
    /// (ordered again if still needed when it never got an answer).
    async fn look_up_order(&mut self, request_id: &str, zone: &str, report: &mut Report) {
        let found = match self.provider(zone) {
            Some(p) => p.list(&format!("{REQUEST_TAG}={request_id}")).await,
            None => Ok(Vec::new()),
        };
        let list = match found {
            Ok(list) => list,
            Err(e) => {
                report.errors.push(Problem::LookUpOrder {
                    request_id: request_id.to_owned(),
                    error: e,
                });
                return;
            }
        };
        let device = list.into_iter().find(|d| d.state != DeviceState::Gone);
        let Some(o) = self.ledger.get_mut(request_id) else {
            return;
        };
        match device {
            Some(d) => {
                o.state = OrderState::Seen;
                o.device_id = Some(d.id);
            }
            None if o.device_id.is_none() => {
                o.state = OrderState::Lost;
                report.errors.push(Problem::OrderUnanswered {
                    request_id: request_id.to_owned(),
                    zone: zone.to_owned(),
                });
            }
            None => {
                o.state = OrderState::Lost;
                report.errors.push(Problem::OrderNeverShowed {
                    request_id: request_id.to_owned(),
                    zone: zone.to_owned(),
                });
            }
        }
    }

    fn forget(&mut self, id: &str) {
        self.memory.booting.remove(id);
        self.memory.known.remove(id);
        self.memory.draining.remove(id);
        self.memory.missing.remove(id);
    }

    /// Releases one server; its node (if any) leaves the pool once the provider took the
    /// release. A failed release is retried on a back-off and reported.
    #[allow(clippy::too_many_arguments)]
    async fn release(
        &mut self,
        device_id: &str,
        zone: &str,
        node: Option<String>,
        why: &str,
        now: Instant,
        wall: SystemTime,
        report: &mut Report,
    ) {
        let Some(provider) = self.provider(zone) else {
            report.errors.push(Problem::ReleaseZoneUnknown {
                device_id: device_id.to_owned(),
                zone: zone.to_owned(),
            });
            return;
        };
        let outcome = provider.delete(device_id).await;
        let entry = self
            .memory
            .releasing
            .entry(device_id.to_owned())
            .or_insert_with(|| Releasing {
                zone: zone.to_owned(),
                failures: 0,
                next_try: None,
            });
        match outcome {
            Ok(()) => {
                entry.next_try = None;
                tracing::info!(device = %device_id, %zone, why, "server released to the provider");
                report.released += 1;
                if node.is_none() {
                    self.released_unserved += 1;
                }
                if let Some(id) = node {
                    let _ = self.pool.remove(&id);
                    self.forget(&id);
                }
                if let Some(o) = self
                    .ledger
                    .orders
                    .iter_mut()
                    .find(|o| o.device_id.as_deref() == Some(device_id))
                {
                    o.state = OrderState::Released;
                    o.released_at = Some(wall);
                }
            }
            Err(e) => {
                entry.failures += 1;
                let wait = backoff(
                    entry.failures,
                    self.cfg.release_backoff_base,
                    self.cfg.order_backoff_max,
                    None,
                )
                .max(self.cfg.release_backoff_base);
                entry.next_try = Some(now + wait);
                metrics::counter!(crate::telemetry::names::AUTOSCALER_RELEASE_FAILURES)
                    .increment(1);
                report.errors.push(Problem::ReleaseFailed {
                    device_id: device_id.to_owned(),
                    why: why.to_owned(),
                    attempt: entry.failures,
                    error: e,
                    retry_in: Duration::from_secs(wait.as_secs().max(1)),
                });
            }
        }
    }

    /// Orders one server in the first zone that has the offer in stock, recording it in
    /// the ledger before it is sent. Returns whether to go on ordering this round.
    async fn order_one(
        &mut self,
        reason: &str,
        now: Instant,
        wall: SystemTime,
        report: &mut Report,
    ) -> bool {
        let mut refused = OrderRefused { zones: Vec::new() };
        for zi in 0..self.zones.len() {
            let zone = self.zones[zi].0.clone();
            let offer = match self.offer_in(zi).await {
                Ok(offer) => offer,
                Err(why) => {
                    refused.zones.push(ZoneRefusal { zone, why });
                    continue;
                }
            };
            if let Some(price) = offer.price_per_hour {
                self.offer_price = Some(price);
                if let Some(limit) = self.over_budget(price) {
                    report.budget_reached = Some(limit);
                    return false;
                }
            }
            let request_id = new_request_id();
            let order = Order {
                request_id: request_id.clone(),
                zone: zone.clone(),
                offer: self.cfg.offer.clone(),
                placed_at: wall,
                device_id: None,
                state: OrderState::Placed,
                price_per_hour: offer.price_per_hour.unwrap_or(0.0),
                released_at: None,
                reason: reason.to_owned(),
            };
            if let Err(e) = self.write_ahead(order, wall).await {
                report.errors.push(e);
                return false;
            }
            let spec = self.create_spec(&zone, &offer, &request_id);
            let created = self.zones[zi].1.create(&spec).await;
            let order = self.ledger.get_mut(&request_id);
            match created {
                Ok(d) => {
                    tracing::info!(device = %d.id, %zone, request = %request_id, reason, "server ordered");
                    if let Some(o) = order {
                        o.device_id = Some(d.id);
                    }
                    report.ordered += 1;
                    self.order_failures = 0;
                    self.memory.next_order_at = None;
                    return true;
                }
                Err(e @ ProviderError::Held(_)) => {
                    // Not sent (no longer leading): nothing to count, nothing to retry.
                    if let Some(o) = order {
                        o.state = OrderState::Refused;
                    }
                    report.errors.push(Problem::OrderHeld {
                        request_id: request_id.clone(),
                        error: e,
                    });
                    return false;
                }
                Err(e @ ProviderError::Uncertain(_)) => {
                    // It may stand: it counts as on its way until its server shows (or
                    // its deadline passes), and is never sent again.
                    report.errors.push(Problem::OrderUncertain {
                        request_id: request_id.clone(),
                        zone: zone.clone(),
                        error: e,
                    });
                    report.ordered += 1;
                    return true;
                }
                Err(e) => {
                    if let Some(o) = order {
                        o.state = OrderState::Refused;
                    }
                    refused.zones.push(ZoneRefusal {
                        zone,
                        why: WhyNot::Order(e),
                    });
                }
            }
        }
        report
            .errors
            .extend(refused.zones.into_iter().map(Problem::ZoneRefused));
        self.order_failures += 1;
        let wait = backoff(
            self.order_failures,
            self.cfg.order_backoff_base,
            self.cfg.order_backoff_max,
            None,
        )
        .max(self.cfg.order_backoff_base);
        self.memory.next_order_at = Some(now + wait);
        false
    }

    /// The configured offer in zone `zi`, in stock; or why not.
    async fn offer_in(&self, zi: usize) -> Result<crate::provider::Offer, WhyNot> {
        let offers = self.zones[zi].1.offers().await.map_err(WhyNot::Offers)?;
        let name = &self.cfg.offer;
        let offer = offers
            .into_iter()
            .find(|o| &o.name == name)
            .ok_or_else(|| WhyNot::NoSuchOffer(name.clone()))?;
        if offer.stock == Stock::Empty {
            return Err(WhyNot::OutOfStock(name.clone()));
        }
        Ok(offer)
    }

    /// The budget's limit, in words, if one more server at `price` per hour would pass
    /// `max_price_per_hour`.
    fn over_budget(&self, price: f64) -> Option<String> {
        let max = self.cfg.rules.budget.max_price_per_hour?;
        let billed: f64 = self
            .ledger
            .orders
            .iter()
            .filter(|o| o.billed())
            .map(|o| o.price_per_hour)
            .sum();
        (billed + price > max + 1e-9).then(|| {
            format!(
                "budget: {billed:.2}/h spent on servers, at most {max:.2}/h ({price:.2}/h each)"
            )
        })
    }

    /// Records `order` in the ledger before it is sent (write-ahead): if this process
    /// dies with the order sent, the next one knows (in a cluster, the next leader: the
    /// ledger goes to etcd, fenced). On failure the order is taken back out, and the
    /// error says that nothing was ordered.
    async fn write_ahead(&mut self, order: Order, wall: SystemTime) -> Result<(), Problem> {
        self.ledger.orders.push(order);
        if let Err(e) = self.ledger.save(wall) {
            self.ledger.orders.pop();
            return Err(Problem::LedgerNotWritten {
                error: e.to_string(),
            });
        }
        if let Some(gate) = &self.gate {
            let key = gate.cluster().ledger_key();
            if let Err(e) = gate.put(vec![(key, self.ledger.to_json())]).await {
                self.ledger.orders.pop();
                return Err(Problem::LedgerNotShared {
                    error: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// What the vendor is asked for: the offer, a name and the pool's tags, the request
    /// id (found again by its tag if the answer is lost), the bootstrap's user-data.
    fn create_spec(
        &self,
        zone: &str,
        offer: &crate::provider::Offer,
        request_id: &str,
    ) -> CreateSpec {
        let name = format!("surge-{}-{}", self.cfg.pool, &request_id[..8]);
        let blade_port = self.cfg.rules.blade_port.to_string();
        let user_data = self.cfg.bootstrap.as_ref().map(|b| {
            b.render(&[
                ("server_name", &name),
                ("pool", &self.cfg.pool),
                ("zone", zone),
                ("proxy_address", &self.cfg.proxy_address),
                ("blade_port", &blade_port),
            ])
        });
        CreateSpec {
            offer_id: offer.id.clone(),
            name,
            pool: self.cfg.pool.clone(),
            request_id: request_id.to_owned(),
            user_data,
            ssh_key_ids: self
                .cfg
                .bootstrap
                .as_ref()
                .map(|b| b.ssh_key_ids.clone())
                .unwrap_or_default(),
            private_network: self.cfg.private_network.clone(),
        }
    }
}

/// What a leading round read from the provider.
struct Observed {
    zones: Vec<ZoneListing>,
    looked_up: HashMap<String, LookUp>,
    addresses: HashMap<String, std::net::IpAddr>,
    /// Delivered servers not attached to the private network yet: (zone, server).
    unattached: Vec<(String, String)>,
}

/// What a follower's round may use of the reconciler: reads of the provider and the
/// pool to change, never a write to the provider.
pub(super) struct Following<'a, P> {
    r: &'a Reconciler<P>,
}

impl<P: Provider> Following<'_, P> {
    /// Every zone's inventory (with look-ups of known servers it misses; none are known
    /// with the memory dropped).
    pub(super) async fn inventory(&self, report: &mut Report) -> Vec<ZoneListing> {
        self.r.inventory(report).await.0
    }

    pub(super) fn nodes(&self, now: Instant) -> Vec<Node> {
        self.r.nodes(now)
    }

    pub(super) fn pool(&self) -> &Pool {
        &self.r.pool
    }

    pub(super) fn drain_timeout(&self) -> Duration {
        self.r.cfg.rules.drain_timeout
    }

    pub(super) fn orders(&self) -> &[Order] {
        &self.r.ledger.orders
    }
}

/// Why no zone could take an order: each zone's reason, in order of preference.
#[derive(Debug, thiserror::Error)]
#[error("no zone could take the order: {}", .zones.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct OrderRefused {
    pub zones: Vec<ZoneRefusal>,
}

/// Why one zone could not take an order.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{zone}: {why}")]
pub struct ZoneRefusal {
    pub zone: String,
    pub why: WhyNot,
}

/// What stood in the way of an order in a zone.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WhyNot {
    #[error("offers: {0}")]
    Offers(#[source] ProviderError),
    #[error("no offer named {0}")]
    NoSuchOffer(String),
    #[error("{0} out of stock")]
    OutOfStock(String),
    #[error("{}", order_error(.0))]
    Order(#[source] ProviderError),
}

/// An order's error as the status page words it (out of stock needs no "order:").
fn order_error(e: &ProviderError) -> String {
    match e {
        ProviderError::OutOfStock(_) => e.to_string(),
        other => format!("order: {other}"),
    }
}
