//! A shopper's connection as every protocol leg reads and writes it: plain TCP, TLS, or
//! either behind a PROXY protocol header or a send timeout.

use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};

/// A shopper's transport as the engine needs it: bytes both ways, and a way to wait for
/// the next request without holding a buffer.
pub trait Transport: AsyncRead + AsyncWrite + Unpin {
    /// Ready with `true` once a read would find bytes (or the end); `false` when this
    /// transport cannot tell without reading (TLS: the engine reads with a buffer then).
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let _ = cx;
        Poll::Ready(false)
    }
}

impl Transport for tokio::net::TcpStream {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<bool> {
        self.poll_read_ready(cx).map(|_| true)
    }
}

/// A TLS connection has something to read when rustls holds decrypted bytes (or the
/// peer's close) or its socket has bytes; a wake-up for bytes that prove to be no data
/// (a key update) is rare and only costs a buffer for one head read.
impl<S: Transport> Transport for tokio_rustls::server::TlsStream<S> {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let (io, tls) = self.get_ref();
        if !tls.wants_read() {
            return Poll::Ready(true);
        }
        io.poll_readable(cx)
    }
}
