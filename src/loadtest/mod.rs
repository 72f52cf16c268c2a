//! `surge loadtest FILE`: load from the outside, as shoppers make it.
//!
//! Open model (the default, `[[stages]]`): sessions arrive on a timeline fixed in advance
//! (`schedule`); each session opens its own connection and walks a scenario (steps with
//! cookies, so carts stick). Latency is measured from each request's *intended* start, so
//! a stall that delays the next arrivals shows up in the percentiles (no coordinated
//! omission). Closed model (`[closed]`): N users in a loop on kept-alive connections,
//! like wrk; for peak throughput, labelled as such in every report. SLOs from the file
//! decide the exit code; with `abort_early` a run stops once one can no longer pass.
//!
//! Must not import `proxy`, `pool` or `admin`: it measures from outside, like a shopper.

pub mod chart;
pub mod compare;
pub mod plan;
pub mod report;
pub mod schedule;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

pub use plan::{AdminWatch, Model, Plan, PlanError, Scenario, Slo, SloLimit, Step};
pub use report::{QueueStats, Report, ScalerSample, StepStats};

/// Everything measured so far; one lock per finished request.
#[derive(Debug, Default)]
struct Stats {
    steps: BTreeMap<String, StepStats>,
    total: StepStats,
    /// By the second of the request's intended start.
    timeline: Vec<StepStats>,
    /// The same per step.
    step_timeline: BTreeMap<String, Vec<report::Sketch>>,
    /// Sessions that met a waiting room.
    queue: QueueStats,
    /// Sessions ended by a failure, newcomers apart from shoppers already served.
    failures: report::Failures,
}

impl Stats {
    fn record(
        &mut self,
        step: &str,
        second: usize,
        latency: Duration,
        outcome: &'static str,
        good: bool,
    ) {
        match self.steps.get_mut(step) {
            Some(s) => s.record(latency, outcome, good),
            None => {
                let mut s = StepStats::new();
                s.record(latency, outcome, good);
                self.steps.insert(step.to_owned(), s);
            }
        }
        self.total.record(latency, outcome, good);
        if self.timeline.len() <= second {
            self.timeline.resize_with(second + 1, StepStats::coarse);
        }
        self.timeline[second].record(latency, outcome, good);
        let per_step = match self.step_timeline.get_mut(step) {
            Some(v) => v,
            None => self.step_timeline.entry(step.to_owned()).or_default(),
        };
        if per_step.len() <= second {
            per_step.resize_with(second + 1, report::Sketch::default);
        }
        per_step[second].record(latency);
    }
}

type Shared = Arc<Mutex<Stats>>;

/// A step ready to send: parsed once, cloned per request.
struct Prepared {
    name: String,
    method: Method,
    uri: Uri,
    body: Bytes,
    json: bool,
    expect: u16,
    think: Duration,
}

/// The target's address and the scenarios in sendable form.
struct Target {
    authority: String,
    host: HeaderValue,
    timeout: Duration,
    queue_patience: Duration,
    scenarios: Vec<(String, Vec<Prepared>)>,
    weights: Vec<u32>,
}

impl Target {
    fn new(plan: &Plan) -> Target {
        // `Plan::parse` checked the URL; an unparsable one here would be a bug upstream,
        // and fails every request as a connect error rather than panicking.
        let authority = plan
            .target
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.as_str().to_owned()))
            .unwrap_or_default();
        let authority = if authority.contains(':') {
            authority
        } else {
            format!("{authority}:80")
        };
        let host =
            HeaderValue::from_str(&authority).unwrap_or(HeaderValue::from_static("localhost"));
        let scenarios = plan
            .scenarios
            .iter()
            .map(|s| {
                let steps = s
                    .steps
                    .iter()
                    .map(|st| Prepared {
                        name: st.name.clone(),
                        method: Method::from_bytes(st.method.as_bytes()).unwrap_or(Method::GET),
                        uri: st.path.parse().unwrap_or_else(|_| Uri::from_static("/")),
                        body: Bytes::from(st.body.clone().unwrap_or_default()),
                        json: st.body.is_some(),
                        expect: st.expect,
                        think: st.think,
                    })
                    .collect();
                (s.name.clone(), steps)
            })
            .collect();
        Target {
            authority,
            host,
            timeout: plan.timeout,
            queue_patience: plan.queue_patience,
            scenarios,
            weights: plan.scenarios.iter().map(|s| s.weight).collect(),
        }
    }
}

/// One client connection (HTTP/1.1, kept alive), reopened when the server closes it.
struct Conn {
    authority: String,
    /// The source address to connect from (a plan's `clients`), if not the kernel's.
    local: Option<std::net::IpAddr>,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Conn {
    fn new(authority: &str) -> Conn {
        Self::from(authority, None)
    }

    fn from(authority: &str, local: Option<std::net::IpAddr>) -> Conn {
        Conn {
            authority: authority.to_owned(),
            local,
            sender: None,
        }
    }

    /// A TCP connection to the target, from `local` when set (an IPv4 loopback
    /// address: the target is reached on its IPv4 address then).
    async fn open(&self) -> std::io::Result<tokio::net::TcpStream> {
        let Some(local) = self.local else {
            return tokio::net::TcpStream::connect(&self.authority).await;
        };
        let to = tokio::net::lookup_host(&self.authority)
            .await?
            .find(|a| a.is_ipv4() == local.is_ipv4())
            .ok_or_else(|| std::io::Error::other("no address of the source's family"))?;
        let socket = match local {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(std::net::SocketAddr::new(local, 0))?;
        socket.connect(to).await
    }

    async fn connect(&mut self) -> Result<(), &'static str> {
        let stream = self.open().await.map_err(|_| "connect_error")?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| "connect_error")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends one request; a request the connection never wrote (the server had closed
    /// it between requests) goes once more on a new connection, as browsers do.
    async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, &'static str> {
        let mut req = req;
        for _ in 0..2 {
            if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
                self.connect().await?;
            }
            let Some(sender) = self.sender.as_mut() else {
                return Err("connect_error");
            };
            if sender.ready().await.is_err() {
                self.sender = None;
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => {
                    self.sender = None;
                    match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => return Err("io_error"),
                    }
                }
            }
        }
        Err("io_error")
    }
}

/// Runs `plan` to the end (or until an SLO is hopeless, with `abort_early`) and checks
/// its SLOs.
pub async fn run(plan: &Plan) -> Report {
    let target = Arc::new(Target::new(plan));
    let stats: Shared = Arc::new(Mutex::new(Stats::default()));
    let scaler: Arc<Mutex<Vec<Option<ScalerSample>>>> = Arc::default();
    let start = Instant::now();
    let (abort_tx, abort_rx) = tokio::sync::watch::channel(None::<String>);
    let (mut report, label) = match &plan.model {
        Model::Open(stages) => {
            let arrivals = schedule::arrivals(stages);
            let bounds = plan
                .abort_early
                .then(|| request_bounds(plan, arrivals.len()));
            let watcher = tokio::spawn(watch(
                plan.clone(),
                stats.clone(),
                scaler.clone(),
                start,
                bounds,
                abort_tx,
            ));
            let report = run_open(plan, &target, &arrivals, &stats, start, abort_rx).await;
            watcher.abort();
            let _ = watcher.await;
            (report, "open model".to_owned())
        }
        Model::Closed { users, duration } => {
            let watcher = tokio::spawn(watch(
                plan.clone(),
                stats.clone(),
                scaler.clone(),
                start,
                None,
                abort_tx,
            ));
            let report = run_closed(&target, *users, start + *duration, &stats, start).await;
            watcher.abort();
            let _ = watcher.await;
            (
                report,
                format!(
                    "closed model: {users} users in a loop; latency is service time (coordinated omission NOT corrected)"
                ),
            )
        }
    };
    report.model = label;
    let stats = std::mem::take(&mut *stats.lock().unwrap_or_else(|p| p.into_inner()));
    report.steps = stats.steps;
    report.total = stats.total;
    report.timeline = stats.timeline;
    report.step_timeline = stats.step_timeline;
    report.queue = stats.queue;
    report.queue.count_overtaken();
    report.failures = stats.failures;
    report.autoscaler = std::mem::take(&mut *scaler.lock().unwrap_or_else(|p| p.into_inner()));
    report.check_slos(&plan.slos);
    report
}

fn empty_report(scheduled: usize) -> Report {
    Report {
        model: String::new(),
        scheduled_sessions: scheduled,
        started_sessions: 0,
        late_starts: 0,
        duration: Duration::ZERO,
        scenarios: BTreeMap::new(),
        timeline: Vec::new(),
        step_timeline: BTreeMap::new(),
        starts_per_second: Vec::new(),
        autoscaler: Vec::new(),
        steps: BTreeMap::new(),
        total: StepStats::new(),
        slo_results: Vec::new(),
        aborted: None,
        queue: QueueStats::default(),
        failures: report::Failures::default(),
    }
}

/// At most how many requests the run sends, in all and per step name: every session
/// walking its whole scenario (scenario picks are deterministic, so this is exact for
/// runs without errors, and an upper bound otherwise).
fn request_bounds(plan: &Plan, sessions: usize) -> (u64, BTreeMap<String, u64>) {
    let mut per_scenario = vec![0u64; plan.scenarios.len()];
    for n in 0..sessions {
        per_scenario[plan.scenario_of(n)] += 1;
    }
    let mut total = 0;
    let mut steps = BTreeMap::new();
    for (s, count) in plan.scenarios.iter().zip(per_scenario) {
        total += count * s.steps.len() as u64;
        for st in &s.steps {
            *steps.entry(st.name.clone()).or_default() += count;
        }
    }
    (total, steps)
}

async fn run_open(
    plan: &Plan,
    target: &Arc<Target>,
    arrivals: &[Duration],
    stats: &Shared,
    start: Instant,
    mut abort: tokio::sync::watch::Receiver<Option<String>>,
) -> Report {
    let mut report = empty_report(arrivals.len());
    let mut last_start = start;
    let mut tasks = tokio::task::JoinSet::new();
    for (n, offset) in arrivals.iter().enumerate() {
        let intended = start + *offset;
        tokio::select! {
            _ = tokio::time::sleep_until(intended.into()) => {}
            _ = abort.changed() => break,
        }
        last_start = Instant::now();
        if last_start.saturating_duration_since(intended) > Duration::from_millis(10) {
            report.late_starts += 1;
        }
        report.started_sessions += 1;
        let scenario = plan.scenario_of(n);
        *report
            .scenarios
            .entry(plan.scenarios[scenario].name.clone())
            .or_default() += 1;
        let (target, stats) = (target.clone(), stats.clone());
        let local = plan::client_address(n, plan.clients);
        tasks.spawn(async move {
            let mut conn = Conn::from(&target.authority, local);
            session(&target, scenario, &mut conn, intended, start, &stats).await;
        });
        while tasks.try_join_next().is_some() {}
    }
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = abort.changed() => tasks.abort_all(),
        }
    }
    report.aborted = abort.borrow().clone();
    // Arrivals sit mid-interval: the first at half a gap, so the achieved rate is
    // measured over [0, last start + half a gap].
    let half_gap = arrivals.first().copied().unwrap_or_default();
    report.duration =
        (last_start.saturating_duration_since(start) + half_gap).max(Duration::from_millis(1));
    for a in arrivals.iter().take(report.started_sessions) {
        let i = a.as_secs() as usize;
        if i >= report.starts_per_second.len() {
            report.starts_per_second.resize(i + 1, 0);
        }
        report.starts_per_second[i] += 1;
    }
    report
}

async fn run_closed(
    target: &Arc<Target>,
    users: usize,
    deadline: Instant,
    stats: &Shared,
    start: Instant,
) -> Report {
    let iterations = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..users {
        let (target, stats, iterations) = (target.clone(), stats.clone(), iterations.clone());
        tasks.spawn(async move {
            let mut conn = Conn::new(&target.authority);
            let mut mine: BTreeMap<usize, u64> = BTreeMap::new();
            while Instant::now() < deadline {
                let n = iterations.fetch_add(1, Ordering::Relaxed);
                let scenario = plan::weighted_pick(&target.weights, n);
                *mine.entry(scenario).or_default() += 1;
                session(&target, scenario, &mut conn, Instant::now(), start, &stats).await;
            }
            mine
        });
    }
    let mut report = empty_report(0);
    while let Some(done) = tasks.join_next().await {
        for (scenario, count) in done.unwrap_or_default() {
            let name = target.scenarios[scenario].0.clone();
            *report.scenarios.entry(name).or_default() += count;
            report.started_sessions += count as usize;
        }
    }
    report.scheduled_sessions = report.started_sessions;
    report.duration = start.elapsed().max(Duration::from_millis(1));
    report
}

/// Once a second: the progress line, the autoscaler's counts (with `--admin`), and with
/// `abort_early` whether an SLO has become hopeless.
async fn watch(
    plan: Plan,
    stats: Shared,
    scaler: Arc<Mutex<Vec<Option<ScalerSample>>>>,
    start: Instant,
    bounds: Option<(u64, BTreeMap<String, u64>)>,
    abort: tokio::sync::watch::Sender<Option<String>>,
) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let _hide_on_exit = clear_on_drop(bar.clone());
    let mut admin = plan
        .admin
        .as_ref()
        .map(|a| (AdminReader::new(a), a.clone()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let second = start.elapsed().as_secs() as usize;
        if let Some((reader, _)) = admin.as_mut() {
            let sample = reader.read().await;
            let mut v = scaler.lock().unwrap_or_else(|p| p.into_inner());
            if v.len() <= second {
                v.resize(second + 1, None);
            }
            v[second] = sample;
        }
        let (line, hopeless) = {
            let s = stats.lock().unwrap_or_else(|p| p.into_inner());
            let last = s.timeline.get(second.saturating_sub(1));
            let line = format!(
                "{} requests | last second: {} req, p99 {} | errors {}",
                s.total.count(),
                last.map_or(0, StepStats::count),
                last.map_or("-".into(), |b| report::fmt_ms(b.quantile(0.99))),
                s.total.errors
            );
            let hopeless = bounds.as_ref().and_then(|(total, steps)| {
                plan.slos.iter().find_map(|slo| {
                    let (st, bound) = match &slo.step {
                        Some(name) => (s.steps.get(name), steps.get(name).copied().unwrap_or(0)),
                        None => (Some(&s.total), *total),
                    };
                    report::hopeless(slo, st, bound).then(|| {
                        format!(
                            "after {second} s, SLO `{}` cannot pass any more ({}; at most {bound} requests in the run)",
                            slo.label,
                            report::check(slo, st).1
                        )
                    })
                })
            });
            (line, hopeless)
        };
        bar.set_message(line);
        bar.tick();
        if let Some(why) = hopeless {
            let _ = abort.send(Some(why));
            return;
        }
    }
}

/// Reads `GET /v1/autoscaler` from a surge admin API.
struct AdminReader {
    conn: Conn,
    uri: Uri,
    host: HeaderValue,
    auth: Option<HeaderValue>,
}

impl AdminReader {
    fn new(watch: &AdminWatch) -> AdminReader {
        let base = watch.url.trim_end_matches('/');
        let uri: Uri = format!("{base}/v1/autoscaler")
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"));
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        AdminReader {
            conn: Conn::new(&authority),
            host: HeaderValue::from_str(&authority)
                .unwrap_or(HeaderValue::from_static("localhost")),
            uri: uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .parse()
                .unwrap_or_else(|_| Uri::from_static("/")),
            auth: watch
                .token
                .as_ref()
                .and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok()),
        }
    }

    /// `None` when the admin API did not answer within 800 ms or answered something else.
    async fn read(&mut self) -> Option<ScalerSample> {
        let mut req = Request::get(self.uri.clone()).header(http::header::HOST, self.host.clone());
        if let Some(auth) = &self.auth {
            req = req.header(http::header::AUTHORIZATION, auth.clone());
        }
        let req = req.body(Full::new(Bytes::new())).ok()?;
        let body = tokio::time::timeout(Duration::from_millis(800), async {
            let resp = self.conn.send(req).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            resp.into_body().collect().await.ok().map(|b| b.to_bytes())
        })
        .await
        .ok()??;
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        // The cost view is newer than the counts: absent from an older surge, it reads 0.
        let cost = |key: &str| {
            v.get("cost")
                .and_then(|c| c.get(key))
                .and_then(serde_json::Value::as_f64)
        };
        Some(ScalerSample {
            desired: v.get("desired")?.as_u64()?,
            in_service: v.get("in_service")?.as_u64()?,
            servers: cost("servers").unwrap_or(0.0) as u64,
            cost_per_hour: cost("per_hour").unwrap_or(0.0),
            spent: cost("since_start").unwrap_or(0.0),
            counted: v
                .get("observations")
                .and_then(|o| o.get("connections_counted"))
                .and_then(serde_json::Value::as_u64),
            released_unserved: v
                .get("released_unserved")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
        })
    }
}

/// Clears the progress line when the task ends or is aborted.
fn clear_on_drop(bar: indicatif::ProgressBar) -> impl Drop {
    struct Clear(indicatif::ProgressBar);
    impl Drop for Clear {
        fn drop(&mut self) {
            self.0.finish_and_clear();
        }
    }
    Clear(bar)
}

/// What one shopper carries between requests: its cookies, and where it stands with
/// the waiting room.
#[derive(Default)]
struct Visitor {
    cookies: BTreeMap<String, String>,
    /// When this session was first shown a waiting page (it then follows the page's
    /// refresh, as a browser does, until let in or out of patience).
    queued_at: Option<Instant>,
    /// Its place in line as the queue cookie names it (issued ms, nonce).
    ticket: Option<(u64, u64)>,
    /// When it last asked and was told to wait (relative to the run's start).
    last_wait_asked: Duration,
    /// Whether the shop has served it (a good answer): failures after that are those of
    /// a shopper who got in.
    served: bool,
}

/// What to do after a waiting page.
enum AfterWait {
    /// Ask again after this long.
    Retry(Duration),
    /// Out of patience: the session ends.
    Leave,
}

/// One shopper: the scenario's steps in order on `conn`, with a cookie jar. The first
/// step's latency counts from `intended` (its scheduled start); later steps from when the
/// previous answer arrived (plus think time).
async fn session(
    target: &Target,
    scenario: usize,
    conn: &mut Conn,
    intended: Instant,
    run_start: Instant,
    stats: &Shared,
) {
    let Some((_, steps)) = target.scenarios.get(scenario) else {
        return;
    };
    let mut me = Visitor::default();
    let mut step_intended = intended;
    for step in steps {
        if !step.think.is_zero() {
            tokio::time::sleep(step.think).await;
            step_intended = Instant::now();
        }
        loop {
            let Some(req) = request(target, step, &me.cookies) else {
                return;
            };
            let asked = Instant::now();
            let answer = tokio::time::timeout(target.timeout, async {
                let resp = conn.send(req).await?;
                let (parts, body) = resp.into_parts();
                body.collect().await.map_err(|_| "io_error")?;
                Ok::<_, &'static str>(parts)
            })
            .await;
            // Measured from the intended start: waiting for our turn is part of the wait.
            let latency = Instant::now().saturating_duration_since(step_intended);
            let waiting_page = match &answer {
                Ok(Ok(parts)) => waiting_page(parts),
                _ => None,
            };
            if let Some(retry) = waiting_page {
                remember_cookies(&answer, &mut me.cookies);
                match told_to_wait(&mut me, target, retry, asked, run_start, stats) {
                    AfterWait::Retry(after) => tokio::time::sleep(after).await,
                    AfterWait::Leave => return,
                }
                step_intended = Instant::now();
                continue;
            }
            if me.queued_at.is_some() {
                let_in(&mut me, run_start, stats);
            }
            remember_cookies(&answer, &mut me.cookies);
            let (outcome, good) = match &answer {
                Ok(Ok(parts)) => {
                    let s = parts.status.as_u16();
                    (status_class(s), s == step.expect)
                }
                Ok(Err(kind)) => (*kind, false),
                Err(_) => ("timeout", false),
            };
            if answer.is_err() || matches!(answer, Ok(Err(_))) {
                // The connection's state is unknown after a failure: start afresh.
                conn.sender = None;
            }
            let second = step_intended.saturating_duration_since(run_start).as_secs() as usize;
            let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
            s.record(&step.name, second, latency, outcome, good);
            if !good {
                s.failures.count(me.served, outcome);
                return;
            }
            drop(s);
            me.served = true;
            step_intended = Instant::now();
            break;
        }
    }
}

/// The request for `step`, with the session's cookies; a page load accepts HTML as a
/// browser's does.
fn request(
    target: &Target,
    step: &Prepared,
    cookies: &BTreeMap<String, String>,
) -> Option<Request<Full<Bytes>>> {
    let mut req = Request::builder()
        .method(step.method.clone())
        .uri(step.uri.clone())
        .header(http::header::HOST, target.host.clone());
    if step.json {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    } else {
        req = req.header(
            http::header::ACCEPT,
            "text/html,application/xhtml+xml,*/*;q=0.8",
        );
    }
    if !cookies.is_empty() {
        let jar: Vec<String> = cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
        req = req.header(http::header::COOKIE, jar.join("; "));
    }
    req.body(Full::new(step.body.clone())).ok()
}

/// A waiting page: the session's place is noted (a changed ticket is a place lost), the
/// line's counts move, and it asks again after `retry` unless out of patience.
fn told_to_wait(
    me: &mut Visitor,
    target: &Target,
    retry: Duration,
    asked: Instant,
    run_start: Instant,
    stats: &Shared,
) -> AfterWait {
    let now = Instant::now();
    let first = *me.queued_at.get_or_insert(now);
    let second = now.saturating_duration_since(run_start).as_secs() as usize;
    me.last_wait_asked = asked.saturating_duration_since(run_start);
    let ticket = me.cookies.values().find_map(|v| queue_ticket(v));
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    if me.ticket.is_some() && ticket.is_some() && ticket != me.ticket {
        s.queue.reissued += 1;
    }
    me.ticket = ticket.or(me.ticket);
    if first == now {
        s.queue.queued += 1;
        s.queue.line_change(second, 1);
    }
    let per = &mut s.queue.pages_per_second;
    if per.len() <= second {
        per.resize(second + 1, 0);
    }
    per[second] += 1;
    if now.saturating_duration_since(first) >= target.queue_patience {
        s.queue.abandoned += 1;
        s.queue.line_change(second, -1);
        if let Some(ticket) = me.ticket {
            s.queue.places.push(report::Place {
                ticket,
                last_told_to_wait: me.last_wait_asked,
                entered: None,
            });
        }
        return AfterWait::Leave;
    }
    AfterWait::Retry(retry)
}

/// A session that waited got an answer other than the waiting page: it is in.
fn let_in(me: &mut Visitor, run_start: Instant, stats: &Shared) {
    let Some(first) = me.queued_at.take() else {
        return;
    };
    let now = Instant::now();
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    let second = now.saturating_duration_since(run_start).as_secs() as usize;
    s.queue.admitted += 1;
    s.queue.line_change(second, -1);
    s.queue
        .wait
        .record(now.saturating_duration_since(first), "2xx", true);
    if let Some(ticket) = me.ticket {
        s.queue.places.push(report::Place {
            ticket,
            last_told_to_wait: me.last_wait_asked,
            entered: Some(now.saturating_duration_since(run_start)),
        });
    }
}

/// The place a queue cookie's value names (`q<issued ms>.<nonce>~<expiry>~<mac>`).
fn queue_ticket(value: &str) -> Option<(u64, u64)> {
    let subject = value.strip_prefix('q')?.split('~').next()?;
    let (ms, nonce) = subject.split_once('.')?;
    Some((ms.parse().ok()?, nonce.parse().ok()?))
}

/// The wait a waiting-room page asks for (`Retry-After`, at most 10 s), if the answer is
/// one: a 503 HTML page that sets a cookie (the place in line).
fn waiting_page(parts: &http::response::Parts) -> Option<Duration> {
    let html = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if parts.status != http::StatusCode::SERVICE_UNAVAILABLE
        || !html
        || !parts.headers.contains_key(http::header::SET_COOKIE)
    {
        return None;
    }
    let secs = parts
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(5);
    Some(Duration::from_secs(secs.clamp(1, 10)))
}

/// Keeps the cookies an answer sets.
fn remember_cookies(
    answer: &Result<Result<http::response::Parts, &'static str>, tokio::time::error::Elapsed>,
    cookies: &mut BTreeMap<String, String>,
) {
    if let Ok(Ok(parts)) = answer {
        for v in parts
            .headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            if let Some((k, v)) = v.split(';').next().and_then(|kv| kv.split_once('=')) {
                // An empty value (`Max-Age=0`) deletes the cookie, as a browser does.
                match v.trim() {
                    "" => cookies.remove(k.trim()),
                    v => cookies.insert(k.trim().to_owned(), v.to_owned()),
                };
            }
        }
    }
}

fn status_class(s: u16) -> &'static str {
    match s {
        503 => "503",
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
