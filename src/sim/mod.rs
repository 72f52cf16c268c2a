//! A bare-metal-as-a-service simulator on loopback, speaking Scaleway Elastic Metal's
//! HTTP API or Canonical MAAS's. When a server becomes ready it starts a real `blade` on the server's own
//! loopback address (127.0.1.x), so what surge orders really serves traffic.
//!
//! Deliberately an independent implementation of the vendor's API: it shares no types with
//! `provider`, so a contract misunderstanding in the client shows up as a failing test.
//!
//! Its rooms: [`fleet`] (servers and their lifecycle, vendor-neutral), [`faults`]
//! (deliberate misbehaviour, vendor-neutral), and each vendor's HTTP API over the same
//! fleet: [`elastic_metal`] and [`maas`].
//!
//! Faults, from [`Faults`] or per request with `?sim_fault=`: orders ending in `error`,
//! offers out of stock, 429 with `Retry-After`, 5xx, slow answers, orders whose answer is
//! "lost" (the server is created, the answer comes too late), wrong token → 401.

mod elastic_metal;
pub mod faults;
mod fleet;
mod maas;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::blade::{self, BladeConfig};
pub use faults::Faults;
use fleet::Fleet;

/// How often server states advance.
const TICK: Duration = Duration::from_millis(50);

/// Largest request body the simulator reads.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Which vendor's API the simulator speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SimApi {
    /// Scaleway Elastic Metal: servers ordered and deleted.
    #[default]
    ElasticMetal,
    /// Canonical MAAS 2.0: a fixed inventory of machines allocated, deployed, released.
    Maas,
}

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub api: SimApi,
    /// MAAS: commissioned machines per zone.
    pub machines_per_zone: usize,
    /// Zones served; others answer 404.
    pub zones: Vec<String>,
    /// The secret clients must present: Elastic Metal's `X-Auth-Token`; for MAAS the
    /// API key `consumer:token:secret` requests are signed with.
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
    /// CPU work per request of the started blades (rounds of hashing, as `surge blade`).
    pub blade_cpu_work: u32,
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
            api: SimApi::ElasticMetal,
            machines_per_zone: 8,
            zones: vec!["fr-par-2".into(), "nl-ams-1".into()],
            token: token.into(),
            delivery: Duration::from_secs(2),
            install: Duration::from_secs(1),
            spread: 0.0,
            time_scale: 1.0,
            capacity: 64,
            blade_port: 18_000,
            blade_latency: Duration::from_millis(2),
            blade_cpu_work: 0,
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

/// The simulator's state, shared by its API and its tick loop.
struct Sim {
    cfg: SimConfig,
    /// Current faults (changeable at run time).
    faults: Mutex<Faults>,
    fleet: Mutex<Fleet>,
    /// MAAS: the machines (empty for Elastic Metal).
    maas: Mutex<maas::Inventory>,
    /// Requests served, for `rate_limit_every`.
    requests: AtomicU64,
}

/// What a server was ordered with, as the simulator received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderedWith {
    /// The user-data, decoded.
    pub user_data: Option<String>,
    pub ssh_key_ids: Vec<String>,
    pub private_network: Option<String>,
    /// Its address on the private network.
    pub private_ip: Option<std::net::Ipv4Addr>,
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
    /// Base URL to give a client (`api_url`): the host for Elastic Metal, `…/MAAS` for
    /// MAAS.
    pub fn url(&self) -> String {
        match self.sim.cfg.api {
            SimApi::ElasticMetal => format!("http://{}", self.local_addr),
            SimApi::Maas => format!("http://{}/MAAS", self.local_addr),
        }
    }

    /// MAAS: machines allocated to someone (deploying, deployed, failed or releasing
    /// included), for tests.
    pub fn machines_allocated(&self) -> usize {
        self.sim.maas.lock().map_or(0, |inv| {
            inv.machines
                .values()
                .filter(|m| m.owner.is_some() && m.releasing.is_none())
                .count()
        })
    }

    /// Servers that exist (not deleted), for tests.
    pub fn server_count(&self) -> usize {
        self.sim.fleet.lock().map_or(0, |s| s.servers.len())
    }

    /// What server `id` was ordered with: (user-data, SSH key ids, private network,
    /// private address), for tests.
    pub fn ordered_with(&self, id: &str) -> Option<OrderedWith> {
        let fleet = self.sim.fleet.lock().ok()?;
        let s = fleet.servers.get(id)?;
        Some(OrderedWith {
            user_data: s.user_data.clone(),
            ssh_key_ids: s.ssh_key_ids.clone(),
            private_network: s.private_network.clone(),
            private_ip: s.private_ip,
        })
    }

    /// Ids of the servers that exist, for tests.
    pub fn server_ids(&self) -> Vec<String> {
        self.sim
            .fleet
            .lock()
            .map_or(Vec::new(), |f| f.servers.keys().cloned().collect())
    }

    /// Address of the blade started for server `id`, once it runs.
    pub fn blade_addr(&self, id: &str) -> Option<SocketAddr> {
        self.sim.fleet.lock().ok()?.blades.get(id).map(|b| b.addr)
    }

    /// Changes the faults while running.
    pub fn set_faults(&self, faults: Faults) {
        self.sim.set_faults(faults);
    }

    /// Stops serving and stops every blade it started.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
        if let Ok(mut s) = self.sim.fleet.lock() {
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
    let servers = match &cfg.state_file {
        Some(file) => fleet::load(file)?,
        None => Default::default(),
    };
    let mut fleet = Fleet::with(servers, &cfg.faults);
    let inventory = match cfg.api {
        SimApi::Maas => maas::Inventory::seed(&cfg.zones, cfg.machines_per_zone, &mut fleet),
        SimApi::ElasticMetal => maas::Inventory::default(),
    };
    let sim = Arc::new(Sim {
        faults: Mutex::new(cfg.faults.clone()),
        fleet: Mutex::new(fleet),
        maas: Mutex::new(inventory),
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

impl Sim {
    /// Saves the fleet to the state file, if there is one (failures are logged: the
    /// simulator keeps serving from memory).
    fn save(&self, fleet: &Fleet) {
        let Some(file) = &self.cfg.state_file else {
            return;
        };
        if let Err(e) = fleet::save(file, fleet) {
            tracing::warn!(file = %file.display(), error = %e, "cannot save simulator state");
        }
    }

    /// The faults now in force.
    fn faults(&self) -> Faults {
        self.faults.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Replaces the faults (also resets how many order answers are still to be lost and
    /// listings still to be wrong).
    fn set_faults(&self, faults: Faults) {
        if let Ok(mut f) = self.fleet.lock() {
            f.lose_orders = faults.lose_orders;
            f.create_then_5xx = faults.create_then_5xx;
            f.empty_listings = faults.empty_listings;
            f.skip_pages = faults.skip_pages;
        }
        if let Ok(mut f) = self.faults.lock() {
            *f = faults;
        }
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
        let (to_start, to_stop) = {
            let Ok(mut fleet) = sim.fleet.lock() else {
                return;
            };
            let (start, stop, changed) = fleet.advance(Instant::now());
            if changed {
                sim.save(&fleet);
            }
            (start, stop)
        };
        for (id, ip) in to_start {
            let boot = sim
                .fleet
                .lock()
                .ok()
                .and_then(|f| {
                    f.servers
                        .get(&id)
                        .map(|s| fleet::Boot::of(s.user_data.as_deref()))
                })
                .unwrap_or_default();
            if boot.never_healthy {
                // Its bootstrap is broken: nothing ever listens. Marked so it is not tried
                // on every tick.
                if let Ok(mut f) = sim.fleet.lock() {
                    f.booting.insert(id);
                }
                continue;
            }
            let cfg = BladeConfig {
                id: format!("bm-{}", &id[..8.min(id.len())]),
                listen: SocketAddr::new(IpAddr::V4(ip), sim.cfg.blade_port),
                latency: boot.latency.unwrap_or(sim.cfg.blade_latency),
                cpu_work: sim.cfg.blade_cpu_work,
                tls: None,
            };
            if boot.delay.is_zero() {
                start_blade(&sim, id, cfg).await;
            } else {
                if let Ok(mut f) = sim.fleet.lock() {
                    f.booting.insert(id.clone());
                }
                let (sim, delay) = (sim.clone(), boot.delay);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    start_blade(&sim, id.clone(), cfg).await;
                    if let Ok(mut f) = sim.fleet.lock() {
                        f.booting.remove(&id);
                    }
                });
            }
        }
        for b in to_stop {
            b.kill();
        }
    }
}

/// Starts the frontend of server `id` (unless it was deleted meanwhile).
async fn start_blade(sim: &Sim, id: String, cfg: BladeConfig) {
    let alive = sim
        .fleet
        .lock()
        .is_ok_and(|f| f.servers.get(&id).is_some_and(|s| s.deleting_at.is_none()));
    if !alive {
        return;
    }
    match blade::start(cfg).await {
        Ok(handle) => {
            if let Ok(mut f) = sim.fleet.lock() {
                f.blades.insert(id, handle);
            }
        }
        Err(e) => tracing::warn!(server = %id, error = %e, "simulator cannot start a blade"),
    }
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
                async move {
                    Ok::<_, Infallible>(match sim.cfg.api {
                        SimApi::ElasticMetal => elastic_metal::handle(&sim, req).await,
                        SimApi::Maas => maas::handle(&sim, req).await,
                    })
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A request body of at most [`MAX_BODY_BYTES`]; `None` when it is larger.
async fn read_body(req: Request<Incoming>) -> Option<Bytes> {
    Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .ok()
        .map(|b| b.to_bytes())
}

/// `PUT /sim/v1/faults`: the simulator's own control, outside any vendor's API (the
/// vendor API in front authenticates it). `Err`: the status and reason to answer.
async fn set_faults_call(
    sim: &Sim,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, (StatusCode, String)> {
    if req.method() != Method::PUT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "use PUT".into()));
    }
    let body = read_body(req)
        .await
        .ok_or((StatusCode::PAYLOAD_TOO_LARGE, "body too large".to_owned()))?;
    let faults: Faults =
        serde_json::from_slice(&body).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    tracing::info!(?faults, "simulator faults changed");
    sim.set_faults(faults);
    let mut done = Response::new(Full::new(Bytes::new()));
    *done.status_mut() = StatusCode::NO_CONTENT;
    Ok(done)
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
