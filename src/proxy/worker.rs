//! One proxy worker: a thread with its own single-threaded tokio runtime, its listeners,
//! its forwarder (with its upstream connection pools) and its shopper connections. A
//! request never leaves the thread it arrived on.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::conn_info::ConnInfo;
use super::drive::{self, Graceful};
use super::forward::Forwarder;
use super::listen::ListenerSpec;
use super::stall::SendTimeout;
use super::transport::Transport;
use super::{h1, headers, limits, proxy_protocol, LocalExec};
use crate::config::ProxyConfig;
use crate::telemetry::names;

/// hyper's own limit on request header fields (HTTP/1.1).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// HTTP/2 abuse limits, set here rather than left to library defaults that may change:
/// streams open at once per connection (a browser opens a few dozen at most); streams a
/// client may open and reset before surge accepts them ("rapid reset", CVE-2023-44487)
/// and streams surge may have to reset for a client's protocol errors, each before the
/// connection ends with GOAWAY `ENHANCE_YOUR_CALM`. The header list (CONTINUATION frames
/// included) is bounded by `proxy.max_header_bytes`.
const H2_MAX_CONCURRENT_STREAMS: u32 = 128;
const H2_MAX_PENDING_RESETS: usize = 20;
const H2_MAX_LOCAL_ERROR_RESETS: usize = 256;

/// Refusal sent on a plain listener to a connection over the limits, before reading it.
const REFUSED_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 44\r\nretry-after: 1\r\nconnection: close\r\n\r\n503 too many connections; retry in a moment\n";

/// Refused connections (per listener and worker) that may linger at once for their 503.
const MAX_LINGERING_REFUSALS: usize = 1024;

/// How long a refused connection may linger while its 503 is read.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// How often a worker closes idle backend connections past their idle timeout.
const UPSTREAM_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Pause after a failed accept (out of file descriptors...), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Per-connection settings a worker needs.
#[derive(Debug, Clone, Copy)]
pub(super) struct WorkerSettings {
    header_read_timeout: Duration,
    max_header_bytes: usize,
    max_headers: usize,
    idle_timeout: Duration,
    shutdown_grace: Duration,
    body_idle_timeout: Duration,
}

impl From<&ProxyConfig> for WorkerSettings {
    fn from(cfg: &ProxyConfig) -> Self {
        Self {
            header_read_timeout: cfg.header_read_timeout,
            max_header_bytes: cfg.max_header_bytes,
            max_headers: cfg.max_headers,
            idle_timeout: cfg.idle_timeout,
            shutdown_grace: cfg.shutdown_grace,
            body_idle_timeout: cfg.body_idle_timeout,
        }
    }
}

/// The HTTP server builders of one worker, shared by its connections.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<LocalExec>,
    /// Plain listeners with h2c: HTTP/1.1 or HTTP/2 by the connection preface.
    auto: hyper_util::server::conn::auto::Builder<LocalExec>,
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
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
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
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
            .keep_alive_interval(Duration::from_secs(30));
        Self { h1, h2, auto }
    }
}

/// A worker: what its connections share. Lives on the worker's thread only.
pub(super) struct Worker {
    forwarder: Rc<Forwarder>,
    /// Surge's HTTP/1.1 engine (`proxy.engine = "surge"`), else hyper serves HTTP/1.1.
    engine: Option<Rc<h1::Engine>>,
    builders: Builders,
    /// The open shopper connections, to stop them and wait for them.
    connections: drive::Connections,
    settings: WorkerSettings,
}

/// Runs one worker on the current thread until `shutdown` says stop and its connections
/// are done (within the grace period).
pub(super) fn run(
    listeners: Vec<(std::net::TcpListener, ListenerSpec)>,
    forwarder: Rc<Forwarder>,
    engine: Option<Rc<h1::Engine>>,
    settings: WorkerSettings,
    shutdown: watch::Receiver<bool>,
    drain_ms: Arc<AtomicU64>,
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
    let worker = Rc::new(Worker {
        forwarder,
        engine,
        builders: Builders::new(&settings),
        connections: drive::Connections::default(),
        settings,
    });
    // A LocalSet: connections, their requests and the upstream pools all live on this
    // thread, so they share state through `Rc`/`RefCell` instead of atomics and locks.
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, worker.serve(listeners, shutdown, drain_ms));
}

impl Worker {
    /// Accepts on every listener until shutdown, then drains and closes the connections.
    async fn serve(
        self: Rc<Self>,
        listeners: Vec<(std::net::TcpListener, ListenerSpec)>,
        shutdown: watch::Receiver<bool>,
        drain_ms: Arc<AtomicU64>,
    ) {
        let upstreams = Rc::downgrade(&self.forwarder.upstreams);
        let engine = self.engine.as_ref().map(Rc::downgrade);
        tokio::task::spawn_local(async move {
            let mut every = tokio::time::interval(UPSTREAM_SWEEP_INTERVAL);
            loop {
                every.tick().await;
                match upstreams.upgrade() {
                    Some(u) => u.sweep(),
                    None => return,
                }
                if let Some(e) = engine.as_ref().and_then(std::rc::Weak::upgrade) {
                    e.blades.sweep();
                }
            }
        });
        if let Some(engine) = self.engine.as_ref().map(Rc::downgrade) {
            tokio::task::spawn_local(async move {
                let mut every = tokio::time::interval(super::h1::buffers::TRIM_INTERVAL);
                loop {
                    every.tick().await;
                    match engine.upgrade() {
                        Some(e) => e.tick(),
                        None => return,
                    }
                }
            });
        }
        let mut loops = tokio::task::JoinSet::new();
        for (listener, spec) in listeners {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot register listener");
                    continue;
                }
            };
            loops.spawn_local(
                self.clone()
                    .accept_loop(listener, Rc::new(spec), shutdown.clone()),
            );
        }
        while loops.join_next().await.is_some() {}
        let stopping = tokio::time::Instant::now();
        let grace = self.settings.shutdown_grace;
        let drain = Duration::from_millis(drain_ms.load(Ordering::Relaxed)).min(grace);
        // Keep-alive drain: connections close themselves after their next answer.
        let _ = tokio::time::timeout(drain, self.connections.all_closed()).await;
        let grace_left = grace.saturating_sub(stopping.elapsed());
        if tokio::time::timeout(grace_left, self.connections.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
    }

    /// Accepts on one listener until shutdown; each connection gets its own task.
    async fn accept_loop(
        self: Rc<Self>,
        listener: TcpListener,
        spec: Rc<ListenerSpec>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let on = Rc::new(Listening {
            acceptor: spec.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            spec,
            lingering: std::cell::Cell::new(0),
            accepted: metrics::counter!(names::CONNECTIONS_ACCEPTED),
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
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let Some(trusted) = &on.spec.proxy_protocol else {
                self.admit(stream, peer, &on);
                continue;
            };
            // Behind an L4 balancer: the connection counts as the client its PROXY header
            // names, so the header is read (in the connection's own task) before any limit.
            if !trusted.iter().any(|n| n.contains(&peer.ip())) {
                refused_proxy(
                    peer,
                    "untrusted_proxy",
                    "PROXY header from an untrusted peer",
                );
                continue;
            }
            let this = self.clone();
            let on = on.clone();
            let limit = self.settings.header_read_timeout;
            tokio::task::spawn_local(async move {
                match tokio::time::timeout(limit, proxy_protocol::read(stream)).await {
                    Ok(Ok((parsed, stream))) => {
                        this.admit(stream, parsed.client.unwrap_or(peer), &on);
                    }
                    Ok(Err(e)) => refused_proxy(peer, "proxy_header", &e.to_string()),
                    Err(_) => refused_proxy(peer, "proxy_header", "no PROXY header in time"),
                }
            });
        }
    }

    /// Counts a connection from `peer` (the real client) under the limits and serves it,
    /// or refuses it: a 503 on plain listeners, a close on TLS ones.
    fn admit<S>(self: &Rc<Self>, stream: S, peer: SocketAddr, on: &Rc<Listening>)
    where
        S: Transport + 'static,
    {
        let permit = match self.forwarder.limits.admit_connection(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                metrics::counter!(names::CONNECTIONS_REFUSED, "reason" => why.as_str())
                    .increment(1);
                tracing::debug!(%peer, reason = why.as_str(), "connection refused");
                // Under a flood, refusals themselves are bounded: past that many
                // lingering, a refused connection is just closed.
                if on.acceptor.is_none() && on.lingering.get() < MAX_LINGERING_REFUSALS {
                    on.lingering.set(on.lingering.get() + 1);
                    let on = on.clone();
                    tokio::task::spawn_local(async move {
                        refuse(stream).await;
                        on.lingering.set(on.lingering.get().saturating_sub(1));
                    });
                }
                return;
            }
        };
        self.forwarder
            .pool
            .traffic
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        on.accepted.increment(1);
        let ticket = self.connections.ticket();
        tokio::task::spawn_local(self.clone().serve_connection(
            Accepted {
                stream: SendTimeout::new(stream, self.settings.body_idle_timeout),
                peer,
                _permit: permit,
            },
            on.clone(),
            ticket,
        ));
    }

    /// One shopper connection: TLS handshake if the listener has TLS, then HTTP/1.1 or
    /// HTTP/2 (by ALPN on TLS, by preface with h2c), requests to the forwarder.
    async fn serve_connection<S>(
        self: Rc<Self>,
        accepted: Accepted<S>,
        on: Rc<Listening>,
        ticket: drive::Ticket,
    ) where
        S: Transport + 'static,
    {
        let spec = &on.spec;
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
        let Some(acceptor) = &on.acceptor else {
            let speaks = if spec.h2c { Speaks::H1OrH2 } else { Speaks::H1 };
            return self
                .serve_http(stream, speaks, info("http", None, false), ticket)
                .await;
        };
        // Boxed (once per TLS connection): the handshake's and rustls' session state,
        // kilobytes, inline here would size the task of every connection, plain ones
        // included; a moved-out local keeps its room in a future's state, so the whole
        // TLS part lives in its own.
        Box::pin(self.serve_tls(acceptor, stream, peer, info, ticket)).await;
    }

    /// The TLS part of [`Self::serve_connection`]: handshake, then HTTP/1.1 or HTTP/2 by
    /// ALPN.
    async fn serve_tls<S>(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        stream: S,
        peer: SocketAddr,
        info: impl Fn(&'static str, Option<(&'static str, &'static str)>, bool) -> Rc<ConnInfo>,
        ticket: drive::Ticket,
    ) where
        S: Transport + 'static,
    {
        let handshake =
            tokio::time::timeout(self.settings.header_read_timeout, acceptor.accept(stream)).await;
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
        let speaks = if h2 { Speaks::H2 } else { Speaks::H1 };
        self.serve_http(tls, speaks, info("https", Some(details), h2), ticket)
            .await;
    }

    /// Serves HTTP on an established connection (plain or TLS) until it ends.
    async fn serve_http<I>(&self, io: I, speaks: Speaks, info: Rc<ConnInfo>, ticket: drive::Ticket)
    where
        I: Transport + 'static,
    {
        if let (Some(engine), Speaks::H1) = (&self.engine, speaks) {
            return h1::serve(engine.clone(), io, info, ticket).await;
        }
        let io = TokioIo::new(io);
        let fwd = self.forwarder.clone();
        let conn_info = info.clone();
        // Boxed per request: hyper keeps its slot for the service future allocated for the
        // whole connection (`Box<Option<S::Future>>`), so an unboxed future (the whole
        // forwarding state machine, kilobytes) would be paid by every idle keep-alive
        // connection; boxed, the slot is one pointer and the future lives only while its
        // request does.
        // HTTP/2 shoppers reach HTTP/1.1 blades through the engine's blade connections.
        let engine = self.engine.clone();
        let service = service_fn(move |req| {
            Box::pin(fwd.clone().handle(req, conn_info.clone(), engine.clone()))
        });
        let b = &self.builders;
        // Boxed (once per connection): inline, hyper's connection state would size every
        // connection's task, the surge engine's idle ones included.
        match speaks {
            Speaks::H1 => {
                Box::pin(self.drive(b.h1.serve_connection(io, service), &info, ticket)).await
            }
            Speaks::H2 => {
                Box::pin(self.drive(b.h2.serve_connection(io, service), &info, ticket)).await
            }
            Speaks::H1OrH2 => {
                Box::pin(self.drive(b.auto.serve_connection(io, service), &info, ticket)).await
            }
        }
    }

    /// Drives one server connection to its end (graceful stop, idle timeout).
    async fn drive<C, E>(&self, conn: C, info: &ConnInfo, ticket: drive::Ticket)
    where
        C: Graceful<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let idle = self.settings.idle_timeout;
        if let Err(e) = drive::drive(conn, ticket, &info.last_request, idle).await {
            tracing::debug!(peer = %info.peer, error = %e, "client connection ended with an error");
        }
    }
}

/// One listener as its accept loop and connections see it.
struct Listening {
    spec: Rc<ListenerSpec>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Refused connections lingering for their 503 now.
    lingering: std::cell::Cell<usize>,
    accepted: metrics::Counter,
}

/// Counts and logs a connection closed for its PROXY header (or the lack of one).
fn refused_proxy(peer: SocketAddr, reason: &'static str, why: &str) {
    metrics::counter!(names::CONNECTIONS_REFUSED, "reason" => reason).increment(1);
    tracing::debug!(%peer, reason, why, "connection refused");
}

/// Which HTTP a connection speaks.
#[derive(Debug, Clone, Copy)]
enum Speaks {
    H1,
    H2,
    /// Plain listeners with h2c: HTTP/1.1 or HTTP/2 by the connection preface.
    H1OrH2,
}

/// A connection just accepted, with its place under the connection limits (given back
/// when the connection ends).
struct Accepted<S> {
    stream: S,
    peer: SocketAddr,
    _permit: limits::ConnPermit,
}

/// Answers a connection over the limits with a 503 and closes it, reading (and
/// discarding) what the client sent meanwhile, so the close is a FIN the client can read
/// the answer before, not a reset. Bounded in time: a refused client holds nothing long.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
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
