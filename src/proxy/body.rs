//! The bodies of answers as the shopper's side sends them: a blade's, which holds the
//! blade's in-flight count (and the request's room under the shedding limit) until it has
//! been sent, or one of surge's own short pages.

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::upstream::{Conn, Upstreams};
use crate::pool::shed::Admitted;
use crate::pool::InFlight;
use crate::telemetry::names;

/// Body sent to the shopper: the backend's (holding the in-flight count until it ends), or
/// one of surge's short error pages.
pub type DownstreamBody = Either<GuardedBody, Full<Bytes>>;

/// A backend's response body that keeps the backend's in-flight count raised until the
/// body has been sent to the shopper (or the shopper went away), so a drain waits for
/// streaming responses too.
pub struct GuardedBody {
    pub(super) inner: Upstream,
    pub(super) guard: Option<InFlight>,
    /// The connection the body arrives on; back to the idle pool once it has been read to
    /// the end, dropped (and so closed) otherwise.
    pub(super) conn: Option<(Rc<Upstreams>, Conn)>,
    /// When the shopper's request arrived; the duration histogram counts to the body's end.
    pub(super) started: Instant,
    /// The request's room under the shedding limit, held until the body is sent.
    pub(super) _admitted: Option<Admitted>,
    /// Ends the body when the backend sends nothing for `proxy.body_idle_timeout`.
    pub(super) stall: super::stall::Stall,
}

/// A blade's answer body as the client that read its head gives it.
pub enum Upstream {
    Hyper(Incoming),
    Engine(super::h1::bridge::BladeBody),
}

impl Body for Upstream {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Upstream::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::from))),
            Upstream::Engine(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Upstream::Hyper(b) => b.is_end_stream(),
            Upstream::Engine(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Upstream::Hyper(b) => b.size_hint(),
            Upstream::Engine(b) => b.size_hint(),
        }
    }
}

/// Why a response body ended before its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("backend body: {0}")]
    Upstream(#[from] hyper::Error),
    #[error("backend body: {0}")]
    Blade(#[from] std::io::Error),
    #[error("the backend sent nothing of the body for {0:?}")]
    Stalled(Duration),
}

impl GuardedBody {
    fn reuse_connection(&mut self) {
        if let Some((pool, conn)) = self.conn.take() {
            pool.checkin(conn);
        }
    }

    fn release(&mut self) {
        if let Some(g) = self.guard.take() {
            g.backend()
                .metrics
                .duration
                .record(self.started.elapsed().as_secs_f64());
        }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                self.reuse_connection();
                self.release();
            }
            Poll::Ready(Some(Err(_))) => {
                self.conn = None;
                self.release();
            }
            Poll::Ready(Some(Ok(_))) => self.stall.progress(),
            Poll::Pending => {
                if self.stall.stalled(cx) {
                    metrics::counter!(names::BODIES_STALLED, "side" => "backend").increment(1);
                    self.conn = None;
                    self.release();
                    return Poll::Ready(Some(Err(BodyError::Stalled(self.stall.limit()))));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        // Bodies known to be empty (204, HEAD, length 0) are never polled.
        if self.inner.is_end_stream() {
            self.reuse_connection();
        }
        self.release();
    }
}
