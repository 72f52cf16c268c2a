//! `proxy.body_idle_timeout`: a body that makes no progress for that long is cut, on
//! either side. A backend that stops sending mid-body is noticed by the response body
//! ([`Stall`] in `body::GuardedBody`); a shopper that stops reading is noticed on the
//! socket ([`SendTimeout`]), because then nothing polls the body at all: hyper waits for
//! the socket to take its buffered bytes first.
//!
//! The timer costs nothing while data flows: it is made the first time a body or a write
//! has to wait, and re-armed only when waiting starts again after progress.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::telemetry::names;

/// A "no progress for `limit`" timer: [`Stall::stalled`] when waiting, [`Stall::progress`]
/// when something moved.
pub struct Stall {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer runs for the current wait.
    armed: bool,
}

impl Stall {
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            timer: None,
            armed: false,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Something moved: the next wait starts a new count.
    pub fn progress(&mut self) {
        self.armed = false;
    }

    /// Called while waiting: whether the wait has now lasted `limit` (the timer wakes the
    /// task when it does).
    pub fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let timer = match (&mut self.timer, self.armed) {
            (Some(t), true) => t,
            (Some(t), false) => {
                t.as_mut().reset(Instant::now() + self.limit);
                t
            }
            (None, _) => self.timer.insert(Box::pin(tokio::time::sleep(self.limit))),
        };
        self.armed = true;
        timer.as_mut().poll(cx).is_ready()
    }
}

/// A shopper's socket whose writes fail with `TimedOut` once the shopper has taken no byte
/// for `limit`: the connection ends, and with it the response bodies it held (their
/// backend connection, in-flight and shed slots are given back).
pub(super) struct SendTimeout<S> {
    inner: S,
    stall: Stall,
}

impl<S> SendTimeout<S> {
    pub(super) fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            stall: Stall::new(limit),
        }
    }

    fn after<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Pending => {
                if self.stall.stalled(cx) {
                    metrics::counter!(names::BODIES_STALLED, "side" => "client").increment(1);
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the client read nothing for {:?}", self.stall.limit()),
                    )))
                } else {
                    Poll::Pending
                }
            }
            ready => {
                self.stall.progress();
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.after(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: super::transport::Transport> super::transport::Transport for SendTimeout<S> {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<bool> {
        self.inner.poll_readable(cx)
    }
}
