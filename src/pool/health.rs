//! Active health checks: every `interval`, each backend is probed; `rise` consecutive
//! successes bring it into service, `fall` consecutive failures take it out.
//!
//! The decision ([`next_state`]) is a pure function; the loop ([`run`]) does the probing
//! through a [`Prober`] the caller hands in, so this module does not depend on the HTTP
//! engine (the proxy implements the prober with its own client).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::lifecycle::{self, Event};
use super::{Member, Pool, State, Update};
use crate::config::HealthConfig;

/// Why a probe found a backend unhealthy (logged when it starts failing).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// No TCP connection could be opened.
    #[error("connect failed")]
    Connect,
    /// The connection broke or the answer was not HTTP.
    #[error("request failed: {0}")]
    Request(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An answer, but not a 2xx one.
    #[error("status {0}")]
    Status(u16),
    /// No answer within the probe's timeout.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The probe request could not be made from the address and path.
    #[error("bad probe request: {0}")]
    BadRequest(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Sends one health probe. Healthy means a 2xx answer within `timeout`.
pub trait Prober: Send + Sync + 'static {
    fn probe(
        &self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), ProbeError>> + Send;
}

/// Consecutive probe results of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streak {
    pub successes: u32,
    pub failures: u32,
}

/// The state a backend should move to after a probe, or `None` to stay.
///
/// Draining and standby backends are probed (so their health is known) but never moved:
/// only the operator, the drain or a promotion changes them. An ejected backend stays down until its
/// ejection period is over, however healthy it looks.
pub fn next_state(
    member: &Member,
    streak: Streak,
    cfg: &HealthConfig,
    now: Instant,
) -> Option<State> {
    match member.state {
        State::Warming if streak.successes >= cfg.rise => Some(State::InService),
        State::InService if streak.failures >= cfg.fall => Some(State::Down),
        State::Down
            if streak.successes >= cfg.rise && member.down_until.is_none_or(|t| now >= t) =>
        {
            Some(State::InService)
        }
        _ => None,
    }
}

/// Probes every backend of `pool` each `cfg.interval` until `shutdown` turns true.
pub async fn run<P: Prober>(
    pool: Arc<Pool>,
    cfg: HealthConfig,
    prober: Arc<P>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut interval = tokio::time::interval(cfg.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        check_once(&pool, &cfg, &prober).await;
    }
}

/// One round: probe all backends concurrently, then publish the transitions at once.
pub async fn check_once<P: Prober>(pool: &Pool, cfg: &HealthConfig, prober: &Arc<P>) {
    let table = pool.snapshot_full();
    let mut probes = JoinSet::new();
    for m in table.members().iter().filter(|m| m.state != State::Maint) {
        let backend = m.backend.clone();
        let prober = prober.clone();
        let path = cfg.path.clone();
        let timeout = cfg.timeout;
        probes.spawn(async move {
            let result = prober.probe(backend.addr, &path, timeout).await;
            (backend, result)
        });
    }
    while let Some(joined) = probes.join_next().await {
        let Ok((backend, result)) = joined else {
            continue;
        };
        match result {
            Ok(()) => {
                backend.probe_successes.fetch_add(1, Ordering::Relaxed);
                backend.probe_failures.store(0, Ordering::Relaxed);
            }
            Err(reason) => {
                backend
                    .last_probe_error
                    .store(Some(std::sync::Arc::new(reason.to_string())));
                let n = backend.probe_failures.fetch_add(1, Ordering::Relaxed) + 1;
                backend.probe_successes.store(0, Ordering::Relaxed);
                if n == cfg.fall {
                    tracing::warn!(backend = &*backend.id, %reason, "health check failing");
                }
            }
        }
    }
    pool.update(|members, now| {
        let mut changed = false;
        for m in members.iter_mut() {
            let streak = Streak {
                successes: m.backend.probe_successes.load(Ordering::Relaxed),
                failures: m.backend.probe_failures.load(Ordering::Relaxed),
            };
            if let Some(next) = next_state(m, streak, cfg, now) {
                let from = m.state;
                let event = if next == State::InService {
                    Event::HealthRise
                } else {
                    Event::HealthFall
                };
                if lifecycle::apply(m, event, now).is_some() {
                    tracing::info!(
                        backend = &*m.backend.id,
                        from = from.as_str(),
                        to = next.as_str(),
                        "backend state changed by health check"
                    );
                    changed = true;
                }
            }
        }
        if changed {
            Update::Publish(())
        } else {
            Update::Keep(())
        }
    });
    pool.probed();
}

/// Republishes the table while a backend ramps up, so slow start advances in steps of
/// `every`.
pub async fn run_upkeep(pool: Arc<Pool>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = interval.tick() => pool.tick(),
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
        }
    }

    use crate::pool::testing::member;

    fn streak(successes: u32, failures: u32) -> Streak {
        Streak {
            successes,
            failures,
        }
    }

    #[test]
    fn warming_needs_rise_successes() {
        let m = member(State::Warming);
        let now = Instant::now();
        assert_eq!(next_state(&m, streak(1, 0), &cfg(), now), None);
        assert_eq!(
            next_state(&m, streak(2, 0), &cfg(), now),
            Some(State::InService)
        );
    }

    #[test]
    fn in_service_falls_after_fall_failures() {
        let m = member(State::InService);
        let now = Instant::now();
        assert_eq!(next_state(&m, streak(0, 2), &cfg(), now), None);
        assert_eq!(next_state(&m, streak(0, 3), &cfg(), now), Some(State::Down));
    }

    #[test]
    fn ejected_backend_waits_out_its_period() {
        let mut m = member(State::Down);
        let now = Instant::now();
        m.down_until = Some(now + Duration::from_secs(5));
        assert_eq!(next_state(&m, streak(9, 0), &cfg(), now), None);
        assert_eq!(
            next_state(&m, streak(9, 0), &cfg(), now + Duration::from_secs(5)),
            Some(State::InService)
        );
    }

    #[test]
    fn draining_is_never_moved_by_health() {
        let m = member(State::Draining);
        let now = Instant::now();
        assert_eq!(next_state(&m, streak(0, 99), &cfg(), now), None);
        assert_eq!(next_state(&m, streak(99, 0), &cfg(), now), None);
    }
}
