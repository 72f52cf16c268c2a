//! A worker's spare timers, reused like its buffers.
//!
//! A request waits on deadlines (its head, the blade's answer, a body's next bytes), and
//! with `tokio::time::timeout` each was a new timer: the runtime handle looked up and
//! cloned, the timer wheel's lock taken to register it and again to cancel it (with the
//! idle wait's, the profile put that at ~2.5% of the engine's CPU). A registered timer
//! re-armed to a later deadline costs one atomic operation instead (the wheel moves it
//! when the old deadline comes), so timers are kept per kind of wait (one kind's
//! deadlines grow from one use to the next) and re-armed. A deadline is also read from
//! the clock only when the wait really has to wait: bytes already there never read it.
//! (The idle wait between requests has the connection's own timer: see `conn::serve`.)

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

/// The kinds of wait, each with its own spares.
#[derive(Debug, Clone, Copy)]
pub enum Wait {
    /// A request head arriving.
    Head,
    /// A blade's answer (head).
    Answer,
    /// A body's next bytes.
    Body,
}

/// Spare timers kept per kind; more are dropped.
const MAX_SPARE: usize = 1024;

/// One worker's spare timers (single-threaded, like everything of a worker).
#[derive(Default)]
pub struct Timers {
    spare: [RefCell<Vec<Pin<Box<Sleep>>>>; 3],
}

impl Timers {
    /// Runs `fut` until `deadline()`; `None` when the deadline came first. `deadline` is
    /// called (once) only if `fut` does not finish on its first poll.
    pub async fn within<F: Future>(
        &self,
        wait: Wait,
        deadline: impl FnOnce() -> Instant,
        fut: F,
    ) -> Option<F::Output> {
        let mut fut = pin!(fut);
        let mut deadline = Some(deadline);
        let mut timer = Held {
            timers: self,
            wait,
            timer: None,
        };
        poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            if let Some(deadline) = deadline.take() {
                timer.timer = Some(self.take(wait, deadline()));
            }
            match timer.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(None),
                _ => Poll::Pending,
            }
        })
        .await
    }

    fn take(&self, wait: Wait, deadline: Instant) -> Pin<Box<Sleep>> {
        match self.spare[wait as usize].borrow_mut().pop() {
            Some(mut t) => {
                t.as_mut().reset(deadline);
                t
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    fn give(&self, wait: Wait, mut timer: Pin<Box<Sleep>>) {
        let mut spare = self.spare[wait as usize].borrow_mut();
        if spare.len() < MAX_SPARE {
            // The timer keeps the last waker it was polled with, and with it the task that
            // used it: a no-op waker lets that task's memory go.
            let _ = timer.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            spare.push(timer);
        }
    }

    /// Spare timers of a kind now.
    #[cfg(test)]
    pub fn spares(&self, wait: Wait) -> usize {
        self.spare[wait as usize].borrow().len()
    }
}

/// The timer a wait uses, given back when the wait ends (or is dropped).
struct Held<'a> {
    timers: &'a Timers,
    wait: Wait,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.timer.take() {
            self.timers.give(self.wait, t);
        }
    }
}

impl std::fmt::Debug for Timers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timers").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime")
    }

    /// What is ready needs no timer (nor the clock); what waits gets one, and a reused
    /// timer still keeps its new deadline, not its old one.
    #[test]
    fn a_reused_timer_keeps_the_deadline_it_was_given() {
        runtime().block_on(async {
            let timers = Timers::default();
            let ready = timers
                .within(Wait::Head, || panic!("no clock read"), async { 7 })
                .await;
            assert_eq!(ready, Some(7));
            assert_eq!(timers.spares(Wait::Head), 0, "no timer was needed");

            let slow = timers
                .within(
                    Wait::Head,
                    || Instant::now() + Duration::from_secs(1),
                    tokio::time::sleep(Duration::from_secs(5)),
                )
                .await;
            assert_eq!(slow, None, "the deadline came first");
            assert_eq!(timers.spares(Wait::Head), 1);

            let start = Instant::now();
            let quick = timers
                .within(
                    Wait::Head,
                    || Instant::now() + Duration::from_secs(10),
                    tokio::time::sleep(Duration::from_secs(3)),
                )
                .await;
            assert_eq!(quick, Some(()), "the old, earlier deadline does not fire");
            assert_eq!(start.elapsed(), Duration::from_secs(3));
            assert_eq!(timers.spares(Wait::Head), 1, "the same timer, back");

            // Re-armed earlier than it was set: still honoured.
            let earlier = timers
                .within(
                    Wait::Head,
                    || Instant::now() + Duration::from_secs(2),
                    tokio::time::sleep(Duration::from_secs(4)),
                )
                .await;
            assert_eq!(earlier, None);
            assert_eq!(start.elapsed(), Duration::from_secs(5));
        });
    }
}
