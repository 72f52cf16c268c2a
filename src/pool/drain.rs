//! Drain: no new requests or carts go to a node; requests in flight finish; carts bound
//! to it keep reaching it until the deadline. Done when nothing is in flight any more or
//! at the deadline, whichever comes first.
//!
//! Owns "drain, then remove when done" for everyone who asks (the admin API's `DELETE`,
//! the autoscaler's scale-in checks [`Pool::drain_done`] each round before it releases
//! the server). Waiting is event-driven: the backend's last request to finish wakes the
//! waiter, and so does any change of the table (an undrain, a removal).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lifecycle::{self, Event};
use super::{Backend, Member, Pool, PoolError, State, Update};

/// How a wait for a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// Nothing in flight any more, or the deadline passed.
    Done,
    /// The node left the drain (undrained, put in maintenance...): someone changed their
    /// mind.
    Abandoned,
    /// The node is no longer in the pool.
    Gone,
}

impl Member {
    /// Whether this member's drain is over at `now`: nothing in flight, or the deadline
    /// passed. False for a member that is not draining.
    pub fn drain_is_over(&self, now: Instant) -> bool {
        self.state == State::Draining
            && (self.backend.in_flight() == 0 || self.drain_deadline.is_some_and(|d| now >= d))
    }
}

impl Pool {
    /// Starts draining: no new requests or carts; carts bound to it keep reaching it until
    /// `now + timeout`. Draining an already draining backend keeps the earlier deadline.
    pub fn drain(&self, id: &str, timeout: Duration) -> Result<Instant, PoolError> {
        self.drain_keeping(id, timeout, 0)
    }

    /// [`Pool::drain`], refused when fewer than `min_in_service` backends would remain in
    /// service (checked against the very table the drain is published on).
    pub fn drain_keeping(
        &self,
        id: &str,
        timeout: Duration,
        min_in_service: usize,
    ) -> Result<Instant, PoolError> {
        self.update(|members, now| {
            let in_service = members
                .iter()
                .filter(|m| m.state == State::InService)
                .count();
            let Some(m) = members.iter_mut().find(|m| &*m.backend.id == id) else {
                return Update::Keep(Err(PoolError::UnknownBackend(id.to_string())));
            };
            if let (State::Draining, Some(d)) = (m.state, m.drain_deadline) {
                return Update::Keep(Ok(d));
            }
            let left = in_service - usize::from(m.state == State::InService);
            if left < min_in_service {
                return Update::Keep(Err(PoolError::TooFewInService {
                    id: id.to_string(),
                    left,
                    min: min_in_service,
                }));
            }
            let deadline = now + timeout;
            lifecycle::apply(m, Event::Drain { deadline }, now);
            Update::Publish(Ok(deadline))
        })
    }

    /// Whether a drain of `id` is over: nothing in flight, or the deadline passed.
    /// `None` when there is no such backend.
    pub fn drain_done(&self, id: &str, now: Instant) -> Option<bool> {
        Some(self.snapshot().get(id)?.drain_is_over(now))
    }
}

/// Waits until the drain of `id` ends, however it ends.
pub async fn wait_drained(pool: &Pool, id: &str) -> DrainEnd {
    let mut changes = pool.changes();
    let mut watching: Option<IdleWatch> = None;
    loop {
        changes.borrow_and_update();
        let table = pool.snapshot_full();
        let Some(m) = table.get(id) else {
            return DrainEnd::Gone;
        };
        if m.state != State::Draining {
            return DrainEnd::Abandoned;
        }
        let watch = watching.get_or_insert_with(|| IdleWatch::new(m.backend.clone()));
        let idle = watch.backend.idle.notified();
        let mut idle = std::pin::pin!(idle);
        // Registered before the check, so a request finishing in between still wakes us.
        idle.as_mut().enable();
        if m.drain_is_over(Instant::now()) {
            return DrainEnd::Done;
        }
        let deadline = m.drain_deadline.map(tokio::time::Instant::from_std);
        drop(table);
        tokio::select! {
            _ = idle => {}
            _ = changes.changed() => {}
            _ = sleep_until(deadline) => {}
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Drains `id` (as [`Pool::drain_keeping`]) and removes it from the pool once the drain
/// is done, in a task of its own on the current runtime. An undrain meanwhile cancels
/// the removal.
pub fn drain_then_remove(
    pool: &Arc<Pool>,
    id: &str,
    timeout: Duration,
    min_in_service: usize,
) -> Result<Instant, PoolError> {
    let deadline = pool.drain_keeping(id, timeout, min_in_service)?;
    let (pool, id) = (pool.clone(), id.to_owned());
    tokio::spawn(async move {
        if wait_drained(&pool, &id).await == DrainEnd::Done && pool.remove(&id).is_ok() {
            tracing::info!(backend = %id, "node removed after drain");
        }
    });
    Ok(deadline)
}

/// Asks a backend's last finishing request to wake drain waiters while it lives (the
/// request path checks a counter, not a lock, when nobody watches).
struct IdleWatch {
    backend: Arc<Backend>,
}

impl IdleWatch {
    fn new(backend: Arc<Backend>) -> Self {
        backend.idle_watchers.fetch_add(1, Ordering::SeqCst);
        Self { backend }
    }
}

impl Drop for IdleWatch {
    fn drop(&mut self) {
        self.backend.idle_watchers.fetch_sub(1, Ordering::SeqCst);
    }
}
