//! What a run measured: HDR histograms per step, per second and in all, outcome counts,
//! SLO verdicts, and the renderings (terminal table, JSON, self-contained HTML with SVG).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;

use super::chart::{Chart, Marker, Series};
use super::plan::{Slo, SloLimit};

/// The longest latency a histogram keeps (an hour, in µs); longer is clamped.
const MAX_US: u64 = 3_600_000_000;

/// Measurements of one step (or of all steps, or of one second).
#[derive(Debug)]
pub struct StepStats {
    latency: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    /// Responses by status class and failures by kind.
    pub outcomes: BTreeMap<&'static str, u64>,
}

impl StepStats {
    /// Three significant digits: what the final percentiles are read from.
    pub fn new() -> Self {
        Self::with_precision(3)
    }

    /// Two significant digits (1%) for the per-second buckets: a sales-day run has
    /// hundreds of them and three digits would cost ~180 KB each.
    pub fn coarse() -> Self {
        Self::with_precision(2)
    }

    fn with_precision(sigfig: u8) -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, MAX_US, sigfig)
                .expect("static histogram bounds"),
            ok: 0,
            errors: 0,
            outcomes: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, latency: Duration, outcome: &'static str, good: bool) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_US);
        let _ = self.latency.record(us);
        if good {
            self.ok += 1;
        } else {
            self.errors += 1;
        }
        *self.outcomes.entry(outcome).or_default() += 1;
    }

    pub fn count(&self) -> u64 {
        self.ok + self.errors
    }

    pub fn quantile(&self, q: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(q))
    }

    fn max(&self) -> Duration {
        Duration::from_micros(self.latency.max())
    }

    /// Requests that took `limit` or longer.
    fn at_or_over(&self, limit: Duration) -> u64 {
        let us = u64::try_from(limit.as_micros()).unwrap_or(MAX_US);
        self.latency.count_between(us, MAX_US)
    }

    /// How many requests took up to each bound: `(upper bound, count)` on doubling
    /// bounds from 0.1 ms, up to the slowest request.
    pub fn distribution(&self) -> Vec<(Duration, u64)> {
        if self.count() == 0 {
            return Vec::new();
        }
        self.latency
            .iter_log(100, 2.0)
            .map(|v| {
                (
                    Duration::from_micros(v.value_iterated_to()),
                    v.count_since_last_iteration(),
                )
            })
            .collect()
    }

    pub fn error_rate(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            0.0
        } else {
            self.errors as f64 / n as f64
        }
    }
}

impl Default for StepStats {
    fn default() -> Self {
        Self::new()
    }
}

/// A small latency sketch for the per-step, per-second percentiles: counts in buckets a
/// quarter octave wide (upper bounds ≤ 19% above the true value) from 1 µs to 71 min, in
/// 512 bytes. An HDR histogram for every step of every second would take megabytes a
/// minute; the per-step tables keep their exact histograms.
#[derive(Debug, Clone)]
pub struct Sketch {
    counts: [u32; SKETCH_BUCKETS],
    n: u64,
}

const SKETCH_BUCKETS: usize = 128;

impl Default for Sketch {
    fn default() -> Self {
        Self {
            counts: [0; SKETCH_BUCKETS],
            n: 0,
        }
    }
}

impl Sketch {
    fn bucket(us: u64) -> usize {
        ((us.max(1) as f64).log2() * 4.0) as usize
    }

    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let i = Self::bucket(us).min(SKETCH_BUCKETS - 1);
        self.counts[i] = self.counts[i].saturating_add(1);
        self.n += 1;
    }

    /// The upper bound of the bucket holding quantile `q`; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.n == 0 {
            return None;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                let upper = 2f64.powf((i + 1) as f64 / 4.0);
                return Some(Duration::from_micros(upper as u64));
            }
        }
        None
    }
}

/// Whether an SLO holds on what was measured, and the measured value in words.
pub fn check(slo: &Slo, stats: Option<&StepStats>) -> (bool, String) {
    let Some(s) = stats.filter(|s| s.count() > 0) else {
        return (false, "no requests of that step".to_owned());
    };
    match &slo.limit {
        SloLimit::Latency(q, limit) => {
            let v = s.quantile(*q);
            if v < *limit {
                (true, fmt_ms(v))
            } else {
                (
                    false,
                    format!("{} (over by {})", fmt_ms(v), fmt_ms(v - *limit)),
                )
            }
        }
        SloLimit::ErrorRate(limit) => {
            let v = s.error_rate();
            if v < *limit {
                (true, format!("{:.4}%", v * 100.0))
            } else {
                (
                    false,
                    format!(
                        "{:.4}% (over by {:.4} points)",
                        v * 100.0,
                        (v - limit) * 100.0
                    ),
                )
            }
        }
    }
}

/// True when the SLO cannot pass any more, even if every request still to come (at most
/// `bound` requests in all, counting those measured) succeeds at once: the errors, or the
/// requests at or over the latency limit, already exceed the allowed share of `bound`.
pub fn hopeless(slo: &Slo, stats: Option<&StepStats>, bound: u64) -> bool {
    let Some(s) = stats else { return false };
    let bound = bound.max(s.count()) as f64;
    match &slo.limit {
        SloLimit::ErrorRate(limit) => s.errors as f64 >= limit * bound,
        SloLimit::Latency(q, limit) => s.at_or_over(*limit) as f64 > (1.0 - q) * bound + 1.0,
    }
}

/// The autoscaler's counts at one second of the run (from `--admin`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalerSample {
    pub desired: u64,
    pub in_service: u64,
    /// Servers provisioned (ordered and not released).
    pub servers: u64,
    /// Their hourly prices added up, in the offer's currency.
    pub cost_per_hour: f64,
    /// Spent since the surge started (started billing hours).
    pub spent: f64,
    /// New connections the autoscaler counted since surge started (its scaling signal,
    /// after the per-client share cap), when the admin API says.
    pub counted: Option<u64>,
    /// Servers released before they ever served, since surge started.
    pub released_unserved: u64,
}

/// What the run cost, from the first and last autoscaler readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunCost {
    pub peak_servers: u64,
    pub peak_per_hour: f64,
    /// Spent (started billing hours) between the first and last reading.
    pub spent: f64,
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Report {
    /// `open model` or `closed model: N users`, printed on top of every rendering.
    pub model: String,
    pub scheduled_sessions: usize,
    pub started_sessions: usize,
    /// Sessions that started more than 10 ms after their intended time.
    pub late_starts: usize,
    pub duration: Duration,
    /// Sessions started per scenario.
    pub scenarios: BTreeMap<String, u64>,
    /// Requests by the second of their intended start.
    pub timeline: Vec<StepStats>,
    /// The same per step, as sketches (percentiles per step over time).
    pub step_timeline: BTreeMap<String, Vec<Sketch>>,
    /// Sessions started per second.
    pub starts_per_second: Vec<u64>,
    /// Autoscaler counts per second, when the run watched an admin API.
    pub autoscaler: Vec<Option<ScalerSample>>,
    pub steps: BTreeMap<String, StepStats>,
    pub total: StepStats,
    /// `(slo label, passed, measured value in words)`.
    pub slo_results: Vec<(String, bool, String)>,
    /// Why the run stopped early, if it did.
    pub aborted: Option<String>,
    /// Sessions that met a waiting room.
    pub queue: QueueStats,
    /// Sessions ended by a failure: newcomers apart from shoppers the shop had served.
    pub failures: Failures,
}

/// Sessions ended by a failure, by outcome (`503`, `io_error`, `timeout`...): a
/// newcomer's is a plain refusal (no place in line, or a dropped connection), a served
/// shopper's a failed request of someone who got in.
#[derive(Debug, Default, Clone)]
pub struct Failures {
    pub newcomers: BTreeMap<String, u64>,
    pub served: BTreeMap<String, u64>,
}

impl Failures {
    pub fn count(&mut self, served: bool, outcome: &str) {
        let to = if served {
            &mut self.served
        } else {
            &mut self.newcomers
        };
        *to.entry(outcome.to_owned()).or_default() += 1;
    }

    fn words(m: &BTreeMap<String, u64>) -> String {
        if m.is_empty() {
            return "0".into();
        }
        let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        format!("{} ({})", m.values().sum::<u64>(), parts.join(" "))
    }
}

/// One session's place in a waiting room: its ticket (issued ms, nonce), when it last
/// asked and was told to wait, and when it got in (from the run's start).
#[derive(Debug, Clone, Copy)]
pub struct Place {
    pub ticket: (u64, u64),
    pub last_told_to_wait: Duration,
    pub entered: Option<Duration>,
}

/// Sessions held in a waiting room (a 503 HTML page with `Retry-After` that sets a
/// cookie): counted apart from errors, as a browser's shopper would experience them.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Sessions that were shown the waiting page at least once.
    pub queued: u64,
    /// Of those, let in (and continuing their scenario).
    pub admitted: u64,
    /// Of those, gone before they were let in (waited past the plan's patience).
    pub abandoned: u64,
    /// How long the admitted ones waited.
    pub wait: StepStats,
    /// Waiting pages answered per second of the run.
    pub pages_per_second: Vec<u64>,
    /// Sessions that joined the line (+) and left it, let in or gone (−), per second.
    pub line_changes: Vec<i64>,
    /// Every queued session's place (see [`Place`]).
    pub places: Vec<Place>,
    /// Sessions whose ticket changed while they waited (a place lost).
    pub reissued: u64,
    /// Sessions told to wait after one with a later ticket had got in (out of order).
    pub overtaken: u64,
}

impl QueueStats {
    /// Counts the sessions overtaken: told to wait (asked after) a session holding a
    /// later ticket had already got in. Exact for one room: the room lets in by ticket
    /// order, so an earlier holder is never still waiting once a later one is in.
    pub fn count_overtaken(&mut self) {
        let mut places = self.places.clone();
        places.sort_by_key(|p| std::cmp::Reverse(p.ticket));
        let mut first_later_in: Option<Duration> = None;
        let mut overtaken = 0;
        for p in &places {
            if first_later_in.is_some_and(|t| t < p.last_told_to_wait) {
                overtaken += 1;
            }
            if let Some(at) = p.entered {
                first_later_in = Some(first_later_in.map_or(at, |t| t.min(at)));
            }
        }
        self.overtaken = overtaken;
    }

    /// Counts a session joining (`+1`) or leaving (`-1`) the line at `second`.
    pub fn line_change(&mut self, second: usize, by: i64) {
        if self.line_changes.len() <= second {
            self.line_changes.resize(second + 1, 0);
        }
        self.line_changes[second] += by;
    }

    /// Sessions in the line at the end of each of the first `seconds` seconds.
    pub fn length_per_second(&self, seconds: usize) -> Vec<u64> {
        let mut now = 0i64;
        (0..seconds.max(self.line_changes.len()))
            .map(|i| {
                now += self.line_changes.get(i).copied().unwrap_or(0);
                now.max(0) as u64
            })
            .collect()
    }
}

impl Report {
    pub fn passed(&self) -> bool {
        self.aborted.is_none() && self.slo_results.iter().all(|(_, ok, _)| *ok)
    }

    /// Achieved session arrivals per second.
    pub fn arrival_rate(&self) -> f64 {
        self.started_sessions as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// Completed requests (answered or failed) per second.
    pub fn request_rate(&self) -> f64 {
        self.total.count() as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// A quantile of one step's latency, or of all steps.
    pub fn quantile(&self, step: Option<&str>, q: f64) -> Option<Duration> {
        let s = match step {
            Some(name) => self.steps.get(name)?,
            None => &self.total,
        };
        (s.count() > 0).then(|| s.quantile(q))
    }

    /// Checks every SLO of the plan against the measurements.
    pub fn check_slos(&mut self, slos: &[Slo]) {
        self.slo_results = slos
            .iter()
            .map(|slo| {
                let s = match &slo.step {
                    Some(name) => self.steps.get(name),
                    None => Some(&self.total),
                };
                let (ok, measured) = check(slo, s);
                (slo.label.clone(), ok, measured)
            })
            .collect();
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let scenarios: Vec<String> = self
            .scenarios
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let mut out = format!("{}\n", self.model);
        out.push_str(&format!(
            "sessions: {} scheduled, {} started ({:.1}/s achieved), {} late starts; {:.1} s; {:.1} requests/s; {}\n",
            self.scheduled_sessions,
            self.started_sessions,
            self.arrival_rate(),
            self.late_starts,
            self.duration.as_secs_f64(),
            self.request_rate(),
            scenarios.join(", ")
        ));
        out.push_str(&format!(
            "{:<14} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10}  outcomes\n",
            "step", "ok", "errors", "p50", "p90", "p99", "max"
        ));
        let rows = self
            .steps
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .chain([("(all)", &self.total)]);
        for (name, s) in rows {
            let outcomes: Vec<String> =
                s.outcomes.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            out.push_str(&format!(
                "{:<14} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10}  {}\n",
                name,
                s.ok,
                s.errors,
                fmt_ms(s.quantile(0.5)),
                fmt_ms(s.quantile(0.9)),
                fmt_ms(s.quantile(0.99)),
                fmt_ms(s.max()),
                outcomes.join(" ")
            ));
        }
        let seen: Vec<ScalerSample> = self.autoscaler.iter().flatten().copied().collect();
        if let (Some(first), Some(last)) = (seen.first(), seen.last()) {
            out.push_str(&format!(
                "autoscaler: in service {} → {} (peak {}), desired peak {}; {} of {} seconds read\n",
                first.in_service,
                last.in_service,
                seen.iter().map(|s| s.in_service).max().unwrap_or(0),
                seen.iter().map(|s| s.desired).max().unwrap_or(0),
                seen.len(),
                self.autoscaler.len()
            ));
        }
        if let Some(c) = self.cost() {
            out.push_str(&format!(
                "cost: peak {} servers at {:.2}/h; {:.2} spent during the run (started billing hours)\n",
                c.peak_servers, c.peak_per_hour, c.spent
            ));
        }
        if self.queue.queued > 0 {
            out.push_str(&format!(
                "waiting room: {} sessions queued, {} let in (waited p50 {}, p99 {}), {} abandoned; {} overtaken (let in out of ticket order), {} places lost\n",
                self.queue.queued,
                self.queue.admitted,
                fmt_ms(self.queue.wait.quantile(0.5)),
                fmt_ms(self.queue.wait.quantile(0.99)),
                self.queue.abandoned,
                self.queue.overtaken,
                self.queue.reissued,
            ));
        }
        out.push_str(&format!(
            "plain refusals (newcomers turned away without a place: 503, dropped connections): {}; failed sessions of shoppers already served: {}\n",
            Failures::words(&self.failures.newcomers),
            Failures::words(&self.failures.served),
        ));
        out.push_str(&self.signal_lines(&seen));
        if let Some(why) = &self.aborted {
            out.push_str(&format!("ABORTED: {why}\n"));
        }
        for (label, ok, measured) in &self.slo_results {
            out.push_str(&format!(
                "SLO {} {label}: {measured}\n",
                if *ok { "passed" } else { "FAILED" }
            ));
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let queue_length = self.queue.length_per_second(self.seconds());
        let step = |s: &StepStats| {
            json!({
                "ok": s.ok, "errors": s.errors, "error_rate": s.error_rate(), "outcomes": s.outcomes,
                "p50_ms": ms(s.quantile(0.5)), "p90_ms": ms(s.quantile(0.9)), "p99_ms": ms(s.quantile(0.99)),
                "p999_ms": ms(s.quantile(0.999)), "max_ms": ms(s.max()),
            })
        };
        json!({
            "model": self.model,
            "scheduled_sessions": self.scheduled_sessions, "started_sessions": self.started_sessions,
            "late_starts": self.late_starts, "duration_s": self.duration.as_secs_f64(),
            "arrival_rate": self.arrival_rate(), "request_rate": self.request_rate(),
            "scenarios": self.scenarios,
            "steps": self.steps.iter().map(|(k, v)| (k.clone(), step(v))).collect::<serde_json::Map<_, _>>(),
            "total": step(&self.total),
            "aborted": self.aborted,
            "passed": self.passed(),
            "slo": self.slo_results.iter().map(|(l, ok, m)| json!({"slo": l, "passed": ok, "measured": m})).collect::<Vec<_>>(),
            "cost": self.cost().map(|c| json!({"peak_servers": c.peak_servers, "peak_per_hour": c.peak_per_hour, "spent": c.spent})),
            "failures": json!({"newcomers": self.failures.newcomers, "served": self.failures.served}),
            "orders_released_unserved": self.released_unserved(),
            "waiting_room": json!({
                "queued": self.queue.queued, "admitted": self.queue.admitted, "abandoned": self.queue.abandoned,
                "overtaken": self.queue.overtaken, "places_lost": self.queue.reissued,
                "wait_p50_ms": ms(self.queue.wait.quantile(0.5)), "wait_p99_ms": ms(self.queue.wait.quantile(0.99)),
            }),
            "step_timeline": self.step_timeline.iter().map(|(k, v)| (k.clone(), v.iter().map(|sk| json!({
                "p50_ms": sk.quantile(0.5).map(ms), "p99_ms": sk.quantile(0.99).map(ms),
            })).collect::<Vec<_>>().into())).collect::<serde_json::Map<String, serde_json::Value>>(),
            "distribution": self.total.distribution().iter().map(|(le, n)| json!({"le_ms": ms(*le), "count": n})).collect::<Vec<_>>(),
            "timeline": (0..self.seconds()).map(|i| {
                let queue_length = &queue_length;
                let b = self.timeline.get(i);
                let scaler = self.autoscaler.get(i).copied().flatten();
                json!({
                    "second": i, "sessions": self.starts_per_second.get(i).copied().unwrap_or(0),
                    "ok": b.map_or(0, |b| b.ok), "errors": b.map_or(0, |b| b.errors),
                    "outcomes": b.map(|b| b.outcomes.clone()).unwrap_or_default(),
                    "p50_ms": b.map(|b| ms(b.quantile(0.5))), "p99_ms": b.map(|b| ms(b.quantile(0.99))),
                    "desired": scaler.map(|s| s.desired), "in_service": scaler.map(|s| s.in_service),
                    "servers": scaler.map(|s| s.servers), "cost_per_hour": scaler.map(|s| s.cost_per_hour),
                    "queue_pages": self.queue.pages_per_second.get(i).copied().unwrap_or(0),
                    "queued": queue_length.get(i).copied().unwrap_or(0),
                })
            }).collect::<Vec<_>>(),
        })
    }

    /// Servers released before they served during the run (`--admin`).
    pub fn released_unserved(&self) -> Option<u64> {
        let seen: Vec<&ScalerSample> = self.autoscaler.iter().flatten().collect();
        // A surge restarted mid-run starts its count again: never a wrapped figure.
        Some(
            seen.last()?
                .released_unserved
                .saturating_sub(seen.first()?.released_unserved),
        )
    }

    /// The autoscaler lines read from `--admin`: orders released before serving, and a
    /// warning when its signal counted under half the sessions the run started (one
    /// source address against `autoscale.max_client_share`: try `clients = N`).
    fn signal_lines(&self, seen: &[ScalerSample]) -> String {
        let mut out = String::new();
        if let Some(n) = self.released_unserved() {
            out.push_str(&format!(
                "orders released before they served (cancelled): {n}\n"
            ));
        }
        let counted: Vec<u64> = seen.iter().filter_map(|s| s.counted).collect();
        if let (Some(first), Some(last)) = (counted.first(), counted.last()) {
            let counted = last - first;
            let started = self.started_sessions as u64;
            if started >= 20 && counted * 2 < started {
                out.push_str(&format!(
                    "WARNING: the autoscaler's signal counted {counted} new connections for {started} sessions started (under half): a rehearsal from few addresses against autoscale.max_client_share is not what a sale looks like; set clients = N in the plan\n"
                ));
            }
        }
        out
    }

    /// What the autoscaler's servers cost during the run, when `--admin` was given.
    pub fn cost(&self) -> Option<RunCost> {
        let seen: Vec<&ScalerSample> = self.autoscaler.iter().flatten().collect();
        let (first, last) = (seen.first()?, seen.last()?);
        Some(RunCost {
            peak_servers: seen.iter().map(|s| s.servers).max().unwrap_or(0),
            peak_per_hour: seen.iter().map(|s| s.cost_per_hour).fold(0.0, f64::max),
            spent: (last.spent - first.spent).max(0.0),
        })
    }

    fn seconds(&self) -> usize {
        self.timeline
            .len()
            .max(self.starts_per_second.len())
            .max(self.autoscaler.len())
    }

    /// The autoscaler's events read off its per-second counts: orders (desired up),
    /// nodes coming into service, releases (servers down).
    pub fn scaler_events(&self) -> Vec<Marker> {
        let mut out = Vec::new();
        let mut last: Option<ScalerSample> = None;
        for (second, sample) in self.autoscaler.iter().enumerate() {
            let Some(now) = sample else { continue };
            if let Some(before) = last {
                if now.desired > before.desired {
                    out.push(Marker {
                        second,
                        label: format!("desired {}→{}", before.desired, now.desired),
                        color: "#9467bd",
                    });
                }
                if now.in_service > before.in_service {
                    out.push(Marker {
                        second,
                        label: format!("in service {}→{}", before.in_service, now.in_service),
                        color: "#2ca02c",
                    });
                }
                if now.servers < before.servers {
                    out.push(Marker {
                        second,
                        label: format!("released {}", before.servers - now.servers),
                        color: "#8c564b",
                    });
                }
            }
            last = Some(*now);
        }
        out
    }

    /// A self-contained HTML page: the table and SVG charts over time, with the
    /// autoscaler's events marked on each.
    pub fn html(&self) -> String {
        let secs = self.seconds();
        let series = |f: &dyn Fn(usize) -> f64| (0..secs).map(f).collect::<Vec<f64>>();
        let bucket = |i: usize, q: f64| self.timeline.get(i).map_or(0.0, |b| ms(b.quantile(q)));
        let p50 = series(&|i| bucket(i, 0.5));
        let p90 = series(&|i| bucket(i, 0.9));
        let p99 = series(&|i| bucket(i, 0.99));
        let rate = series(&|i| self.starts_per_second.get(i).copied().unwrap_or(0) as f64);
        let requests = series(&|i| self.timeline.get(i).map_or(0.0, |b| b.count() as f64));
        let errors = series(&|i| self.timeline.get(i).map_or(0.0, |b| b.errors as f64));
        let queue_length = self.queue.length_per_second(secs);
        let queued = series(&|i| queue_length.get(i).copied().unwrap_or(0) as f64);
        let markers = self.scaler_events();
        let chart = |id: &str, unit: &str, lines: &[Series]| chart_svg(id, unit, lines, &markers);
        let distribution = distribution_table(&self.total);
        let step_chart = self.step_chart(secs, &markers);
        let mut spec_rows = String::new();
        for q in [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0] {
            spec_rows.push_str(&format!(
                "<tr><td>{:.2}%</td><td>{:.2} ms</td></tr>",
                q * 100.0,
                ms(self.total.quantile(q))
            ));
        }
        let scaler = self.scaler_chart(secs, &markers);
        format!(
            "<!doctype html><meta charset=utf-8><title>surge load test</title>\
             <style>body{{font:14px sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em}}svg{{border:1px solid #ccc;margin:.5em 0;display:block}}</style>\
             <h1>surge load test</h1><pre>{}</pre>\
             <h2>Latency over time</h2>{}{step_chart}\
             <h2>New sessions and requests per second</h2>{}\
             <h2>Errors per second and shoppers in the waiting room</h2>{}{scaler}\
             <h2>Response-time distribution (all steps)</h2>{distribution}\
             <h2>Percentile spectrum (all steps)</h2><table>{spec_rows}</table>",
            html_escape(&self.table()),
            chart(
                "latency",
                "ms",
                &[
                    Series { name: "p50", color: "#1f77b4", values: &p50 },
                    Series { name: "p90", color: "#ff7f0e", values: &p90 },
                    Series { name: "p99", color: "#d62728", values: &p99 },
                ]
            ),
            chart(
                "rates",
                "/s",
                &[
                    Series { name: "new sessions", color: "#2ca02c", values: &rate },
                    Series { name: "requests", color: "#888888", values: &requests },
                ]
            ),
            chart(
                "errors and queue",
                "",
                &[
                    Series { name: "errors /s", color: "#d62728", values: &errors },
                    Series { name: "queued sessions", color: "#17becf", values: &queued },
                ]
            ),
        )
    }

    /// The p99 of each step over time, one line per step (empty without steps).
    fn step_chart(&self, secs: usize, markers: &[Marker]) -> String {
        const PALETTE: [&str; 8] = [
            "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
        ];
        let per_step: Vec<(String, Vec<f64>)> = self
            .step_timeline
            .iter()
            .map(|(name, sketches)| {
                let p99 = (0..secs)
                    .map(|i| {
                        sketches
                            .get(i)
                            .and_then(|s| s.quantile(0.99))
                            .map_or(0.0, ms)
                    })
                    .collect();
                (format!("{name} p99"), p99)
            })
            .collect();
        if per_step.is_empty() {
            return String::new();
        }
        let step_series: Vec<Series> = per_step
            .iter()
            .enumerate()
            .map(|(i, (name, values))| Series {
                name,
                color: PALETTE[i % PALETTE.len()],
                values,
            })
            .collect();
        format!(
            "<h2>p99 per step over time</h2>{}",
            chart_svg("latency per step", "ms", &step_series, markers)
        )
    }

    /// The autoscaler's desired, in-service and provisioned nodes over time (empty when
    /// the run did not watch an autoscaler).
    fn scaler_chart(&self, secs: usize, markers: &[Marker]) -> String {
        if !self.autoscaler.iter().any(Option::is_some) {
            return String::new();
        }
        let pick = |f: fn(&ScalerSample) -> u64| -> Vec<f64> {
            (0..secs)
                .map(|i| {
                    self.autoscaler
                        .get(i)
                        .copied()
                        .flatten()
                        .map_or(0.0, |s| f(&s) as f64)
                })
                .collect()
        };
        let (desired, in_service, servers) = (
            pick(|s| s.desired),
            pick(|s| s.in_service),
            pick(|s| s.servers),
        );
        let lines = [
            Series {
                name: "desired",
                color: "#9467bd",
                values: &desired,
            },
            Series {
                name: "in service",
                color: "#000000",
                values: &in_service,
            },
            Series {
                name: "provisioned",
                color: "#8c564b",
                values: &servers,
            },
        ];
        format!(
            "<h2>Autoscaler: desired, in service and provisioned nodes</h2>{}",
            chart_svg("autoscaler", "nodes", &lines, markers)
        )
    }
}

/// One chart of the report: counts unless its unit is milliseconds.
fn chart_svg(id: &str, unit: &str, lines: &[Series], markers: &[Marker]) -> String {
    Chart {
        id,
        unit,
        series: lines,
        markers,
        counts: unit != "ms",
    }
    .svg()
}

/// The response-time distribution as a table of bars: requests up to each bound.
fn distribution_table(stats: &StepStats) -> String {
    let rows = stats.distribution();
    let total = stats.count().max(1) as f64;
    let widest = rows.iter().map(|(_, n)| *n).max().unwrap_or(1).max(1) as f64;
    let mut out = String::from(
        "<table class='distribution'><tr><th>up to</th><th>requests</th><th>share</th><th></th></tr>",
    );
    for (le, n) in rows {
        out.push_str(&format!(
            "<tr><td>{:.1} ms</td><td>{n}</td><td>{:.2}%</td>\
             <td><div style='background:#1f77b4;height:10px;width:{:.0}px'></div></td></tr>",
            ms(le),
            n as f64 / total * 100.0,
            n as f64 / widest * 400.0
        ));
    }
    out.push_str("</table>");
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Milliseconds to the microsecond (the histograms hold microseconds anyway), as the
/// access log prints them.
pub fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

pub fn fmt_ms(d: Duration) -> String {
    format!("{:.2}ms", ms(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slo(limit: SloLimit) -> Slo {
        Slo {
            label: "x".into(),
            step: None,
            limit,
        }
    }

    #[test]
    fn an_error_budget_spent_on_the_whole_run_is_hopeless_before_the_end() {
        let s = slo(SloLimit::ErrorRate(0.01));
        let mut st = StepStats::new();
        for _ in 0..50 {
            st.record(Duration::from_millis(1), "2xx", true);
        }
        for _ in 0..9 {
            st.record(Duration::from_millis(1), "5xx", false);
        }
        // 9 errors of at most 1,000 requests: 0.9% still possible.
        assert!(!hopeless(&s, Some(&st), 1000));
        st.record(Duration::from_millis(1), "5xx", false);
        // 10 of at most 1,000: 1.0% at best, not below 1%.
        assert!(hopeless(&s, Some(&st), 1000));
        assert!(!check(&s, Some(&st)).0);
    }

    #[test]
    fn slow_requests_beyond_the_tail_share_make_a_percentile_hopeless() {
        let s = slo(SloLimit::Latency(0.99, Duration::from_millis(100)));
        let mut st = StepStats::new();
        for _ in 0..10 {
            st.record(Duration::from_millis(500), "2xx", true);
        }
        // 10 slow of at most 1,000: 1% may still sit above p99's cut: not yet.
        assert!(!hopeless(&s, Some(&st), 1000));
        for _ in 0..2 {
            st.record(Duration::from_millis(500), "2xx", true);
        }
        assert!(hopeless(&s, Some(&st), 1000));
        // A bound that grows (more requests to come) makes it possible again.
        assert!(!hopeless(&s, Some(&st), 100_000));
    }

    #[test]
    fn a_sketch_bounds_its_quantiles_within_a_fifth() {
        let mut sk = Sketch::default();
        assert_eq!(sk.quantile(0.99), None);
        for ms in 1..=100u64 {
            sk.record(Duration::from_millis(ms));
        }
        for (q, exact) in [(0.5, 50.0), (0.99, 99.0)] {
            let got = sk.quantile(q).unwrap().as_secs_f64() * 1e3;
            assert!(
                got >= exact * 0.99 && got <= exact * 1.2,
                "q{q}: {got} for {exact}"
            );
        }
        // An hour-long stall lands in the last bucket, not out of range.
        sk.record(Duration::from_secs(7200));
        assert!(sk.quantile(1.0).unwrap() >= Duration::from_secs(3600));
    }

    #[test]
    fn check_says_by_how_much() {
        let s = slo(SloLimit::Latency(0.5, Duration::from_millis(5)));
        let mut st = StepStats::new();
        st.record(Duration::from_millis(20), "2xx", true);
        let (ok, words) = check(&s, Some(&st));
        assert!(!ok);
        assert!(words.contains("over by 15."), "{words}");
        assert_eq!(check(&s, None).1, "no requests of that step");
    }
}
