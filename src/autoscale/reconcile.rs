//! Drives the provider toward the desired size: adopts what the provider already runs for
//! this pool (so a restart neither orphans nor duplicates a blade), orders what is
//! missing in the first zone with stock, puts delivered blades into the pool (they warm
//! up through health checks and slow start), releases failed orders, and on scale-in
//! drains the least-loaded provisioned node and deletes it once drained.
//!
//! It never touches static or demo nodes, never undrains anything, and only finishes
//! drains it started itself: a node an operator drained stays drained.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pool::{Backend, Origin, Pool, State};
use crate::provider::{
    backoff, new_request_id, CreateSpec, Device, DeviceState, Provider, ProviderError, Stock,
    POOL_TAG,
};

/// Most servers ordered in one step; a spike orders over a few ticks, not all at once.
const MAX_ORDERS_PER_STEP: usize = 8;

#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// Pool name, also the `surge-pool` tag value.
    pub pool: String,
    /// Offer name to order.
    pub offer: String,
    /// Port the frontend listens on on each server.
    pub blade_port: u16,
    /// Deadline for carts bound to a node being scaled in.
    pub drain_timeout: Duration,
    /// Warm spares to keep: delivered, healthy, no traffic, promoted first on a spike.
    pub standby: usize,
    /// Back-off after a round in which no zone could take an order.
    pub order_backoff_base: Duration,
    pub order_backoff_max: Duration,
}

/// What one step saw and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Nodes in service (all origins).
    pub in_service: usize,
    /// Ordered or delivered servers not yet in service.
    pub pending: usize,
    /// Warm spares ready to be promoted.
    pub standby: usize,
    /// Spares promoted into service this step.
    pub promoted: usize,
    /// Servers the provider runs for this pool.
    pub devices: usize,
    pub ordered: usize,
    pub released: usize,
    pub draining: usize,
    /// Problems met, in words for the status page and the log.
    pub errors: Vec<String>,
}

/// Why no zone could take an order: each zone's reason, in order of preference.
#[derive(Debug, thiserror::Error)]
#[error("no zone could take the order: {}", .zones.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct OrderRefused {
    pub zones: Vec<ZoneRefusal>,
}

/// Why one zone could not take an order.
#[derive(Debug, thiserror::Error)]
#[error("{zone}: {why}")]
pub struct ZoneRefusal {
    pub zone: String,
    pub why: WhyNot,
}

/// What stood in the way of an order in a zone.
#[derive(Debug, thiserror::Error)]
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

/// The backend id a provisioned server gets in the pool.
pub fn backend_id(device: &Device) -> String {
    format!("bm-{}", device.id.chars().take(8).collect::<String>())
}

pub struct Reconciler<P> {
    pool: Arc<Pool>,
    /// Providers, one per zone, in order of preference.
    zones: Vec<(String, P)>,
    cfg: ReconcileConfig,
    /// Nodes this reconciler is draining: backend id → (zone index, device id).
    draining: HashMap<String, (usize, String)>,
    /// Servers released and not yet gone from the inventory: never re-adopted.
    released: HashSet<String>,
    /// Consecutive rounds in which no order could be placed.
    order_failures: u32,
    next_order_at: Option<Instant>,
    /// Whether servers found on the provider have been adopted once (a complete
    /// inventory seen). Before that, what the provider runs is what a previous surge
    /// (restarted, or handing over) was serving with: see [`adopt_as_spare`].
    adopted_once: bool,
}

/// Whether a delivered server joining the pool becomes a spare. Normally when the pool
/// already has (or is getting) the desired in-service count. On the first adoption, the
/// servers a previous surge ran were serving shoppers (their carts bound to them), and the
/// desired count of a process just started only knows the static nodes: all but
/// `standby` of them go back into service.
fn adopt_as_spare(
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

impl<P: Provider> Reconciler<P> {
    pub fn new(pool: Arc<Pool>, zones: Vec<(String, P)>, cfg: ReconcileConfig) -> Self {
        Self {
            pool,
            zones,
            cfg,
            draining: HashMap::new(),
            released: HashSet::new(),
            order_failures: 0,
            next_order_at: None,
            adopted_once: false,
        }
    }

    /// One round toward `desired` in-service nodes.
    pub async fn step(&mut self, desired: usize, now: Instant) -> Report {
        let mut report = Report::default();
        let tag = format!("{POOL_TAG}={}", self.cfg.pool);

        // 1. Inventory. Without a complete one, nothing is ordered or released: a zone
        // that did not answer may hold servers we would otherwise order again.
        let mut devices: Vec<(usize, Device)> = Vec::new();
        let mut complete = true;
        for (zi, (zone, provider)) in self.zones.iter().enumerate() {
            match provider.list(&tag).await {
                Ok(list) => devices.extend(list.into_iter().map(|d| (zi, d))),
                Err(e) => {
                    complete = false;
                    report.errors.push(format!("listing {zone}: {e}"));
                }
            }
        }
        report.devices = devices.len();

        // 2. Finish the drains this reconciler started: release, then forget the node.
        let finished: Vec<String> = self
            .draining
            .keys()
            .filter(|id| self.pool.drain_done(id, now) != Some(false))
            .cloned()
            .collect();
        for id in finished {
            let Some((zi, device_id)) = self.draining.get(&id).cloned() else {
                continue;
            };
            match self.zones[zi].1.delete(&device_id).await {
                Ok(()) => {
                    let _ = self.pool.remove(&id);
                    self.draining.remove(&id);
                    self.released.insert(device_id.clone());
                    report.released += 1;
                    tracing::info!(backend = %id, device = %device_id, "drained node released to the provider");
                }
                Err(e) => report.errors.push(format!("releasing {device_id}: {e}")),
            }
        }

        // 3. Adopt delivered servers (into service while short of `desired`, else as
        // spares); release failed ones.
        let table = self.pool.snapshot_full();
        let mut toward_service = table.count(State::InService) + table.count(State::Warming);
        let mut pending = 0;
        let first_adoption = !self.adopted_once;
        let mut spares_so_far = table.count(State::Standby);
        let mut live_ids = HashSet::new();
        if complete {
            self.released
                .retain(|id| devices.iter().any(|(_, d)| &d.id == id));
        }
        let current: Vec<(usize, Device)> = devices
            .iter()
            .filter(|(_, d)| !self.released.contains(&d.id))
            .cloned()
            .collect();
        for (zi, d) in &current {
            let id = backend_id(d);
            live_ids.insert(id.clone());
            match d.state {
                DeviceState::Ready => match (table.get(&id), d.address) {
                    (Some(m), _) => {
                        if matches!(m.state, State::Warming) {
                            pending += 1;
                        }
                    }
                    (None, Some(ip)) if !self.draining.contains_key(&id) => {
                        let backend = Backend::new(
                            &id,
                            SocketAddr::new(ip, self.cfg.blade_port),
                            1,
                            Origin::Provisioned,
                        );
                        let backend = Arc::new(backend);
                        let as_spare = adopt_as_spare(
                            first_adoption,
                            toward_service,
                            desired,
                            spares_so_far,
                            self.cfg.standby,
                        );
                        let added = if as_spare {
                            self.pool.add_standby(backend)
                        } else {
                            self.pool.add(backend)
                        };
                        match added {
                            Ok(()) => {
                                tracing::info!(backend = %id, %ip, zone = %self.zones[*zi].0, standby = as_spare, "delivered server joins the pool")
                            }
                            Err(e) => report.errors.push(format!("adding {id}: {e}")),
                        }
                        if as_spare {
                            spares_so_far += 1;
                        } else {
                            toward_service += 1;
                            pending += 1;
                        }
                    }
                    _ => {}
                },
                DeviceState::Requested | DeviceState::Provisioning | DeviceState::Installing => {
                    pending += 1
                }
                DeviceState::Failed if complete => {
                    report.errors.push(format!(
                        "server {} failed ({}); releasing it",
                        d.id, d.vendor_status
                    ));
                    match self.zones[*zi].1.delete(&d.id).await {
                        Ok(()) => {
                            self.released.insert(d.id.clone());
                            report.released += 1;
                        }
                        Err(e) => report.errors.push(format!("releasing {}: {e}", d.id)),
                    }
                }
                DeviceState::Failed | DeviceState::Deleting | DeviceState::Gone => {}
            }
        }
        if complete {
            self.adopted_once = true;
        }
        // Provisioned nodes whose server vanished (released by hand): out of the pool.
        if complete {
            for m in table.members() {
                if m.backend.origin == Origin::Provisioned && !live_ids.contains(&*m.backend.id) {
                    let _ = self.pool.remove(&m.backend.id);
                    self.draining.remove(&*m.backend.id);
                }
            }
        }

        // 4. Promote spares first: they are in service within this step.
        let table = self.pool.snapshot_full();
        let mut in_service = table.count(State::InService);
        let mut standby: Vec<&str> = table
            .members()
            .iter()
            .filter(|m| m.state == State::Standby)
            .map(|m| &*m.backend.id)
            .collect();
        while desired > in_service + pending {
            let Some(id) = standby.pop() else { break };
            if self.pool.promote(id) {
                tracing::info!(backend = %id, "standby promoted into service");
                in_service += 1;
                report.promoted += 1;
            }
        }
        report.in_service = in_service;
        report.pending = pending;
        report.standby = standby.len();
        report.draining = self.draining.len();

        // 5. Scale up: what is on its way counts, so a slow delivery is not ordered twice;
        // spares are replaced as they are promoted.
        let supply = in_service + pending + standby.len();
        let target = desired + self.cfg.standby;
        if complete && target > supply && self.next_order_at.is_none_or(|t| now >= t) {
            let wanted = (target - supply).min(MAX_ORDERS_PER_STEP);
            for _ in 0..wanted {
                match self.order_one().await {
                    Ok(()) => {
                        report.ordered += 1;
                        self.order_failures = 0;
                        self.next_order_at = None;
                    }
                    Err(refused) => {
                        report
                            .errors
                            .extend(refused.zones.iter().map(ToString::to_string));
                        self.order_failures += 1;
                        let wait = backoff(
                            self.order_failures,
                            self.cfg.order_backoff_base,
                            self.cfg.order_backoff_max,
                            None,
                        )
                        .max(self.cfg.order_backoff_base);
                        self.next_order_at = Some(now + wait);
                        break;
                    }
                }
            }
            report.pending += report.ordered;
        }

        // 6. Scale in, cheapest first: spares beyond the target and servers not yet
        // delivered (they serve nothing), then drain the least-loaded provisioned node.
        // Spares on their way count toward the standby target, not as surplus.
        let total = in_service + pending + standby.len();
        if complete && total > target && self.draining.is_empty() {
            let mut surplus = total - target;
            let extra_spares = standby.len().saturating_sub(self.cfg.standby);
            for id in standby.iter().take(extra_spares.min(surplus)) {
                if let Some((zi, d)) = devices.iter().find(|(_, d)| backend_id(d) == *id) {
                    if self.zones[*zi].1.delete(&d.id).await.is_ok() {
                        self.released.insert(d.id.clone());
                        let _ = self.pool.remove(id);
                        report.released += 1;
                        surplus -= 1;
                    }
                }
            }
            for (zi, d) in &devices {
                if surplus == 0 {
                    break;
                }
                let not_serving = matches!(
                    d.state,
                    DeviceState::Requested | DeviceState::Provisioning | DeviceState::Installing
                );
                if not_serving && self.zones[*zi].1.delete(&d.id).await.is_ok() {
                    self.released.insert(d.id.clone());
                    surplus -= 1;
                    report.released += 1;
                }
            }
            if surplus > 0 && desired < in_service {
                let candidate = table
                    .members()
                    .iter()
                    .filter(|m| {
                        m.state == State::InService && m.backend.origin == Origin::Provisioned
                    })
                    .min_by_key(|m| m.backend.in_flight());
                if let Some(m) = candidate {
                    let id = m.backend.id.to_string();
                    let device = devices.iter().find(|(_, d)| backend_id(d) == id);
                    if let Some((zi, d)) = device {
                        match self.pool.drain(&id, self.cfg.drain_timeout) {
                            Ok(_) => {
                                tracing::info!(backend = %id, "scaling in: draining");
                                self.draining.insert(id, (*zi, d.id.clone()));
                                report.draining = self.draining.len();
                            }
                            Err(e) => report.errors.push(format!("draining {id}: {e}")),
                        }
                    }
                }
            }
        }
        for e in &report.errors {
            tracing::warn!(error = %e, "reconciler");
        }
        report
    }

    /// Orders one server in the first zone that has the offer in stock; why each zone
    /// could not take it otherwise.
    async fn order_one(&self) -> Result<(), OrderRefused> {
        let mut refused = OrderRefused { zones: Vec::new() };
        let mut no = |zone: &str, why| {
            refused.zones.push(ZoneRefusal {
                zone: zone.to_owned(),
                why,
            })
        };
        for (zone, provider) in &self.zones {
            let offer = match provider.offers().await {
                Ok(offers) => offers.into_iter().find(|o| o.name == self.cfg.offer),
                Err(e) => {
                    no(zone, WhyNot::Offers(e));
                    continue;
                }
            };
            let Some(offer) = offer else {
                no(zone, WhyNot::NoSuchOffer(self.cfg.offer.clone()));
                continue;
            };
            if offer.stock == Stock::Empty {
                no(zone, WhyNot::OutOfStock(self.cfg.offer.clone()));
                continue;
            }
            let spec = CreateSpec {
                offer_id: offer.id.clone(),
                name: format!("surge-{}-{}", self.cfg.pool, fastrand::u32(..) % 100_000),
                pool: self.cfg.pool.clone(),
                request_id: new_request_id(),
            };
            match provider.create(&spec).await {
                Ok(d) => {
                    tracing::info!(device = %d.id, %zone, "server ordered");
                    return Ok(());
                }
                Err(e) => no(zone, WhyNot::Order(e)),
            }
        }
        Err(refused)
    }
}

#[cfg(test)]
mod tests {
    use super::adopt_as_spare;

    #[test]
    fn a_previous_surges_servers_go_back_into_service_but_for_the_spares() {
        // First adoption: desired (3, from static nodes alone) does not matter; with one
        // spare wanted, the first server found is the spare, the rest serve.
        assert!(adopt_as_spare(true, 3, 3, 0, 1));
        assert!(!adopt_as_spare(true, 3, 3, 1, 1));
        assert!(!adopt_as_spare(true, 4, 3, 1, 1));
        assert!(!adopt_as_spare(true, 3, 3, 0, 0));
        // Afterwards: spare once the pool has what is desired.
        assert!(adopt_as_spare(false, 3, 3, 0, 1));
        assert!(!adopt_as_spare(false, 2, 3, 0, 1));
    }
}
