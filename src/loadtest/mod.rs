//! `surge loadtest FILE`: open-model load from the outside. Sessions arrive on a timeline
//! fixed in advance (`schedule`); each session opens its own connection and walks a
//! scenario (steps with cookies, so carts stick). Latency is measured from each request's
//! *intended* start, so a stall that delays the next arrivals shows up in the percentiles
//! (no coordinated omission). SLOs from the file decide the exit code.
//!
//! Must not import `proxy` or `pool`: it measures from outside, like a shopper.

pub mod schedule;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::json;

use schedule::Stage;

/// Why a plan could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {key}: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePlan {
    target: String,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    stages: Vec<FileStage>,
    scenarios: Vec<FileScenario>,
    #[serde(default)]
    slo: Vec<FileSlo>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStage {
    #[serde(with = "humantime_serde")]
    duration: Duration,
    rate: f64,
    #[serde(default)]
    ramp_to: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileScenario {
    name: String,
    #[serde(default = "one")]
    weight: u32,
    steps: Vec<Step>,
}

fn one() -> u32 {
    1
}

/// One request of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub name: String,
    #[serde(default = "get")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub body: Option<String>,
    /// Expected status; anything else counts as an error.
    #[serde(default = "ok")]
    pub expect: u16,
    /// Pause before this step (a shopper reading the page).
    #[serde(default, with = "humantime_serde")]
    pub think: Duration,
}

fn get() -> String {
    "GET".into()
}
fn ok() -> u16 {
    200
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSlo {
    /// `p50`, `p90`, `p99`, `p999` or `error_rate`.
    metric: String,
    /// A step name; the whole run when absent.
    #[serde(default)]
    step: Option<String>,
    /// A duration (`"300ms"`) for percentiles, a fraction (`"0.001"`) for error rates.
    below: String,
}

/// A validated plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: String,
    pub timeout: Duration,
    pub stages: Vec<Stage>,
    scenarios: Vec<FileScenario>,
    slos: Vec<Slo>,
}

#[derive(Debug, Clone)]
enum SloLimit {
    Latency(f64, Duration),
    ErrorRate(f64),
}

#[derive(Debug, Clone)]
struct Slo {
    label: String,
    step: Option<String>,
    limit: SloLimit,
}

impl Plan {
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<Plan, PlanError> {
        let invalid = |key: &str, reason: String| PlanError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let raw: FilePlan = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                invalid(
                    &e.path().to_string(),
                    e.into_inner().message().replace('\n', "; "),
                )
            })?;
        if !raw.target.starts_with("http://") {
            return Err(invalid(
                "target",
                format!("`{}` must be an http:// URL", raw.target),
            ));
        }
        if raw.scenarios.is_empty()
            || raw
                .scenarios
                .iter()
                .any(|s| s.steps.is_empty() || s.weight == 0)
        {
            return Err(invalid(
                "scenarios",
                "need at least one scenario, each with a weight ≥ 1 and a step".into(),
            ));
        }
        let mut slos = Vec::new();
        for (i, s) in raw.slo.iter().enumerate() {
            let q = match s.metric.as_str() {
                "p50" => Some(0.5),
                "p90" => Some(0.9),
                "p99" => Some(0.99),
                "p999" => Some(0.999),
                "error_rate" => None,
                m => {
                    return Err(invalid(
                        &format!("slo[{i}].metric"),
                        format!("`{m}`: use p50, p90, p99, p999 or error_rate"),
                    ))
                }
            };
            let limit = match q {
                Some(q) => SloLimit::Latency(
                    q,
                    humantime::parse_duration(&s.below)
                        .map_err(|e| invalid(&format!("slo[{i}].below"), e.to_string()))?,
                ),
                None => SloLimit::ErrorRate(
                    s.below
                        .trim_end_matches('%')
                        .parse::<f64>()
                        .map(|v| if s.below.ends_with('%') { v / 100.0 } else { v })
                        .map_err(|e| invalid(&format!("slo[{i}].below"), e.to_string()))?,
                ),
            };
            slos.push(Slo {
                label: format!(
                    "{} of {} < {}",
                    s.metric,
                    s.step.as_deref().unwrap_or("all steps"),
                    s.below
                ),
                step: s.step.clone(),
                limit,
            });
        }
        Ok(Plan {
            target: raw.target.trim_end_matches('/').to_owned(),
            timeout: raw.timeout,
            stages: raw
                .stages
                .iter()
                .map(|s| Stage {
                    duration: s.duration,
                    rate: s.rate,
                    ramp_to: s.ramp_to,
                })
                .collect(),
            scenarios: raw.scenarios,
            slos,
        })
    }
}

/// Measurements of one step (or of all steps).
#[derive(Debug)]
struct StepStats {
    latency: Histogram<u64>,
    ok: u64,
    errors: u64,
    /// Responses by status class and failures by kind.
    outcomes: BTreeMap<String, u64>,
}

impl StepStats {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("static histogram bounds"),
            ok: 0,
            errors: 0,
            outcomes: BTreeMap::new(),
        }
    }

    fn record(&mut self, latency: Duration, outcome: &str, good: bool) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let _ = self.latency.record(us.min(3_600_000_000));
        if good {
            self.ok += 1;
        } else {
            self.errors += 1;
        }
        *self.outcomes.entry(outcome.to_owned()).or_default() += 1;
    }

    fn quantile(&self, q: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(q))
    }

    fn error_rate(&self) -> f64 {
        let n = self.ok + self.errors;
        if n == 0 {
            0.0
        } else {
            self.errors as f64 / n as f64
        }
    }
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Report {
    pub scheduled_sessions: usize,
    pub started_sessions: usize,
    /// Sessions that started more than 10 ms after their intended time.
    pub late_starts: usize,
    pub duration: Duration,
    /// Sessions started per scenario.
    pub scenarios: BTreeMap<String, u64>,
    /// Requests by the second of their intended start.
    timeline: Vec<StepStats>,
    /// Sessions scheduled per second.
    starts_per_second: Vec<u64>,
    steps: BTreeMap<String, StepStats>,
    total: StepStats,
    /// `(slo label, passed, measured value in words)`.
    pub slo_results: Vec<(String, bool, String)>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.slo_results.iter().all(|(_, ok, _)| *ok)
    }

    /// Achieved session arrivals per second.
    pub fn arrival_rate(&self) -> f64 {
        self.started_sessions as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// A quantile of one step's latency, or of all steps.
    pub fn quantile(&self, step: Option<&str>, q: f64) -> Option<Duration> {
        let s = match step {
            Some(name) => self.steps.get(name)?,
            None => &self.total,
        };
        (!s.latency.is_empty()).then(|| s.quantile(q))
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let scenarios: Vec<String> = self
            .scenarios
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let mut out = format!(
            "sessions: {} scheduled, {} started ({:.1}/s achieved), {} late starts; {:.1} s; {}\n",
            self.scheduled_sessions,
            self.started_sessions,
            self.arrival_rate(),
            self.late_starts,
            self.duration.as_secs_f64(),
            scenarios.join(", ")
        );
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
                fmt_ms(Duration::from_micros(s.latency.max())),
                outcomes.join(" ")
            ));
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
        let step = |s: &StepStats| {
            json!({
                "ok": s.ok, "errors": s.errors, "error_rate": s.error_rate(), "outcomes": s.outcomes,
                "p50_ms": ms(s.quantile(0.5)), "p90_ms": ms(s.quantile(0.9)), "p99_ms": ms(s.quantile(0.99)),
                "p999_ms": ms(s.quantile(0.999)), "max_ms": s.latency.max() as f64 / 1e3,
            })
        };
        json!({
            "scheduled_sessions": self.scheduled_sessions, "started_sessions": self.started_sessions,
            "late_starts": self.late_starts, "duration_s": self.duration.as_secs_f64(),
            "arrival_rate": self.arrival_rate(), "scenarios": self.scenarios,
            "steps": self.steps.iter().map(|(k, v)| (k.clone(), step(v))).collect::<serde_json::Map<_, _>>(),
            "total": step(&self.total),
            "slo": self.slo_results.iter().map(|(l, ok, m)| json!({"slo": l, "passed": ok, "measured": m})).collect::<Vec<_>>(),
            "timeline": self.timeline.iter().enumerate().map(|(i, b)| json!({
                "second": i, "sessions": self.starts_per_second.get(i).copied().unwrap_or(0),
                "ok": b.ok, "errors": b.errors, "outcomes": b.outcomes,
                "p50_ms": ms(b.quantile(0.5)), "p99_ms": ms(b.quantile(0.99)),
            })).collect::<Vec<_>>(),
        })
    }

    /// A self-contained HTML page: the table and SVG plots over time.
    pub fn html(&self) -> String {
        let secs = self.timeline.len();
        let series = |f: &dyn Fn(usize) -> f64| (0..secs).map(f).collect::<Vec<f64>>();
        let p50 = series(&|i| ms(self.timeline[i].quantile(0.5)));
        let p99 = series(&|i| ms(self.timeline[i].quantile(0.99)));
        let rate = series(&|i| self.starts_per_second.get(i).copied().unwrap_or(0) as f64);
        let errors = series(&|i| self.timeline[i].errors as f64);
        let spectrum: Vec<(f64, f64)> = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0]
            .iter()
            .map(|q| (*q, ms(self.total.quantile(*q))))
            .collect();
        let mut spec_rows = String::new();
        for (q, v) in &spectrum {
            spec_rows.push_str(&format!(
                "<tr><td>{:.2}%</td><td>{v:.2} ms</td></tr>",
                q * 100.0
            ));
        }
        format!(
            "<!doctype html><meta charset=utf-8><title>surge load test</title>\
             <style>body{{font:14px sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em}}svg{{border:1px solid #ccc;margin:.5em 0}}</style>\
             <h1>surge load test</h1><pre>{}</pre>\
             <h2>Latency over time (p50 blue, p99 red, ms)</h2>{}\
             <h2>New sessions per second</h2>{}\
             <h2>Errors per second</h2>{}\
             <h2>Percentile spectrum (all steps)</h2><table>{spec_rows}</table>",
            html_escape(&self.table()),
            svg_chart(&[(&p50, "#1f77b4"), (&p99, "#d62728")]),
            svg_chart(&[(&rate, "#2ca02c")]),
            svg_chart(&[(&errors, "#ff7f0e")]),
        )
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart of per-second series, 720×200, with the maximum labelled.
fn svg_chart(series: &[(&Vec<f64>, &str)]) -> String {
    let (w, h) = (720.0, 200.0);
    let n = series
        .iter()
        .map(|(s, _)| s.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let max = series
        .iter()
        .flat_map(|(s, _)| s.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}'>"
    );
    for (s, color) in series {
        let points: Vec<String> = s
            .iter()
            .enumerate()
            .map(|(i, v)| {
                format!(
                    "{:.1},{:.1}",
                    i as f64 * w / (n - 1) as f64,
                    h - v / max * (h - 20.0)
                )
            })
            .collect();
        out.push_str(&format!(
            "<polyline fill='none' stroke='{color}' stroke-width='2' points='{}'/>",
            points.join(" ")
        ));
    }
    out.push_str(&format!("<text x='4' y='14' font-size='12'>max {max:.2}</text><text x='{}' y='{}' font-size='12'>{} s</text></svg>", w - 40.0, h - 4.0, n));
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.2}ms", ms(d))
}

/// Per-step stats, the total, and one bucket per second of the run (by intended start).
type Shared = Arc<Mutex<(BTreeMap<String, StepStats>, StepStats, Vec<StepStats>)>>;

/// Runs `plan` to the end and checks its SLOs.
pub async fn run(plan: &Plan) -> Report {
    let arrivals = schedule::arrivals(&plan.stages);
    let stats: Shared = Arc::new(Mutex::new((BTreeMap::new(), StepStats::new(), Vec::new())));
    let weights: Vec<u32> = plan.scenarios.iter().map(|s| s.weight).collect();
    let total_weight: u32 = weights.iter().sum();
    let start = Instant::now();
    let mut late = 0;
    let mut last_start = start;
    let mut per_scenario: BTreeMap<String, u64> = BTreeMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let progress = tokio::spawn(show_progress(stats.clone(), start, arrivals.len()));
    for (n, offset) in arrivals.iter().enumerate() {
        let intended = start + *offset;
        tokio::time::sleep_until(intended.into()).await;
        last_start = Instant::now();
        if last_start.saturating_duration_since(intended) > Duration::from_millis(10) {
            late += 1;
        }
        // Deterministic weighted pick: session n takes the scenario its slot falls in.
        let mut slot = (n as u32).wrapping_mul(2_654_435_761) % total_weight;
        let scenario = plan
            .scenarios
            .iter()
            .find(|s| {
                if slot < s.weight {
                    true
                } else {
                    slot -= s.weight;
                    false
                }
            })
            .cloned()
            .unwrap_or_else(|| plan.scenarios[0].clone());
        *per_scenario.entry(scenario.name.clone()).or_default() += 1;
        let (stats, target, timeout) = (stats.clone(), plan.target.clone(), plan.timeout);
        tasks.spawn(session(scenario, target, timeout, intended, start, stats));
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    progress.abort();
    let _ = progress.await;
    // Arrivals sit mid-interval: the first at half a gap, so the achieved rate is
    // measured over [0, last start + half a gap].
    let half_gap = arrivals.first().copied().unwrap_or_default();
    let duration = last_start.saturating_duration_since(start) + half_gap;
    let (steps, total, timeline) = match Arc::try_unwrap(stats) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(_) => (BTreeMap::new(), StepStats::new(), Vec::new()),
    };
    let mut starts_per_second = vec![0u64; timeline.len().max(1)];
    for a in &arrivals {
        let i = a.as_secs() as usize;
        if i >= starts_per_second.len() {
            starts_per_second.resize(i + 1, 0);
        }
        starts_per_second[i] += 1;
    }
    let mut report = Report {
        scheduled_sessions: arrivals.len(),
        started_sessions: arrivals.len(),
        late_starts: late,
        duration: duration.max(Duration::from_millis(1)),
        scenarios: per_scenario,
        timeline,
        starts_per_second,
        steps,
        total,
        slo_results: Vec::new(),
    };
    for slo in &plan.slos {
        let s = match &slo.step {
            Some(name) => report.steps.get(name),
            None => Some(&report.total),
        };
        let result = match (s, &slo.limit) {
            (None, _) => (false, "no requests of that step".to_owned()),
            (Some(s), SloLimit::Latency(q, limit)) => {
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
            (Some(s), SloLimit::ErrorRate(limit)) => {
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
        };
        report
            .slo_results
            .push((slo.label.clone(), result.0, result.1));
    }
    report
}

/// A live line on the terminal (hidden when stderr is not one): elapsed time, requests,
/// the last second's rate and p99, errors so far.
async fn show_progress(stats: Shared, start: Instant, scheduled: usize) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let _hide_on_exit = scopeguard(bar.clone());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let line = stats.lock().ok().map(|s| {
            let second = start.elapsed().as_secs().saturating_sub(1) as usize;
            let last = s.2.get(second);
            format!(
                "{} requests ({scheduled} sessions scheduled) | last second: {} req, p99 {} | errors {}",
                s.1.ok + s.1.errors,
                last.map_or(0, |b| b.ok + b.errors),
                last.map_or("-".into(), |b| fmt_ms(b.quantile(0.99))),
                s.1.errors
            )
        });
        if let Some(line) = line {
            bar.set_message(line);
        }
        bar.tick();
    }
}

/// Clears the progress line when the task ends or is aborted.
fn scopeguard(bar: indicatif::ProgressBar) -> impl Drop {
    struct Clear(indicatif::ProgressBar);
    impl Drop for Clear {
        fn drop(&mut self) {
            self.0.finish_and_clear();
        }
    }
    Clear(bar)
}

/// One shopper: a fresh connection, a cookie jar, the scenario's steps in order.
async fn session(
    scenario: FileScenario,
    target: String,
    timeout: Duration,
    intended: Instant,
    run_start: Instant,
    stats: Shared,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut cookies: BTreeMap<String, String> = BTreeMap::new();
    let mut step_intended = intended;
    for step in &scenario.steps {
        if !step.think.is_zero() {
            tokio::time::sleep(step.think).await;
            step_intended = Instant::now();
        }
        let mut req = Request::builder()
            .method(Method::from_bytes(step.method.as_bytes()).unwrap_or(Method::GET))
            .uri(format!("{target}{}", step.path));
        if !cookies.is_empty() {
            let jar: Vec<String> = cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req = req.header(http::header::COOKIE, jar.join("; "));
        }
        if step.body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let body = Bytes::from(step.body.clone().unwrap_or_default());
        let Ok(req) = req.body(Full::new(body)) else {
            return;
        };
        let answer = tokio::time::timeout(timeout, async {
            let resp = client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    "connect_error"
                } else {
                    "io_error"
                }
            })?;
            let (parts, body) = resp.into_parts();
            body.collect().await.map_err(|_| "io_error")?;
            Ok::<_, &'static str>(parts)
        })
        .await;
        // Measured from the intended start: waiting for our turn is part of the wait.
        let latency = Instant::now().saturating_duration_since(step_intended);
        let (outcome, good) = match &answer {
            Ok(Ok(parts)) => {
                for v in parts
                    .headers
                    .get_all(http::header::SET_COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                {
                    if let Some((k, v)) = v.split(';').next().and_then(|kv| kv.split_once('=')) {
                        cookies.insert(k.trim().to_owned(), v.trim().to_owned());
                    }
                }
                let s = parts.status.as_u16();
                let class = if s == 503 {
                    "503".to_owned()
                } else {
                    format!("{}xx", s / 100)
                };
                (class, s == step.expect)
            }
            Ok(Err(kind)) => ((*kind).to_owned(), false),
            Err(_) => ("timeout".to_owned(), false),
        };
        if let Ok(mut s) = stats.lock() {
            s.0.entry(step.name.clone())
                .or_insert_with(StepStats::new)
                .record(latency, &outcome, good);
            s.1.record(latency, &outcome, good);
            let second = step_intended.saturating_duration_since(run_start).as_secs() as usize;
            if s.2.len() <= second {
                s.2.resize_with(second + 1, StepStats::new);
            }
            s.2[second].record(latency, &outcome, good);
        }
        if !good {
            return;
        }
        step_intended = Instant::now();
    }
}
