//! The autoscaler: every tick the meter reads the pool's counters, the policy decides the
//! desired size, and the reconciler drives the provider toward it.
//!
//! Owns: observations, decisions and the node lifecycle at the provider. Must not: talk
//! HTTP except through `provider`, or import the proxy.

pub mod cost;
pub mod fence;
pub mod follow;
pub mod ledger;
pub mod meter;
pub mod plan;
pub mod policy;
pub mod problem;
pub mod reconcile;
pub mod schedule;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::cluster::{Cluster, Reading};
use crate::config::AutoscaleConfig;
use crate::pool::Pool;
use crate::provider::Provider;
use crate::telemetry::names;
use fence::{Fenced, Gate};
use meter::Meter;
use policy::{Decision, PolicyState};
use problem::Problem;
use reconcile::{ReconcileConfig, Reconciler, Report};

/// Decisions kept for `GET /v1/autoscaler`.
const HISTORY: usize = 100;

/// What the admin API shows and changes: shared with the running loop.
#[derive(Debug, Default)]
pub struct Shared {
    /// Operator's pause switch (also `autoscale.paused` in config).
    paused: AtomicBool,
    status: Mutex<Status>,
    /// Reconciliation rounds done; ≥ 1 once what the provider runs has been adopted.
    rounds: watch::Sender<u64>,
    /// Held for the whole of a round, so [`Shared::step_aside`] can wait for one to end.
    round: tokio::sync::Mutex<()>,
    /// Set while another process (a successor taking over) runs the autoscaler: no round
    /// runs here, so two processes never order or release side by side.
    aside: AtomicBool,
    /// Set by [`Shared::step_back`]: the next round first re-reads what the other process
    /// may have ordered (the ledger file) and re-adopts the provider's servers.
    resumed: AtomicBool,
}

/// The autoscaler's latest round, as the admin API shows it.
#[derive(Debug, Default, Clone)]
pub struct Status {
    /// In-service nodes the policy wants.
    pub desired: usize,
    /// The minimum a scheduled event imposes now, and the event's name.
    pub scheduled: Option<(usize, String)>,
    /// What the meter saw.
    pub observations: Option<policy::Observations>,
    /// What the reconciler saw and did.
    pub report: Report,
    /// Decisions that changed the desired or current size, oldest first.
    pub decisions: VecDeque<(SystemTime, Decision)>,
    /// What the servers cost.
    pub cost: cost::Cost,
    /// Desired, in service and ordered, once a second over the last ten minutes (the
    /// status page's chart).
    pub samples: VecDeque<Sample>,
}

/// The autoscaler's counts at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: SystemTime,
    pub desired: usize,
    pub in_service: usize,
    pub ordered: usize,
}

/// Samples kept: ten minutes at one a second.
const SAMPLES: usize = 600;

impl Status {
    /// Records the round's counts, at most one sample a second.
    fn sample(&mut self, at: SystemTime) {
        let recent = self.samples.back().is_some_and(|last| {
            at.duration_since(last.at)
                .is_ok_and(|d| d < std::time::Duration::from_secs(1))
        });
        if recent {
            return;
        }
        self.samples.push_back(Sample {
            at,
            desired: self.desired,
            in_service: self.report.in_service,
            ordered: self.report.pending,
        });
        if self.samples.len() > SAMPLES {
            self.samples.pop_front();
        }
    }
}

impl Shared {
    /// A status starting paused or not.
    pub fn new(paused: bool) -> Self {
        let shared = Self::default();
        shared.set_paused(paused);
        shared
    }

    /// Whether the first reconciliation round is done: servers the provider already
    /// runs for this pool (a restart, a hand-over) are in the pool by then.
    pub fn adopted(&self) -> bool {
        *self.rounds.borrow() > 0
    }

    /// Changes on every reconciliation round (for waiting until [`Shared::adopted`]).
    pub fn rounds(&self) -> watch::Receiver<u64> {
        self.rounds.subscribe()
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// The operator's pause switch: a paused autoscaler holds the current size.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Stops this process's rounds (waiting for one under way to end) while a successor
    /// takes over: a standalone surge's provider and ledger file are then its alone.
    pub async fn step_aside(&self) {
        let _round = self.round.lock().await;
        self.aside.store(true, Ordering::SeqCst);
    }

    /// Runs rounds again after [`Shared::step_aside`] (the successor failed or died),
    /// starting from what the provider and the ledger file say now.
    pub fn step_back(&self) {
        self.resumed.store(true, Ordering::SeqCst);
        self.aside.store(false, Ordering::SeqCst);
    }

    /// A copy of the latest round's status.
    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The reconciler's settings from the configuration: the autoscaler's, and what of the
/// provider's the orders need (`None`: no bootstrap, public addresses).
pub fn reconcile_config(
    cfg: &AutoscaleConfig,
    provider: Option<&crate::config::ProviderConfig>,
    pool: &str,
    proxy_address: &str,
    blade_port: u16,
) -> ReconcileConfig {
    let private_network = provider.and_then(|p| match &p.reach {
        crate::config::Reach::Private(network) => Some(network.clone()),
        crate::config::Reach::Public => None,
    });
    ReconcileConfig {
        pool: pool.to_owned(),
        offer: cfg.offer.clone(),
        rules: plan::Rules {
            blade_port,
            standby: cfg.standby,
            drain_timeout: cfg.drain_timeout,
            missing_limit: cfg.missing_listings,
            order_deadline: cfg.order_deadline,
            unanswered_order_wait: cfg.unanswered_order_wait,
            release_margin: cfg.release_margin,
            down_release_after: cfg.release_down_after,
            budget: plan::Budget {
                max_orders_per_hour: cfg.budget.max_orders_per_hour,
                max_servers: cfg.budget.max_servers,
                max_price_per_hour: cfg.budget.max_price_per_hour,
            },
            private_network: private_network.is_some(),
            bootstrap_timeout: cfg.bootstrap_timeout,
            bootstrap_failure_limit: cfg.bootstrap_failures,
        },
        order_backoff_base: Duration::from_secs(1),
        order_backoff_max: Duration::from_secs(60),
        release_backoff_base: Duration::from_secs(1),
        bootstrap: provider.and_then(|p| p.bootstrap.clone()),
        private_network,
        own_network: provider.is_some_and(|p| p.kind == "maas"),
        proxy_address: provider
            .and_then(|p| p.bootstrap.as_ref())
            .and_then(|b| b.proxy_address.clone())
            .unwrap_or_else(|| proxy_address.to_owned()),
    }
}

/// Opens the order ledger the configuration names (in memory when it names none).
pub fn open_ledger(cfg: &AutoscaleConfig) -> Result<ledger::Ledger, ledger::LedgerError> {
    match &cfg.ledger {
        Some(file) => ledger::Ledger::open(file),
        None => Ok(ledger::Ledger::in_memory()),
    }
}

/// Where the autoscaler orders from.
pub struct Providers<P> {
    /// The provider's settings (bootstrap, private network).
    pub settings: crate::config::ProviderConfig,
    /// The proxy's first listener, for `{{proxy_address}}` in the user-data.
    pub proxy_address: String,
    /// One client per zone ordered from, in order of preference.
    pub zones: Vec<(String, P)>,
    /// Zones only watched for unmanaged servers.
    pub watched: Vec<(String, P)>,
    /// Port the frontend listens on on each server.
    pub blade_port: u16,
}

/// Runs the loop until `shutdown` turns true. In a cluster, only the leader plans and
/// writes; the others follow its roles (see [`follow`]).
pub async fn run<P: Provider>(
    pool: Arc<Pool>,
    cfg: AutoscaleConfig,
    providers: Providers<P>,
    ledger: ledger::Ledger,
    shared: Arc<Shared>,
    cluster: Option<Arc<Cluster>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let meter = Meter::with_fast_window(cfg.metrics_window, cfg.fast_window);
    let state = PolicyState::default();
    let started = SystemTime::now();
    let gate = cluster.clone().map(Gate::new);
    let fence = |zones: Vec<(String, P)>| -> Vec<(String, Fenced<P>)> {
        zones
            .into_iter()
            .map(|(z, p)| (z, Fenced::new(p, gate.clone())))
            .collect()
    };
    let mut reconciler = Reconciler::new(
        pool.clone(),
        fence(providers.zones),
        reconcile_config(
            &cfg,
            Some(&providers.settings),
            &pool.settings().name,
            &providers.proxy_address,
            providers.blade_port,
        ),
        ledger,
    )
    .watching(fence(providers.watched));
    if let Some(g) = &gate {
        reconciler = reconciler.fenced(g.clone());
    }
    let cluster_present = cluster.is_some();
    let mut round = Rounds {
        pool,
        cfg,
        shared,
        cluster,
        gate,
        meter,
        state,
        reconciler,
        started,
        term: None,
        gauges: Gauges::new(cluster_present),
    };
    round.gauges.max.set(round.cfg.policy.max as f64);
    let mut tick = tokio::time::interval(round.cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let shared = round.shared.clone();
        let _round = shared.round.lock().await;
        if shared.aside.load(Ordering::SeqCst) {
            continue;
        }
        if shared.resumed.swap(false, Ordering::SeqCst) {
            for problem in round.reconciler.resume() {
                tracing::warn!(%problem, "autoscaler: resuming");
            }
        }
        let outcome = round.once(Instant::now()).await;
        record(&shared, outcome);
    }
}

/// The autoscaler's gauges.
struct Gauges {
    servers: metrics::Gauge,
    cost: metrics::Gauge,
    today: metrics::Gauge,
    desired: metrics::Gauge,
    min: metrics::Gauge,
    max: metrics::Gauge,
    /// In a cluster only.
    leader: Option<metrics::Gauge>,
}

impl Gauges {
    fn new(cluster: bool) -> Self {
        Self {
            servers: metrics::gauge!(names::AUTOSCALER_SERVERS),
            cost: metrics::gauge!(names::AUTOSCALER_COST_PER_HOUR),
            today: metrics::gauge!(names::AUTOSCALER_SPENT_TODAY),
            desired: metrics::gauge!(names::AUTOSCALER_DESIRED),
            min: metrics::gauge!(names::AUTOSCALER_MIN),
            max: metrics::gauge!(names::AUTOSCALER_MAX),
            leader: cluster.then(|| metrics::gauge!(names::CLUSTER_LEADER)),
        }
    }
}

/// What the loop keeps from one round to the next.
struct Rounds<P: Provider> {
    pool: Arc<Pool>,
    cfg: AutoscaleConfig,
    shared: Arc<Shared>,
    cluster: Option<Arc<Cluster>>,
    gate: Option<Gate>,
    meter: Meter,
    state: PolicyState,
    reconciler: Reconciler<Fenced<P>>,
    started: SystemTime,
    /// The term the memory belongs to: a new one starts from the etcd records.
    term: Option<crate::cluster::Term>,
    gauges: Gauges,
}

/// What a round did, for the status: a leader's (or a lone instance's) decision, or a
/// follower's report.
struct Outcome {
    desired: usize,
    observations: policy::Observations,
    report: Report,
    led: Option<Led>,
}

/// The part of a round only the deciding instance has.
struct Led {
    decision: Decision,
    scheduled: Option<(usize, String)>,
    cost: cost::Cost,
}

impl<P: Provider> Rounds<P> {
    /// One round: in a cluster, a follower's if this instance does not lead (or has not
    /// taken over yet), else the leader's.
    async fn once(&mut self, now: Instant) -> Outcome {
        let local = self.meter.observe(&self.pool, now);
        let Some(c) = self.cluster.clone() else {
            return self.lead(local, now).await;
        };
        let lead = c.leading();
        if let Some(g) = &self.gauges.leader {
            g.set(if lead.is_some() { 1.0 } else { 0.0 });
        }
        if let Some(g) = &self.gate {
            g.set_term(lead);
        }
        let obs = cluster_round(
            &c,
            &self.pool,
            &self.meter,
            &local,
            &self.cfg,
            &mut self.reconciler,
            now,
        )
        .await;
        if lead.is_some() && lead != self.term {
            match take_over(&c, &mut self.reconciler).await {
                Ok(()) => self.term = lead,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot take over yet");
                    if let Some(g) = &self.gate {
                        g.set_term(None);
                    }
                }
            }
        }
        if lead.is_none() || lead != self.term {
            self.term = None;
            return self.follow(&c, obs, now).await;
        }
        self.lead(obs, now).await
    }

    /// A follower's round: the pool set to the roles the leader published.
    async fn follow(&mut self, c: &Cluster, obs: policy::Observations, now: Instant) -> Outcome {
        let roles = c.roles().await;
        let operator: std::collections::HashSet<String> =
            c.intents().borrow().nodes.keys().cloned().collect();
        let mut report = match &roles {
            Ok(r) => follow::round(self.reconciler.as_follower(), r.as_ref(), &operator, now).await,
            // etcd away: the pool stays as it is.
            Err(e) => Report {
                errors: vec![Problem::ClusterAway {
                    error: e.to_string(),
                }],
                ..Report::default()
            },
        };
        report.notes.retain(|n| !n.is_empty());
        Outcome {
            desired: report.in_service,
            observations: obs,
            report,
            led: None,
        }
    }

    /// The deciding round: policy, then the reconciler's step towards its count, the
    /// roles published for the followers, the cost.
    async fn lead(&mut self, obs: policy::Observations, now: Instant) -> Outcome {
        let cfg = &self.cfg;
        let current = self.pool.snapshot().count(crate::pool::State::InService);
        let paused = self.shared.is_paused();
        let scheduled = schedule::min_at(&cfg.schedule, chrono::Utc::now());
        let min = scheduled.map_or(cfg.policy.min, |(m, _)| m.max(cfg.policy.min));
        self.gauges.min.set(min as f64);
        let decision = policy::decide(
            &obs,
            current,
            min,
            paused,
            &cfg.policy,
            &mut self.state,
            now,
        );
        log_decision(&decision);
        self.gauges.desired.set(decision.desired as f64);
        let wall = SystemTime::now();
        if let Some(c) = &self.cluster {
            self.reconciler
                .set_operator_nodes(c.intents().borrow().nodes.keys().cloned());
        }
        let mut report = self.reconciler.step_at(decision.desired, now, wall).await;
        if let Some(c) = &self.cluster {
            if let Err(e) = self.reconciler.publish(c.instance(), wall).await {
                report.errors.push(Problem::Publish {
                    error: e.to_string(),
                });
            }
        }
        let cost = cost::cost(&report.orders, self.started, cfg.budget.timezone, wall);
        self.gauges.servers.set(cost.servers as f64);
        self.gauges.cost.set(cost.per_hour);
        self.gauges.today.set(cost.today);
        Outcome {
            desired: decision.desired,
            observations: obs,
            report,
            led: Some(Led {
                decision,
                scheduled: scheduled.map(|(m, name)| (m, name.to_owned())),
                cost,
            }),
        }
    }
}

fn log_decision(decision: &Decision) {
    if decision.desired != decision.current {
        tracing::info!(
            current = decision.current,
            desired = decision.desired,
            reasons = %decision.reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            "autoscaler decision"
        );
    }
    for r in &decision.reasons {
        metrics::counter!(names::AUTOSCALER_DECISIONS, "direction" => decision.direction(), "reason" => r.label())
            .increment(1);
    }
}

/// The one place a round's outcome becomes the status the admin API and the status page
/// read: counted, sampled, and (when this instance decided) its decision kept in the
/// history when it changed.
fn record(shared: &Shared, outcome: Outcome) {
    shared.rounds.send_modify(|n| *n += 1);
    let Ok(mut s) = shared.status.lock() else {
        return;
    };
    s.desired = outcome.desired;
    s.observations = Some(outcome.observations);
    s.report = outcome.report;
    let Some(led) = outcome.led else {
        s.sample(SystemTime::now());
        return;
    };
    if led.scheduled != s.scheduled {
        match &led.scheduled {
            Some((m, name)) => {
                tracing::info!(event = %name, min = m, "scheduled event: minimum raised")
            }
            None => tracing::info!("scheduled event over: minimum back to the configured one"),
        }
    }
    s.scheduled = led.scheduled;
    s.cost = led.cost;
    s.sample(SystemTime::now());
    let mut decision = led.decision;
    if let Some(limit) = &s.report.budget_reached {
        decision.reasons.push(policy::Reason::Budget {
            limit: limit.clone(),
        });
    }
    let budget_changed = |d: &Decision| {
        d.reasons
            .iter()
            .any(|r| matches!(r, policy::Reason::Budget { .. }))
            != s.report.budget_reached.is_some()
    };
    let changed = s.decisions.back().is_none_or(|(_, d)| {
        d.desired != decision.desired || d.current != decision.current || budget_changed(d)
    });
    if changed {
        s.decisions.push_back((SystemTime::now(), decision));
        if s.decisions.len() > HISTORY {
            s.decisions.pop_front();
        }
    }
}

/// A cluster member's share of a round: publishes this process's reading and, when it
/// leads, returns the cluster's demand (the sum of every member's; stale if any reading
/// is, or etcd does not answer) and tells the reconciler which nodes others still use.
async fn cluster_round<P: Provider>(
    cluster: &Cluster,
    pool: &Pool,
    meter: &Meter,
    local: &policy::Observations,
    cfg: &AutoscaleConfig,
    reconciler: &mut Reconciler<Fenced<P>>,
    now: Instant,
) -> policy::Observations {
    let table = pool.snapshot();
    let in_service = table.count(crate::pool::State::InService);
    let in_flight: u64 = table
        .members()
        .iter()
        .filter(|m| m.state == crate::pool::State::InService)
        .map(|m| u64::from(m.backend.in_flight()))
        .sum();
    drop(table);
    let reading = Reading {
        instance: cluster.instance().to_owned(),
        pid: std::process::id(),
        at_ms: crate::cluster::unix_ms(SystemTime::now()),
        connection_rate: local.connection_rate,
        request_rate: local.request_rate,
        in_flight,
        in_service,
        latency: meter.latency_window(),
        fresh: local.fresh,
        busy: follow::busy(&reconciler.pool_nodes(now)),
        line: crate::cluster::LineReading {
            waiting: local.line.waiting,
            held: local.line.held,
            arrived_per_second: local.line.arrived_per_second,
            let_in_per_second: local.line.let_in_per_second,
            shed_per_second: local.line.shed_per_second,
            per_node: local.line.per_node,
        },
    };
    if let Err(e) = cluster.publish(&reading).await {
        tracing::debug!(error = %e, "cluster: publishing the reading");
    }
    if cluster.leading().is_none() {
        return local.clone();
    }
    let stale = policy::Observations {
        fresh: false,
        ..local.clone()
    };
    let Ok(readings) = cluster.readings().await else {
        return stale;
    };
    let mut busy: std::collections::HashMap<String, Vec<String>> = Default::default();
    for r in readings
        .iter()
        .filter(|r| !(r.pid == reading.pid && r.instance == reading.instance))
    {
        for id in &r.busy {
            busy.entry(id.clone())
                .or_default()
                .push(format!("{} (pid {})", r.instance, r.pid));
        }
    }
    reconciler.set_busy_elsewhere(busy);
    // Readings come every tick: three missed ones (or a meter not yet warm) hold.
    let max_age = cfg.interval * 3 + std::time::Duration::from_secs(1);
    let demand = crate::cluster::merge(&readings, reading.at_ms, max_age);
    if !demand.stale.is_empty() {
        tracing::info!(stale = ?demand.stale, "cluster: stale readings; holding the size");
    }
    policy::Observations {
        connection_rate: demand.connection_rate,
        request_rate: demand.request_rate,
        in_flight_per_node: demand.in_flight as f64 / in_service.max(1) as f64,
        p99: crate::pool::latency::quantile_between(&[], &demand.latency, 0.99),
        fresh: demand.fresh,
        // Readings carry window rates only: the short window is this instance's view.
        recent_connection_rate: demand.connection_rate,
        at_limit: local.at_limit,
        line: policy::Line {
            waiting: demand.line.waiting,
            held: demand.line.held,
            arrived_per_second: demand.line.arrived_per_second,
            let_in_per_second: demand.line.let_in_per_second,
            shed_per_second: demand.line.shed_per_second,
            per_node: demand.line.per_node,
        },
    }
}

/// Starts a term: the previous leader's ledger and roles, read from etcd.
async fn take_over<P: Provider>(
    cluster: &Cluster,
    reconciler: &mut Reconciler<Fenced<P>>,
) -> Result<(), crate::cluster::ClusterError> {
    let ledger = cluster.ledger().await?;
    let roles = cluster.roles().await?;
    for problem in reconciler.take_over(ledger.as_deref(), roles.as_ref()) {
        tracing::error!(%problem, "cluster: taking over");
    }
    tracing::info!(
        orders = ledger.is_some(),
        nodes = roles.as_ref().map_or(0, |r| r.nodes.len()),
        "cluster: leading; took over the ledger and the nodes"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_history_keeps_one_sample_a_second_for_ten_minutes() {
        let mut s = Status::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        s.desired = 3;
        s.report.in_service = 2;
        s.report.pending = 1;
        s.sample(t0);
        // Rounds every 200 ms: one sample a second.
        for ms in (200..1000).step_by(200) {
            s.sample(t0 + Duration::from_millis(ms));
        }
        assert_eq!(s.samples.len(), 1);
        assert_eq!(
            s.samples[0],
            Sample {
                at: t0,
                desired: 3,
                in_service: 2,
                ordered: 1
            }
        );
        s.sample(t0 + Duration::from_secs(1));
        assert_eq!(s.samples.len(), 2);
        for i in 2..2000 {
            s.sample(t0 + Duration::from_secs(i));
        }
        assert_eq!(s.samples.len(), SAMPLES);
        assert_eq!(s.samples[0].at, t0 + Duration::from_secs(2000 - 600));
    }
}
