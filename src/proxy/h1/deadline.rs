//! A connection's deadlines, all kept by the connection's one timer.
//!
//! A request waits against deadlines (its head, the blade's answer, a body's next bytes),
//! and between requests the connection waits against its idle timeout. A timer per wait,
//! even one taken from a pool and re-armed, cost per request: the timer handed the task's
//! waker and given a no-op one back, its deadline converted to the wheel's ticks, and the
//! wheel's entry re-armed (callgrind: ~880 instructions, 7% of the engine's). Instead a
//! wait only writes its deadline into the connection's [`Deadline`], and the connection's
//! task, which polls the request's work, also polls the connection's own timer: its waker
//! is registered once, and the timer moves only when it is armed later than the
//! deadline in force. Armed earlier, it fires early, is seen to be early, and is set to
//! the deadline of the wait in progress then (nginx's timers are lazy the same way).
//! With the 30 s answer and 60 s idle timeouts of the default, a kept-alive connection
//! moves its timer once every 30 s, not twice per request. A deadline is still read from
//! the clock only when the wait really has to wait: bytes already there never read it.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// The deadline of the wait a connection's request is in, if any.
#[derive(Debug, Default)]
pub struct Deadline {
    /// When the wait in progress must end; `None` while nothing waits against a deadline.
    at: Cell<Option<Instant>>,
    /// The connection's timer saw `at` pass: the wait in progress ends with `None`.
    passed: Cell<bool>,
    /// When the last answer was done: what the idle timeout counts from, without a
    /// clock reading of its own.
    answered: Cell<Option<Instant>>,
}

impl Deadline {
    /// Runs `fut` until `deadline()`; `None` when the deadline came first. `deadline` is
    /// called (once) only if `fut` does not finish on its first poll. One wait at a time
    /// per connection. The deadline is kept only while something polls
    /// [`Deadline::poll_timer`] with a timer: the connection's task, in `conn::serve`.
    pub async fn within<F: Future>(
        &self,
        deadline: impl FnOnce() -> Instant,
        fut: F,
    ) -> Option<F::Output> {
        let mut fut = pin!(fut);
        let mut deadline = Some(deadline);
        let _ended = Ended(self);
        poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            if self.passed.get() {
                return Poll::Ready(None);
            }
            if let Some(deadline) = deadline.take() {
                self.at.set(Some(deadline()));
            }
            Poll::Pending
        })
        .await
    }

    /// Notes when an answer was done (see [`Deadline::idle_until`]).
    pub fn answered(&self, at: std::time::Instant) {
        self.answered.set(Some(Instant::from_std(at)));
    }

    /// When a kept-alive connection idle since its last answer is closed: `idle` after
    /// that answer (or after now, when there was none).
    pub fn idle_until(&self, idle: std::time::Duration) -> Instant {
        self.answered.take().unwrap_or_else(Instant::now) + idle
    }

    /// Keeps the deadline of the wait in progress with the connection's `timer`:
    /// `Ready` once it has passed (the wait then ends with `None` when it is next
    /// polled). `Pending` with no wait in progress, or none that has passed.
    pub fn poll_timer(&self, timer: &mut Timer<'_>, cx: &mut Context<'_>) -> Poll<()> {
        match self.at.get() {
            Some(at) if !self.passed.get() => {
                let passed = timer.poll_until(at, cx);
                if passed.is_ready() {
                    self.passed.set(true);
                }
                passed
            }
            _ => Poll::Pending,
        }
    }
}

/// A wait's end, however it ends (done, timed out, or dropped): its deadline no longer
/// holds.
struct Ended<'a>(&'a Deadline);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.at.set(None);
        self.0.passed.set(false);
    }
}

/// A connection's timer, polled only by the connection's task.
pub struct Timer<'a> {
    sleep: Pin<&'a mut Sleep>,
    /// Polled since it was last set, and so holding this task's waker: while it has not
    /// fired it need not be polled again (that was ~150 instructions, twice a request).
    polled: bool,
}

impl<'a> Timer<'a> {
    pub fn new(sleep: Pin<&'a mut Sleep>) -> Self {
        Self {
            sleep,
            polled: false,
        }
    }

    /// `Ready` once `at` has passed. The timer is moved only when it is armed later
    /// than `at`; armed earlier, it fires, and is then set to `at`. Whether `at` has
    /// passed is the timer's word (its deadline is `at` or later and it fired), so no
    /// clock is read here.
    pub fn poll_until(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        if self.sleep.deadline() > at {
            self.sleep.as_mut().reset(at);
            self.polled = false;
        } else if self.polled && !self.sleep.is_elapsed() {
            // It will wake this task when it fires, and be polled then.
            return Poll::Pending;
        }
        loop {
            self.polled = true;
            // Unconstrained: with the task's budget spent, tokio's timer answers `Pending`
            // without taking the waker, and a timer skipped as "polled" would then never
            // wake the connection. (One poll of a timer is no loop that could starve
            // other connections.)
            let mut sleep = tokio::task::coop::unconstrained(self.sleep.as_mut());
            match Pin::new(&mut sleep).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if self.sleep.deadline() >= at => return Poll::Ready(()),
                // Fired for an earlier deadline than this one: set again, and polled
                // again so that it holds this task's waker.
                Poll::Ready(()) => self.sleep.as_mut().reset(at),
            }
        }
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

    /// Drives `work` as `conn::serve` drives a turn: the work first, then the
    /// connection's timer for the deadline the work is waiting against.
    async fn drive<F: Future>(deadline: &Deadline, timer: &mut Timer<'_>, work: F) -> F::Output {
        let mut work = pin!(work);
        poll_fn(|cx| loop {
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            if deadline.poll_timer(timer, cx).is_pending() {
                return Poll::Pending;
            }
        })
        .await
    }

    /// A wait with a deadline `limit` from now on work that takes `work`, driven with
    /// the connection's `timer`: `Some(())` if the work finished first.
    async fn wait(
        deadline: &Deadline,
        timer: &mut Timer<'_>,
        limit: Duration,
        work: Duration,
    ) -> Option<()> {
        let waited = deadline.within(|| Instant::now() + limit, tokio::time::sleep(work));
        drive(deadline, timer, waited).await
    }

    /// What is ready needs no deadline (nor the clock); what waits ends at its own
    /// deadline, whether the connection's timer was armed earlier or later than it.
    #[test]
    fn each_wait_ends_at_its_own_deadline_with_one_timer() {
        runtime().block_on(async {
            let deadline = Deadline::default();
            let start = Instant::now();
            // Armed far later than any wait: moved earlier when a wait needs it.
            let sleep = pin!(tokio::time::sleep_until(start + Duration::from_secs(60)));
            let mut timer = Timer::new(sleep);

            let ready = drive(
                &deadline,
                &mut timer,
                deadline.within(|| panic!("no clock read"), async { 7 }),
            )
            .await;
            assert_eq!(ready, Some(7));

            let slow = wait(
                &deadline,
                &mut timer,
                Duration::from_secs(1),
                Duration::from_secs(5),
            )
            .await;
            assert_eq!(slow, None, "the deadline came first");
            assert_eq!(start.elapsed(), Duration::from_secs(1));

            // The timer is now armed for 1 s, earlier than this wait's 10 s: it fires,
            // is re-armed, and the work finishes first.
            let quick = wait(
                &deadline,
                &mut timer,
                Duration::from_secs(10),
                Duration::from_secs(3),
            )
            .await;
            assert_eq!(
                quick,
                Some(()),
                "an earlier, finished wait's deadline does not fire"
            );
            assert_eq!(start.elapsed(), Duration::from_secs(4));

            // Armed for 11 s now; a wait with an earlier deadline moves it back.
            let earlier = wait(
                &deadline,
                &mut timer,
                Duration::from_secs(2),
                Duration::from_secs(4),
            )
            .await;
            assert_eq!(earlier, None);
            assert_eq!(start.elapsed(), Duration::from_secs(6));

            // A wait that ended leaves nothing behind: with no wait in progress the
            // timer is not polled, whatever it was armed for.
            assert!(deadline.at.get().is_none() && !deadline.passed.get());
            drive(
                &deadline,
                &mut timer,
                tokio::time::sleep(Duration::from_secs(30)),
            )
            .await;
            assert_eq!(start.elapsed(), Duration::from_secs(36));
        });
    }

    /// The idle wait's helper: a timer armed earlier than the deadline is not taken for
    /// it, and one armed later is moved.
    #[test]
    fn a_timer_answers_for_its_own_deadline_only() {
        runtime().block_on(async {
            let start = Instant::now();
            let sleep = pin!(tokio::time::sleep_until(start + Duration::from_secs(1)));
            let mut timer = Timer::new(sleep);
            poll_fn(|cx| timer.poll_until(start + Duration::from_secs(5), cx)).await;
            assert_eq!(start.elapsed(), Duration::from_secs(5));
            poll_fn(|cx| timer.poll_until(start + Duration::from_secs(7), cx)).await;
            assert_eq!(start.elapsed(), Duration::from_secs(7));
            // Armed (and polled) for 12 s: a poll for 9 s moves it back.
            let mut once = false;
            poll_fn(|cx| {
                if !once {
                    once = true;
                    assert!(timer
                        .poll_until(start + Duration::from_secs(12), cx)
                        .is_pending());
                }
                timer.poll_until(start + Duration::from_secs(9), cx)
            })
            .await;
            assert_eq!(start.elapsed(), Duration::from_secs(9));
        });
    }
}
