//! `[autoscale]`: the policy's knobs, warm spares, and scheduled events.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use chrono_tz::Tz;
use serde::Deserialize;

use super::{Problems, ProviderConfig};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileAutoscale {
    paused: bool,
    standby: usize,
    min: usize,
    max: usize,
    target_connections_per_node: f64,
    tolerance: f64,
    max_in_flight_per_node: f64,
    #[serde(with = "humantime_serde")]
    max_p99: Duration,
    #[serde(with = "humantime_serde")]
    interval: Duration,
    #[serde(with = "humantime_serde")]
    metrics_window: Duration,
    #[serde(with = "humantime_serde")]
    fast_window: Duration,
    #[serde(with = "humantime_serde")]
    scale_up_window: Duration,
    #[serde(with = "humantime_serde")]
    scale_down_window: Duration,
    up_percent: f64,
    up_nodes: usize,
    #[serde(with = "humantime_serde")]
    up_period: Duration,
    #[serde(with = "humantime_serde")]
    down_period: Duration,
    #[serde(with = "humantime_serde")]
    delivery_time: Duration,
    #[serde(default, with = "humantime_serde::option")]
    line_clear_within: Option<Duration>,
    #[serde(with = "humantime_serde")]
    drain_timeout: Duration,
    schedule: Vec<FileEvent>,
    ledger: PathBuf,
    #[serde(with = "humantime_serde")]
    order_deadline: Duration,
    #[serde(with = "humantime_serde")]
    unanswered_order_wait: Duration,
    missing_listings: u32,
    #[serde(with = "humantime_serde")]
    release_margin: Duration,
    #[serde(with = "humantime_serde")]
    release_down_after: Duration,
    max_client_share: f64,
    #[serde(with = "humantime_serde")]
    bootstrap_timeout: Duration,
    bootstrap_failures: u32,
    budget: FileBudget,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileBudget {
    max_orders_per_hour: Option<usize>,
    max_servers: Option<usize>,
    max_price_per_hour: Option<f64>,
    timezone: String,
}

impl Default for FileBudget {
    fn default() -> Self {
        Self {
            max_orders_per_hour: None,
            max_servers: None,
            max_price_per_hour: None,
            timezone: "UTC".into(),
        }
    }
}

impl Default for FileAutoscale {
    fn default() -> Self {
        Self {
            paused: false,
            standby: 0,
            min: 2,
            max: 20,
            target_connections_per_node: 250.0,
            tolerance: 0.1,
            max_in_flight_per_node: 200.0,
            max_p99: Duration::ZERO,
            interval: Duration::from_secs(1),
            metrics_window: Duration::from_secs(10),
            fast_window: Duration::from_secs(1),
            scale_up_window: Duration::ZERO,
            scale_down_window: Duration::from_secs(300),
            up_percent: 100.0,
            up_nodes: 4,
            up_period: Duration::from_secs(15),
            down_period: Duration::from_secs(60),
            delivery_time: Duration::from_secs(10 * 60),
            line_clear_within: None,
            drain_timeout: Duration::from_secs(300),
            schedule: Vec::new(),
            ledger: PathBuf::from("data/orders.json"),
            order_deadline: Duration::from_secs(20 * 60),
            unanswered_order_wait: Duration::from_secs(120),
            missing_listings: 3,
            release_margin: Duration::from_secs(5 * 60),
            release_down_after: Duration::from_secs(10 * 60),
            max_client_share: 0.1,
            bootstrap_timeout: Duration::from_secs(20 * 60),
            bootstrap_failures: 3,
            budget: FileBudget::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEvent {
    name: String,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(with = "humantime_serde")]
    duration: Duration,
    #[serde(default = "default_lead", with = "humantime_serde")]
    lead: Duration,
    min: usize,
}

fn default_lead() -> Duration {
    Duration::from_secs(15 * 60)
}

/// The autoscaler.
#[derive(Debug, Clone)]
pub struct AutoscaleConfig {
    /// Start paused (the admin API resumes it).
    pub paused: bool,
    /// Warm spare blades kept delivered and healthy at no traffic.
    pub standby: usize,
    pub policy: PolicyConfig,
    /// How often the loop runs (observe, decide, reconcile).
    pub interval: Duration,
    /// Rates are averaged over this window.
    pub metrics_window: Duration,
    /// The short window scale-up also reads, so a step in new sessions is acted on
    /// within a tick instead of once the window average catches up (at most
    /// `metrics_window`; shorter than a tick, it spans the last tick).
    pub fast_window: Duration,
    /// Deadline for carts bound to a node being scaled in.
    pub drain_timeout: Duration,
    /// Offer to order (from `provider.offer`).
    pub offer: String,
    /// Known events that raise the minimum.
    pub schedule: Vec<Event>,
    /// The order ledger's file (`None`: kept in memory only, `ledger = ""`).
    pub ledger: Option<PathBuf>,
    /// An order whose server has not shown in a listing by then is looked up by its
    /// request tag one last time, then reported and forgotten.
    pub order_deadline: Duration,
    /// An order that got no answer (lost, or a 5xx: it may stand) and has not shown in a
    /// listing by then is looked up by its request tag: found, it is on its way; not
    /// found, it counts as not placed and the need is ordered again. Longer than the
    /// vendor's listings lag their creates; a server that shows later is taken in as
    /// found running.
    pub unanswered_order_wait: Duration,
    /// Consecutive complete listings a server may be missing from before its node is
    /// drained (a direct look-up that says it is gone drains it at once).
    pub missing_listings: u32,
    /// A surplus server is released only this close to the end of its paid hour.
    pub release_margin: Duration,
    /// A provisioned node failing its health checks this long is released.
    pub release_down_after: Duration,
    /// Most of the scaling rate one client address (IPv6: its /64) may make, 0..=1.
    pub max_client_share: f64,
    /// A delivered server not healthy this long after delivery is released, replaced.
    pub bootstrap_timeout: Duration,
    /// Bootstrap failures in a row that stop new orders (and raise the alarm).
    pub bootstrap_failures: u32,
    pub budget: BudgetConfig,
}

/// Spending limits (`[autoscale.budget]`); `None`: no limit.
#[derive(Debug, Clone)]
pub struct BudgetConfig {
    /// Servers ordered in any hour.
    pub max_orders_per_hour: Option<usize>,
    /// Servers provisioned at once (ordered and not released).
    pub max_servers: Option<usize>,
    /// Sum of the hourly prices of the provisioned servers, in the offer's currency.
    pub max_price_per_hour: Option<f64>,
    /// Where "since midnight" is for the cost view.
    pub timezone: Tz,
}

/// The policy's knobs.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub min: usize,
    pub max: usize,
    /// New connections per second one in-service node should carry.
    pub target_connections_per_node: f64,
    /// No change while `metric / target` is within `1 ± tolerance`.
    pub tolerance: f64,
    /// Above this many requests in flight per in-service node, scale up regardless.
    pub max_in_flight_per_node: f64,
    /// Above this p99 (request to response head), add a node per decision; `None`: off.
    pub max_p99: Option<Duration>,
    /// Scale up to the lowest recommendation of this window (0: at once).
    pub scale_up_window: Duration,
    /// Scale down only to the highest recommendation of this window.
    pub scale_down_window: Duration,
    /// Per `up_period`, grow by at most max(`up_percent`% of current, `up_nodes`).
    pub up_percent: f64,
    pub up_nodes: usize,
    pub up_period: Duration,
    /// Shrink by at most one node per `down_period`.
    pub down_period: Duration,
    /// How long an order takes to serve (placed to in service): the line a step builds
    /// meanwhile is what the pool must clear once the blades arrive.
    pub delivery_time: Duration,
    /// The line is cleared within this once the capacity ordered for it arrives
    /// (default: `delivery_time` + 5 s, as long as it took to build).
    pub line_clear_within: Duration,
}

/// When an event starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// One instant (`2026-11-27T08:00:00+01:00`).
    At(DateTime<FixedOffset>),
    /// Every occurrence of a cron line (`sec min hour day-of-month month day-of-week`)
    /// in a time zone.
    Cron(Box<cron::Schedule>, Tz),
}

/// One scheduled event.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub start: Start,
    /// How long the event lasts from its start.
    pub duration: Duration,
    /// How long before the start the minimum is raised.
    pub lead: Duration,
    /// The minimum while active.
    pub min: usize,
}

/// Why an event line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("`{0}` is not an RFC 3339 time with an offset (e.g. 2026-11-27T08:00:00+01:00)")]
    BadTime(String),
    #[error("`{0}` is not a cron line (sec min hour day month weekday): {1}")]
    BadCron(String, String),
    #[error("`{0}` is not a time zone name (e.g. Europe/Paris)")]
    BadZone(String),
}

impl Start {
    pub fn at(text: &str) -> Result<Self, ScheduleError> {
        DateTime::parse_from_rfc3339(text)
            .map(Start::At)
            .map_err(|_| ScheduleError::BadTime(text.to_owned()))
    }

    pub fn cron(line: &str, zone: &str) -> Result<Self, ScheduleError> {
        let schedule = cron::Schedule::from_str(line)
            .map_err(|e| ScheduleError::BadCron(line.to_owned(), e.to_string()))?;
        let tz = Tz::from_str(zone).map_err(|_| ScheduleError::BadZone(zone.to_owned()))?;
        Ok(Start::Cron(Box::new(schedule), tz))
    }
}

/// Checks `[autoscale]` (keys relative to it); it needs a provider to order from.
pub(super) fn validate(
    a: &FileAutoscale,
    provider: Option<&ProviderConfig>,
    p: &mut Problems,
) -> AutoscaleConfig {
    if provider.is_none() {
        p.bad("", "needs a [provider] to order blades from");
    }
    check_policy(a, p);
    check_orders(a, p);
    let budget = p.within("budget", |p| budget(&a.budget, p));
    let schedule = a
        .schedule
        .iter()
        .enumerate()
        .filter_map(|(i, e)| p.within(&format!("schedule[{i}]"), |p| event(e, a.max, p)))
        .collect();
    AutoscaleConfig {
        schedule,
        paused: a.paused,
        standby: a.standby,
        policy: PolicyConfig {
            min: a.min,
            max: a.max,
            target_connections_per_node: a.target_connections_per_node,
            tolerance: a.tolerance,
            max_in_flight_per_node: a.max_in_flight_per_node,
            max_p99: (!a.max_p99.is_zero()).then_some(a.max_p99),
            scale_up_window: a.scale_up_window,
            scale_down_window: a.scale_down_window,
            up_percent: a.up_percent,
            up_nodes: a.up_nodes,
            up_period: a.up_period,
            down_period: a.down_period,
            delivery_time: a.delivery_time,
            line_clear_within: a
                .line_clear_within
                .unwrap_or(a.delivery_time + Duration::from_secs(5)),
        },
        interval: a.interval,
        metrics_window: a.metrics_window,
        fast_window: a.fast_window,
        drain_timeout: a.drain_timeout,
        offer: provider.map(|p| p.offer.clone()).unwrap_or_default(),
        ledger: (!a.ledger.as_os_str().is_empty()).then(|| a.ledger.clone()),
        order_deadline: a.order_deadline,
        unanswered_order_wait: a.unanswered_order_wait,
        missing_listings: a.missing_listings,
        release_margin: a.release_margin,
        release_down_after: a.release_down_after,
        max_client_share: a.max_client_share,
        bootstrap_timeout: a.bootstrap_timeout,
        bootstrap_failures: a.bootstrap_failures,
        budget,
    }
}

/// The policy's numbers: sizes, targets and windows.
fn check_policy(a: &FileAutoscale, p: &mut Problems) {
    if a.max == 0 || a.min > a.max {
        let min = p.path("min");
        p.bad("max", format!("must be ≥ 1 and ≥ {min} ({})", a.min));
    }
    if a.target_connections_per_node.is_nan() || a.target_connections_per_node <= 0.0 {
        p.bad("target_connections_per_node", "must be greater than 0");
    }
    if !(0.0..1.0).contains(&a.tolerance) {
        p.bad("tolerance", format!("{} is outside 0..1", a.tolerance));
    }
    if a.max_in_flight_per_node.is_nan() || a.max_in_flight_per_node <= 0.0 {
        p.bad("max_in_flight_per_node", "must be greater than 0");
    }
    for (key, d) in [
        ("interval", a.interval),
        ("metrics_window", a.metrics_window),
        ("fast_window", a.fast_window),
        ("delivery_time", a.delivery_time),
        (
            "line_clear_within",
            a.line_clear_within.unwrap_or(Duration::from_secs(1)),
        ),
    ] {
        if d.is_zero() {
            p.bad(key, "must be greater than 0");
        }
    }
    if a.delivery_time > Duration::from_secs(24 * 3600) {
        p.bad("delivery_time", "must be at most 24h");
    }
    if !a.interval.is_zero() && a.interval < Duration::from_millis(200) {
        p.bad(
            "interval",
            "must be at least 200ms (each tick reads the provider's inventory)",
        );
    }
}

/// The reconciler's limits: bootstraps, drains, listings, order deadlines, client share.
fn check_orders(a: &FileAutoscale, p: &mut Problems) {
    if a.bootstrap_failures == 0 {
        p.bad("bootstrap_failures", "must be at least 1");
    }
    if a.drain_timeout > super::admin::MAX_DRAIN {
        p.bad("drain_timeout", "must be at most 7 days");
    }
    if a.missing_listings == 0 {
        p.bad("missing_listings", "must be at least 1");
    }
    if a.order_deadline.is_zero() {
        p.bad("order_deadline", "must be greater than 0");
    }
    if a.unanswered_order_wait.is_zero() || a.unanswered_order_wait > a.order_deadline {
        p.bad(
            "unanswered_order_wait",
            "must be greater than 0 and at most order_deadline",
        );
    }
    if !(a.max_client_share > 0.0 && a.max_client_share <= 1.0) {
        p.bad(
            "max_client_share",
            format!("{} is outside 0 (exclusive) ..= 1", a.max_client_share),
        );
    }
}

/// `[autoscale.budget]`, checked.
fn budget(b: &FileBudget, p: &mut Problems) -> BudgetConfig {
    if b.max_price_per_hour
        .is_some_and(|m| !(m >= 0.0 && m.is_finite()))
    {
        p.bad("max_price_per_hour", "must be a number ≥ 0");
    }
    let timezone = Tz::from_str(&b.timezone).unwrap_or_else(|_| {
        p.bad(
            "timezone",
            format!(
                "`{}` is not a time zone name (e.g. Europe/Paris)",
                b.timezone
            ),
        );
        Tz::UTC
    });
    BudgetConfig {
        max_orders_per_hour: b.max_orders_per_hour,
        max_servers: b.max_servers,
        max_price_per_hour: b.max_price_per_hour,
        timezone,
    }
}

/// One `[[autoscale.schedule]]` entry (keys relative to it); `None` when its start is
/// unusable.
fn event(e: &FileEvent, max: usize, p: &mut Problems) -> Option<Event> {
    let start = match (&e.at, &e.cron, &e.timezone) {
        (Some(at), None, None) => Start::at(at).map_err(|err| ("at", err.to_string())),
        (None, Some(line), Some(zone)) => {
            Start::cron(line, zone).map_err(|err| ("cron", err.to_string()))
        }
        (None, Some(_), None) => Err((
            "timezone",
            "a cron line needs a time zone, e.g. Europe/Paris".into(),
        )),
        _ => Err((
            "",
            "give either `at` (RFC 3339) or `cron` with `timezone`".into(),
        )),
    };
    if e.min > max {
        p.bad("min", format!("{} is above autoscale.max ({max})", e.min));
    }
    match start {
        Ok(start) => Some(Event {
            name: e.name.clone(),
            start,
            duration: e.duration,
            lead: e.lead,
            min: e.min,
        }),
        Err((key, reason)) => {
            p.bad(key, reason);
            None
        }
    }
}
