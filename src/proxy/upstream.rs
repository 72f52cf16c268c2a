//! Per-worker connections to backends, on hyper's low-level clients.
//!
//! Each worker thread owns one [`Upstreams`]: a map from backend address to connections,
//! touched only by that thread, so checking a connection out or in takes no lock and no
//! atomic. HTTP/1.1: a pool of idle keep-alive connections; a connection is handed back
//! when the response body has been read to its end, and dropped otherwise (hyper closes it
//! then, as its framing is unknown). h2c: one multiplexed connection per backend, shared
//! by every request of the worker, replaced when it closes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use bytes::Bytes;
use http_body_util::{Either, Empty, Full};

use super::LocalExec;
use crate::config::UpstreamProtocol;

/// Body sent to a backend: the shopper's, read whole beforehand (see
/// `Forwarder::read_body`), or nothing.
pub type UpstreamBody = Either<Full<Bytes>, Empty<Bytes>>;

/// A connection's request sender, in the backend's protocol.
pub enum SendRequest {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

impl SendRequest {
    /// Sends a request; one the connection never wrote comes back in the error.
    pub async fn try_send_request(
        &mut self,
        req: http::Request<UpstreamBody>,
    ) -> Result<http::Response<Incoming>, TrySendError<http::Request<UpstreamBody>>> {
        match self {
            SendRequest::H1(s) => s.try_send_request(req).await,
            SendRequest::H2(s) => s.try_send_request(req).await,
        }
    }
}

/// Idle connections kept per backend address; beyond it, finished ones are closed.
const MAX_IDLE_PER_BACKEND: usize = 1024;

/// Why no connection to a backend could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
}

/// A connection checked out for one request.
pub struct Conn {
    pub sender: SendRequest,
    pub addr: SocketAddr,
    /// Whether it served a request before; a reused connection may have been closed by
    /// the backend meanwhile, which makes a failure on it retryable.
    pub reused: bool,
}

struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

/// One worker's connections to every backend.
pub struct Upstreams {
    pub protocol: UpstreamProtocol,
    idle: RefCell<HashMap<SocketAddr, Vec<Idle>>>,
    /// h2c: the one shared connection per backend.
    shared: RefCell<HashMap<SocketAddr, http2::SendRequest<UpstreamBody>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    builder: http1::Builder,
    h2_builder: http2::Builder<LocalExec>,
    /// HTTPS to the blades (`[pool.tls]`); `None`: plain HTTP.
    tls: Option<super::tls::UpstreamTls>,
}

impl Upstreams {
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        protocol: UpstreamProtocol,
        tls: Option<super::tls::UpstreamTls>,
    ) -> Self {
        let mut builder = http1::Builder::new();
        builder.writev(false);
        let mut h2_builder = http2::Builder::new(LocalExec);
        h2_builder
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        Self {
            protocol,
            idle: RefCell::new(HashMap::new()),
            shared: RefCell::new(HashMap::new()),
            connect_timeout,
            idle_timeout,
            builder,
            h2_builder,
            tls,
        }
    }

    /// An idle (HTTP/1.1) or the shared (h2c) connection to `addr`, else a new one.
    pub async fn checkout(&self, addr: SocketAddr) -> Result<Conn, ConnectError> {
        if self.protocol == UpstreamProtocol::H2c {
            let shared = self.shared.borrow().get(&addr).cloned();
            if let Some(sender) = shared.filter(|s| !s.is_closed()) {
                return Ok(Conn {
                    sender: SendRequest::H2(sender),
                    addr,
                    reused: true,
                });
            }
        } else if let Some(sender) = self.take_idle(addr) {
            return Ok(Conn {
                sender: SendRequest::H1(sender),
                addr,
                reused: true,
            });
        }
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout(self.connect_timeout))??;
        stream.set_nodelay(true)?;
        if let Some(tls) = &self.tls {
            // HTTP/1.1 only (config refuses TLS with h2c).
            let handshake = tls.connector.connect(tls.name_for(addr), stream);
            let stream = tokio::time::timeout(self.connect_timeout, handshake)
                .await
                .map_err(|_| ConnectError::Timeout(self.connect_timeout))?
                .map_err(ConnectError::Tls)?;
            let (sender, conn) = self.builder.handshake(TokioIo::new(stream)).await?;
            spawn_conn(addr, conn);
            return Ok(Conn {
                sender: SendRequest::H1(sender),
                addr,
                reused: false,
            });
        }
        let sender = match self.protocol {
            UpstreamProtocol::Http1 => {
                let (sender, conn) = self.builder.handshake(TokioIo::new(stream)).await?;
                spawn_conn(addr, conn);
                SendRequest::H1(sender)
            }
            UpstreamProtocol::H2c => {
                let (sender, conn) = self.h2_builder.handshake(TokioIo::new(stream)).await?;
                spawn_conn(addr, conn);
                self.shared.borrow_mut().insert(addr, sender.clone());
                SendRequest::H2(sender)
            }
        };
        Ok(Conn {
            sender,
            addr,
            reused: false,
        })
    }

    /// The most recently used idle connection that is ready for a request. Connections
    /// whose connection task has not yet caught up with the end of their last response are
    /// left for later; closed and expired ones are dropped on the way.
    fn take_idle(&self, addr: SocketAddr) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let c = &list[i];
            if c.sender.is_closed() || now.duration_since(c.since) >= self.idle_timeout {
                list.swap_remove(i);
                continue;
            }
            if c.sender.is_ready() {
                return Some(list.swap_remove(i).sender);
            }
        }
        None
    }

    /// Hands a connection back after its response was read to the end. It may not be
    /// ready for the next request for a moment (its task has yet to see the end of the
    /// body); [`Upstreams::checkout`] skips it until it is.
    pub fn checkin(&self, conn: Conn) {
        // An h2c sender is a handle on the shared connection: nothing to hand back.
        if let SendRequest::H1(sender) = conn.sender {
            if !sender.is_closed() {
                self.put(conn.addr, sender);
            }
        }
    }

    fn put(&self, addr: SocketAddr, sender: http1::SendRequest<UpstreamBody>) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_BACKEND {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drops closed and expired idle connections, and backends that have none left.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        for list in idle.values_mut() {
            list.retain(|c| {
                !c.sender.is_closed() && now.duration_since(c.since) < self.idle_timeout
            });
        }
        idle.retain(|_, list| !list.is_empty());
        self.shared.borrow_mut().retain(|_, s| !s.is_closed());
    }
}

/// Drives a backend connection on this worker until it closes.
fn spawn_conn<F>(addr: SocketAddr, conn: F)
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + 'static,
{
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "backend connection ended with an error");
        }
    });
}
