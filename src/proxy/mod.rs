//! The data plane: hyper server for shoppers, hyper client to backends.
//!
//! One worker thread per core, each running a single-threaded tokio runtime with its own
//! `SO_REUSEPORT` listener and its own upstream connection pools: the kernel spreads new
//! connections over workers, and a request never crosses threads (no work stealing, no
//! cross-core cache traffic). Backends are picked from the pool's lock-free table.
//!
//! Owns: everything engine-specific (hyper server and client wiring). Must not: decide
//! scaling, or keep state about backends beyond connection pools (that is `pool`'s).

pub mod forward;
pub mod headers;
pub mod probe;
pub mod upstream;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::pool::Pool;
use crate::telemetry::names;
use forward::Forwarder;

/// How often a worker closes idle backend connections past their idle timeout.
const UPSTREAM_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

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
    #[error("cannot start worker thread: {0}")]
    Worker(#[source] std::io::Error),
}

/// A running proxy. [`ProxyHandle::shutdown`] stops accepting and lets in-flight requests
/// finish within the configured grace period.
#[derive(Debug)]
pub struct ProxyHandle {
    /// The address shoppers connect to (the real port when the config said port 0).
    pub local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

impl ProxyHandle {
    /// Stops accepting new connections; open connections finish their current request.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
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

/// Binds the listeners and starts the workers. Returns once every listener is bound, so
/// a bind error is reported here rather than lost in a thread.
pub fn start(cfg: &ProxyConfig, pool: Arc<Pool>) -> Result<ProxyHandle, ProxyError> {
    let first = reuseport_listener(cfg.listen)?;
    let local_addr = first.local_addr().map_err(|source| ProxyError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let mut listeners = vec![first];
    for _ in 1..cfg.workers.max(1) {
        listeners.push(reuseport_listener(local_addr)?);
    }
    let (tx, rx) = watch::channel(false);
    let request_ids = Arc::new(headers::RequestIds::default());
    let mut workers = Vec::with_capacity(listeners.len());
    for (n, listener) in listeners.into_iter().enumerate() {
        let cfg = cfg.clone();
        let pool = pool.clone();
        let request_ids = request_ids.clone();
        let rx = rx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("surge-proxy-{n}"))
            .spawn(move || {
                // Built on the worker's own thread: it holds thread-local connection pools.
                let forwarder = Forwarder::new(&cfg, pool, request_ids);
                run_worker(listener, forwarder, WorkerSettings::from(&cfg), rx)
            })
            .map_err(ProxyError::Worker)?;
        workers.push(handle);
    }
    tracing::info!(%local_addr, workers = workers.len(), "proxy listening");
    Ok(ProxyHandle {
        local_addr,
        shutdown: tx,
        workers,
    })
}

/// Per-connection settings a worker needs.
#[derive(Debug, Clone, Copy)]
struct WorkerSettings {
    header_read_timeout: Duration,
    max_header_bytes: usize,
    shutdown_grace: Duration,
}

impl From<&ProxyConfig> for WorkerSettings {
    fn from(cfg: &ProxyConfig) -> Self {
        Self {
            header_read_timeout: cfg.header_read_timeout,
            max_header_bytes: cfg.max_header_bytes,
            shutdown_grace: cfg.shutdown_grace,
        }
    }
}

fn reuseport_listener(addr: SocketAddr) -> Result<std::net::TcpListener, ProxyError> {
    let listen_err = |source| ProxyError::Listen { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(listen_err)?;
    socket.set_reuse_address(true).map_err(listen_err)?;
    socket.set_reuse_port(true).map_err(listen_err)?;
    socket.set_nonblocking(true).map_err(listen_err)?;
    socket.bind(&addr.into()).map_err(listen_err)?;
    socket.listen(4096).map_err(listen_err)?;
    Ok(socket.into())
}

fn run_worker(
    listener: std::net::TcpListener,
    forwarder: Forwarder,
    settings: WorkerSettings,
    shutdown: watch::Receiver<bool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start proxy worker runtime");
            return;
        }
    };
    // A LocalSet: connections, their requests and the upstream pools all live on this
    // thread, so they share state through `Rc`/`RefCell` instead of atomics and locks.
    let local = tokio::task::LocalSet::new();
    local.block_on(
        &runtime,
        serve(listener, Rc::new(forwarder), settings, shutdown),
    );
}

async fn serve(
    listener: std::net::TcpListener,
    forwarder: Rc<Forwarder>,
    settings: WorkerSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register listener");
            return;
        }
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes)
        .writev(false);
    let graceful = GracefulShutdown::new();
    let accepted = metrics::counter!(names::CONNECTIONS_ACCEPTED);
    let upstreams = Rc::downgrade(&forwarder.upstreams);
    tokio::task::spawn_local(async move {
        let mut every = tokio::time::interval(UPSTREAM_SWEEP_INTERVAL);
        loop {
            every.tick().await;
            match upstreams.upgrade() {
                Some(u) => u.sweep(),
                None => return,
            }
        }
    });
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            res = listener.accept() => match res {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        forwarder
            .pool
            .traffic
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        accepted.increment(1);
        let _ = stream.set_nodelay(true);
        let fwd = forwarder.clone();
        // The shopper's address as a header value, made once per connection.
        let client_ip = headers::ip_header_value(peer.ip());
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| fwd.clone().handle(req, peer, client_ip.clone())),
        );
        let conn = graceful.watch(conn);
        tokio::task::spawn_local(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(settings.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
    }
}
