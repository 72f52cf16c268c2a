//! `surge serve`: wires config, pool, health checks, demo blades and the proxy together,
//! and runs them until SIGTERM or Ctrl-C.
//!
//! Sits on the top floor with `main` (it imports everything below). Owns: start-up order
//! and shutdown order. Must not: contain request-path or selection logic.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::admin::{self, Admin, AdminError, AdminHandle};
use crate::blade::{self, BladeConfig, BladeError, BladeHandle};
use crate::config::Config;
use crate::pool::{health, Backend, Origin, Pool};
use crate::provider::scaleway::{Scaleway, ScalewayConfig};
use crate::proxy::{self, probe::HttpProber, ProxyError, ProxyHandle};

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
    #[error("provider: {0}")]
    Provider(String),
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
    background: watch::Sender<bool>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (within the grace period), then
    /// stops health checks and demo blades.
    pub async fn stop(self) {
        self.admin.shutdown();
        self.proxy.shutdown();
        self.proxy.wait().await;
        let _ = self.background.send(true);
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
    // Before any backend exists: backends register their metric handles when created.
    let metrics = crate::telemetry::prometheus();
    let mut blades = Vec::new();
    let mut extra = Vec::new();
    if let Some(local) = &cfg.local_blades {
        for n in 1..=local.count {
            let handle = blade::start(BladeConfig {
                id: format!("blade-{n}"),
                listen: ([127, 0, 0, 1], 0).into(),
                latency: local.latency,
                cpu_work: local.cpu_work,
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
    }
    let pool = Arc::new(Pool::from_config(&cfg.pool, extra));
    let (background, rx) = watch::channel(false);
    let prober = Arc::new(HttpProber::new(cfg.proxy.connect_timeout));
    tokio::spawn(health::run(
        pool.clone(),
        cfg.pool.health.clone(),
        prober,
        rx.clone(),
    ));
    tokio::spawn(health::run_upkeep(pool.clone(), UPKEEP_INTERVAL, rx));
    // The simulator's key exists only in this process: nothing to leak.
    let sim_token = format!("sim-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let sim = match &cfg.sim {
        Some(s) => {
            let token = sim_token.clone();
            let mut sim_cfg = crate::sim::SimConfig::demo(s.listen, &token);
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
            Some(crate::sim::start(sim_cfg).await?)
        }
        None => None,
    };
    let autoscaler = match (&cfg.autoscale, &cfg.provider) {
        (Some(a), Some(p)) => {
            let (api_url, secret) = match (&p.api_url, &sim) {
                (Some(url), _) => (
                    url.clone(),
                    std::env::var(&p.secret_key_env).map_err(|_| {
                        ServeError::Provider(format!(
                            "the secret key is read from ${}, which is not set",
                            p.secret_key_env
                        ))
                    })?,
                ),
                (None, Some(s)) => (s.url(), sim_token.clone()),
                (None, None) => return Err(ServeError::Provider("no simulator running".into())),
            };
            let mut zones = Vec::new();
            for zone in &p.zones {
                let client = Scaleway::new(ScalewayConfig {
                    api_url: api_url.clone(),
                    zone: zone.clone(),
                    project_id: p.project_id.clone(),
                    secret_key: secret.clone(),
                    os_id: p.os_id.clone(),
                    call_timeout: p.call_timeout,
                    max_attempts: p.max_attempts,
                    backoff_base: Duration::from_millis(200),
                    backoff_max: Duration::from_secs(10),
                })
                .map_err(|e| ServeError::Provider(e.to_string()))?;
                zones.push((zone.clone(), client));
            }
            let shared = Arc::new(crate::autoscale::Shared::default());
            shared.paused.store(a.paused, Ordering::Relaxed);
            tokio::spawn(crate::autoscale::run(
                pool.clone(),
                a.clone(),
                zones,
                p.blade_port,
                shared.clone(),
                background.subscribe(),
            ));
            Some(shared)
        }
        _ => None,
    };
    let proxy_listening = Arc::new(AtomicBool::new(false));
    let tls_sets = Arc::new(std::sync::OnceLock::new());
    let admin = admin::start(Admin {
        tls: tls_sets.clone(),
        autoscaler: autoscaler.clone(),
        pool: pool.clone(),
        cfg: cfg.admin.clone(),
        metrics,
        proxy_listening: proxy_listening.clone(),
    })
    .await?;
    let proxy = proxy::start(&cfg.proxy, pool.clone())?;
    proxy_listening.store(true, Ordering::Relaxed);
    let _ = tls_sets.set(proxy.tls.clone());
    for tls in &proxy.tls {
        let (tls, mut stop) = (tls.clone(), background.subscribe());
        tokio::spawn(async move {
            tokio::select! {
                _ = tls.watch() => {}
                _ = stop.changed() => {}
            }
        });
    }
    Ok(Running {
        proxy,
        admin,
        pool,
        blades,
        sim,
        autoscaler,
        background,
    })
}

/// Runs until SIGTERM or Ctrl-C, then shuts down gracefully.
pub async fn run(cfg: Config) -> Result<(), ServeError> {
    let running = start(&cfg).await?;
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
    wait_for_signal(&running).await;
    println!(
        "surge: shutting down, letting in-flight requests finish (up to {})",
        humantime::format_duration(cfg.proxy.shutdown_grace)
    );
    running.stop().await;
    Ok(())
}

/// Waits for SIGTERM or Ctrl-C; SIGHUP meanwhile reloads the TLS certificates.
async fn wait_for_signal(running: &Running) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
                _ = hup.recv() => {
                    for r in running.proxy.reload_tls("SIGHUP") {
                        match r {
                            Ok(summary) => println!("surge: SIGHUP: reloaded {summary}"),
                            Err(e) => eprintln!("surge: SIGHUP: TLS reload refused, old certificates keep serving: {e}"),
                        }
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
