//! The answers surge writes itself, in its own words: refusals of bad or excessive
//! requests (4xx), its own failures (502/503/504), the shedding page and the HTTPS
//! redirect. One place for their status, text and headers, so they stay consistent.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use super::conn_info::ConnInfo;
use crate::pool::Backend;
use crate::telemetry::names;

/// One of surge's own answers: plain data, written out by whichever protocol leg serves
/// the request.
pub(super) type Own = Response<Full<Bytes>>;

/// One of surge's own short plain-text answers.
pub(super) fn text_response(status: StatusCode, text: Bytes) -> Own {
    let mut resp = Response::new(Full::new(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Why surge refused a shopper's request before any backend saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    RateLimited,
    UriTooLong,
    TooManyHeaders,
    BodyTooLarge,
    BodyTimeout,
    BadBody,
    /// No `Host` on HTTP/1.1, more than one, or one that disagrees with HTTP/2's
    /// `:authority` (RFC 9112 §3.2, RFC 9113 §8.3.1).
    BadHost,
    /// `chunked` applied more than once (RFC 9112 §6.1).
    BadFraming,
    /// The process-wide budget for buffered request bodies is spent.
    BodyBudget,
    /// Not an HTTP/1.x request surge can read (the HTTP/1.1 engine's parser said no).
    Malformed,
    /// The header section did not fit in `proxy.max_header_bytes`.
    HeadTooLarge,
    /// `CONNECT`: surge is a shop's reverse proxy, not a tunnel to anywhere.
    Connect,
    /// A request line of another major HTTP version (`HTTP/2.0`, `HTTP/3.0`): 505, the
    /// answer RFC 9110 §15.6.6 has for it, rather than a 400 that says the client
    /// wrote something wrong.
    Version,
}

/// Surge's own answer to a refused request. All but 429 close an HTTP/1.1 connection:
/// what is left of the request on it cannot be trusted to be framed as announced.
pub(super) fn refusal(why: Refused, conn: &ConnInfo) -> Own {
    let (status, label, text) = match why {
        Refused::RateLimited => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate",
            "429 too many requests from your address; please slow down\n",
        ),
        Refused::UriTooLong => (
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            "414 request target too long\n",
        ),
        Refused::TooManyHeaders => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_many_headers",
            "431 too many header fields\n",
        ),
        Refused::BodyTooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "413 request body too large\n",
        ),
        Refused::BodyTimeout => (
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "408 request body not received in time\n",
        ),
        Refused::BadBody => (
            StatusCode::BAD_REQUEST,
            "bad_body",
            "400 malformed request body\n",
        ),
        Refused::BadHost => (
            StatusCode::BAD_REQUEST,
            "bad_host",
            "400 a request needs exactly one Host, matching its target\n",
        ),
        Refused::BadFraming => (
            StatusCode::BAD_REQUEST,
            "bad_framing",
            "400 Transfer-Encoding applies chunked more than once\n",
        ),
        Refused::BodyBudget => (
            StatusCode::SERVICE_UNAVAILABLE,
            "body_budget",
            "503 too many uploads at once; please retry in a moment\n",
        ),
        Refused::Malformed => (
            StatusCode::BAD_REQUEST,
            "malformed",
            "400 malformed request\n",
        ),
        Refused::HeadTooLarge => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "head_too_large",
            "431 request header section too large\n",
        ),
        Refused::Connect => (
            StatusCode::NOT_IMPLEMENTED,
            "connect",
            "501 CONNECT is not served here\n",
        ),
        Refused::Version => (
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "version",
            "505 HTTP version not supported: this is HTTP/1.1\n",
        ),
    };
    metrics::counter!(names::REQUESTS_REFUSED, "reason" => label).increment(1);
    let mut resp = text_response(status, Bytes::from_static(text.as_bytes()));
    let h = resp.headers_mut();
    if why == Refused::RateLimited {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    } else if !conn.h2 {
        if why == Refused::BodyBudget {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(v) = &conn.hsts {
        h.insert(header::STRICT_TRANSPORT_SECURITY, v.clone());
    }
    resp
}

/// Why surge answered a request itself.
pub(super) enum ProxyFailure {
    /// No backend could take the request.
    NoBackend,
    /// The backend holding the shopper's cart is at its in-flight ceiling.
    NodeBusy,
    /// The backend failed: refused, reset, closed mid-response, or sent garbage.
    Backend(Arc<Backend>, &'static str),
    /// The backend sent no response head in time.
    Timeout(Arc<Backend>, Duration),
}

impl ProxyFailure {
    pub(super) fn backend_id(&self) -> Option<Arc<str>> {
        match self {
            ProxyFailure::NoBackend | ProxyFailure::NodeBusy => None,
            ProxyFailure::Backend(b, _) | ProxyFailure::Timeout(b, _) => Some(b.id.clone()),
        }
    }
}

/// Surge's answer when no backend answered: 503 (none available, with `Retry-After`),
/// 502 (the backend failed) or 504 (it sent no response head in time), with the request
/// id. No backend id: a shopper learns nothing of the pool's nodes (the access log and
/// the warning logged here have it, under the same request id).
pub(super) fn failure(failure: &ProxyFailure, pool: &str, request_id: &HeaderValue) -> Own {
    let rid = request_id.to_str().unwrap_or("-");
    let (status, text) = match failure {
        ProxyFailure::NoBackend => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "503 service unavailable: no backend available in pool `{pool}` (request {rid})\n"
            ),
        ),
        ProxyFailure::NodeBusy => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "503 service unavailable: the shop is very busy; please retry in a moment (request {rid})\n"
            ),
        ),
        ProxyFailure::Backend(b, reason) => {
            tracing::warn!(backend = %b.id, request = rid, reason, "502: the backend failed");
            (
                StatusCode::BAD_GATEWAY,
                format!("502 bad gateway: the shop's frontend failed: {reason} (request {rid})\n"),
            )
        }
        ProxyFailure::Timeout(b, after) => {
            tracing::warn!(backend = %b.id, request = rid, after = %humantime::format_duration(*after), "504: the backend sent no response in time");
            (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "504 gateway timeout: the shop's frontend sent no response within {} (request {rid})\n",
                    humantime::format_duration(*after)
                ),
            )
        }
    };
    let mut resp = text_response(status, Bytes::from(text));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// The page for a request shed while capacity is on its way: 503 with `Retry-After`.
pub(super) fn shed(request_id: &HeaderValue) -> Own {
    let text = format!(
        "503 service unavailable: the shop is very busy; more capacity is on its way, please retry shortly (request {})\n",
        request_id.to_str().unwrap_or("-")
    );
    let mut resp = text_response(StatusCode::SERVICE_UNAVAILABLE, Bytes::from(text));
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    resp
}

/// The built-in waiting page: a shop's calm "you are in line", not an error. `{{place}}`,
/// `{{wait}}` and `{{refresh}}` are filled in; it reloads itself, and between reloads
/// asks [`QUEUE_PATH`] for its place.
pub const DEFAULT_WAITING_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{{refresh}}">
<title>You are in line</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;background:#f6f5f2;color:#222;margin:0;display:flex;min-height:100vh;align-items:center;justify-content:center}
main{background:#fff;border-radius:12px;box-shadow:0 2px 12px rgba(0,0,0,.08);padding:2.5rem 3rem;max-width:28rem;text-align:center}
h1{font-size:1.5rem;margin:0 0 .5rem}
.place{font-size:3rem;font-weight:700;margin:1rem 0 .25rem}
.muted{color:#666}
.bar{height:6px;background:#eee;border-radius:3px;overflow:hidden;margin-top:1.5rem}
.bar span{display:block;height:100%;width:40%;background:#2a7;animation:m 2s ease-in-out infinite}
@keyframes m{0%{margin-left:-40%}100%{margin-left:100%}}
</style></head>
<body><main>
<h1>So many shoppers right now!</h1>
<p class="muted">You are in line and will be let in automatically. Please keep this page open.</p>
<div class="place" id="place">{{place}}</div>
<p class="muted">your place in line &middot; estimated wait <span id="wait">{{wait}}</span></p>
<div class="bar"><span></span></div>
</main>
<script>
setInterval(function(){fetch("/.well-known/surge/queue",{credentials:"same-origin",cache:"no-store"}).then(function(r){return r.json()}).then(function(q){
if(q.ready){location.reload();return}
if(q.place){document.getElementById("place").textContent=q.place;document.getElementById("wait").textContent=q.wait}}).catch(function(){})},2000);
</script>
</body></html>
"#;

/// Where the waiting page asks for its place.
pub const QUEUE_PATH: &str = "/.well-known/surge/queue";

/// A wait, in words a shopper reads.
pub(super) fn wait_words(wait: Option<Duration>) -> String {
    match wait.map(|d| d.as_secs()) {
        None => "a few minutes".into(),
        Some(0..=59) => "less than a minute".into(),
        Some(s) if s < 3600 => format!("about {} minutes", s.div_ceil(60)),
        Some(_) => "more than an hour".into(),
    }
}

/// The waiting page for `place`: 503 (not an answer a cache or crawler keeps) with
/// `Retry-After`, never stored.
pub(super) fn waiting(
    template: Option<&str>,
    place: usize,
    wait: Option<Duration>,
    refresh: Duration,
    ticket_cookie: HeaderValue,
) -> Own {
    let page = template
        .unwrap_or(DEFAULT_WAITING_PAGE)
        .replace("{{place}}", &place.to_string())
        .replace("{{wait}}", &wait_words(wait))
        .replace("{{refresh}}", &refresh.as_secs().to_string());
    let mut resp = Response::new(Full::new(Bytes::from(page)));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&refresh.as_secs().to_string()) {
        h.insert(header::RETRY_AFTER, v);
    }
    h.append(header::SET_COOKIE, ticket_cookie);
    resp
}

/// What the waiting page's poll learns: its place and wait, or that it may come in.
pub(super) fn queue_status(place: Option<(usize, bool)>, wait: Option<Duration>) -> Own {
    let body = match place {
        Some((_, true)) => r#"{"ready":true}"#.to_owned(),
        Some((place, false)) => format!(
            r#"{{"ready":false,"place":{place},"wait":"{}"}}"#,
            wait_words(wait)
        ),
        None => r#"{"ready":false,"place":null}"#.to_owned(),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A 308 to the same path on the HTTPS origin: keeps the method and body (RFC 9110).
pub(super) fn redirect<B>(origin: &str, req: &Request<B>) -> Own {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&format!("{origin}{path}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}
