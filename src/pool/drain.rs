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

/// Longest drain deadline: a week. Longer ones are cut to it (the admin API refuses
/// them with 400).
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

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
            // A timeout too large for the clock means "until drained": cap it.
            let deadline = now
                .checked_add(timeout.min(MAX_DRAIN_TIMEOUT))
                .unwrap_or(now + MAX_DRAIN_TIMEOUT);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Algorithm;
    use crate::pool::{Origin, Pick};

    fn pool() -> Arc<Pool> {
        let settings = crate::pool::testing::settings(Algorithm::RoundRobin);
        let backends = (0..2)
            .map(|i| {
                Arc::new(Backend::new(
                    &format!("b{i}"),
                    format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                    1,
                    Origin::Static,
                ))
            })
            .collect();
        Arc::new(Pool::new(settings, backends))
    }

    /// A request in flight on `id`.
    fn request_on(p: &Pool, id: &str) -> crate::pool::InFlight {
        loop {
            let g = p.pick(&Pick::default()).expect("a backend");
            if &*g.backend().id == id {
                return g;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_request_finishing_ends_the_wait() {
        let p = pool();
        let busy = request_on(&p, "b0");
        p.drain("b0", Duration::from_secs(3600)).unwrap();
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { wait_drained(&p, "b0").await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "done while a request is in flight");
        drop(busy);
        let end = tokio::time::timeout(Duration::from_secs(1), waiter).await;
        assert_eq!(end.ok().and_then(Result::ok), Some(DrainEnd::Done));
    }

    // Real time: the drain deadline is a clock reading, as in production.
    #[tokio::test]
    async fn the_deadline_ends_the_wait_and_an_undrain_or_removal_abandons_it() {
        let p = pool();
        let _stuck = request_on(&p, "b0");
        p.drain("b0", Duration::from_millis(100)).unwrap();
        // Done at the deadline although the request never ends.
        assert_eq!(wait_drained(&p, "b0").await, DrainEnd::Done);

        let _busy = request_on(&p, "b1");
        p.drain("b1", Duration::from_secs(3600)).unwrap();
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { wait_drained(&p, "b1").await }
        });
        tokio::task::yield_now().await;
        p.undrain("b1").unwrap();
        assert_eq!(waiter.await.ok(), Some(DrainEnd::Abandoned));

        p.drain("b1", Duration::from_secs(3600)).unwrap();
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { wait_drained(&p, "b1").await }
        });
        tokio::task::yield_now().await;
        p.remove("b1").unwrap();
        assert_eq!(waiter.await.ok(), Some(DrainEnd::Gone));
    }

    #[tokio::test]
    async fn drain_then_remove_removes_once_drained_and_not_after_an_undrain() {
        let p = pool();
        let busy = request_on(&p, "b0");
        drain_then_remove(&p, "b0", Duration::from_secs(3600), 0).unwrap();
        tokio::task::yield_now().await;
        assert!(p.snapshot().get("b0").is_some(), "removed while busy");
        let mut changes = p.changes();
        drop(busy);
        let removed = tokio::time::timeout(Duration::from_secs(5), async {
            while p.snapshot().get("b0").is_some() {
                let _ = changes.changed().await;
            }
        })
        .await;
        assert!(removed.is_ok(), "not removed after its drain");

        let busy = request_on(&p, "b1");
        drain_then_remove(&p, "b1", Duration::from_secs(3600), 0).unwrap();
        tokio::task::yield_now().await;
        p.undrain("b1").unwrap();
        drop(busy);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            p.snapshot().get("b1").map(|m| m.state),
            Some(State::InService),
            "an undrained node stays"
        );
    }
}
