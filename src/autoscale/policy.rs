//! How many nodes the pool should have: a pure function of observations, the policy's
//! memory and the time. No runtime, no I/O: tests feed observations and check decisions.
//!
//! Follows the Kubernetes HPA and AWS target tracking: `desired = ceil(metric / target)`
//! with a tolerance band, stabilization windows (scale down only to the highest
//! recommendation of the window), step limits per period, min and max. Differences: the
//! metric is new connections per second (what a sales opening spikes first), and an
//! in-flight guard scales up even when the connection rate looks fine (slow backends).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use crate::config::PolicyConfig;

/// What the meter saw.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observations {
    /// New connections per second, pool-wide.
    pub connection_rate: f64,
    /// Requests per second, pool-wide.
    pub request_rate: f64,
    /// Requests in flight per in-service node.
    pub in_flight_per_node: f64,
    /// 99th percentile of request-to-response-head time over the window, if any traffic.
    pub p99: Option<Duration>,
    /// Whether the figures are recent and complete; stale ones never scale anything.
    pub fresh: bool,
    /// New connections per second over the short window (`autoscale.fast_window`): a
    /// step in demand shows here within a tick, long before the window average moves.
    pub recent_connection_rate: f64,
    /// Requests were waiting for room or shed since the last reading: the pool is at
    /// its limit, whatever the rates say.
    pub at_limit: bool,
    /// The demand the pool did not serve: the waiting room's line, sheds, and the new
    /// visitors arriving against those the pool took on.
    pub line: Line,
}

/// New visitors and the line, over the short window (`autoscale.fast_window`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Line {
    /// Visitors waiting in line (the door not held), plus requests waiting for room.
    pub waiting: u64,
    /// Visitors held in line by hand (a pre-queue): no scale-down while they wait.
    pub held: u64,
    /// New visitors per second: let in, given a place in line, or turned away.
    pub arrived_per_second: f64,
    /// New visitors the pool took on per second (straight in, or let in from the line).
    pub let_in_per_second: f64,
    /// Requests shed per second.
    pub shed_per_second: f64,
    /// New visitors one in-service node can take on per second, as the meter measured
    /// what a shopper costs the shop; `None`: not measured yet (the let-in rate per node
    /// stands in).
    pub per_node: Option<f64>,
}

impl Line {
    /// Anyone waits or is turned away: demand the pool does not serve.
    pub fn pressure(&self) -> bool {
        self.waiting > 0 || self.held > 0 || self.shed_per_second > 0.0
    }
}

/// Why the policy decided what it did.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// Connection rate against the target.
    Target {
        rate: f64,
        target_per_node: f64,
        recommended: usize,
    },
    /// Within the tolerance band: keep the current size.
    WithinTolerance { ratio: f64 },
    /// In-flight per node above the limit.
    InFlightGuard { per_node: f64, limit: f64 },
    /// p99 latency above the limit.
    LatencyGuard { p99: Duration, limit: Duration },
    /// Held up by the scale-down stabilization window.
    Stabilized { highest_recent: usize },
    /// Growth capped by the step limit.
    UpStepLimit { at_most: usize },
    /// Shrink capped: one node per period.
    DownStepLimit,
    /// Raised to the minimum (possibly a scheduled one).
    Min { min: usize },
    /// Lowered to the maximum.
    Max { max: usize },
    /// Metrics missing or stale: hold.
    StaleMetrics,
    /// The operator paused the autoscaler.
    Paused,
    /// The budget holds orders back (the reconciler's finding, added to the decision so
    /// that the decision log says why the pool does not grow).
    Budget { limit: String },
    /// The short window's rate is above the window average: a step in demand, acted on
    /// now rather than once the average catches up.
    RecentStep { recent: f64, window: f64 },
    /// Requests waited for room or were shed: the pool is at its limit.
    AtLimit,
    /// The line sized the pool: new visitors arriving, and the line they build until
    /// the blades ordered now arrive, at what one in-service node takes on.
    Line {
        arrived: f64,
        let_in_per_node: f64,
        backlog: f64,
        need: usize,
    },
    /// Visitors wait or are shed: no scale-down.
    LineWaiting { waiting: u64 },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Target {
                rate,
                target_per_node,
                recommended,
            } => write!(
                f,
                "{rate:.0} new connections/s at {target_per_node:.0}/node recommends {recommended}"
            ),
            Reason::WithinTolerance { ratio } => {
                write!(f, "load/target {ratio:.2} within tolerance")
            }
            Reason::InFlightGuard { per_node, limit } => {
                write!(f, "{per_node:.1} in flight per node above {limit:.1}")
            }
            Reason::LatencyGuard { p99, limit } => {
                write!(f, "p99 {p99:?} above {limit:?}")
            }
            Reason::Stabilized { highest_recent } => {
                write!(f, "held at {highest_recent} by the scale-down window")
            }
            Reason::UpStepLimit { at_most } => write!(f, "scale-up step limited to {at_most}"),
            Reason::DownStepLimit => write!(f, "one node per scale-down period"),
            Reason::Min { min } => write!(f, "raised to minimum {min}"),
            Reason::Max { max } => write!(f, "capped at maximum {max}"),
            Reason::StaleMetrics => write!(f, "metrics stale: holding"),
            Reason::Paused => write!(f, "paused: holding"),
            Reason::Budget { limit } => write!(f, "orders held back by the {limit}"),
            Reason::RecentStep { recent, window } => write!(
                f,
                "step: {recent:.0} new connections/s over the last second against {window:.0} over the window"
            ),
            Reason::AtLimit => write!(f, "requests waiting or shed: the pool is at its limit"),
            Reason::Line {
                arrived,
                let_in_per_node,
                backlog,
                need,
            } => write!(
                f,
                "{arrived:.0} new visitors/s and a line of {backlog:.0} by delivery, at {let_in_per_node:.1} let in per node per second, need {need}"
            ),
            Reason::LineWaiting { waiting } => {
                write!(f, "{waiting} waiting or shed: no scale-down")
            }
        }
    }
}

impl Reason {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Target { .. } => "target",
            Reason::WithinTolerance { .. } => "tolerance",
            Reason::InFlightGuard { .. } => "in_flight",
            Reason::LatencyGuard { .. } => "latency",
            Reason::Stabilized { .. } => "stabilized",
            Reason::UpStepLimit { .. } => "up_step",
            Reason::DownStepLimit => "down_step",
            Reason::Min { .. } => "min",
            Reason::Max { .. } => "max",
            Reason::StaleMetrics => "stale",
            Reason::Paused => "paused",
            Reason::Budget { .. } => "budget",
            Reason::RecentStep { .. } => "step",
            Reason::AtLimit => "at_limit",
            Reason::Line { .. } => "line",
            Reason::LineWaiting { .. } => "line_waiting",
        }
    }
}

/// One decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: usize,
    /// The size it was decided against.
    pub current: usize,
    pub reasons: Vec<Reason>,
}

impl Decision {
    pub fn direction(&self) -> &'static str {
        match self.desired.cmp(&self.current) {
            std::cmp::Ordering::Greater => "up",
            std::cmp::Ordering::Less => "down",
            std::cmp::Ordering::Equal => "hold",
        }
    }
}

/// What the policy remembers between decisions.
#[derive(Debug, Default, Clone)]
pub struct PolicyState {
    /// Recent raw recommendations, newest last.
    recommendations: VecDeque<(Instant, usize)>,
    /// Start of the current scale-up period and the size then.
    up_period: Option<(Instant, usize)>,
    /// When the last scale-down was decided.
    last_down: Option<Instant>,
    /// When visitors began to wait or be shed (this episode), and the most it asked
    /// for: `desired` never goes below that while anyone still waits.
    line: Option<(Instant, usize)>,
}

/// Decides the desired number of in-service nodes. `current` is the number in service,
/// `min` the effective minimum (the configured one, raised by a scheduled event).
pub fn decide(
    obs: &Observations,
    current: usize,
    min: usize,
    paused: bool,
    cfg: &PolicyConfig,
    state: &mut PolicyState,
    now: Instant,
) -> Decision {
    let min = min.min(cfg.max);
    let mut reasons = Vec::new();
    let hold = |reason: Reason| {
        let mut reasons = vec![reason];
        // Even when holding, never below the minimum (a scheduled event may raise it).
        let desired = if current < min {
            reasons.push(Reason::Min { min });
            min
        } else {
            current.min(cfg.max)
        };
        Decision {
            desired,
            current,
            reasons,
        }
    };
    if paused {
        return hold(Reason::Paused);
    }
    // Stale rates (the window not half full yet: just started, or taken over) hold the
    // size, unless the pool is at its limit right now: requests waiting or shed are read
    // live, and a sale that opens while the meter warms up must not wait for it.
    if !obs.fresh && !obs.at_limit {
        return hold(Reason::StaleMetrics);
    }
    let mut recommended = if obs.fresh {
        rate_recommendation(obs, current, cfg, &mut reasons)
    } else {
        reasons.push(Reason::StaleMetrics);
        current
    };
    let measured = line_need(&obs.line, current, cfg, state, now, &mut reasons);
    // At the limit without a measured line (no room, nothing let in yet): one more.
    if measured.is_none() && obs.at_limit && recommended <= current {
        recommended = current + 1;
        reasons.push(Reason::AtLimit);
    }
    recommended = recommended.clamp(min, cfg.max);
    let mut decision = stabilize_and_limit(recommended, current, min, cfg, state, now, reasons);
    // A measured line is not a noisy signal: its count is taken whole, past the up-window
    // and the step limits (which still hold the rate-based part), within `max`; and the
    // scale-down window remembers it.
    if let Some(need) = measured.map(|n| n.min(cfg.max)) {
        state.recommendations.push_back((now, need));
        if need > decision.desired {
            decision.desired = need;
        }
    }
    hold_while_waiting(&obs.line, &mut decision, cfg, state);
    decision
}

/// The nodes the line needs, in one decision: the new visitors arriving, plus the line
/// they build until blades ordered now are in service (`delivery_time`, counted from
/// when the line began) cleared within `line_clear_within`, at the rate one in-service
/// node takes on new visitors (what the pool let in over the short window, per node).
/// `None` without a line or sheds, or before anyone was let in (nothing to measure a
/// node by): then the at-limit signal adds one node.
fn line_need(
    line: &Line,
    current: usize,
    cfg: &PolicyConfig,
    state: &mut PolicyState,
    now: Instant,
    reasons: &mut Vec<Reason>,
) -> Option<usize> {
    if !line.pressure() {
        state.line = None;
        return None;
    }
    let (since, _) = *state.line.get_or_insert((now, 0));
    let measured_here = (current > 0 && line.let_in_per_second >= 1.0)
        .then(|| line.let_in_per_second / current as f64);
    let per_node = line.per_node.or(measured_here).filter(|p| *p > 0.0)?;
    let building = cfg
        .delivery_time
        .saturating_sub(now.saturating_duration_since(since));
    let growth = (line.arrived_per_second - line.let_in_per_second).max(0.0);
    let backlog = line.waiting as f64 + growth * building.as_secs_f64();
    let demand = line.arrived_per_second.max(line.let_in_per_second)
        + backlog / cfg.line_clear_within.as_secs_f64().max(1.0);
    let need = (demand / per_node).ceil() as usize;
    reasons.push(Reason::Line {
        arrived: line.arrived_per_second,
        let_in_per_node: per_node,
        backlog,
        need,
    });
    Some(need)
}

/// While anyone waits or is shed, `desired` neither goes down nor below the most this
/// episode asked for (a count that wobbles as blades arrive must not cancel them).
fn hold_while_waiting(
    line: &Line,
    decision: &mut Decision,
    cfg: &PolicyConfig,
    state: &mut PolicyState,
) {
    let Some((_, peak)) = state.line.as_mut() else {
        return;
    };
    let floor = (*peak).max(decision.current).min(cfg.max);
    if decision.desired < floor {
        decision.desired = floor;
        decision.reasons.push(Reason::LineWaiting {
            waiting: line.waiting + line.held,
        });
    }
    *peak = (*peak).max(decision.desired);
}

/// Step 1, the raw recommendation from the rates: the target with tolerance, the
/// in-flight and latency guards. Up on the short window too: a step shows there within a
/// tick (the scale-down window keeps the highest recent recommendation, so a blip costs
/// nothing but time).
fn rate_recommendation(
    obs: &Observations,
    current: usize,
    cfg: &PolicyConfig,
    reasons: &mut Vec<Reason>,
) -> usize {
    let base = current.max(1);
    let rate = if obs.recent_connection_rate > obs.connection_rate * (1.0 + cfg.tolerance) {
        reasons.push(Reason::RecentStep {
            recent: obs.recent_connection_rate,
            window: obs.connection_rate,
        });
        obs.recent_connection_rate
    } else {
        obs.connection_rate
    };
    let per_node = rate / base as f64;
    let ratio = per_node / cfg.target_connections_per_node;
    let mut recommended = if (ratio - 1.0).abs() <= cfg.tolerance {
        reasons.push(Reason::WithinTolerance { ratio });
        current
    } else {
        let r = (rate / cfg.target_connections_per_node).ceil() as usize;
        reasons.push(Reason::Target {
            rate,
            target_per_node: cfg.target_connections_per_node,
            recommended: r,
        });
        r
    };
    if obs.in_flight_per_node > cfg.max_in_flight_per_node {
        let needed =
            (base as f64 * obs.in_flight_per_node / cfg.max_in_flight_per_node).ceil() as usize;
        if needed > recommended {
            recommended = needed;
            reasons.push(Reason::InFlightGuard {
                per_node: obs.in_flight_per_node,
                limit: cfg.max_in_flight_per_node,
            });
        }
    }
    if let (Some(p99), Some(limit)) = (obs.p99, cfg.max_p99) {
        // Latency does not scale linearly with nodes: one more per decision, step-limited.
        if p99 > limit && recommended <= current {
            recommended = current + 1;
            reasons.push(Reason::LatencyGuard { p99, limit });
        }
    }
    recommended
}

/// Steps 2 to 4: stabilization windows over the raw recommendations, step limits, bounds.
fn stabilize_and_limit(
    recommended: usize,
    current: usize,
    min: usize,
    cfg: &PolicyConfig,
    state: &mut PolicyState,
    now: Instant,
    mut reasons: Vec<Reason>,
) -> Decision {
    // 2. Stabilization windows over the raw recommendations.
    state.recommendations.push_back((now, recommended));
    let keep = cfg.scale_down_window.max(cfg.scale_up_window);
    while state
        .recommendations
        .front()
        .is_some_and(|(t, _)| now.saturating_duration_since(*t) > keep)
    {
        state.recommendations.pop_front();
    }
    let within = |w: Duration| {
        state
            .recommendations
            .iter()
            .filter(move |(t, _)| now.saturating_duration_since(*t) <= w)
            .map(|(_, r)| *r)
    };
    let mut desired = recommended;
    if desired > current {
        desired = within(cfg.scale_up_window)
            .min()
            .unwrap_or(recommended)
            .max(current);
    } else if desired < current {
        let highest = within(cfg.scale_down_window).max().unwrap_or(recommended);
        if highest > desired {
            desired = highest.min(current);
            reasons.push(Reason::Stabilized {
                highest_recent: desired,
            });
        }
    }

    // 3. Step limits.
    desired = step_limited(desired, current, cfg, state, now, &mut reasons);

    // 4. Bounds.
    if desired < min {
        desired = min;
        reasons.push(Reason::Min { min });
    }
    if desired > cfg.max {
        desired = cfg.max;
        reasons.push(Reason::Max { max: cfg.max });
    }
    Decision {
        desired,
        current,
        reasons,
    }
}

/// Step 3: up by at most max(`up_percent`%, `up_nodes`) of the size at the start of the
/// up period, down by one node per `down_period`.
fn step_limited(
    mut desired: usize,
    current: usize,
    cfg: &PolicyConfig,
    state: &mut PolicyState,
    now: Instant,
    reasons: &mut Vec<Reason>,
) -> usize {
    if desired > current {
        let (start, from) = match state.up_period {
            Some((t, from)) if now.saturating_duration_since(t) < cfg.up_period => (t, from),
            _ => (now, current),
        };
        state.up_period = Some((start, from));
        let step = ((from as f64 * cfg.up_percent / 100.0).ceil() as usize).max(cfg.up_nodes);
        let at_most = from + step;
        if desired > at_most {
            desired = at_most.max(current);
            reasons.push(Reason::UpStepLimit { at_most });
        }
    } else if desired < current {
        if state
            .last_down
            .is_some_and(|t| now.saturating_duration_since(t) < cfg.down_period)
        {
            desired = current;
            reasons.push(Reason::DownStepLimit);
        } else {
            if desired < current - 1 {
                reasons.push(Reason::DownStepLimit);
            }
            desired = current - 1;
            state.last_down = Some(now);
        }
    }

    desired
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            min: 2,
            max: 20,
            target_connections_per_node: 250.0,
            tolerance: 0.1,
            max_in_flight_per_node: 100.0,
            max_p99: Some(Duration::from_millis(300)),
            scale_up_window: Duration::ZERO,
            scale_down_window: Duration::from_secs(300),
            up_percent: 100.0,
            up_nodes: 4,
            up_period: Duration::from_secs(15),
            down_period: Duration::from_secs(60),
            delivery_time: Duration::from_secs(10),
            line_clear_within: Duration::from_secs(15),
        }
    }

    fn obs(rate: f64) -> Observations {
        Observations {
            connection_rate: rate,
            request_rate: rate * 5.0,
            in_flight_per_node: 1.0,
            p99: Some(Duration::from_millis(20)),
            fresh: true,
            ..Observations::default()
        }
    }

    #[test]
    fn a_slow_p99_adds_a_node_at_an_unchanged_rate() {
        let mut slow = obs(4.0 * 250.0);
        slow.p99 = Some(Duration::from_millis(900));
        let d = decide(
            &slow,
            4,
            2,
            false,
            &cfg(),
            &mut PolicyState::default(),
            Instant::now(),
        );
        assert_eq!(d.desired, 5);
        assert!(d
            .reasons
            .iter()
            .any(|r| matches!(r, Reason::LatencyGuard { .. })));
    }

    #[test]
    fn a_step_in_the_last_second_scales_up_before_the_window_average_moves() {
        // 4 nodes at 1,000/s over the window (on target); the last second ran at 2,000/s.
        let mut step = obs(1000.0);
        step.recent_connection_rate = 2000.0;
        let mut st = PolicyState::default();
        let d = decide(&step, 4, 2, false, &cfg(), &mut st, Instant::now());
        assert_eq!(d.desired, 8, "{:?}", d.reasons);
        assert!(d
            .reasons
            .iter()
            .any(|r| matches!(r, Reason::RecentStep { .. })));
        // Noise within the tolerance changes nothing; a quieter last second neither.
        for recent in [1080.0, 300.0] {
            let mut o = obs(1000.0);
            o.recent_connection_rate = recent;
            let d = decide(
                &o,
                4,
                2,
                false,
                &cfg(),
                &mut PolicyState::default(),
                Instant::now(),
            );
            assert_eq!(d.desired, 4, "recent {recent}: {:?}", d.reasons);
        }
    }

    #[test]
    fn requests_waiting_or_shed_add_a_node_at_an_unchanged_rate() {
        let mut full = obs(4.0 * 250.0);
        full.at_limit = true;
        let d = decide(
            &full,
            4,
            2,
            false,
            &cfg(),
            &mut PolicyState::default(),
            Instant::now(),
        );
        assert_eq!(d.desired, 5);
        assert!(d.reasons.contains(&Reason::AtLimit));
        assert_eq!(Reason::AtLimit.label(), "at_limit");
    }

    #[test]
    fn target_tracking_scales_up_to_rate_over_target() {
        let mut st = PolicyState::default();
        let d = decide(&obs(1500.0), 4, 2, false, &cfg(), &mut st, Instant::now());
        assert_eq!(d.desired, 6);
        assert_eq!(d.direction(), "up");
    }

    #[test]
    fn a_spike_is_limited_per_period() {
        let mut st = PolicyState::default();
        let t0 = Instant::now();
        // 2 → 8 wanted; step max(100% of 2, 4) = 4 → 6.
        let d = decide(&obs(2000.0), 2, 2, false, &cfg(), &mut st, t0);
        assert_eq!(d.desired, 6);
        assert!(d.reasons.contains(&Reason::UpStepLimit { at_most: 6 }));
        // Same period: still capped from the period's start size.
        let d = decide(
            &obs(2000.0),
            6,
            2,
            false,
            &cfg(),
            &mut st,
            t0 + Duration::from_secs(5),
        );
        assert_eq!(d.desired, 6);
        // Next period: grows again.
        let d = decide(
            &obs(2000.0),
            6,
            2,
            false,
            &cfg(),
            &mut st,
            t0 + Duration::from_secs(16),
        );
        assert_eq!(d.desired, 8);
    }

    #[test]
    fn no_scale_in_inside_the_window_after_a_spike() {
        let mut st = PolicyState::default();
        let t0 = Instant::now();
        decide(&obs(2000.0), 8, 2, false, &cfg(), &mut st, t0);
        for s in (10..300).step_by(10) {
            let d = decide(
                &obs(200.0),
                8,
                2,
                false,
                &cfg(),
                &mut st,
                t0 + Duration::from_secs(s),
            );
            assert_eq!(d.desired, 8, "scaled in {s} s after the spike");
        }
        let d = decide(
            &obs(200.0),
            8,
            2,
            false,
            &cfg(),
            &mut st,
            t0 + Duration::from_secs(301),
        );
        assert_eq!(d.desired, 7, "one node at a time after the window");
        let d = decide(
            &obs(200.0),
            7,
            2,
            false,
            &cfg(),
            &mut st,
            t0 + Duration::from_secs(330),
        );
        assert_eq!(d.desired, 7, "one node per minute");
        let d = decide(
            &obs(200.0),
            7,
            2,
            false,
            &cfg(),
            &mut st,
            t0 + Duration::from_secs(362),
        );
        assert_eq!(d.desired, 6);
    }

    #[test]
    fn tolerance_holds_and_in_flight_guard_scales_up() {
        let mut st = PolicyState::default();
        let now = Instant::now();
        let d = decide(&obs(4.0 * 260.0), 4, 2, false, &cfg(), &mut st, now);
        assert_eq!(d.desired, 4);
        let mut busy = obs(4.0 * 250.0);
        busy.in_flight_per_node = 150.0;
        let d = decide(&busy, 4, 2, false, &cfg(), &mut PolicyState::default(), now);
        assert_eq!(d.desired, 6);
        assert!(matches!(
            d.reasons.last(),
            Some(Reason::InFlightGuard { .. })
        ));
    }

    #[test]
    fn a_pool_at_its_limit_grows_before_the_meter_is_warm_within_the_step_limits() {
        // Just started (or taken over): the rates are not there yet, the sheds are.
        let mut full = obs(0.0);
        full.fresh = false;
        full.at_limit = true;
        let c = PolicyConfig {
            up_percent: 0.0,
            up_nodes: 1,
            ..cfg()
        };
        let mut state = PolicyState::default();
        let now = Instant::now();
        let d = decide(&full, 2, 2, false, &c, &mut state, now);
        assert_eq!(d.desired, 3);
        assert_eq!(d.reasons, [Reason::StaleMetrics, Reason::AtLimit]);
        // The next tick, still at the limit: the step limit of the up period holds.
        let d = decide(
            &full,
            2,
            2,
            false,
            &c,
            &mut state,
            now + Duration::from_millis(200),
        );
        assert_eq!(d.desired, 3, "{:?}", d.reasons);
        // Not at the limit: stale rates hold, as before.
        full.at_limit = false;
        let d = decide(
            &full,
            3,
            2,
            false,
            &c,
            &mut state,
            now + Duration::from_secs(1),
        );
        assert_eq!((d.desired, d.reasons), (3, vec![Reason::StaleMetrics]));
        // Paused beats everything.
        full.at_limit = true;
        let d = decide(
            &full,
            3,
            2,
            true,
            &c,
            &mut state,
            now + Duration::from_secs(2),
        );
        assert_eq!((d.desired, d.reasons), (3, vec![Reason::Paused]));
    }

    #[test]
    fn stale_metrics_and_pause_hold_but_respect_a_raised_minimum() {
        let mut stale = obs(0.0);
        stale.fresh = false;
        let now = Instant::now();
        let d = decide(
            &stale,
            6,
            2,
            false,
            &cfg(),
            &mut PolicyState::default(),
            now,
        );
        assert_eq!(d.desired, 6);
        assert_eq!(d.reasons, [Reason::StaleMetrics]);
        let d = decide(
            &obs(0.0),
            6,
            2,
            true,
            &cfg(),
            &mut PolicyState::default(),
            now,
        );
        assert_eq!(d.desired, 6);
        let d = decide(
            &stale,
            2,
            10,
            false,
            &cfg(),
            &mut PolicyState::default(),
            now,
        );
        assert_eq!(
            d.desired, 10,
            "a scheduled minimum applies even without metrics"
        );
    }

    proptest! {
        /// Whatever the load and history: never above max, never below min, and never more
        /// than one node fewer than current.
        #[test]
        fn bounds_always_hold(
            steps in proptest::collection::vec((0.0f64..20_000.0, 0usize..30, 0.0f64..500.0, any::<bool>(), 0u64..120), 1..60),
            min in 0usize..10,
        ) {
            let c = cfg();
            let mut st = PolicyState::default();
            let mut now = Instant::now();
            for (rate, current, in_flight, fresh, dt) in steps {
                now += Duration::from_secs(dt);
                let o = Observations { connection_rate: rate, request_rate: rate, in_flight_per_node: in_flight, p99: None, fresh, ..Observations::default() };
                let d = decide(&o, current, min, false, &c, &mut st, now);
                prop_assert!(d.desired <= c.max);
                prop_assert!(d.desired >= min.min(c.max));
                prop_assert!(d.desired + 1 >= current.min(c.max) || d.desired == min.min(c.max) || current > c.max);
            }
        }
    }

    /// A step of new visitors with the room filling: the whole count in one decision
    /// (not one node per decision, not step-limited), and never down while anyone waits,
    /// however the count wobbles as blades arrive.
    #[test]
    fn the_line_sizes_the_pool_in_one_decision_and_holds_while_anyone_waits() {
        let c = cfg();
        let mut state = PolicyState::default();
        let t0 = Instant::now();
        // 2 nodes let in 250 new visitors/s between them; 1,200/s arrive.
        let mut o = obs(500.0);
        o.line = Line {
            waiting: 300,
            held: 0,
            arrived_per_second: 1200.0,
            let_in_per_second: 250.0,
            shed_per_second: 0.0,
            per_node: None,
        };
        let d = decide(&o, 2, 2, false, &c, &mut state, t0);
        // 1,200/s at 125 per node, plus the line built over the 10 s delivery cleared
        // within 15 s: (1200 + (300 + 950 * 10) / 15) / 125 = 14.8 -> 15, capped at 20.
        assert_eq!(d.desired, 15, "{:?}", d.reasons);
        assert!(d.reasons.iter().any(|r| r.label() == "line"));
        // A second later the same: the line grew as foreseen, the need did not.
        o.line.waiting = 1250;
        let d = decide(&o, 2, 2, false, &c, &mut state, t0 + Duration::from_secs(1));
        assert_eq!(d.desired, 15, "{:?}", d.reasons);
        // Blades arrive: 12 in service let in 1,500/s; the line shrinks, the count
        // computed now is lower, but while anyone waits desired stays.
        o.line.let_in_per_second = 1500.0;
        o.line.waiting = 4000;
        let d = decide(
            &o,
            12,
            2,
            false,
            &c,
            &mut state,
            t0 + Duration::from_secs(12),
        );
        assert_eq!(d.desired, 15, "{:?}", d.reasons);
        // Nobody waits any more: the usual windows take over (no jump down either).
        let d = decide(
            &obs(1200.0),
            15,
            2,
            false,
            &c,
            &mut state,
            t0 + Duration::from_secs(40),
        );
        assert!(d.desired >= 14, "{:?}", d.reasons);
    }

    #[test]
    fn no_scale_down_while_visitors_are_held_or_shed() {
        let c = cfg();
        let mut state = PolicyState::default();
        let t0 = Instant::now();
        let mut o = obs(10.0);
        o.line.held = 40;
        let later = t0 + Duration::from_secs(1000);
        let d = decide(&o, 8, 2, false, &c, &mut state, later);
        assert_eq!(d.desired, 8, "{:?}", d.reasons);
        o.line.held = 0;
        o.line.shed_per_second = 3.0;
        let d = decide(
            &o,
            8,
            2,
            false,
            &c,
            &mut state,
            later + Duration::from_secs(100),
        );
        assert_eq!(d.desired, 8, "{:?}", d.reasons);
    }
}
