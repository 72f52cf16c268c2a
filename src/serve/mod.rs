//! `surge serve`: wires config, pool, health checks, demo blades and the proxy together,
//! and runs them until SIGTERM or Ctrl-C.
//!
//! The top floor under `main` (it imports everything below). Owns: start-up order
//! and shutdown order. Must not: contain request-path or selection logic.

mod intent;
mod notify;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::admin::{
    self, Admin, AdminError, AdminHandle, CertificateReload, Control, ControlKind, HandOverError,
    HandedOver,
};
use crate::blade::{self, BladeConfig, BladeError, BladeHandle};
use crate::config::Config;
use crate::handoff::{Inherited, Successor};
use crate::pool::{health, Backend, Origin, Pool};
use crate::provider::maas::{Maas, MaasConfig};
use crate::provider::scaleway::{Scaleway, ScalewayConfig};
use crate::provider::ProviderError;
use crate::proxy::{self, probe::HttpProber, tls::Tls, ProxyError, ProxyHandle};

/// How often slow start advances a ramping backend's weight.
const UPKEEP_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error(transparent)]
    Blade(#[from] BladeError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Sim(#[from] crate::sim::SimError),
    /// The provider's secret key is to be read from an environment variable that is not
    /// set.
    #[error("provider: the secret key is read from ${0}, which is not set")]
    MissingSecret(String),
    /// `api_url = "sim"` but no simulator was started (a configuration bug).
    #[error("provider: api_url is \"sim\" but no simulator runs")]
    NoSimulator,
    /// The provider client could not be built.
    #[error("provider: {0}")]
    Provider(#[from] ProviderError),
    /// The order ledger cannot be read: ordering without it could order twice.
    #[error("autoscaler: {0}")]
    Ledger(#[from] crate::autoscale::ledger::LedgerError),
    /// The etcd client could not be set up.
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// The admin API's view of a TLS listener: certificate reload, without importing the
/// proxy into `admin`.
struct TlsReload(Arc<Tls>);

impl CertificateReload for TlsReload {
    fn listener(&self) -> String {
        self.0.listener.clone()
    }

    fn reload(&self, why: &str) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        self.0.log_reload(why).map_err(Into::into)
    }
}

/// A running surge: everything `serve` started, for an orderly stop.
#[derive(Debug)]
pub struct Running {
    pub proxy: ProxyHandle,
    pub admin: AdminHandle,
    pub pool: Arc<Pool>,
    /// Demo frontends this process started (`[local_blades]`).
    pub blades: Vec<BladeHandle>,
    /// The in-process BMaaS simulator (`provider.api_url = "sim"`).
    pub sim: Option<crate::sim::SimHandle>,
    /// The autoscaler's status and pause switch, when it runs.
    pub autoscaler: Option<Arc<crate::autoscale::Shared>>,
    /// The cluster connection, with `[cluster]`.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    background: watch::Sender<bool>,
    /// What starting the admin API and the proxy again takes.
    front: Front,
    /// A proxy and admin API stopped for a successor that then died, finishing.
    retired: Vec<(ProxyHandle, AdminHandle)>,
}

/// What the admin API and the proxy are started from, kept to start them again when a
/// successor dies soon after taking over.
struct Front {
    cfg: Config,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    control: Option<tokio::sync::mpsc::Sender<Control>>,
    proxy_listening: Arc<AtomicBool>,
    /// The admin API's certificates (`admin.tls`), watched for changes like a listener's.
    admin_tls: Option<Arc<Tls>>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front").finish_non_exhaustive()
    }
}

/// What the autoscaler is started with, whichever vendor's client it drives.
struct AutoscalerStart {
    pool: Arc<Pool>,
    cfg: crate::config::AutoscaleConfig,
    provider: crate::config::ProviderConfig,
    proxy_address: String,
    ledger: crate::autoscale::ledger::Ledger,
    shared: Arc<crate::autoscale::Shared>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    shutdown: watch::Receiver<bool>,
}

impl AutoscalerStart {
    /// Makes one client per zone (ordered from, then watched) and runs the autoscaler
    /// over them.
    fn spawn<P, F>(self, client: F) -> Result<(), ServeError>
    where
        P: crate::provider::Provider + 'static,
        F: Fn(&str) -> Result<P, ProviderError>,
    {
        let p = &self.provider;
        let mut zones = Vec::new();
        let mut watched = Vec::new();
        for (i, zone) in p.zones.iter().chain(&p.watch_zones).enumerate() {
            let c = client(zone)?;
            if i < p.zones.len() {
                zones.push((zone.clone(), c));
            } else {
                watched.push((zone.clone(), c));
            }
        }
        let blade_port = p.blade_port;
        tokio::spawn(crate::autoscale::run(
            self.pool,
            self.cfg,
            crate::autoscale::Providers {
                settings: self.provider,
                proxy_address: self.proxy_address,
                zones,
                watched,
                blade_port,
            },
            self.ledger,
            self.shared,
            self.cluster,
            self.shutdown,
        ));
        Ok(())
    }
}

/// The TLS listeners' certificate reloads, as the admin API sees them.
type TlsSets = Arc<std::sync::OnceLock<Vec<Arc<dyn CertificateReload>>>>;

/// What `surge serve` needs beyond the config to reload and upgrade itself.
#[derive(Debug, Default)]
pub struct Restarts {
    /// The config file to re-read on reload (`None`: the embedded default, nothing to
    /// re-read).
    pub config_path: Option<std::path::PathBuf>,
    /// How to start the process that takes over (`None`: reload and upgrade refused).
    pub successor: Option<Successor>,
    /// Sockets handed over by the process this one takes over from.
    pub inherited: Inherited,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (within the grace period), then
    /// stops health checks and demo blades.
    pub async fn stop(self) {
        self.stop_draining(Duration::ZERO).await;
    }

    /// [`Running::stop`], letting kept-alive connections end on their own for up to
    /// `keepalive_drain` first (see `ProxyHandle::shutdown_draining`).
    pub async fn stop_draining(self, keepalive_drain: Duration) {
        self.stop_accepting(keepalive_drain);
        self.finish().await;
    }

    /// Stops accepting (admin API and proxy); in-flight requests go on.
    fn stop_accepting(&self, keepalive_drain: Duration) {
        self.admin.shutdown();
        self.proxy.shutdown_draining(keepalive_drain);
    }

    /// Serves again on `sockets` (copies kept of what was handed to a successor that then
    /// died): a new admin API and proxy on the same addresses, the autoscaler back from
    /// aside. The stopped ones finish their in-flight requests meanwhile.
    async fn serve_again(&mut self, sockets: Vec<std::net::TcpListener>) -> Result<(), ServeError> {
        let mut by_addr: std::collections::HashMap<_, Vec<_>> = std::collections::HashMap::new();
        for s in sockets {
            if let Ok(addr) = s.local_addr() {
                by_addr.entry(addr).or_default().push(s);
            }
        }
        let tls_sets = TlsSets::default();
        let admin_socket = by_addr
            .remove(&self.front.cfg.admin.listen)
            .and_then(|mut v| v.pop());
        let admin = start_admin(
            &self.front,
            &self.pool,
            self.autoscaler.clone(),
            self.cluster.clone(),
            tls_sets.clone(),
            admin_socket,
        )
        .await?;
        let proxy = start_proxy(
            &self.front,
            &self.pool,
            &tls_sets,
            &self.background,
            &mut |addr| by_addr.remove(&addr).unwrap_or_default(),
        )?;
        self.retired.push((
            std::mem::replace(&mut self.proxy, proxy),
            std::mem::replace(&mut self.admin, admin),
        ));
        if let (Some(a), None) = (&self.autoscaler, &self.cluster) {
            a.step_back();
        }
        Ok(())
    }

    /// Waits for the proxy and admin API to finish their requests, then stops the rest.
    async fn finish(self) {
        self.proxy.wait().await;
        self.admin.wait().await;
        for (proxy, admin) in self.retired {
            proxy.wait().await;
            admin.wait().await;
        }
        let _ = self.background.send(true);
        if let Some(c) = &self.cluster {
            // Hands the leadership on at once rather than after the lease's TTL.
            c.leave().await;
        }
        for b in &self.blades {
            b.kill();
        }
        if let Some(sim) = &self.sim {
            sim.stop();
        }
    }
}

/// Starts everything `cfg` describes on the current tokio runtime (proxy workers get
/// threads of their own).
pub async fn start(cfg: &Config) -> Result<Running, ServeError> {
    start_with(cfg, &mut Inherited::default(), None).await
}

/// [`start`], serving sockets `inherited` from a predecessor where the addresses match,
/// with admin reload/upgrade requests sent to `control`.
pub async fn start_with(
    cfg: &Config,
    inherited: &mut Inherited,
    control: Option<tokio::sync::mpsc::Sender<Control>>,
) -> Result<Running, ServeError> {
    // Before any backend exists: backends register their metric handles when created.
    let metrics = crate::telemetry::prometheus();
    let (blades, extra) = start_local_blades(cfg).await?;
    let pool = Arc::new(Pool::from_config(&cfg.pool, extra));
    let (background, rx) = watch::channel(false);
    let cluster = match &cfg.cluster {
        Some(c) => Some(start_cluster(c, background.subscribe()).await?),
        None => None,
    };
    share_ticket_claims(&pool, cluster.as_ref());
    start_pool_upkeep(cfg, &pool, rx)?;
    let (sim, sim_token) = start_sim(cfg).await?;
    let autoscaler = match (&cfg.autoscale, &cfg.provider) {
        (Some(a), Some(p)) => {
            let api = match (&p.api_url, &sim) {
                (Some(url), _) => (
                    url.clone(),
                    std::env::var(&p.secret_key_env)
                        .map_err(|_| ServeError::MissingSecret(p.secret_key_env.clone()))?,
                ),
                (None, Some(s)) => (s.url(), sim_token),
                (None, None) => return Err(ServeError::NoSimulator),
            };
            let start = AutoscalerStart {
                pool: pool.clone(),
                cfg: a.clone(),
                provider: p.clone(),
                proxy_address: cfg
                    .proxy
                    .listeners
                    .first()
                    .map(|l| l.listen.to_string())
                    .unwrap_or_default(),
                ledger: crate::autoscale::open_ledger(a)?,
                shared: Arc::new(crate::autoscale::Shared::new(a.paused)),
                cluster: cluster.clone(),
                shutdown: background.subscribe(),
            };
            pool.traffic.scaling.set_share(a.max_client_share);
            Some(start_autoscaler(start, p, api)?)
        }
        _ => None,
    };
    let admin_tls = start_admin_tls(cfg, &background)?;
    let front = Front {
        cfg: cfg.clone(),
        metrics,
        control,
        proxy_listening: Arc::new(AtomicBool::new(false)),
        admin_tls,
    };
    let tls_sets = TlsSets::default();
    let admin_socket = match cfg.admin.listen.port() {
        0 => None,
        _ => inherited.take(cfg.admin.listen).pop(),
    };
    let admin = start_admin(
        &front,
        &pool,
        autoscaler.clone(),
        cluster.clone(),
        tls_sets.clone(),
        admin_socket,
    )
    .await?;
    if inherited.from_predecessor() {
        // The predecessor serves on these very sockets until this process accepts on
        // them: first get the pool to where it was (servers adopted from the provider,
        // intent read back, nodes through their health checks), or a cart bound to an
        // adopted node would meet a pool that does not know it yet.
        if !warm(
            &pool,
            autoscaler.as_deref(),
            cluster.as_deref(),
            SUCCESSOR_WARM_LIMIT,
        )
        .await
        {
            eprintln!(
                "surge: pool not fully warm after {}; taking over anyway",
                humantime::format_duration(SUCCESSOR_WARM_LIMIT)
            );
        }
    }
    let proxy = start_proxy(&front, &pool, &tls_sets, &background, &mut |addr| {
        inherited.take(addr)
    })?;
    if let Some(c) = &cluster {
        tokio::spawn(intent::run(
            pool.clone(),
            c.clone(),
            autoscaler.clone(),
            background.subscribe(),
        ));
    }
    Ok(Running {
        proxy,
        admin,
        pool,
        blades,
        sim,
        autoscaler,
        cluster,
        background,
        front,
        retired: Vec::new(),
    })
}

/// The demo's blades (`[local_blades]`), started on loopback, and their pool members.
async fn start_local_blades(
    cfg: &Config,
) -> Result<(Vec<blade::BladeHandle>, Vec<Arc<Backend>>), ServeError> {
    let (mut blades, mut extra) = (Vec::new(), Vec::new());
    let Some(local) = &cfg.local_blades else {
        return Ok((blades, extra));
    };
    for n in 1..=local.count {
        let handle = blade::start(BladeConfig {
            id: format!("blade-{n}"),
            listen: ([127, 0, 0, 1], 0).into(),
            latency: local.latency,
            cpu_work: local.cpu_work,
            tls: None,
        })
        .await?;
        extra.push(Arc::new(Backend::new(
            &handle.id,
            handle.addr,
            1,
            Origin::Local,
        )));
        blades.push(handle);
    }
    Ok((blades, extra))
}

/// The pool's own clocks: health checks, upkeep, the waiting room's tidying.
fn start_pool_upkeep(
    cfg: &Config,
    pool: &Arc<Pool>,
    rx: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let upstream_tls = match &cfg.pool.tls {
        Some(t) => Some(
            crate::proxy::tls::UpstreamTls::new(t)
                .map_err(|e| ServeError::Proxy(ProxyError::UpstreamTls(e)))?,
        ),
        None => None,
    };
    let prober = Arc::new(HttpProber::new(cfg.proxy.connect_timeout).with_tls(upstream_tls));
    tokio::spawn(health::run(
        pool.clone(),
        cfg.pool.health.clone(),
        prober,
        rx.clone(),
    ));
    tokio::spawn(health::run_upkeep(
        pool.clone(),
        UPKEEP_INTERVAL,
        rx.clone(),
    ));
    if pool.traffic.waiting.is_some() {
        tokio::spawn(tidy_waiting_room(pool.clone(), rx));
    }
    Ok(())
}

/// The in-process simulator (`[sim]`) speaking the configured provider's API, and the
/// key it accepts (it exists only in this process: nothing to leak).
async fn start_sim(cfg: &Config) -> Result<(Option<crate::sim::SimHandle>, String), ServeError> {
    let maas = cfg.provider.as_ref().is_some_and(|p| p.kind == "maas");
    let token = if maas {
        // A MAAS API key: consumer:token:secret.
        format!(
            "surge-sim:{:016x}:{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        )
    } else {
        format!("sim-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
    };
    let Some(s) = &cfg.sim else {
        return Ok((None, token));
    };
    let mut sim_cfg = crate::sim::SimConfig::demo(s.listen, &token);
    if maas {
        sim_cfg.api = crate::sim::SimApi::Maas;
        sim_cfg.machines_per_zone = s.capacity;
    }
    if let Some(p) = &cfg.provider {
        sim_cfg.zones = p.zones.clone();
    }
    sim_cfg.delivery = s.delivery;
    sim_cfg.install = s.install;
    sim_cfg.capacity = s.capacity;
    sim_cfg.blade_port = s.blade_port;
    sim_cfg.state_file = s.state_file.clone();
    sim_cfg.spread = s.spread;
    sim_cfg.time_scale = s.time_scale;
    sim_cfg.blade_latency = s.blade_latency;
    sim_cfg.blade_cpu_work = s.blade_cpu_work;
    Ok((Some(crate::sim::start(sim_cfg).await?), token))
}

/// Starts the autoscaler over the configured vendor's API (`api`: its address and
/// secret), one provider client per zone.
fn start_autoscaler(
    start: AutoscalerStart,
    p: &crate::config::ProviderConfig,
    (api_url, secret): (String, String),
) -> Result<Arc<crate::autoscale::Shared>, ServeError> {
    let shared = start.shared.clone();
    let retry = crate::provider::http::Retry {
        max_attempts: p.max_attempts,
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(10),
        max_retry_after: p.max_retry_after,
    };
    if p.kind == "maas" {
        let key: crate::provider::maas::ApiKey = secret.parse()?;
        let maas = p.maas.as_ref();
        start.spawn(|zone| {
            Maas::new(MaasConfig {
                api_url: api_url.clone(),
                api_key: key.clone(),
                zone: zone.to_owned(),
                offer: p.offer.clone(),
                resource_pool: maas.and_then(|m| m.resource_pool.clone()),
                tags: maas.map(|m| m.tags.clone()).unwrap_or_default(),
                min_cpu_count: maas.and_then(|m| m.min_cpu_count),
                min_memory_mib: maas.and_then(|m| m.min_memory_mib),
                distro_series: maas.map_or_else(|| "noble".into(), |m| m.distro_series.clone()),
                erase_on_release: maas.is_some_and(|m| m.erase_on_release),
                call_timeout: p.call_timeout,
                retry,
            })
        })?;
    } else {
        start.spawn(|zone| {
            Scaleway::new(ScalewayConfig {
                api_url: api_url.clone(),
                zone: zone.to_owned(),
                project_id: p.project_id.clone(),
                secret_key: secret.clone(),
                os_id: p.os_id.clone(),
                call_timeout: p.call_timeout,
                retry,
            })
        })?;
    }
    Ok(shared)
}

/// The admin listener's TLS (`[admin.tls]`), its files watched until surge stops.
fn start_admin_tls(
    cfg: &Config,
    background: &watch::Sender<bool>,
) -> Result<Option<Arc<Tls>>, ServeError> {
    let Some(t) = &cfg.admin.tls else {
        return Ok(None);
    };
    let addr = cfg.admin.listen;
    let tls = Tls::new(format!("admin {addr}"), t)
        .map_err(|source| ServeError::Proxy(ProxyError::Tls { addr, source }))?;
    let (tls, mut stop) = (Arc::new(tls), background.subscribe());
    let watched = tls.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = watched.watch() => {}
            _ = stop.changed() => {}
        }
    });
    Ok(Some(tls))
}

/// Starts the admin API (before the proxy, so `/readyz` can say the proxy is not up).
async fn start_admin(
    front: &Front,
    pool: &Arc<Pool>,
    autoscaler: Option<Arc<crate::autoscale::Shared>>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    tls: TlsSets,
    socket: Option<std::net::TcpListener>,
) -> Result<AdminHandle, ServeError> {
    Ok(admin::start_with(
        Admin {
            tls,
            autoscaler,
            pool: pool.clone(),
            cfg: front.cfg.admin.clone(),
            metrics: front.metrics.clone(),
            proxy_listening: front.proxy_listening.clone(),
            control: front.control.clone(),
            cluster,
            server_tls: front.admin_tls.as_ref().map(|t| t.server_config()),
        },
        socket,
    )
    .await?)
}

/// Starts the proxy on the sockets `sockets` gives for each listener (new ones where it
/// gives none), with certificate watching for its TLS listeners.
fn start_proxy(
    front: &Front,
    pool: &Arc<Pool>,
    tls_sets: &TlsSets,
    background: &watch::Sender<bool>,
    sockets: &mut dyn FnMut(std::net::SocketAddr) -> Vec<std::net::TcpListener>,
) -> Result<ProxyHandle, ServeError> {
    let proxy = proxy::start_with(&front.cfg.proxy, pool.clone(), sockets)?;
    front.proxy_listening.store(true, Ordering::Relaxed);
    let _ = tls_sets.set(
        proxy
            .tls
            .iter()
            .chain(&front.admin_tls)
            .map(|t| Arc::new(TlsReload(t.clone())) as Arc<dyn CertificateReload>)
            .collect(),
    );
    for tls in &proxy.tls {
        let (tls, mut stop) = (tls.clone(), background.subscribe());
        tokio::spawn(async move {
            tokio::select! {
                _ = tls.watch() => {}
                _ = stop.changed() => {}
            }
        });
    }
    Ok(proxy)
}

#[cfg(feature = "cluster")]
async fn start_cluster(
    cfg: &crate::config::ClusterConfig,
    stop: watch::Receiver<bool>,
) -> Result<Arc<crate::cluster::Cluster>, ServeError> {
    Ok(crate::cluster::Cluster::start(cfg, stop).await?)
}

/// A waiting-room ticket enters once across the cluster: its use is recorded in etcd.
/// An unreachable etcd lets the holder in (a shopper is not turned away for it; the
/// instance's own memory still stops a replay there).
#[cfg(feature = "cluster")]
struct ClusterClaims(Arc<crate::cluster::Cluster>);

#[cfg(feature = "cluster")]
impl crate::pool::waiting::Claims for ClusterClaims {
    fn claim(
        &self,
        ticket: crate::pool::waiting::Ticket,
        expires_unix: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            match self.0.claim_ticket(&ticket.subject(), expires_unix).await {
                Ok(first) => first,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: recording a used ticket; letting its holder in");
                    true
                }
            }
        })
    }
}

#[cfg(feature = "cluster")]
fn share_ticket_claims(pool: &Pool, cluster: Option<&Arc<crate::cluster::Cluster>>) {
    if let (Some(room), Some(c)) = (pool.traffic.waiting.as_ref(), cluster) {
        room.share_claims(Arc::new(ClusterClaims(c.clone())));
    }
}

#[cfg(not(feature = "cluster"))]
fn share_ticket_claims(_pool: &Pool, _cluster: Option<&Arc<crate::cluster::Cluster>>) {}

/// Without the feature the config check already refuses `[cluster]`.
#[cfg(not(feature = "cluster"))]
async fn start_cluster(
    _cfg: &crate::config::ClusterConfig,
    _stop: watch::Receiver<bool>,
) -> Result<Arc<crate::cluster::Cluster>, ServeError> {
    Err(ServeError::Cluster(crate::cluster::ClusterError::Store(
        "this surge was built without the cluster feature".into(),
    )))
}

/// Runs until SIGTERM or Ctrl-C, or until a successor process has taken over (after a
/// reload or an upgrade), then shuts down gracefully.
pub async fn run(cfg: Config, mut restarts: Restarts) -> Result<(), ServeError> {
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel(4);
    let running = start_with(&cfg, &mut restarts.inherited, Some(control_tx)).await?;
    for addr in restarts.inherited.close_leftover() {
        println!("surge: {addr} is no longer in the config; closed it");
    }
    let took_over = restarts.inherited.from_predecessor();
    let table = running.pool.snapshot();
    let listeners: Vec<String> = running
        .proxy
        .listeners
        .iter()
        .map(|b| format!("{}://{}", if b.tls { "https" } else { "http" }, b.addr))
        .collect();
    println!(
        "surge: proxy on {} ({} workers), admin on http://{}, pool `{}` with {} backends: {}",
        listeners.join(" and "),
        cfg.proxy.workers,
        running.admin.local_addr,
        cfg.pool.name,
        table.members().len(),
        table
            .members()
            .iter()
            .map(|m| format!("{}={}", m.backend.id, m.backend.addr))
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop(table);
    if let Some(sim) = &running.sim {
        println!(
            "surge: BMaaS simulator (Scaleway Elastic Metal API) on {}",
            sim.url()
        );
    }
    if took_over {
        println!("surge: serving the sockets handed over by the previous process");
        restarts.inherited.ready();
    }
    notify::ready(took_over);
    let mut running = running;
    loop {
        match wait_for_signal(&running, &restarts, &mut control_rx).await {
            Ended::Stop => {
                // After a hand-over the unit's main process is the new one: only a stop
                // says so.
                notify::stopping();
                running.stop_accepting(KEEPALIVE_DRAIN);
                break;
            }
            Ended::HandedOver(mut next) => {
                // Stop accepting at once (the successor does), but keep copies of the
                // sockets until it has served a while: if it dies, this process takes
                // them back rather than leave the shop with nobody accepting.
                running.stop_accepting(KEEPALIVE_DRAIN);
                let probation = cfg.proxy.handover_probation;
                let died = tokio::select! {
                    d = crate::handoff::watch(&mut next.child, probation) => d,
                    _ = terminated() => None,
                };
                let Some(how) = died else { break };
                eprintln!(
                    "surge: the new process {} ended ({how}) within {} of taking over; this one ({}) serves again",
                    next.child.id(),
                    humantime::format_duration(probation),
                    std::process::id()
                );
                running.serve_again(next.sockets).await?;
                notify::ready(true);
            }
        }
    }
    println!(
        "surge: shutting down, letting in-flight requests finish (up to {})",
        humantime::format_duration(cfg.proxy.shutdown_grace)
    );
    running.finish().await;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// On SIGTERM and after a hand-over: how long kept-alive connections get to end on
/// their own (their answers say `Connection: close`) before idle ones are closed.
const KEEPALIVE_DRAIN: Duration = Duration::from_secs(5);

/// How long a process taking over waits for its pool to warm up before serving anyway.
const SUCCESSOR_WARM_LIMIT: Duration = Duration::from_secs(30);

/// Waits until the autoscaler (if any) has adopted what the provider runs, the cluster's
/// intent (if any) has been read, and no node is still warming up (unless failing its
/// probes); `false` if `limit` passed first. Wakes on what can change the answer: a table
/// publish, a health-check round, an autoscaler round, the intent view.
async fn warm(
    pool: &Pool,
    autoscaler: Option<&crate::autoscale::Shared>,
    cluster: Option<&crate::cluster::Cluster>,
    limit: Duration,
) -> bool {
    let until = tokio::time::Instant::now() + limit;
    let mut changes = pool.changes();
    let mut probes = pool.probe_rounds();
    let mut rounds = autoscaler.map(|a| a.rounds());
    let mut intents = cluster.map(|c| c.intents());
    loop {
        changes.borrow_and_update();
        probes.borrow_and_update();
        if let Some(r) = rounds.as_mut() {
            r.borrow_and_update();
        }
        let loaded = intents
            .as_mut()
            .is_none_or(|i| i.borrow_and_update().loaded);
        let adopted = autoscaler.is_none_or(|a| a.adopted()) && loaded;
        // A warming node whose latest probe failed is not about to serve: no waiting.
        let warming = pool
            .snapshot()
            .members()
            .iter()
            .filter(|m| m.state == crate::pool::State::Warming && m.backend.probe_streak().1 == 0)
            .count();
        if adopted && warming == 0 {
            return true;
        }
        let autoscaler_round = async {
            match rounds.as_mut() {
                Some(r) => r.changed().await,
                None => std::future::pending().await,
            }
        };
        let intent_change = async {
            match intents.as_mut() {
                Some(i) => i.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = changes.changed() => {}
            _ = probes.changed() => {}
            _ = autoscaler_round => {}
            _ = intent_change => {}
            _ = tokio::time::sleep_until(until) => return false,
        }
    }
}

/// How long a new process may take to start serving before a switch is called off.
pub const SUCCESSOR_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How [`wait_for_signal`] ended.
#[derive(Debug)]
enum Ended {
    /// SIGTERM or Ctrl-C: the service stops.
    Stop,
    /// A successor serves: this process goes, the service goes on.
    HandedOver(Takeover),
}

/// A successor that serves now, and copies of the sockets it was given, kept until it
/// has served for `proxy.handover_probation`.
#[derive(Debug)]
struct Takeover {
    child: std::process::Child,
    sockets: Vec<std::net::TcpListener>,
}

/// Waits for SIGTERM or Ctrl-C, or for a successor to take over. Meanwhile SIGHUP (or
/// `POST /v1/config/reload`) reloads the config and SIGUSR2 (or `POST /v1/upgrade`)
/// upgrades the binary, both by handing the sockets to a new process.
async fn wait_for_signal(
    running: &Running,
    restarts: &Restarts,
    control: &mut tokio::sync::mpsc::Receiver<Control>,
) -> Ended {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup), Ok(mut usr2)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined2()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return Ended::Stop;
    };
    loop {
        let (kind, reply) = tokio::select! {
            _ = term.recv() => return Ended::Stop,
            _ = tokio::signal::ctrl_c() => return Ended::Stop,
            _ = hup.recv() => (ControlKind::Reload, None),
            _ = usr2.recv() => (ControlKind::Upgrade, None),
            Some(c) = control.recv() => (c.kind, Some(c.reply)),
        };
        notify::reloading(match kind {
            ControlKind::Reload => "reloading: a new process takes over",
            ControlKind::Upgrade => "upgrading: a new process takes over",
        });
        // SIGTERM stays honoured while the new process starts: the hand-over is given
        // up (the new process stopped) and this one stops.
        let outcome = tokio::select! {
            o = hand_over(running, restarts, kind) => o,
            _ = term.recv() => {
                println!("surge: SIGTERM during a hand-over: the new process is stopped, and so is this one");
                return Ended::Stop;
            }
        };
        let (answer, takeover) = match outcome {
            Ok((done, takeover)) => {
                println!("surge: {done}");
                (Ok(done), Some(takeover))
            }
            Err(refused) => {
                notify::still_serving(&refused.to_string());
                eprintln!("surge: {refused}");
                (Err(refused), None)
            }
        };
        if let Some(reply) = reply {
            let _ = reply.send(answer);
        }
        if let Some(takeover) = takeover {
            return Ended::HandedOver(takeover);
        }
    }
}

/// Starts the process that takes over: for a reload only once the config file has been
/// read and validated. `Ok` means the new process serves and this one should stop.
async fn hand_over(
    running: &Running,
    restarts: &Restarts,
    kind: ControlKind,
) -> Result<(HandedOver, Takeover), HandOverError> {
    if kind == ControlKind::Reload {
        // Without a file (the embedded default) there is nothing to check; the new
        // process still re-reads the certificates.
        if let Some(path) = &restarts.config_path {
            Config::load(path).map_err(|e| HandOverError::BadConfig(kind, e))?;
        }
    }
    let Some(successor) = &restarts.successor else {
        return Err(HandOverError::NoSuccessor(kind));
    };
    let sockets_err = |e| HandOverError::Sockets(kind, e);
    let mut sockets = running.proxy.sockets().map_err(sockets_err)?;
    sockets.extend(running.admin.socket().map_err(sockets_err)?);
    // A standalone autoscaler steps aside first: the successor starts its own, and two
    // would order and release side by side (in a cluster only the leader writes, fenced).
    let aside = match (&running.autoscaler, &running.cluster) {
        (Some(a), None) => Some(a),
        _ => None,
    };
    if let Some(a) = aside {
        a.step_aside().await;
    }
    let child = match successor.start(&sockets).await {
        Ok(child) => child,
        Err(e) => {
            if let Some(a) = aside {
                a.step_back();
            }
            return Err(HandOverError::Successor(kind, Box::new(e)));
        }
    };
    Ok((
        HandedOver {
            kind,
            successor: child.id(),
            this: std::process::id(),
        },
        Takeover { child, sockets },
    ))
}

/// The waiting room's own clock: places whose holders stopped asking lapse whether or not
/// anyone visits, so the line the autoscaler and the admin API read is the live one.
async fn tidy_waiting_room(pool: Arc<Pool>, mut shutdown: watch::Receiver<bool>) {
    let Some(room) = pool.traffic.waiting.as_ref() else {
        return;
    };
    let mut every = tokio::time::interval(crate::pool::waiting::TIDY_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cost = crate::pool::waiting::SessionCost::new(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now_ms = crate::pool::waiting::wall_ms();
        let now = std::time::Instant::now();
        room.tidy(now, now_ms);
        let admission = &pool.traffic.admission;
        cost.observe(
            now,
            admission.newcomers_in.load(Ordering::Relaxed)
                + room.counters.spent.load(Ordering::Relaxed),
            admission.in_flight.load(Ordering::Relaxed),
        );
        if let Some(slot_seconds) = cost.slot_seconds() {
            room.set_session_cost(slot_seconds);
        }
        let status = room.status(now_ms);
        metrics::gauge!(crate::telemetry::names::WAITING_ROOM_QUEUED).set(status.queued as f64);
    }
}
