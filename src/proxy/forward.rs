//! One request's way through surge: pick a backend, forward, retry once elsewhere when
//! that is safe, and answer 502/503/504 in surge's own words when it is not.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderValue;

use super::answers::{self, ProxyFailure, Refused};
pub use super::conn_info::ConnInfo;
use super::headers::{self, RequestIds, RequestView};
use super::limits::Limits;
use super::upstream::Upstreams;
use crate::config::{ProxyConfig, StickyConfig};
use crate::pool::Pool;
use crate::telemetry::names;

/// What a chunked body (no declared length) reserves before it is read.
const CHUNKED_FIRST_RESERVATION: u64 = 64 * 1024;
/// How long a body waits for room in the budget before 503.
const BODY_BUDGET_WAIT: Duration = Duration::from_secs(1);

/// A route cookie that verified: the backend it binds the cart to.
pub(super) struct Route {
    pub(super) backend: String,
    /// Issue it again (past half its life, or signed with the previous key).
    pub(super) renew: bool,
}

/// Everything a worker's request handler needs; one per worker thread.
pub struct Forwarder {
    pub pool: Arc<Pool>,
    /// This worker's keep-alive connections to backends.
    pub upstreams: Rc<Upstreams>,
    pub response_timeout: Duration,
    pub access_log: bool,
    pub sticky: Option<StickyConfig>,
    /// Peers whose `X-Forwarded-For` is kept (`proxy.trusted_proxies`).
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
    /// Signs and checks route cookies (with `sticky`).
    pub route_signer: Option<Arc<super::route::RouteSigner>>,
    /// Signs and checks admission cookies (with `pool.shed`).
    pub admission: Option<Arc<super::route::RouteSigner>>,
    /// Signs and checks waiting-room tickets (with `[waiting_room]`).
    pub queue_signer: Option<Arc<super::route::RouteSigner>>,
    pub request_ids: Arc<RequestIds>,
    pub limits: Arc<Limits>,
    pub max_uri_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: u64,
    /// Shared by every worker: bodies held in memory at once.
    pub body_budget: Arc<super::limits::BodyBudget>,
    pub body_read_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub max_requests_per_connection: u32,
    /// Set while surge stops with a keep-alive drain (see `ProxyHandle::shutdown_draining`).
    pub closing: Arc<std::sync::atomic::AtomicBool>,
}

impl Forwarder {
    pub fn new(
        cfg: &ProxyConfig,
        pool: Arc<Pool>,
        request_ids: Arc<RequestIds>,
        limits: Arc<Limits>,
        closing: Arc<std::sync::atomic::AtomicBool>,
        upstream_tls: Option<super::tls::UpstreamTls>,
    ) -> Self {
        let sticky = pool.settings().sticky.clone();
        Self {
            upstreams: Rc::new(Upstreams::new(
                cfg.connect_timeout,
                cfg.upstream_idle_timeout,
                pool.settings().protocol,
                upstream_tls,
            )),
            pool,
            response_timeout: cfg.response_timeout,
            access_log: cfg.access_log,
            sticky,
            route_signer: None,
            admission: None,
            queue_signer: None,
            trusted_proxies: cfg.trusted_proxies.clone().into(),
            request_ids,
            limits,
            max_uri_bytes: cfg.max_uri_bytes,
            max_headers: cfg.max_headers,
            max_body_bytes: cfg.max_body_bytes,
            body_budget: super::limits::BodyBudget::new(cfg.max_buffered_body_bytes),
            body_read_timeout: cfg.body_read_timeout,
            body_idle_timeout: cfg.body_idle_timeout,
            max_requests_per_connection: cfg.max_requests_per_connection,
            closing,
        }
    }

    /// Counts a request whose body was read whole (at `start`): for the pool's traffic,
    /// and its connection for scaling once, at its first request.
    pub(super) fn count_request(&self, info: &ConnInfo, start: Instant) {
        info.last_request.set(start);
        if info.requests.get() == 1 && !self.pool.traffic.scaling.first_request(info.peer.ip()) {
            metrics::counter!(names::SCALING_CONNECTIONS_DISCOUNTED).increment(1);
        }
        self.pool.traffic.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Room in the body budget for a body of `declared` bytes (0: no declared length, a
    /// first slice of it then; the reservation grows as its bytes come), waiting a
    /// moment for room before 503.
    pub(super) async fn reserve_body(
        &self,
        declared: u64,
    ) -> Result<super::limits::BodyReservation, Refused> {
        let first = if declared > 0 {
            declared
        } else {
            CHUNKED_FIRST_RESERVATION.min(self.max_body_bytes)
        };
        self.body_budget
            .reserve(first, BODY_BUDGET_WAIT)
            .await
            .ok_or(Refused::BodyBudget)
    }

    /// Cart affinity: the cart cookie, and the backend a route cookie binds it to. A
    /// route cookie counts only beside a cart, and only if this pool signed it and it
    /// has not expired: a shopper cannot choose its blade.
    pub(super) fn affinity<V: RequestView>(
        &self,
        view: &V,
        unix_now: u64,
    ) -> (Option<String>, Option<Route>) {
        let (cart, route) = self.affinity_in(view, unix_now);
        (
            cart.map(str::to_owned),
            route.map(|v| Route {
                backend: v.backend.to_owned(),
                renew: v.renew,
            }),
        )
    }

    /// [`Self::affinity`] borrowing from the request (the HTTP/1.1 engine keeps its
    /// request in its buffer for the whole exchange, so nothing is copied).
    pub(super) fn affinity_in<'v, V: RequestView>(
        &self,
        view: &'v V,
        unix_now: u64,
    ) -> (Option<&'v str>, Option<super::route::Verified<'v>>) {
        match (&self.sticky, &self.route_signer) {
            (Some(s), Some(signer)) => {
                let cart = headers::cookie_of(view, &s.cookie);
                let route = cart
                    .and_then(|_| headers::cookie_of(view, &s.route_cookie))
                    .and_then(|v| signer.verify(v, unix_now));
                (cart, route)
            }
            _ => (None, None),
        }
    }

    /// The route cookie to set with a backend's answer: when the cart was not bound to
    /// this backend yet (or its cookie is due for renewal), and the shopper has a cart or
    /// the backend just set one (`sets_cart` asks the response).
    pub(super) fn route_cookie(
        &self,
        route: Option<super::route::Verified<'_>>,
        had_cart: bool,
        sets_cart: impl FnOnce(&str) -> bool,
        backend_id: &str,
        secure: bool,
        unix_now: u64,
    ) -> Option<HeaderValue> {
        let (Some(s), Some(signer)) = (&self.sticky, &self.route_signer) else {
            return None;
        };
        let bound_here = route.is_some_and(|r| r.backend == backend_id && !r.renew);
        if bound_here || !(had_cart || sets_cart(&s.cookie)) {
            return None;
        }
        let cookie = format!(
            "{}={}; Path=/; HttpOnly; SameSite=Lax{}",
            s.route_cookie,
            signer.issue(backend_id, unix_now),
            if secure { "; Secure" } else { "" }
        );
        HeaderValue::from_str(&cookie).ok()
    }

    pub(super) fn failure_response(
        &self,
        failure: ProxyFailure,
        request_id: &HeaderValue,
    ) -> answers::Own {
        self.pool
            .traffic
            .proxy_errors
            .fetch_add(1, Ordering::Relaxed);
        let resp = answers::failure(&failure, &self.pool.settings().name, request_id);
        metrics::counter!(names::PROXY_ERRORS_TOTAL, "code" => resp.status().as_str().to_owned())
            .increment(1);
        if let ProxyFailure::Backend(b, _) | ProxyFailure::Timeout(b, _) = &failure {
            b.metrics.count_status(resp.status().as_u16());
        }
        resp
    }
}

/// The access-log line itself, for either engine.
pub(super) fn access_line(
    conn: &ConnInfo,
    method: &str,
    path: &str,
    status: u16,
    backend: &str,
    started: Option<Instant>,
    request_id: &str,
) {
    let (tls_version, cipher) = conn.tls.unwrap_or(("-", "-"));
    tracing::info!(
        target: "surge::access",
        client = %conn.peer.ip(),
        proto = conn.proto,
        tls = tls_version,
        cipher,
        method,
        path,
        status,
        backend,
        ms = started.map_or(0.0, |t| crate::telemetry::millis(t.elapsed())),
        request_id,
    );
}
