//! The autoscaler: every tick the meter reads the pool's counters, the policy decides the
//! desired size, and the reconciler drives the provider toward it.
//!
//! Owns: observations, decisions and the node lifecycle at the provider. Must not: talk
//! HTTP except through `provider`, or import the proxy.

pub mod cost;
pub mod ledger;
pub mod meter;
pub mod plan;
pub mod policy;
pub mod reconcile;
pub mod schedule;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::config::AutoscaleConfig;
use crate::pool::Pool;
use crate::provider::Provider;
use crate::telemetry::names;
use meter::Meter;
use policy::{Decision, PolicyState};
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

/// Runs the loop until `shutdown` turns true.
pub async fn run<P: Provider>(
    pool: Arc<Pool>,
    cfg: AutoscaleConfig,
    providers: Providers<P>,
    ledger: ledger::Ledger,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut meter = Meter::new(cfg.metrics_window);
    let mut state = PolicyState::default();
    let started = SystemTime::now();
    let mut reconciler = Reconciler::new(
        pool.clone(),
        providers.zones,
        reconcile_config(
            &cfg,
            Some(&providers.settings),
            &pool.settings().name,
            &providers.proxy_address,
            providers.blade_port,
        ),
        ledger,
    )
    .watching(providers.watched);
    let servers_gauge = metrics::gauge!(names::AUTOSCALER_SERVERS);
    let cost_gauge = metrics::gauge!(names::AUTOSCALER_COST_PER_HOUR);
    let today_gauge = metrics::gauge!(names::AUTOSCALER_SPENT_TODAY);
    let desired_gauge = metrics::gauge!(names::AUTOSCALER_DESIRED);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        let obs = meter.observe(&pool, now);
        let current = pool.snapshot().count(crate::pool::State::InService);
        let paused = shared.is_paused();
        let scheduled = schedule::min_at(&cfg.schedule, chrono::Utc::now());
        let min = scheduled.map_or(cfg.policy.min, |(m, _)| m.max(cfg.policy.min));
        let decision = policy::decide(&obs, current, min, paused, &cfg.policy, &mut state, now);
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
        desired_gauge.set(decision.desired as f64);
        let wall = SystemTime::now();
        let report = reconciler.step_at(decision.desired, now, wall).await;
        let cost = cost::cost(&report.orders, started, cfg.budget.timezone, wall);
        servers_gauge.set(cost.servers as f64);
        cost_gauge.set(cost.per_hour);
        today_gauge.set(cost.today);
        shared.rounds.send_modify(|n| *n += 1);
        if let Ok(mut s) = shared.status.lock() {
            s.desired = decision.desired;
            let scheduled = scheduled.map(|(m, name)| (m, name.to_owned()));
            if scheduled != s.scheduled {
                match &scheduled {
                    Some((m, name)) => {
                        tracing::info!(event = %name, min = m, "scheduled event: minimum raised")
                    }
                    None => {
                        tracing::info!("scheduled event over: minimum back to the configured one")
                    }
                }
            }
            s.scheduled = scheduled;
            s.observations = Some(obs);
            s.report = report;
            s.cost = cost;
            let mut decision = decision;
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
    }
}
