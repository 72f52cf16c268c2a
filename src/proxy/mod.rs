//! The data plane: shoppers' connections (plain, TLS, PROXY protocol) to the blades.
//! HTTP/1.1 goes through surge's own engine ([`h1`]); HTTP/2 shoppers through hyper's
//! HTTP/2 server into [`service`], and from there to HTTP/1.1 blades through the engine's
//! blade connections ([`h1::bridge`]) or to h2c blades through hyper's client. Every leg
//! takes the same decisions (admission, affinity, pick) and the one retry loop
//! ([`attempts`]).
//!
//! One worker thread per core, each running a single-threaded tokio runtime with its own
//! `SO_REUSEPORT` listener and its own upstream connection pools: the kernel spreads new
//! connections over workers, and a request never crosses threads (no work stealing, no
//! cross-core cache traffic). Backends are picked from the pool's lock-free table.
//!
//! Owns: the request path, its connection pools and limits. Must not: decide scaling, or
//! keep state about backends beyond connection pools (that is `pool`'s).

mod admission;
mod answers;
mod attempts;
mod body;
mod conn_info;
pub mod drive;
pub mod forward;
mod h1;
pub mod headers;
pub mod limits;
mod listen;
pub mod probe;
pub mod proxy_protocol;
mod retry;
pub mod route;
mod service;
mod stall;
pub mod tls;
mod transport;
pub mod upstream;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::pool::Pool;
use forward::Forwarder;
pub use listen::Bound;
use worker::WorkerSettings;

/// Runs hyper's HTTP/2 tasks on the worker's own thread (`spawn_local`): the request
/// futures hold `Rc`s and never need to cross threads.
#[derive(Debug, Clone, Copy)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: tls::TlsError,
    },
    #[error("pool.tls: {0}")]
    UpstreamTls(#[source] tls::TlsError),
    #[error("cannot start worker thread: {0}")]
    Worker(#[source] std::io::Error),
    #[error("pool.sticky: {0}")]
    RouteKey(#[source] route::RouteKeyError),
}

/// A running proxy. [`ProxyHandle::shutdown`] stops accepting and lets in-flight requests
/// finish within the configured grace period.
#[derive(Debug)]
pub struct ProxyHandle {
    /// The first listener's address (the real port when the config said port 0).
    pub local_addr: SocketAddr,
    /// Every listener, in the order of the configuration.
    pub listeners: Vec<Bound>,
    /// The TLS listeners' certificate sets (for reloads).
    pub tls: Vec<Arc<tls::Tls>>,
    /// Connection and request-rate limits, with the count of open shopper connections.
    pub limits: Arc<limits::Limits>,
    /// Copies of every listening socket, to hand to a successor process; emptied on
    /// shutdown so that a stopping surge stops queueing connections.
    handoff: std::sync::Mutex<Vec<std::net::TcpListener>>,
    /// Set when stopping with a keep-alive drain: HTTP/1.1 answers say `Connection: close`.
    closing: Arc<AtomicBool>,
    /// The keep-alive drain period of the stop under way, in milliseconds.
    drain_ms: Arc<AtomicU64>,
    shutdown: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

impl ProxyHandle {
    /// Stops accepting new connections; open connections finish their current request.
    pub fn shutdown(&self) {
        if let Ok(mut h) = self.handoff.lock() {
            h.clear();
        }
        let _ = self.shutdown.send(true);
    }

    /// Stops accepting like [`ProxyHandle::shutdown`], but first lets kept-alive
    /// HTTP/1.1 connections end on their own for up to `drain`: each answer meanwhile
    /// carries `Connection: close`, so shoppers reconnect (to the successor, after an
    /// upgrade) between requests instead of having an idle connection closed under a
    /// request they are sending: a request lost in that race was never answered.
    pub fn shutdown_draining(&self, drain: Duration) {
        self.closing.store(true, Ordering::Relaxed);
        self.drain_ms.store(
            u64::try_from(drain.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.shutdown();
    }

    /// Copies of every listening socket (for a successor process).
    pub fn sockets(&self) -> std::io::Result<Vec<std::net::TcpListener>> {
        match self.handoff.lock() {
            Ok(h) => h.iter().map(std::net::TcpListener::try_clone).collect(),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// Waits until every worker has finished (after [`ProxyHandle::shutdown`]).
    pub fn join(self) {
        for w in self.workers {
            let _ = w.join();
        }
    }

    /// [`ProxyHandle::join`] without blocking the async runtime.
    pub async fn wait(self) {
        let _ = tokio::task::spawn_blocking(move || self.join()).await;
    }
}

/// Binds the listeners and starts the workers. Returns once every listener is bound and
/// every certificate loaded, so such errors are reported here rather than lost in a thread.
pub fn start(cfg: &ProxyConfig, pool: Arc<Pool>) -> Result<ProxyHandle, ProxyError> {
    start_with(cfg, pool, &mut |_| Vec::new())
}

/// The keys that sign what shoppers carry: cart routes, admission cookies, waiting-room
/// tickets.
#[derive(Clone)]
struct Signers {
    route: Option<Arc<route::RouteSigner>>,
    admission: Option<Arc<route::RouteSigner>>,
    queue: Option<Arc<route::RouteSigner>>,
}

impl Signers {
    fn new(pool: &Pool) -> Result<Self, ProxyError> {
        let settings = pool.settings();
        let route_key = match &settings.sticky {
            Some(s) => Some(match &s.route_key {
                Some(k) => k.clone(),
                None => route::key_from_file(&s.route_key_file).map_err(ProxyError::RouteKey)?,
            }),
            None => None,
        };
        let route = match (&settings.sticky, &route_key) {
            (Some(s), Some(key)) => Some(Arc::new(route::RouteSigner::new(
                key,
                s.route_key_previous.as_deref(),
                s.route_ttl,
            ))),
            _ => None,
        };
        // Admission cookies: a key of their own derived from the route key (so one cookie
        // can never stand for the other), valid on every instance that shares it; without
        // carts, a key of this process (shoppers are newcomers again after a restart).
        let admission_key = match &route_key {
            Some(k) => Some(route::derive_key(k, b"surge admission cookie v1")),
            // No randomness: no admission cookies (every visitor counts as new).
            None => route::random_key(),
        };
        let admission = settings.shed.as_ref().and_then(|shed| {
            let key = admission_key.clone()?;
            let previous = settings
                .sticky
                .as_ref()
                .and_then(|s| s.route_key_previous.as_deref())
                .map(|p| route::derive_key(p, b"surge admission cookie v1"));
            Some(Arc::new(route::RouteSigner::new(
                &key,
                previous.as_deref(),
                shed.session_duration,
            )))
        });
        // Waiting-room tickets: their own key again, valid for the ticket's life.
        let queue = match (&settings.waiting_room, &admission_key) {
            (Some(w), Some(key)) => Some(Arc::new(route::RouteSigner::new(
                &route::derive_key(key, b"surge queue ticket v1"),
                None,
                w.ticket_ttl,
            ))),
            _ => None,
        };
        Ok(Self {
            route,
            admission,
            queue,
        })
    }
}

/// What every worker is given: settings, the pool, and the process-wide counters, keys
/// and budget.
#[derive(Clone)]
struct WorkerShare {
    cfg: ProxyConfig,
    pool: Arc<Pool>,
    request_ids: Arc<headers::RequestIds>,
    limits: Arc<limits::Limits>,
    closing: Arc<AtomicBool>,
    drain_ms: Arc<AtomicU64>,
    upstream_tls: Option<tls::UpstreamTls>,
    signers: Signers,
    body_budget: Arc<limits::BodyBudget>,
    stop: watch::Receiver<bool>,
}

/// Starts worker `n` on a thread of its own, serving the listeners `mine`.
fn spawn_worker(
    n: usize,
    mine: Vec<(std::net::TcpListener, listen::ListenerSpec)>,
    share: WorkerShare,
) -> Result<std::thread::JoinHandle<()>, ProxyError> {
    std::thread::Builder::new()
        .name(format!("surge-proxy-{n}"))
        .spawn(move || {
            let WorkerShare {
                cfg,
                pool,
                request_ids,
                limits,
                closing,
                drain_ms,
                upstream_tls,
                signers,
                body_budget,
                stop,
            } = share;
            // Built on the worker's own thread: it holds thread-local connection pools.
            // The surge engine speaks HTTP/1.1 to the blades; with h2c blades hyper's
            // client (and so hyper's server) does the work.
            let own_engine = cfg.engine == crate::config::Engine::Surge
                && pool.settings().protocol == crate::config::UpstreamProtocol::Http1;
            let blades = own_engine.then(|| {
                h1::blades::Blades::new(
                    cfg.connect_timeout,
                    cfg.upstream_idle_timeout,
                    upstream_tls.clone(),
                )
            });
            let mut forwarder =
                Forwarder::new(&cfg, pool, request_ids, limits, closing, upstream_tls);
            forwarder.route_signer = signers.route;
            forwarder.admission = signers.admission;
            forwarder.queue_signer = signers.queue;
            forwarder.body_budget = body_budget;
            let forwarder = std::rc::Rc::new(forwarder);
            let engine =
                blades.map(|b| std::rc::Rc::new(h1::Engine::new(forwarder.clone(), b, &cfg)));
            worker::run(
                mine,
                forwarder,
                engine,
                WorkerSettings::from(&cfg),
                stop,
                drain_ms,
            )
        })
        .map_err(ProxyError::Worker)
}

/// [`start`], taking listening sockets from `inherited` (by configured address) before
/// binding new ones: a process taking over from another serves the very same sockets,
/// queued connections included. Every inherited socket is served, even if there are more
/// than workers.
pub fn start_with(
    cfg: &ProxyConfig,
    pool: Arc<Pool>,
    inherited: &mut dyn FnMut(SocketAddr) -> Vec<std::net::TcpListener>,
) -> Result<ProxyHandle, ProxyError> {
    let workers_n = cfg.workers.max(1);
    let listen::Listeners {
        per_worker,
        bound,
        tls,
        handoff,
    } = listen::bind(cfg, workers_n, inherited)?;
    let (tx, rx) = watch::channel(false);
    let limits = Arc::new(limits::Limits::new(cfg));
    let closing = Arc::new(AtomicBool::new(false));
    let drain_ms = Arc::new(AtomicU64::new(0));
    let shared = WorkerShare {
        cfg: cfg.clone(),
        pool: pool.clone(),
        request_ids: Arc::new(headers::RequestIds::default()),
        limits: limits.clone(),
        closing: closing.clone(),
        drain_ms: drain_ms.clone(),
        upstream_tls: match &cfg.upstream_tls {
            Some(t) => Some(tls::UpstreamTls::new(t).map_err(ProxyError::UpstreamTls)?),
            None => None,
        },
        signers: Signers::new(&pool)?,
        // One budget for the whole process, whatever the number of workers.
        body_budget: limits::BodyBudget::new(cfg.max_buffered_body_bytes),
        stop: rx,
    };
    let mut workers = Vec::with_capacity(workers_n);
    for (n, mine) in per_worker.into_iter().enumerate() {
        workers.push(spawn_worker(n, mine, shared.clone())?);
    }
    for b in &bound {
        tracing::info!(addr = %b.addr, tls = b.tls, workers = workers.len(), "proxy listening");
    }
    Ok(ProxyHandle {
        local_addr: bound[0].addr,
        listeners: bound,
        tls,
        limits,
        handoff: std::sync::Mutex::new(handoff),
        closing,
        drain_ms,
        shutdown: tx,
        workers,
    })
}
