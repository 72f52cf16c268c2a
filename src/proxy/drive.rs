//! Runs one shopper connection to its end, closing it gracefully when the worker stops or
//! when the connection has sent no request for `proxy.idle_timeout`.
//!
//! hyper-util's `GracefulShutdown` does the first half, but its connection trait is
//! sealed, so an idle timeout cannot be added to it; this is the same mechanism (a watch
//! channel whose receivers count the open connections) with the idle timer beside it.
//! HTTP/1.1 connections are usually closed earlier by `header_read_timeout`; what this
//! adds is HTTP/2 connections, which client pings would otherwise keep open forever.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use tokio::sync::watch;
use tokio::time::Instant;

/// Stops a worker's connections and waits for them.
#[derive(Debug)]
pub struct Connections {
    tx: watch::Sender<()>,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            tx: watch::channel(()).0,
        }
    }
}

impl Connections {
    /// A ticket for one connection: counted until dropped, told when to stop.
    pub fn ticket(&self) -> watch::Receiver<()> {
        self.tx.subscribe()
    }

    /// Resolves once every connection has ended on its own (used for the keep-alive
    /// drain, before any is asked to close).
    pub async fn all_closed(&self) {
        self.tx.closed().await;
    }

    /// Asks every connection to finish its current requests and close, then waits until
    /// all have.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

/// A hyper server connection that can be asked to close after its current requests.
pub trait Graceful: Future {
    fn begin_shutdown(self: Pin<&mut Self>);
}

impl<I, B, S> Graceful for http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, B, S, E> Graceful for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, B, S, E> Graceful for hyper_util::server::conn::auto::Connection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// When the connection's last request started (set by the request handler).
pub type LastRequest = Cell<std::time::Instant>;

/// Whether a connection whose last request started at `last` is idle at `now`.
fn is_idle(last: std::time::Instant, now: std::time::Instant, idle_timeout: Duration) -> bool {
    now.saturating_duration_since(last) >= idle_timeout
}

/// Drives `conn` to its end: closes it gracefully when `ticket` says stop or when no
/// request has started for `idle_timeout` (requests in progress still finish). The
/// connection's own error, if it ended with one.
pub async fn drive<C, E>(
    conn: C,
    mut ticket: watch::Receiver<()>,
    last_request: &LastRequest,
    idle_timeout: Duration,
) -> Result<(), E>
where
    C: Graceful<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        let idle_at = Instant::from_std(last_request.get()) + idle_timeout;
        tokio::select! {
            // The connection first: it is what wakes this task almost every time.
            biased;
            ended = conn.as_mut() => return ended,
            _ = ticket.changed(), if !closing => {
                closing = true;
                conn.as_mut().begin_shutdown();
            }
            _ = tokio::time::sleep_until(idle_at), if !closing => {
                if is_idle(last_request.get(), std::time::Instant::now(), idle_timeout) {
                    closing = true;
                    conn.as_mut().begin_shutdown();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_only_once_the_timeout_has_passed_since_the_last_request() {
        let t0 = std::time::Instant::now();
        let timeout = Duration::from_secs(60);
        assert!(!is_idle(t0, t0 + Duration::from_secs(59), timeout));
        assert!(is_idle(t0, t0 + timeout, timeout));
        // A request that started "after" now (clock read earlier) is not idle.
        assert!(!is_idle(t0 + Duration::from_secs(1), t0, timeout));
    }
}
