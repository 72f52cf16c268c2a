//! Per-worker keep-alive connections to backends, on hyper's low-level HTTP/1 client.
//!
//! Each worker thread owns one [`Upstreams`]: a map from backend address to idle
//! connections, touched only by that thread, so checking a connection out or in takes no
//! lock and no atomic. A connection is handed back when the response body has been read to
//! its end, and dropped otherwise (hyper closes it then, as its framing is unknown).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::forward::UpstreamBody;

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
}

/// A connection checked out for one request.
pub struct Conn {
    pub sender: SendRequest<UpstreamBody>,
    pub addr: SocketAddr,
    /// Whether it served a request before; a reused connection may have been closed by
    /// the backend meanwhile, which makes a failure on it retryable.
    pub reused: bool,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// One worker's connections to every backend.
pub struct Upstreams {
    idle: RefCell<HashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    builder: http1::Builder,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        let mut builder = http1::Builder::new();
        builder.writev(false);
        Self {
            idle: RefCell::new(HashMap::new()),
            connect_timeout,
            idle_timeout,
            builder,
        }
    }

    /// An idle connection to `addr` if one is ready, else a new one.
    pub async fn checkout(&self, addr: SocketAddr) -> Result<Conn, ConnectError> {
        if let Some(sender) = self.take_idle(addr) {
            return Ok(Conn {
                sender,
                addr,
                reused: true,
            });
        }
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout(self.connect_timeout))??;
        stream.set_nodelay(true)?;
        let (sender, conn) = self.builder.handshake(TokioIo::new(stream)).await?;
        tokio::task::spawn_local(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "backend connection ended with an error");
            }
        });
        Ok(Conn {
            sender,
            addr,
            reused: false,
        })
    }

    /// The most recently used idle connection that is ready for a request. Connections
    /// whose connection task has not yet caught up with the end of their last response are
    /// left for later; closed and expired ones are dropped on the way.
    fn take_idle(&self, addr: SocketAddr) -> Option<SendRequest<UpstreamBody>> {
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
        if !conn.sender.is_closed() {
            self.put(conn.addr, conn.sender);
        }
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest<UpstreamBody>) {
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
    }
}
