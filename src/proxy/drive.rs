//! Runs one shopper connection to its end, closing it gracefully when the worker stops or
//! when the connection has sent no request for `proxy.idle_timeout`.
//!
//! hyper-util's `GracefulShutdown` does the first half, but its connection trait is
//! sealed, so an idle timeout cannot be added to it; this is the same mechanism (tickets
//! that count the open connections and tell them to stop) with the idle timer beside it.
//! HTTP/1.1 connections are usually closed earlier by `header_read_timeout`; what this
//! adds is HTTP/2 connections, which client pings would otherwise keep open forever.
//!
//! The tickets are the worker's own, not a `tokio::sync::watch` channel: every
//! connection of a worker lives on the worker's thread, and a watch receiver's wait took
//! its notifier's lock twice per wait (register, then cancel), i.e. for every request of
//! every kept-alive connection. A ticket stores its connection's waker once, in a
//! worker-local list, and a wait reads a flag.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use tokio::time::Instant;

/// Stops a worker's connections and waits for them.
#[derive(Debug, Default)]
pub struct Connections {
    shared: Rc<Shared>,
}

/// What a worker's connections and their tickets share (one thread: `Cell`s).
#[derive(Debug, Default)]
struct Shared {
    /// Asked to stop (set once, by `shutdown`).
    stopping: Cell<bool>,
    /// Tickets alive: connections not yet ended.
    open: Cell<usize>,
    /// Each ticket's waker, by the ticket's place; `None` for a free place or a ticket
    /// not waiting yet.
    wakers: RefCell<Vec<Option<Waker>>>,
    /// Places of `wakers` free for the next ticket.
    free: RefCell<Vec<usize>>,
    /// Who waits for `open` to reach zero.
    closed: RefCell<Vec<Waker>>,
}

impl Connections {
    /// A ticket for one connection: counted until dropped, told when to stop.
    pub fn ticket(&self) -> Ticket {
        let shared = &self.shared;
        shared.open.set(shared.open.get() + 1);
        let place = match shared.free.borrow_mut().pop() {
            Some(p) => p,
            None => {
                let mut wakers = shared.wakers.borrow_mut();
                wakers.push(None);
                wakers.len() - 1
            }
        };
        Ticket {
            shared: shared.clone(),
            place,
        }
    }

    /// Resolves once every connection has ended on its own (used for the keep-alive
    /// drain, before any is asked to close).
    pub async fn all_closed(&self) {
        poll_fn(|cx| {
            if self.shared.open.get() == 0 {
                return Poll::Ready(());
            }
            let mut closed = self.shared.closed.borrow_mut();
            if !closed.iter().any(|w| w.will_wake(cx.waker())) {
                closed.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
    }

    /// Asks every connection to finish its current requests and close, then waits until
    /// all have.
    pub async fn shutdown(&self) {
        self.shared.stopping.set(true);
        // Taken out first: a waker of a task on this thread may run code that borrows
        // the list (a ticket dropped), so none is called inside the borrow.
        let wakers: Vec<Waker> = self
            .shared
            .wakers
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        wakers.into_iter().for_each(Waker::wake);
        self.all_closed().await;
    }
}

/// One connection's ticket: counts it as open until dropped, and tells it when its
/// worker stops.
#[derive(Debug)]
pub struct Ticket {
    shared: Rc<Shared>,
    place: usize,
}

impl Ticket {
    /// Whether the worker has asked its connections to close.
    pub fn stopping(&self) -> bool {
        self.shared.stopping.get()
    }

    /// Ready once the worker stops; otherwise the task of `cx` is woken then. Cheap to
    /// call on every wait: the waker is stored once, replaced only by another task's.
    pub fn poll_stop(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.stopping() {
            return Poll::Ready(());
        }
        if let Some(slot) = self.shared.wakers.borrow_mut().get_mut(self.place) {
            match slot {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }

    /// Resolves once the worker stops.
    pub async fn stopped(&self) {
        poll_fn(|cx| self.poll_stop(cx)).await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let shared = &self.shared;
        // Taken out, dropped after the borrow (a waker's drop runs no code of ours, but
        // nothing is left to chance inside a `RefCell` borrow).
        let waker = shared
            .wakers
            .borrow_mut()
            .get_mut(self.place)
            .and_then(Option::take);
        drop(waker);
        shared.free.borrow_mut().push(self.place);
        let open = shared.open.get().saturating_sub(1);
        shared.open.set(open);
        if open == 0 {
            let closed = std::mem::take(&mut *shared.closed.borrow_mut());
            closed.into_iter().for_each(Waker::wake);
        }
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
    ticket: Ticket,
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
            () = ticket.stopped(), if !closing => {
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

    /// A worker's stop reaches a connection waiting for its next request, waits for the
    /// connections to end, and a ticket's place is reused by the next connection.
    #[test]
    fn shutdown_wakes_waiting_connections_and_waits_for_them_to_end() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let conns = Rc::new(Connections::default());
            // No connection: the drain is over at once.
            conns.all_closed().await;
            let ended = Rc::new(Cell::new(0));
            for _ in 0..3 {
                let ticket = conns.ticket();
                let ended = ended.clone();
                tokio::task::spawn_local(async move {
                    // Waits twice, as a kept-alive connection does between requests.
                    for _ in 0..2 {
                        tokio::task::yield_now().await;
                        assert!(!ticket.stopping());
                    }
                    ticket.stopped().await;
                    assert!(ticket.stopping());
                    ended.set(ended.get() + 1);
                });
            }
            let drained = tokio::time::timeout(Duration::from_millis(50), conns.all_closed());
            assert!(
                drained.await.is_err(),
                "open connections keep the drain waiting"
            );
            tokio::time::timeout(Duration::from_secs(5), conns.shutdown())
                .await
                .expect("every connection ended after the stop");
            assert_eq!(ended.get(), 3);
            assert_eq!(conns.shared.open.get(), 0);
            let later = conns.ticket();
            assert!(
                later.stopping(),
                "a connection after the stop closes at once"
            );
            assert!(later.place < 3, "a freed place is reused");
        });
    }
}
