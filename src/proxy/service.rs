//! The hyper server's requests (HTTP/2 shoppers, and HTTP/1.1 ones with
//! `proxy.engine = "hyper"`): their limits and bodies checked, then the same decisions and
//! the same retry loop as the engine's ([`super::attempts`]); to HTTP/1.1 blades through
//! the engine's own blade connections, to h2c blades through hyper's client.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::Incoming;

use super::admission::Entry;
use super::answers::{self, ProxyFailure, Refused};
use super::attempts;
use super::body::{DownstreamBody, GuardedBody, Upstream};
use super::conn_info::ConnInfo;
use super::headers::{self, X_REQUEST_ID};
use super::retry;
use super::upstream::Conn;
use super::upstream::UpstreamBody;
use crate::config::UpstreamProtocol;
use crate::pool::shed::Admitted;
use crate::pool::{Backend, InFlight, Outcome, State};

use super::forward::{access_line, Forwarder, Route};

impl Forwarder {
    /// Serves one shopper request. Never fails: every problem becomes a response.
    /// `engine`: the worker's HTTP/1.1 engine, whose blade connections carry the request
    /// to an HTTP/1.1 blade (none: h2c blades, or `proxy.engine = "hyper"`).
    pub async fn handle(
        self: Rc<Self>,
        req: Request<Incoming>,
        conn_info: Rc<ConnInfo>,
        engine: Option<Rc<super::h1::Engine>>,
    ) -> Result<Response<DownstreamBody>, Infallible> {
        if let Some(origin) = &conn_info.redirect_https {
            return Ok(answers::redirect(origin, &req).map(Either::Right));
        }
        let served = conn_info.requests.get().saturating_add(1);
        conn_info.requests.set(served);
        // HTTP/1.1 only: an h2 connection's streams are spread per request anyway.
        let last_on_connection = !conn_info.h2
            && (served >= self.max_requests_per_connection || self.closing.load(Ordering::Relaxed));
        let (parts, body) = req.into_parts();
        let body = match self.check_limits(&parts, &conn_info) {
            // An empty body said with `Content-Length: 0` goes on with its length (a POST
            // without one gets 411 from some blades).
            Ok(()) if body.is_end_stream() => Ok((
                parts
                    .headers
                    .contains_key(header::CONTENT_LENGTH)
                    .then(Bytes::new),
                None,
            )),
            // Boxed: the reading future (timer, collector) is large, and most shop
            // requests have no body; inline it would grow every request's future.
            Ok(()) => Box::pin(self.read_body(&parts, body)).await,
            Err(refused) => Err(refused),
        };
        // The reservation lives until the response head came: the body (and its copy
        // for a retry) is held that long.
        let (body, _reserved) = match body {
            Ok(b) => b,
            Err(refused) => {
                let resp = answers::refusal(refused, &conn_info);
                if self.access_log {
                    log_access(&conn_info, &parts.method, &parts.uri, &resp, "-", None);
                }
                return Ok(resp.map(Either::Right));
            }
        };
        let mut resp = self.forward(parts, body, &conn_info, engine.as_ref()).await;
        if last_on_connection {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(resp)
    }

    /// Limits checked on the request head: the client's request rate, the target's
    /// length, the number of header fields (hyper counts them on HTTP/1.1 already).
    fn check_limits(&self, parts: &http::request::Parts, conn: &ConnInfo) -> Result<(), Refused> {
        if !self.limits.allow_request(conn.peer.ip()) {
            return Err(Refused::RateLimited);
        }
        let target = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
        if target > self.max_uri_bytes {
            return Err(Refused::UriTooLong);
        }
        if parts.headers.len() > self.max_headers {
            return Err(Refused::TooManyHeaders);
        }
        // A proxy tunnel is not a shop's request (and a blade's 2xx to it would turn the
        // pooled connection into a tunnel): refused, as the HTTP/1.1 engine does.
        if parts.method == Method::CONNECT {
            return Err(Refused::Connect);
        }
        headers::check_framing(parts, conn.h2)
    }

    /// Reads the shopper's whole body before any backend is picked, as nginx does by
    /// default: a slow or malformed body then costs the frontends nothing, a chunked body
    /// that breaks off reaches no one, and a body can be sent again to a second backend.
    /// The body's bytes are reserved in the process-wide budget first (the declared
    /// length, or a first slice of a chunked body, grown to its size once read).
    async fn read_body(
        &self,
        parts: &http::request::Parts,
        body: Incoming,
    ) -> Result<(Option<Bytes>, Option<super::limits::BodyReservation>), Refused> {
        if body.is_end_stream() {
            return Ok((None, None));
        }
        // A declared length (Content-Length) is the hint's lower bound.
        let declared = body.size_hint().lower();
        if declared > self.max_body_bytes {
            return Err(Refused::BodyTooLarge);
        }
        let mut reserved = self.reserve_body(declared).await?;
        let limit = self.max_body_bytes;
        let read = tokio::time::timeout(
            self.body_read_timeout,
            collect_within(body, limit, &mut reserved),
        )
        .await;
        match read {
            Ok(Ok(bytes)) => Ok((
                (!bytes.is_empty() || parts.headers.contains_key(header::CONTENT_LENGTH))
                    .then_some(bytes),
                Some(reserved),
            )),
            Ok(Err(why)) => {
                tracing::debug!(path = parts.uri.path(), ?why, "request body refused");
                Err(why)
            }
            Err(_) => Err(Refused::BodyTimeout),
        }
    }

    /// The request, its body read, to a backend and back.
    async fn forward(
        self: &Rc<Self>,
        mut parts: http::request::Parts,
        body: Option<Bytes>,
        conn_info: &ConnInfo,
        engine: Option<&Rc<super::h1::Engine>>,
    ) -> Response<DownstreamBody> {
        let start = Instant::now();
        self.count_request(conn_info, start);
        let request_id = self.prepare(&mut parts, conn_info);
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let entry = match self.enter(&parts, conn_info, &request_id, unix_now).await {
            Ok(entry) => entry,
            Err(resp) => return resp.map(Either::Right),
        };
        let (cart, route) = self.affinity(&parts, unix_now);
        let log_line = self
            .access_log
            .then(|| (parts.method.clone(), parts.uri.clone()));
        let target = attempts::Target {
            sticky_key: cart.as_deref().map(str::as_bytes),
            route: route.as_ref().map(|r| r.backend.as_str()),
            now_ns: crate::pool::nanos_since_epoch(start),
        };
        let idempotent = attempts::idempotent(&parts.method);
        let result = match engine {
            Some(engine) => {
                self.through_engine(engine, target, idempotent, parts, body, start)
                    .await
            }
            // Boxed: hyper's client future is the larger, and inline it would size (and be
            // copied with) every request's future, most of which go through the engine.
            None => Box::pin(self.through_hyper(target, idempotent, parts, body, start)).await,
        };
        let Entry {
            admitted,
            admission_cookie,
            queue_cookie,
        } = entry;
        let (mut resp, backend_id) = match result {
            Ok((guard, answer)) => {
                let id = guard.backend().id.clone();
                let (conn, resp) = match answer {
                    Answer::Hyper(conn, resp) => (Some(conn), resp.map(Upstream::Hyper)),
                    Answer::Engine(resp) => (None, resp.map(Upstream::Engine)),
                };
                let held = Held {
                    guard,
                    conn,
                    admitted,
                };
                let affinity = (route.as_ref(), cart.is_some());
                let resp = self.finish(held, resp, affinity, start, conn_info, unix_now);
                (resp, Some(id))
            }
            Err(failure) => {
                let id = failure.backend_id();
                let resp = self.failure_response(failure, &request_id);
                (resp.map(Either::Right), id)
            }
        };
        let headers = resp.headers_mut();
        if !headers.contains_key(X_REQUEST_ID) {
            headers.insert(X_REQUEST_ID, request_id);
        }
        for cookie in [admission_cookie, queue_cookie].into_iter().flatten() {
            headers.append(header::SET_COOKIE, cookie);
        }
        if let Some(h) = &conn_info.hsts {
            headers.insert(header::STRICT_TRANSPORT_SECURITY, h.clone());
        }
        if let Some((method, uri)) = log_line {
            let backend = backend_id.as_deref().unwrap_or("-");
            log_access(conn_info, &method, &uri, &resp, backend, Some(start));
        }
        resp
    }

    /// The request's head as blades get it: hop-by-hop fields out, the forwarding fields
    /// surge writes in; its request id (kept, or made).
    fn prepare(&self, parts: &mut http::request::Parts, conn_info: &ConnInfo) -> HeaderValue {
        headers::strip_hop_by_hop(&mut parts.headers);
        let peer = conn_info.peer.ip();
        let trusted = self.trusted_proxies.iter().any(|n| n.contains(&peer));
        let (client, proto) = (&conn_info.client_ip, conn_info.proto);
        headers::add_forwarding(&mut parts.headers, client, proto, trusted);
        self.request_ids.ensure(&mut parts.headers)
    }

    /// Turns a backend's response into the shopper's: hop-by-hop headers out, the route
    /// cookie in when the cart was just bound, `Connection: close` when the backend drains.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        self: &Rc<Self>,
        held: Held,
        resp: Response<Upstream>,
        (route, had_cart): (Option<&Route>, bool),
        started: Instant,
        conn_info: &ConnInfo,
        unix_now: u64,
    ) -> Response<DownstreamBody> {
        let h2 = conn_info.h2;
        let Held {
            guard,
            conn,
            admitted,
        } = held;
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::one_length(&mut parts.headers);
        let backend = guard.backend().clone();
        backend.metrics.count_status(parts.status.as_u16());
        let tls = conn_info.tls.is_some();
        if let Some(v) = self.route_cookie(
            route.map(|r| super::route::Verified {
                backend: &r.backend,
                renew: r.renew,
            }),
            had_cart,
            |name| headers::sets_cookie(&parts.headers, name),
            &backend.id,
            tls,
            unix_now,
        ) {
            parts.headers.append(header::SET_COOKIE, v);
        }
        // A draining backend's shoppers should reconnect, so their next requests are
        // spread over the backends that stay. (HTTP/2 has no such header; its streams
        // are spread per request anyway.)
        if !h2 && guard.state() == State::Draining {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Response::from_parts(
            parts,
            Either::Left(GuardedBody {
                inner: body,
                guard: Some(guard),
                conn: conn.map(|c| (self.upstreams.clone(), c)),
                started,
                _admitted: admitted,
                stall: super::stall::Stall::new(self.body_idle_timeout),
            }),
        )
    }
}

/// What a response body holds on to until it has been sent: the backend's in-flight
/// count, the connection it arrives on, and the request's room under the shedding limit.
struct Held {
    guard: InFlight,
    /// Hyper's client connection; the engine's goes with its body.
    conn: Option<Conn>,
    admitted: Option<Admitted>,
}

/// One line on target `surge::access`; the same fields for every answer, refusals
/// included (those have no backend and no duration).
fn log_access<B>(
    conn: &ConnInfo,
    method: &Method,
    uri: &Uri,
    resp: &Response<B>,
    backend: &str,
    started: Option<Instant>,
) {
    let request_id = resp
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    access_line(
        conn,
        method.as_str(),
        uri.path(),
        resp.status().as_u16(),
        backend,
        started,
        request_id,
    );
}

fn upstream_body(body: Option<Bytes>) -> UpstreamBody {
    match body {
        Some(b) => Either::Left(Full::new(b)),
        None => Either::Right(Empty::new()),
    }
}

fn clone_request(copy: &Request<Option<Bytes>>) -> Request<UpstreamBody> {
    let mut req = Request::new(upstream_body(copy.body().clone()));
    *req.method_mut() = copy.method().clone();
    *req.uri_mut() = copy.uri().clone();
    *req.version_mut() = copy.version();
    *req.headers_mut() = copy.headers().clone();
    req
}

impl Forwarder {
    /// The request as the backend's protocol wants it.
    fn upstream_form(
        &self,
        req: Request<UpstreamBody>,
        backend: &Backend,
    ) -> Request<UpstreamBody> {
        match self.upstreams.protocol {
            UpstreamProtocol::Http1 => with_origin_form(req, backend),
            UpstreamProtocol::H2c => with_absolute_form(req, backend),
        }
    }
}

/// HTTP/2 towards the backend: absolute URI (`:scheme` and `:authority` come from it),
/// with the shopper's host as the authority, and no `Host` header beside it.
fn with_absolute_form(mut req: Request<UpstreamBody>, backend: &Backend) -> Request<UpstreamBody> {
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        .or_else(|| req.uri().authority().cloned())
        .or_else(|| http::uri::Authority::try_from(&*backend.authority).ok());
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = authority;
    parts.path_and_query = Some(
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_2;
    req
}

/// Makes the request target origin-form (`/path?query`), as HTTP/1.1 requires towards an
/// origin server. `Host` comes from the shopper's request; an HTTP/2 request carries it
/// as the URI's authority instead, and an HTTP/1.0 one may have none (the backend's then).
fn with_origin_form(mut req: Request<UpstreamBody>, backend: &Backend) -> Request<UpstreamBody> {
    // An absolute-form target's authority replaces any Host (RFC 9112 §3.2.2); HTTP/2's
    // `:authority` becomes the Host an HTTP/1.1 blade expects.
    if let Some(v) = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
    }
    if !req.headers().contains_key(header::HOST) {
        if let Ok(host) = HeaderValue::from_maybe_shared(backend.authority.clone()) {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    *req.version_mut() = http::Version::HTTP_11;
    req
}

/// A blade's answer, with what it came through.
enum Answer {
    /// Hyper's client, and its connection (back to its pool when the body ends).
    Hyper(Conn, Response<Incoming>),
    /// The engine's blade connection (carried by the body).
    Engine(Response<super::h1::bridge::BladeBody>),
}

impl Answer {
    fn status(&self) -> http::StatusCode {
        match self {
            Answer::Hyper(_, r) => r.status(),
            Answer::Engine(r) => r.status(),
        }
    }
}

/// An attempt that failed: what happened, the request if it never left surge, and the
/// words for the shopper's 502.
type Failure = (retry::Attempt, Option<Request<UpstreamBody>>, &'static str);

impl Forwarder {
    /// The request through the engine's blade connections (HTTP/1.1 blades).
    async fn through_engine(
        &self,
        engine: &Rc<super::h1::Engine>,
        target: attempts::Target<'_>,
        idempotent: bool,
        mut parts: http::request::Parts,
        body: Option<Bytes>,
        start: Instant,
    ) -> Result<(InFlight, Answer), ProxyFailure> {
        origin_form(&mut parts);
        let timeout = self.response_timeout;
        attempts::run(
            &self.pool,
            self.response_timeout,
            target,
            idempotent,
            async |backend: &Arc<Backend>| {
                let (resp, sent) =
                    super::h1::bridge::send(engine, backend, &parts, body.as_deref(), timeout)
                        .await?;
                self.answered(backend, resp.status(), sent, start);
                Ok(Answer::Engine(resp))
            },
        )
        .await
    }

    /// The request through hyper's client (h2c blades, `proxy.engine = "hyper"`). A
    /// request that never left surge goes again as it is; after one that may have, only
    /// the copy of an idempotent request does (its body, read already, included).
    async fn through_hyper(
        &self,
        target: attempts::Target<'_>,
        idempotent: bool,
        parts: http::request::Parts,
        body: Option<Bytes>,
        start: Instant,
    ) -> Result<(InFlight, Answer), ProxyFailure> {
        let retry_copy = idempotent.then(|| {
            let mut copy = Request::new(body.clone());
            *copy.method_mut() = parts.method.clone();
            *copy.uri_mut() = parts.uri.clone();
            *copy.version_mut() = parts.version;
            *copy.headers_mut() = parts.headers.clone();
            copy
        });
        let mut pending = Some(Request::from_parts(parts, upstream_body(body)));
        attempts::run(
            &self.pool,
            self.response_timeout,
            target,
            idempotent,
            async |backend: &Arc<Backend>| {
                let req = match (pending.take(), &retry_copy) {
                    (Some(req), _) => req,
                    (None, Some(copy)) => clone_request(copy),
                    // Not reached: `retry::after` sends again only an unsent request or an
                    // idempotent one.
                    (None, None) => {
                        return Err(attempts::Failed {
                            attempt: retry::Attempt::Failed {
                                closed_early: false,
                            },
                            why: "connection error",
                        })
                    }
                };
                match self.send_by_hyper(req, backend).await {
                    Ok((answer, sent)) => {
                        self.answered(backend, answer.status(), sent, start);
                        Ok(answer)
                    }
                    Err((attempt, unsent, why)) => {
                        pending = unsent;
                        Err(attempts::Failed { attempt, why })
                    }
                }
            },
        )
        .await
    }

    /// One attempt through hyper's client.
    async fn send_by_hyper(
        &self,
        req: Request<UpstreamBody>,
        backend: &Backend,
    ) -> Result<(Answer, Instant), Failure> {
        let mut conn = match self.upstreams.checkout(backend.addr).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(backend = &*backend.id, error = %e, "connect failed");
                return Err((
                    retry::Attempt::ConnectFailed,
                    Some(req),
                    "connection failed",
                ));
            }
        };
        let req = self.upstream_form(req, backend);
        let sent = Instant::now();
        let answer =
            tokio::time::timeout(self.response_timeout, conn.sender.try_send_request(req)).await;
        match answer {
            Ok(Ok(resp)) => Ok((Answer::Hyper(conn, resp), sent)),
            Ok(Err(mut e)) => match e.take_message() {
                // Never written: safe to send again, whatever the method.
                Some(unsent) => Err((
                    retry::Attempt::Unsent {
                        reused: conn.reused,
                    },
                    Some(unsent),
                    "connection failed",
                )),
                None => {
                    let e = e.into_error();
                    tracing::debug!(backend = &*backend.id, error = ?e, "backend request failed");
                    Err((
                        retry::Attempt::Failed {
                            closed_early: closed_before_response(&e),
                        },
                        None,
                        short_reason(&e),
                    ))
                }
            },
            Err(_elapsed) => Err((retry::Attempt::TimedOut, None, "timed out")),
        }
    }

    /// A blade answered: its latency, the request's, and the outcome for passive checks.
    fn answered(&self, backend: &Backend, status: http::StatusCode, sent: Instant, start: Instant) {
        let now = Instant::now();
        backend
            .latency
            .observe(now.saturating_duration_since(sent), now);
        self.pool
            .traffic
            .latency
            .record(now.saturating_duration_since(start));
        let outcome = if status.is_server_error() {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        self.pool.record(backend, outcome);
    }
}

/// The request's target in origin-form (`/path?query`), as HTTP/1.1 requires towards an
/// origin server, with an absolute-form target's or HTTP/2's authority as its `Host`
/// (RFC 9112 section 3.2.2). A request without any host gets the blade's (see
/// `bridge::send`).
fn origin_form(parts: &mut http::request::Parts) {
    if let Some(v) = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, v);
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path);
    }
    parts.version = http::Version::HTTP_11;
}

/// Whether the connection closed or reset before any response came: the backend may not
/// have processed the request (an idempotent one may then go elsewhere).
fn closed_before_response(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(he) = s.downcast_ref::<hyper::Error>() {
            if he.is_incomplete_message() || he.is_canceled() || he.is_closed() {
                return true;
            }
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

fn short_reason(e: &hyper::Error) -> &'static str {
    if e.is_parse() {
        "invalid HTTP response"
    } else if e.is_incomplete_message() {
        "connection closed before the response was complete"
    } else if e.is_timeout() {
        "timed out"
    } else {
        "connection error"
    }
}

/// Reads `body` whole, at most `limit` bytes, each frame reserved in the budget before it
/// is held (a body of no declared length, chunked or HTTP/2, grows its reservation as it
/// comes instead of after it is all in memory).
async fn collect_within(
    mut body: Incoming,
    limit: u64,
    reserved: &mut super::limits::BodyReservation,
) -> Result<Bytes, Refused> {
    let mut held = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Refused::BadBody)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = (held.len() + data.len()) as u64;
        if len > limit {
            return Err(Refused::BodyTooLarge);
        }
        if !reserved.grow_to(len) {
            return Err(Refused::BodyBudget);
        }
        held.extend_from_slice(&data);
    }
    Ok(held.freeze())
}
