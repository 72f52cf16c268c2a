//! What a request needs to know of the shopper's connection, whatever protocol leg
//! serves it: made once per connection by the worker.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;

use http::header::HeaderValue;

/// What a request needs to know about the shopper's connection; made once per connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The shopper's address as a header value (for `X-Forwarded-For`).
    pub client_ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub proto: &'static str,
    /// Negotiated TLS version and cipher suite, for the access log.
    pub tls: Option<(&'static str, &'static str)>,
    /// Whether the connection speaks HTTP/2 (no `Connection` header allowed).
    pub h2: bool,
    /// Plain listener set to redirect: the `https://` origin to send shoppers to.
    pub redirect_https: Option<Rc<str>>,
    /// `Strict-Transport-Security` value for TLS listeners that send it.
    pub hsts: Option<HeaderValue>,
    /// Requests seen on this connection so far.
    pub requests: Cell<u32>,
    /// When the latest request started (for `proxy.idle_timeout`).
    pub last_request: Cell<std::time::Instant>,
}
