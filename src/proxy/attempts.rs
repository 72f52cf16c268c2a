//! The one retry loop, shared by every protocol leg: pick a blade (the cart's, away from
//! one that just failed), let the leg send the request there, and decide with
//! [`retry::after`] whether and where it goes again. The legs differ only in how they
//! send (the engine's own blade connections, or hyper's client towards h2c blades).

use std::sync::Arc;

use std::time::Duration;

use super::answers::ProxyFailure;
use super::retry::{self, Attempt, Next};
use crate::pool::{Backend, InFlight, NoPick, Outcome, Pick, Pool};

/// Sends of one request at most: a connect failure, a closed pooled connection and a
/// failure after sending may each cost one.
pub const MAX_ATTEMPTS: usize = 4;

/// How one attempt failed: what happened, and the words for the shopper's 502.
#[derive(Debug, Clone, Copy)]
pub struct Failed {
    pub attempt: Attempt,
    pub why: &'static str,
}

/// Where a request may go: its cart's key and the blade a route cookie binds it to.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub sticky_key: Option<&'a [u8]>,
    pub route: Option<&'a str>,
    /// The request's arrival, for the pick's clock.
    pub now_ns: u64,
}

/// Whether repeating a request is harmless (RFC 9110 section 9.2.2): only such a
/// request may go to a second blade after the first may have acted on it.
pub fn idempotent(m: &http::Method) -> bool {
    use http::Method;
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Sends the request with `send` until a blade of `pool` answers, [`retry::after`] says
/// give up, or [`MAX_ATTEMPTS`] were made. A failure that blames a blade is counted
/// against it (passive ejection) and keeps the next attempt away from it; one without
/// an answer within `response_timeout` is told as a 504.
pub async fn run<T>(
    pool: &Pool,
    response_timeout: Duration,
    target: Target<'_>,
    idempotent: bool,
    mut send: impl AsyncFnMut(&Arc<Backend>) -> Result<T, Failed>,
) -> Result<(InFlight, T), ProxyFailure> {
    let mut avoid: Option<InFlight> = None;
    let mut failure: Option<ProxyFailure> = None;
    for _ in 0..MAX_ATTEMPTS {
        let pick = Pick {
            sticky_key: target.sticky_key,
            route: target.route,
            avoid: avoid.as_ref().map(|g| &**g.backend()),
            now_ns: target.now_ns,
        };
        let Some(guard) = pick_or_fail(pool, &pick, &mut failure) else {
            break;
        };
        let backend = guard.backend().clone();
        let failed = match send(&backend).await {
            Ok(answer) => return Ok((guard, answer)),
            Err(f) => f,
        };
        let verdict = retry::after(failed.attempt, idempotent);
        if verdict.blame {
            pool.record(&backend, Outcome::Failure);
            failure = Some(match failed.attempt {
                Attempt::TimedOut => ProxyFailure::Timeout(backend, response_timeout),
                _ => ProxyFailure::Backend(backend, failed.why),
            });
            avoid = Some(guard);
        }
        if verdict.next == Next::GiveUp {
            break;
        }
    }
    Err(failure.unwrap_or(ProxyFailure::NoBackend))
}

/// A blade for one attempt, or `None` with the reason kept in `failure` (the first reason
/// wins: a later attempt's "nothing left" does not hide an earlier one's).
fn pick_or_fail(
    pool: &Pool,
    pick: &Pick<'_>,
    failure: &mut Option<ProxyFailure>,
) -> Option<InFlight> {
    match pool.pick(pick) {
        Ok(guard) => Some(guard),
        Err(NoPick::Nothing) => {
            failure.get_or_insert(ProxyFailure::NoBackend);
            None
        }
        Err(NoPick::BoundNodeFull) => {
            failure.get_or_insert(ProxyFailure::NodeBusy);
            None
        }
    }
}
