//! The engine's connections to blades: per worker, plain TCP (or TLS with `[pool.tls]`)
//! streams kept alive between requests, most recently used first. No lock and no atomic:
//! only the worker's thread touches them. A connection goes back to the pool only when
//! its response was read exactly to its end.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::proxy::tls::UpstreamTls;
use crate::proxy::upstream::ConnectError;

/// Idle connections kept per blade; beyond it, finished ones are closed.
const MAX_IDLE_PER_BLADE: usize = 1024;

/// A stream to a blade.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether a read now would wait: nothing has arrived and the blade has not closed.
    /// One read attempt through the whole stack (TLS included, which also consumes a
    /// blade's post-handshake messages that carry no data), never waiting: the waker
    /// is a no-op, and the next real read registers its own.
    fn is_quiet(&mut self) -> bool {
        let mut probe = [0u8; 1];
        // Plain TCP: tokio answers from the readiness it already knows, with no system
        // call and no waker to store when nothing arrived.
        if let Stream::Plain(tcp) = self {
            return matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        }
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(self).poll_read(&mut cx, &mut buf).is_pending()
    }
}

/// A connection checked out for one request.
pub struct BladeConn {
    pub stream: Stream,
    pub addr: SocketAddr,
    /// It served a request before: the blade may have closed it meanwhile, which makes a
    /// failure before any answer ordinary keep-alive life.
    pub reused: bool,
}

struct Idle {
    stream: Stream,
    since: Instant,
}

/// One worker's connections to every blade.
pub struct Blades {
    /// Keyed with FxHash: the keys are blade addresses, never a client's input, so
    /// SipHash's flood resistance buys nothing; its two lookups cost ~460 instructions a
    /// request (callgrind).
    idle: RefCell<FxHashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    tls: Option<UpstreamTls>,
}

impl Blades {
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        tls: Option<UpstreamTls>,
    ) -> Self {
        Self {
            idle: RefCell::new(FxHashMap::default()),
            connect_timeout,
            idle_timeout,
            tls,
        }
    }

    /// An idle connection to `addr` that is still open, else a new one.
    /// A connection to `addr`: an idle one, or a new one. `now` is the request's clock
    /// reading (a few microseconds old is close enough to expire idle connections by).
    pub async fn checkout(
        &self,
        addr: SocketAddr,
        now: Instant,
    ) -> Result<BladeConn, ConnectError> {
        if let Some(stream) = self.take_idle(addr, now) {
            return Ok(BladeConn {
                stream,
                addr,
                reused: true,
            });
        }
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout(self.connect_timeout))??;
        tcp.set_nodelay(true)?;
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let handshake = tls.connector.connect(tls.name_for(addr), tcp);
                let tls = tokio::time::timeout(self.connect_timeout, handshake)
                    .await
                    .map_err(|_| ConnectError::Timeout(self.connect_timeout))?
                    .map_err(ConnectError::Tls)?;
                Stream::Tls(Box::new(tls))
            }
        };
        Ok(BladeConn {
            stream,
            addr,
            reused: false,
        })
    }

    /// The most recent idle connection on which nothing at all has arrived since its
    /// last answer: one the blade closed reads as end-of-stream, and one with any byte
    /// waiting (in the socket, or already decrypted inside rustls) is out of step; both
    /// are dropped.
    fn take_idle(&self, addr: SocketAddr, now: Instant) -> Option<Stream> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some(mut c) = list.pop() {
            if now.duration_since(c.since) < self.idle_timeout && c.stream.is_quiet() {
                return Some(c.stream);
            }
        }
        None
    }

    /// Hands back a connection whose response was read to its end (at `now`).
    pub fn checkin(&self, conn: BladeConn, now: Instant) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(conn.addr).or_default();
        if list.len() < MAX_IDLE_PER_BLADE {
            list.push(Idle {
                stream: conn.stream,
                since: now,
            });
        }
    }

    /// Drops expired idle connections, and blades that have none left.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        for list in idle.values_mut() {
            list.retain(|c| now.duration_since(c.since) < self.idle_timeout);
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
