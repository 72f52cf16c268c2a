//! The data plane: hyper server for shoppers, hyper client to backends.
//!
//! One worker thread per core, each running a single-threaded tokio runtime with its own
//! `SO_REUSEPORT` listener and its own upstream connection pools: the kernel spreads new
//! connections over workers, and a request never crosses threads (no work stealing, no
//! cross-core cache traffic). Backends are picked from the pool's lock-free table.
//!
//! Owns: everything engine-specific (hyper server and client wiring). Must not: decide
//! scaling, or keep state about backends beyond connection pools (that is `pool`'s).

pub mod drive;
pub mod forward;
pub mod headers;
pub mod limits;
pub mod probe;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::{ListenerConfig, ProxyConfig};
use crate::pool::Pool;
use crate::telemetry::names;
use forward::{ConnInfo, Forwarder};

/// hyper's own limit on request header fields (HTTP/1.1).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Refusal sent on a plain listener to a connection over the limits, before reading it.
const REFUSED_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 44\r\nretry-after: 1\r\nconnection: close\r\n\r\n503 too many connections; retry in a moment\n";

/// Refused connections (per listener and worker) that may linger at once for their 503.
const MAX_LINGERING_REFUSALS: usize = 1024;

/// How long a refused connection may linger while its 503 is read.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// How often a worker closes idle backend connections past their idle timeout.
const UPSTREAM_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

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
    #[error("cannot start worker thread: {0}")]
    Worker(#[source] std::io::Error),
}

/// A bound listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub addr: SocketAddr,
    pub tls: bool,
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
    closing: Arc<std::sync::atomic::AtomicBool>,
    /// The keep-alive drain period of the stop under way, in milliseconds.
    drain_ms: Arc<std::sync::atomic::AtomicU64>,
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

/// What a worker needs to serve one listener (sendable to the worker thread).
#[derive(Clone)]
struct ListenerSpec {
    tls: Option<Arc<rustls::ServerConfig>>,
    h2c: bool,
    redirect_https: Option<String>,
    hsts: Option<HeaderValue>,
}

impl ListenerSpec {
    fn new(l: &ListenerConfig, tls: Option<&Arc<tls::Tls>>) -> Self {
        Self {
            tls: tls.map(|t| t.server_config()),
            h2c: l.h2c,
            redirect_https: l.redirect_https.clone(),
            hsts: l
                .hsts
                .and_then(|d| HeaderValue::from_str(&format!("max-age={}", d.as_secs())).ok()),
        }
    }
}

/// Binds the listeners and starts the workers. Returns once every listener is bound and
/// every certificate loaded, so such errors are reported here rather than lost in a thread.
pub fn start(cfg: &ProxyConfig, pool: Arc<Pool>) -> Result<ProxyHandle, ProxyError> {
    start_with(cfg, pool, &mut |_| Vec::new())
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
    // sockets[l]: listener l's sockets, one per worker at least.
    let mut sockets: Vec<Vec<std::net::TcpListener>> = Vec::new();
    let mut bound = Vec::new();
    let mut tls_sets = Vec::new();
    let mut specs = Vec::new();
    let mut handoff = Vec::new();
    for l in &cfg.listeners {
        let mut these = if l.listen.port() == 0 {
            Vec::new()
        } else {
            inherited(l.listen)
        };
        for s in &these {
            s.set_nonblocking(true)
                .map_err(|source| ProxyError::Listen {
                    addr: l.listen,
                    source,
                })?;
        }
        if these.is_empty() {
            these.push(reuseport_listener(l.listen)?);
        }
        let addr = these[0].local_addr().map_err(|source| ProxyError::Listen {
            addr: l.listen,
            source,
        })?;
        while these.len() < workers_n {
            these.push(reuseport_listener(addr)?);
        }
        for s in &these {
            handoff.push(
                s.try_clone()
                    .map_err(|source| ProxyError::Listen { addr, source })?,
            );
        }
        sockets.push(these);
        let tls = match &l.tls {
            Some(t) => Some(Arc::new(
                tls::Tls::new(addr.to_string(), t)
                    .map_err(|source| ProxyError::Tls { addr, source })?,
            )),
            None => None,
        };
        specs.push(ListenerSpec::new(l, tls.as_ref()));
        bound.push(Bound {
            addr,
            tls: tls.is_some(),
        });
        tls_sets.extend(tls);
    }
    let (tx, rx) = watch::channel(false);
    let request_ids = Arc::new(headers::RequestIds::default());
    let limits = Arc::new(limits::Limits::new(cfg));
    let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::with_capacity(workers_n);
    let mut per_worker: Vec<Vec<(std::net::TcpListener, ListenerSpec)>> =
        (0..workers_n).map(|_| Vec::new()).collect();
    for (socks, spec) in sockets.into_iter().zip(&specs) {
        for (i, s) in socks.into_iter().enumerate() {
            per_worker[i % workers_n].push((s, spec.clone()));
        }
    }
    for (n, mine) in per_worker.into_iter().enumerate() {
        let cfg = cfg.clone();
        let pool = pool.clone();
        let request_ids = request_ids.clone();
        let limits = limits.clone();
        let (closing, drain_ms) = (closing.clone(), drain_ms.clone());
        let rx = rx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("surge-proxy-{n}"))
            .spawn(move || {
                // Built on the worker's own thread: it holds thread-local connection pools.
                let forwarder = Forwarder::new(&cfg, pool, request_ids, limits, closing);
                run_worker(mine, forwarder, WorkerSettings::from(&cfg), rx, drain_ms)
            })
            .map_err(ProxyError::Worker)?;
        workers.push(handle);
    }
    for b in &bound {
        tracing::info!(addr = %b.addr, tls = b.tls, workers = workers.len(), "proxy listening");
    }
    Ok(ProxyHandle {
        local_addr: bound[0].addr,
        listeners: bound,
        tls: tls_sets,
        limits,
        handoff: std::sync::Mutex::new(handoff),
        closing,
        drain_ms,
        shutdown: tx,
        workers,
    })
}

/// Per-connection settings a worker needs.
#[derive(Debug, Clone, Copy)]
struct WorkerSettings {
    header_read_timeout: Duration,
    max_header_bytes: usize,
    max_headers: usize,
    idle_timeout: Duration,
    shutdown_grace: Duration,
}

impl From<&ProxyConfig> for WorkerSettings {
    fn from(cfg: &ProxyConfig) -> Self {
        Self {
            header_read_timeout: cfg.header_read_timeout,
            max_header_bytes: cfg.max_header_bytes,
            max_headers: cfg.max_headers,
            idle_timeout: cfg.idle_timeout,
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
    listeners: Vec<(std::net::TcpListener, ListenerSpec)>,
    forwarder: Forwarder,
    settings: WorkerSettings,
    shutdown: watch::Receiver<bool>,
    drain_ms: Arc<std::sync::atomic::AtomicU64>,
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
        serve(listeners, Rc::new(forwarder), settings, shutdown, drain_ms),
    );
}

/// The HTTP server builders of one worker, shared by its connections.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<LocalExec>,
    /// Plain listeners with h2c: HTTP/1.1 or HTTP/2 by the connection preface.
    auto: hyper_util::server::conn::auto::Builder<LocalExec>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
}

impl Builders {
    fn new(settings: &WorkerSettings) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_buf_size(settings.max_header_bytes)
            .writev(false);
        // hyper's default is 100 on the stack; any other number costs a heap allocation.
        if settings.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            h1.max_headers(settings.max_headers);
        }
        let mut h2 = http2::Builder::new(LocalExec);
        h2.timer(TokioTimer::new())
            .max_header_list_size(settings.max_header_bytes as u32)
            .max_concurrent_streams(256)
            .keep_alive_interval(Duration::from_secs(30));
        let mut auto = hyper_util::server::conn::auto::Builder::new(LocalExec);
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_buf_size(settings.max_header_bytes)
            .writev(false);
        if settings.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            auto.http1().max_headers(settings.max_headers);
        }
        auto.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(settings.max_header_bytes as u32)
            .max_concurrent_streams(256);
        Self {
            h1,
            h2,
            auto,
            handshake_timeout: settings.header_read_timeout,
            idle_timeout: settings.idle_timeout,
        }
    }
}

async fn serve(
    listeners: Vec<(std::net::TcpListener, ListenerSpec)>,
    forwarder: Rc<Forwarder>,
    settings: WorkerSettings,
    shutdown: watch::Receiver<bool>,
    drain_ms: Arc<std::sync::atomic::AtomicU64>,
) {
    let connections = Rc::new(drive::Connections::default());
    let builders = Rc::new(Builders::new(&settings));
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
    let mut loops = tokio::task::JoinSet::new();
    for (listener, spec) in listeners {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot register listener");
                continue;
            }
        };
        loops.spawn_local(accept_loop(
            listener,
            Rc::new(spec),
            forwarder.clone(),
            builders.clone(),
            connections.clone(),
            shutdown.clone(),
        ));
    }
    while loops.join_next().await.is_some() {}
    let stopping = tokio::time::Instant::now();
    let drain =
        Duration::from_millis(drain_ms.load(Ordering::Relaxed)).min(settings.shutdown_grace);
    // Keep-alive drain: connections close themselves after their next answer.
    while forwarder.limits.open() > 0 && stopping.elapsed() < drain {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Ok(connections) = Rc::try_unwrap(connections) else {
        return;
    };
    let grace_left = settings.shutdown_grace.saturating_sub(stopping.elapsed());
    tokio::select! {
        _ = connections.shutdown() => {}
        _ = tokio::time::sleep(grace_left) => {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
    }
}

/// Accepts on one listener until shutdown; each connection gets its own task.
async fn accept_loop(
    listener: TcpListener,
    spec: Rc<ListenerSpec>,
    forwarder: Rc<Forwarder>,
    builders: Rc<Builders>,
    connections: Rc<drive::Connections>,
    mut shutdown: watch::Receiver<bool>,
) {
    let accepted = metrics::counter!(names::CONNECTIONS_ACCEPTED);
    let acceptor = spec.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let lingering = Rc::new(std::cell::Cell::new(0usize));
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
        let permit = match forwarder.limits.admit_connection(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                metrics::counter!(names::CONNECTIONS_REFUSED, "reason" => why.as_str())
                    .increment(1);
                tracing::debug!(%peer, reason = why.as_str(), "connection refused");
                // Under a flood, refusals themselves are bounded: past that many lingering,
                // a refused connection is just closed.
                if acceptor.is_none() && lingering.get() < MAX_LINGERING_REFUSALS {
                    lingering.set(lingering.get() + 1);
                    let lingering = lingering.clone();
                    tokio::task::spawn_local(async move {
                        refuse(stream).await;
                        lingering.set(lingering.get().saturating_sub(1));
                    });
                }
                continue;
            }
        };
        forwarder
            .pool
            .traffic
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        accepted.increment(1);
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(serve_connection(
            Accepted {
                stream,
                peer,
                _permit: permit,
            },
            spec.clone(),
            acceptor.clone(),
            forwarder.clone(),
            builders.clone(),
            connections.ticket(),
        ));
    }
}

/// A connection just accepted, with its place under the connection limits (given back
/// when the connection ends).
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    _permit: limits::ConnPermit,
}

/// Answers a connection over the limits with a 503 and closes it, reading (and
/// discarding) what the client sent meanwhile, so the close is a FIN the client can read
/// the answer before, not a reset. Bounded in time: a refused client holds nothing long.
async fn refuse(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(REFUSED_503).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// One shopper connection: TLS handshake if the listener has TLS, then HTTP/1.1 or
/// HTTP/2 (by ALPN on TLS, by preface with h2c), requests to the forwarder.
async fn serve_connection(
    accepted: Accepted,
    spec: Rc<ListenerSpec>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    forwarder: Rc<Forwarder>,
    builders: Rc<Builders>,
    ticket: watch::Receiver<()>,
) {
    // `_permit` lives to the end of this function: the connection's place in the counts.
    let Accepted {
        stream,
        peer,
        _permit,
    } = accepted;
    let info = |proto, tls, h2| {
        Rc::new(ConnInfo {
            peer,
            // The shopper's address as a header value, made once per connection.
            client_ip: headers::ip_header_value(peer.ip()),
            proto,
            tls,
            h2,
            redirect_https: spec.redirect_https.as_deref().map(Rc::from),
            hsts: spec.hsts.clone(),
            requests: std::cell::Cell::new(0),
            last_request: std::cell::Cell::new(std::time::Instant::now()),
        })
    };
    let service = |info: Rc<ConnInfo>| {
        let fwd = forwarder.clone();
        service_fn(move |req| fwd.clone().handle(req, info.clone()))
    };
    let idle = builders.idle_timeout;
    let ended = match acceptor {
        None if spec.h2c => {
            let info = info("http", None, false);
            let conn = builders
                .auto
                .serve_connection(TokioIo::new(stream), service(info.clone()));
            drive::drive(conn, ticket, &info.last_request, idle).await
        }
        None => {
            let info = info("http", None, false);
            let conn = builders
                .h1
                .serve_connection(TokioIo::new(stream), service(info.clone()));
            drive::drive(conn, ticket, &info.last_request, idle).await
        }
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(builders.handshake_timeout, acceptor.accept(stream)).await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    metrics::counter!(names::TLS_HANDSHAKE_FAILURES).increment(1);
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics::counter!(names::TLS_HANDSHAKE_FAILURES).increment(1);
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let session = tls.get_ref().1;
            let h2 = session.alpn_protocol() == Some(b"h2");
            let details = (
                session
                    .protocol_version()
                    .and_then(|v| v.as_str())
                    .unwrap_or("-"),
                session
                    .negotiated_cipher_suite()
                    .and_then(|c| c.suite().as_str())
                    .unwrap_or("-"),
            );
            let info = info("https", Some(details), h2);
            if h2 {
                let conn = builders
                    .h2
                    .serve_connection(TokioIo::new(tls), service(info.clone()));
                drive::drive(conn, ticket, &info.last_request, idle).await
            } else {
                let conn = builders
                    .h1
                    .serve_connection(TokioIo::new(tls), service(info.clone()));
                drive::drive(conn, ticket, &info.last_request, idle).await
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}
