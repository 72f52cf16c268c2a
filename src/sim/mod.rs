//! A bare-metal-as-a-service simulator speaking Scaleway Elastic Metal's HTTP API on
//! loopback. When a server becomes ready it starts a real `blade` on the server's own
//! loopback address (127.0.1.x), so what surge orders really serves traffic.
//!
//! Deliberately an independent implementation of the vendor's API: it shares no types with
//! `provider`, so a contract misunderstanding in the client shows up as a failing test.
//!
//! Faults, from [`Faults`] or per request with `?sim_fault=`: orders ending in `error`,
//! offers out of stock, 429 with `Retry-After`, 5xx, slow answers, orders whose answer is
//! "lost" (the server is created, the answer comes too late), wrong token → 401.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::blade::{self, BladeConfig, BladeHandle};

/// How often server states advance.
const TICK: Duration = Duration::from_millis(50);

/// Deliberate misbehaviour. Also the body of `PUT /sim/v1/faults` (JSON, every field
/// optional, durations like `"2s"`), which switches chaos on and off at run time.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of orders (0..=1) that end in status `error` instead of `ready`.
    pub order_error_share: f64,
    /// Offer names reported with stock `empty`; ordering them fails with `out_of_stock`.
    pub out_of_stock: Vec<String>,
    /// Answer every Nth request with 429 (0: never).
    pub rate_limit_every: u64,
    /// `Retry-After` seconds on those 429s.
    pub retry_after_secs: u64,
    /// Share of requests (0..=1) answered with 503 before doing anything.
    pub server_error_share: f64,
    /// Added delay on every answer.
    #[serde(with = "humantime_serde")]
    pub slow: Duration,
    /// The next this-many orders are created but answered only after `lost_delay`, as if
    /// the answer were lost in the network.
    pub lose_orders: u64,
    #[serde(with = "humantime_serde")]
    pub lost_delay: Duration,
}

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    /// Zones served; others answer 404.
    pub zones: Vec<String>,
    /// The secret key clients must send as `X-Auth-Token`.
    pub token: String,
    /// Time from order to delivered hardware (`ordered` → `delivering` → `ready`).
    pub delivery: Duration,
    /// Time for the OS install once delivered (`to_install` → `installing` → `completed`).
    pub install: Duration,
    /// Spread of each server's delivery and install times: σ of a lognormal whose median
    /// is the configured duration (0: exactly as configured). Real deliveries vary a lot.
    pub spread: f64,
    /// Time compression: every duration is divided by this (60: a minute takes a second).
    pub time_scale: f64,
    /// Servers that may exist at once (across offers) before offers go out of stock.
    pub capacity: usize,
    /// Port the started blades listen on, each on its server's own loopback address.
    pub blade_port: u16,
    /// Service time of the started blades.
    pub blade_latency: Duration,
    /// Keep servers in this JSON file, so a restarted simulator still knows them.
    pub state_file: Option<PathBuf>,
    pub faults: Faults,
}

impl SimConfig {
    /// Real bare metal: ~10 minutes to deliver and ~5 to install, widely spread
    /// (lognormal σ 0.4: one in twenty takes over twice as long as the median).
    pub fn realistic(listen: SocketAddr, token: &str) -> Self {
        Self {
            delivery: Duration::from_secs(600),
            install: Duration::from_secs(300),
            spread: 0.4,
            ..Self::demo(listen, token)
        }
    }

    /// A duration for one server: lognormal around `median`, compressed by `time_scale`.
    fn sample(&self, median: Duration) -> Duration {
        let factor = if self.spread > 0.0 {
            // Box–Muller: a standard normal from two uniforms.
            let (u1, u2) = (fastrand::f64().max(f64::MIN_POSITIVE), fastrand::f64());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (self.spread * z).exp()
        } else {
            1.0
        };
        median.mul_f64(factor / self.time_scale.max(1e-6))
    }

    /// Fast defaults for the demo and tests: seconds, not minutes.
    pub fn demo(listen: SocketAddr, token: &str) -> Self {
        Self {
            listen,
            zones: vec!["fr-par-2".into(), "nl-ams-1".into()],
            token: token.into(),
            delivery: Duration::from_secs(2),
            install: Duration::from_secs(1),
            spread: 0.0,
            time_scale: 1.0,
            capacity: 64,
            blade_port: 18_000,
            blade_latency: Duration::from_millis(2),
            state_file: None,
            faults: Faults::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    #[error("simulator cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("simulator state file {file}: {reason}")]
    State { file: PathBuf, reason: String },
}

/// The offers the simulator sells: (id, name).
const OFFERS: [(&str, &str); 2] = [
    ("b0d2b4a4-e2f4-4b1b-9e2a-0f5e3c1a9a01", "EM-A115X-SSD"),
    ("c3a1f2d4-5b6e-4c7d-8e9f-0a1b2c3d4e02", "EM-B112X-SSD"),
];

/// One simulated server. Serialized to the state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Server {
    id: String,
    name: String,
    zone: String,
    offer_id: String,
    project_id: String,
    tags: Vec<String>,
    created_at: String,
    status: String,
    install_status: String,
    ip: Option<Ipv4Addr>,
    /// Whether this order is doomed to end in `error`.
    doomed: bool,
    /// This server's own delivery and install times (sampled at order time).
    #[serde(default)]
    delivery_ms: u64,
    #[serde(default)]
    install_ms: u64,
    /// Milliseconds since the order at which it moves on (scaled from the config).
    #[serde(skip)]
    ordered_at: Option<Instant>,
    #[serde(skip)]
    deleting_at: Option<Instant>,
}

impl Server {
    fn json(&self) -> Value {
        let ips: Vec<Value> = self
            .ip
            .iter()
            .map(|ip| json!({"id": format!("ip-{}", self.id), "address": ip.to_string(), "reverse": "", "version": "IPv4", "reverse_status": "active", "reverse_status_message": ""}))
            .collect();
        json!({
            "id": self.id, "organization_id": "11111111-1111-4111-8111-111111111111",
            "project_id": self.project_id, "name": self.name, "description": "",
            "updated_at": self.created_at, "created_at": self.created_at,
            "status": self.status, "offer_id": self.offer_id,
            "offer_name": OFFERS.iter().find(|o| o.0 == self.offer_id).map_or("", |o| o.1),
            "tags": self.tags, "ips": ips, "domain": format!("{}.fr-par-2.baremetal.scw.cloud", self.id),
            "boot_type": "normal", "zone": self.zone,
            "install": {"os_id": "os-ubuntu-24.04", "hostname": self.name, "ssh_key_ids": [], "status": self.install_status, "user": "ubuntu", "service_user": "service", "service_url": ""},
            "ping_status": if self.status == "ready" { "ping_status_up" } else { "ping_status_unknown" },
            "options": [], "rescue_server": null,
        })
    }
}

struct State {
    servers: BTreeMap<String, Server>,
    /// Blades started for ready servers, by server id.
    blades: BTreeMap<String, BladeHandle>,
    next_ip: u32,
    lose_orders: u64,
}

struct Sim {
    cfg: SimConfig,
    /// Current faults (changeable at run time).
    faults: Mutex<Faults>,
    state: Mutex<State>,
    /// Requests served, for `rate_limit_every`.
    requests: AtomicU64,
}

/// A running simulator.
pub struct SimHandle {
    pub local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    sim: Arc<Sim>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl SimHandle {
    /// Base URL to give a Scaleway client (`api_url`).
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// Servers that exist (not deleted), for tests.
    pub fn server_count(&self) -> usize {
        self.sim.state.lock().map_or(0, |s| s.servers.len())
    }

    /// Address of the blade started for server `id`, once it runs.
    pub fn blade_addr(&self, id: &str) -> Option<SocketAddr> {
        self.sim.state.lock().ok()?.blades.get(id).map(|b| b.addr)
    }

    /// Changes the faults while running.
    pub fn set_faults(&self, faults: Faults) {
        apply_faults(&self.sim, faults);
    }

    /// Stops serving and stops every blade it started.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
        if let Ok(mut s) = self.sim.state.lock() {
            for (_, b) in std::mem::take(&mut s.blades) {
                b.kill();
            }
        }
    }
}

/// Starts the simulator on the current runtime.
pub async fn start(cfg: SimConfig) -> Result<SimHandle, SimError> {
    let addr = cfg.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Listen { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| SimError::Listen { addr, source })?;
    let servers = load_state(&cfg)?;
    let next_ip = servers
        .values()
        .filter_map(|s| s.ip)
        .map(ip_index)
        .max()
        .map_or(1, |i| i + 1);
    let sim = Arc::new(Sim {
        faults: Mutex::new(cfg.faults.clone()),
        state: Mutex::new(State {
            servers,
            blades: BTreeMap::new(),
            next_ip,
            lose_orders: cfg.faults.lose_orders,
        }),
        requests: AtomicU64::new(0),
        cfg,
    });
    let (tx, rx) = watch::channel(false);
    tokio::spawn(tick_loop(sim.clone(), rx.clone()));
    tokio::spawn(accept_loop(listener, sim.clone(), rx));
    tracing::info!(%local_addr, "BMaaS simulator listening");
    Ok(SimHandle {
        local_addr,
        shutdown: tx,
        sim,
    })
}

fn ip_index(ip: Ipv4Addr) -> u32 {
    let o = ip.octets();
    (u32::from(o[2]) - 1) * 250 + u32::from(o[3])
}

/// Server number `n` (from 1) lives on 127.0.(1 + n/250).(n%250).
fn ip_for(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, (1 + n / 250) as u8, (n % 250).max(1) as u8)
}

fn load_state(cfg: &SimConfig) -> Result<BTreeMap<String, Server>, SimError> {
    let Some(file) = &cfg.state_file else {
        return Ok(BTreeMap::new());
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(SimError::State {
                file: file.clone(),
                reason: e.to_string(),
            })
        }
    };
    let list: Vec<Server> = serde_json::from_str(&text).map_err(|e| SimError::State {
        file: file.clone(),
        reason: e.to_string(),
    })?;
    let now = Instant::now();
    Ok(list
        .into_iter()
        .map(|mut s| {
            // Timings restart; finished servers stay finished.
            s.ordered_at = Some(now);
            if s.status == "deleting" {
                s.deleting_at = Some(now);
            }
            (s.id.clone(), s)
        })
        .collect())
}

fn save_state(sim: &Sim, state: &State) {
    let Some(file) = &sim.cfg.state_file else {
        return;
    };
    let list: Vec<&Server> = state.servers.values().collect();
    let result = serde_json::to_vec_pretty(&list)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, file))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        tracing::warn!(file = %file.display(), error = %e, "cannot save simulator state");
    }
}

/// Advances every server through its lifecycle; starts and stops blades.
async fn tick_loop(sim: Arc<Sim>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (to_start, to_stop) = advance(&sim, Instant::now());
        for (id, ip) in to_start {
            let cfg = BladeConfig {
                id: format!("bm-{}", &id[..8.min(id.len())]),
                listen: SocketAddr::new(IpAddr::V4(ip), sim.cfg.blade_port),
                latency: sim.cfg.blade_latency,
                cpu_work: 0,
            };
            match blade::start(cfg).await {
                Ok(handle) => {
                    if let Ok(mut s) = sim.state.lock() {
                        s.blades.insert(id, handle);
                    }
                }
                Err(e) => {
                    tracing::warn!(server = %id, error = %e, "simulator cannot start a blade")
                }
            }
        }
        for b in to_stop {
            b.kill();
        }
    }
}

/// One step of every server's state machine at `now`. Returns the blades to start (server
/// id, address) and the ones to stop.
fn advance(sim: &Sim, now: Instant) -> (Vec<(String, Ipv4Addr)>, Vec<BladeHandle>) {
    let Ok(mut state) = sim.state.lock() else {
        return (Vec::new(), Vec::new());
    };
    let mut start = Vec::new();
    let mut gone = Vec::new();
    let mut changed = false;
    for s in state.servers.values_mut() {
        if let Some(t) = s.deleting_at {
            if now.duration_since(t) >= Duration::from_millis(200) {
                gone.push(s.id.clone());
            }
            continue;
        }
        let age = s
            .ordered_at
            .map_or(Duration::MAX, |t| now.duration_since(t));
        let delivery = Duration::from_millis(s.delivery_ms);
        let install = Duration::from_millis(s.install_ms);
        let (status, install_status) =
            if s.status == "error" || s.status == "ready" && s.install_status == "completed" {
                (s.status.clone(), s.install_status.clone())
            } else if age < delivery / 4 {
                ("ordered".into(), "to_install".into())
            } else if age < delivery {
                ("delivering".into(), "to_install".into())
            } else if s.doomed {
                ("error".into(), "error".into())
            } else if age < delivery + install / 2 {
                ("ready".into(), "to_install".into())
            } else if age < delivery + install {
                ("ready".into(), "installing".into())
            } else {
                ("ready".into(), "completed".into())
            };
        if status != s.status || install_status != s.install_status {
            changed = true;
            if status == "ready" && install_status == "completed" {
                if let Some(ip) = s.ip {
                    start.push((s.id.clone(), ip));
                }
            }
            s.status = status;
            s.install_status = install_status;
        }
    }
    // Servers restored from a state file already ready: their blades are not running.
    for s in state.servers.values() {
        if s.status == "ready"
            && s.install_status == "completed"
            && s.deleting_at.is_none()
            && !state.blades.contains_key(&s.id)
        {
            if let Some(ip) = s.ip {
                if !start.iter().any(|(id, _)| id == &s.id) {
                    start.push((s.id.clone(), ip));
                }
            }
        }
    }
    let mut stop = Vec::new();
    for id in gone {
        state.servers.remove(&id);
        if let Some(b) = state.blades.remove(&id) {
            stop.push(b);
        }
        changed = true;
    }
    // Blades start asynchronously: mark them now so they are not started twice.
    if changed {
        save_state(sim, &state);
    }
    drop(state);
    // Reserve the slots; the tick loop fills them once the blades are up.
    (
        start
            .into_iter()
            .filter(|(id, _)| sim.state.lock().is_ok_and(|s| !s.blades.contains_key(id)))
            .collect(),
        stop,
    )
}

async fn accept_loop(listener: TcpListener, sim: Arc<Sim>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.changed() => return,
            res = listener.accept() => match res {
                Ok((s, _)) => s,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue }
            },
        };
        let sim = sim.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let sim = sim.clone();
                async move { Ok::<_, Infallible>(handle(&sim, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The vendor's error shape: `{"message", "type"}` (plus resource fields on 404).
fn api_error(status: StatusCode, kind: &str, message: &str) -> Reply {
    reply(status, &json!({"message": message, "type": kind}))
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

fn apply_faults(sim: &Sim, faults: Faults) {
    if let Ok(mut s) = sim.state.lock() {
        s.lose_orders = faults.lose_orders;
    }
    // Faults other than lost orders are read on each request.
    if let Ok(mut f) = sim.faults.lock() {
        *f = faults;
    }
}

/// A request body of at most 64 KiB, or the vendor-style error to answer.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Reply> {
    match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_arguments",
            "body too large",
        )),
    }
}

/// `PUT /sim/v1/faults`: the simulator's own control, outside the vendor's API.
async fn set_faults_call(sim: &Sim, req: Request<Incoming>) -> Reply {
    if req.method() != Method::PUT {
        return api_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use PUT",
        );
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "invalid_argument", &e.to_string()),
    };
    tracing::info!(?faults, "simulator faults changed");
    apply_faults(sim, faults);
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Full::new(Bytes::new()))
        .unwrap_or_default()
}

async fn handle(sim: &Sim, req: Request<Incoming>) -> Reply {
    let n = sim.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let faults = sim.faults.lock().map(|f| f.clone()).unwrap_or_default();
    let query = req.uri().query().unwrap_or("").to_owned();
    let fault = query_param(&query, "sim_fault").map(str::to_owned);
    if !faults.slow.is_zero() || fault.as_deref() == Some("slow") {
        tokio::time::sleep(if faults.slow.is_zero() {
            Duration::from_secs(2)
        } else {
            faults.slow
        })
        .await;
    }
    let token_ok = req
        .headers()
        .get("x-auth-token")
        .is_some_and(|v| v.as_bytes() == sim.cfg.token.as_bytes());
    if !token_ok {
        return api_error(
            StatusCode::UNAUTHORIZED,
            "denied_authentication",
            "authentication is denied: invalid or missing X-Auth-Token",
        );
    }
    if req.uri().path() == "/sim/v1/faults" {
        return set_faults_call(sim, req).await;
    }
    let rate_limited = (faults.rate_limit_every > 0 && n % faults.rate_limit_every == 0)
        || fault.as_deref() == Some("429");
    if rate_limited {
        let mut r = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "rate limit exceeded",
        );
        let secs = faults.retry_after_secs.max(1).to_string();
        if let Ok(v) = HeaderValue::from_str(&secs) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    if fault.as_deref() == Some("500")
        || (faults.server_error_share > 0.0 && fastrand::f64() < faults.server_error_share)
    {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "simulated outage",
        );
    }
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["baremetal", "v1", "zones", zone, rest @ ..] = parts.as_slice() else {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route {path}"),
        );
    };
    let zone = (*zone).to_owned();
    if !sim.cfg.zones.contains(&zone) {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("zone {zone} not found"),
        );
    }
    let method = req.method().clone();
    match (method, rest) {
        (Method::GET, ["offers"]) => offers(sim, &faults),
        (Method::GET, ["servers"]) => list(sim, &zone, &query),
        (Method::POST, ["servers"]) => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(reply) => return reply,
            };
            create(sim, &zone, &body, &faults, fault.as_deref() == Some("lose")).await
        }
        (Method::GET, ["servers", id]) => match sim
            .state
            .lock()
            .ok()
            .and_then(|s| s.servers.get(*id).map(Server::json))
        {
            Some(v) => reply(StatusCode::OK, &v),
            None => not_found(id),
        },
        (Method::DELETE, ["servers", id]) => delete(sim, id),
        _ => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route {path}"),
        ),
    }
}

/// A UUID v4-shaped id, as the vendor's are.
fn new_uuid() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn not_found(id: &str) -> Reply {
    reply(
        StatusCode::NOT_FOUND,
        &json!({"message": "resource is not found", "type": "not_found", "resource": "baremetal_server", "resource_id": id}),
    )
}

fn in_stock(sim: &Sim, faults: &Faults, offer_name: &str) -> bool {
    let used = sim.state.lock().map_or(0, |s| s.servers.len());
    used < sim.cfg.capacity && !faults.out_of_stock.iter().any(|o| o == offer_name)
}

fn offers(sim: &Sim, faults: &Faults) -> Reply {
    let list: Vec<Value> = OFFERS
        .iter()
        .map(|(id, name)| {
            let stock = if in_stock(sim, faults, name) {
                "available"
            } else {
                "empty"
            };
            json!({
                "id": id, "name": name, "stock": stock, "bandwidth": 1_000_000_000u64,
                "commercial_range": "aluminium",
                "price_per_hour": {"currency_code": "EUR", "units": 0, "nanos": 210_000_000},
                "price_per_month": {"currency_code": "EUR", "units": 139, "nanos": 0},
                "quota_name": "baremetal_em_a115x_ssd", "subscription_period": "hourly",
                "enable": true, "incompatible_os_ids": [], "tags": [],
            })
        })
        .collect();
    reply(
        StatusCode::OK,
        &json!({"offers": list, "total_count": OFFERS.len()}),
    )
}

fn list(sim: &Sim, zone: &str, query: &str) -> Reply {
    let tags: Vec<String> = query_param(query, "tags")
        .map(|t| t.split(',').map(percent_decode).collect())
        .unwrap_or_default();
    let status = query_param(query, "status").map(percent_decode);
    let page: usize = query_param(query, "page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let page_size: usize = query_param(query, "page_size")
        .and_then(|p| p.parse().ok())
        .unwrap_or(50)
        .clamp(1, 100);
    let Ok(state) = sim.state.lock() else {
        return api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "state poisoned",
        );
    };
    let matching: Vec<&Server> = state
        .servers
        .values()
        .filter(|s| s.zone == zone)
        .filter(|s| tags.iter().all(|t| s.tags.contains(t)))
        .filter(|s| status.as_ref().is_none_or(|st| &s.status == st))
        .collect();
    let total = matching.len();
    let servers: Vec<Value> = matching
        .into_iter()
        .skip((page - 1) * page_size)
        .take(page_size)
        .map(Server::json)
        .collect();
    reply(
        StatusCode::OK,
        &json!({"servers": servers, "total_count": total}),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Deserialize)]
struct CreateBody {
    offer_id: String,
    #[serde(default)]
    project_id: String,
    name: String,
    #[serde(default)]
    tags: Vec<String>,
    install: Option<Value>,
}

async fn create(sim: &Sim, zone: &str, body: &[u8], faults: &Faults, lose: bool) -> Reply {
    let order: CreateBody = match serde_json::from_slice(body) {
        Ok(o) => o,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_arguments",
                &format!("invalid body: {e}"),
            )
        }
    };
    let Some((offer_id, offer_name)) = OFFERS.iter().find(|o| o.0 == order.offer_id) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_arguments",
            &format!("offer {} not found", order.offer_id),
        );
    };
    if order.name.is_empty() || order.install.is_none() {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_arguments",
            "name and install are required",
        );
    }
    if !in_stock(sim, faults, offer_name) {
        return api_error(
            StatusCode::CONFLICT,
            "out_of_stock",
            &format!("offer {offer_name} is out of stock in {zone}"),
        );
    }
    let (server, lost) = {
        let Ok(mut state) = sim.state.lock() else {
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "state poisoned",
            );
        };
        let n = state.next_ip;
        state.next_ip += 1;
        let lost = lose || state.lose_orders > 0;
        state.lose_orders = state.lose_orders.saturating_sub(1);
        let server = Server {
            id: new_uuid(),
            name: order.name,
            zone: zone.to_owned(),
            offer_id: (*offer_id).to_owned(),
            project_id: order.project_id,
            tags: order.tags,
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            status: "ordered".into(),
            install_status: "to_install".into(),
            ip: Some(ip_for(n)),
            doomed: faults.order_error_share > 0.0 && fastrand::f64() < faults.order_error_share,
            delivery_ms: sim.cfg.sample(sim.cfg.delivery).as_millis() as u64,
            install_ms: sim.cfg.sample(sim.cfg.install).as_millis() as u64,
            ordered_at: Some(Instant::now()),
            deleting_at: None,
        };
        state.servers.insert(server.id.clone(), server.clone());
        save_state(sim, &state);
        (server, lost)
    };
    if lost {
        tokio::time::sleep(if faults.lost_delay.is_zero() {
            Duration::from_secs(5)
        } else {
            faults.lost_delay
        })
        .await;
    }
    reply(StatusCode::OK, &server.json())
}

fn delete(sim: &Sim, id: &str) -> Reply {
    let Ok(mut state) = sim.state.lock() else {
        return api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "state poisoned",
        );
    };
    let Some(server) = state.servers.get_mut(id) else {
        return not_found(id);
    };
    if server.deleting_at.is_none() {
        server.status = "deleting".into();
        server.deleting_at = Some(Instant::now());
    }
    let v = server.json();
    save_state(sim, &state);
    reply(StatusCode::OK, &v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_compressed_and_spread_around_the_median() {
        let mut cfg = SimConfig::realistic(SocketAddr::from(([127, 0, 0, 1], 0)), "t");
        cfg.time_scale = 60.0;
        let mut samples: Vec<Duration> = (0..2001).map(|_| cfg.sample(cfg.delivery)).collect();
        samples.sort_unstable();
        let median = samples[1000].as_secs_f64();
        assert!(
            (8.0..12.0).contains(&median),
            "10 min / 60 ≈ 10 s, got {median}"
        );
        assert!(samples[0] < samples[2000] / 2, "spread");
        cfg.spread = 0.0;
        assert_eq!(cfg.sample(Duration::from_secs(60)), Duration::from_secs(1));
    }
}
