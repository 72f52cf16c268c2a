//! `[admin]`: the operators' API: where it listens, its token, drain defaults.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::listeners::socket_addr;
use super::{Environment, Problems};

/// Longest drain deadline (`pool::drain::MAX_DRAIN_TIMEOUT`; config sits below pool).
pub(super) const MAX_DRAIN: Duration = Duration::from_secs(7 * 24 * 3600);

/// Environment variable that overrides `admin.token` (keeps the secret out of files).
pub const ADMIN_TOKEN_ENV: &str = "SURGE_ADMIN_TOKEN";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileAdmin {
    listen: String,
    token: Option<String>,
    min_in_service: usize,
    #[serde(with = "humantime_serde")]
    default_drain_timeout: Duration,
    hosts: Vec<String>,
    tls: Option<super::listeners::FileTls>,
}

impl Default for FileAdmin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
            token: None,
            min_in_service: 1,
            default_drain_timeout: Duration::from_secs(300),
            hosts: Vec::new(),
            tls: None,
        }
    }
}

/// The operators' API.
#[derive(Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token every route but `/healthz` and `/readyz` requires; from
    /// `SURGE_ADMIN_TOKEN` if set, else `admin.token`. `None` is allowed only on loopback,
    /// and then the API is open to local users, like HAProxy's stats socket.
    pub token: Option<String>,
    /// A drain that would leave fewer in-service nodes than this is refused (409) unless
    /// forced.
    pub min_in_service: usize,
    /// Drain deadline when a request does not give one.
    pub default_drain_timeout: Duration,
    /// Host names (besides IP addresses and `localhost`) a request's `Host` may name:
    /// anything else is refused, which is what stops DNS rebinding.
    pub hosts: Vec<String>,
    /// HTTPS on the admin listener (the same loader and reload as the proxy's): the
    /// token and the pool's state do not cross the network in clear.
    pub tls: Option<super::TlsConfig>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("min_in_service", &self.min_in_service)
            .field("default_drain_timeout", &self.default_drain_timeout)
            .field("hosts", &self.hosts)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Checks `[admin]` (keys relative to it); the token from `env` wins over the file's.
pub(super) fn validate(f: &FileAdmin, env: &Environment, p: &mut Problems) -> AdminConfig {
    let listen = socket_addr(&f.listen, "listen", p);
    if env.admin_token.as_deref() == Some("") {
        p.bad(
            "token",
            format!("{ADMIN_TOKEN_ENV} is set but empty: unset it, or give a token (an empty one is no authentication)"),
        );
    } else if env.admin_token.is_none() && f.token.as_deref() == Some("") {
        p.bad("token", "is empty: remove the key, or give a token");
    }
    let token = env
        .admin_token
        .clone()
        .or_else(|| f.token.clone())
        .filter(|t| !t.is_empty());
    match &token {
        Some(t) if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) => p.bad(
            "token",
            "must be at least 16 printable ASCII characters without spaces",
        ),
        Some(_) => {}
        None if !listen.ip().is_loopback() => p.bad(
            "token",
            format!(
                "required when admin.listen ({listen}) is not a loopback address: set admin.token or {ADMIN_TOKEN_ENV}"
            ),
        ),
        None => {}
    }
    if f.default_drain_timeout.is_zero() {
        p.bad("default_drain_timeout", "must be greater than 0");
    }
    if f.default_drain_timeout > MAX_DRAIN {
        p.bad("default_drain_timeout", "must be at most 7 days");
    }
    for (i, h) in f.hosts.iter().enumerate() {
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            p.bad(
                &format!("hosts[{i}]"),
                format!("`{h}` is not a host name (letters, digits, - and . only, no port)"),
            );
        }
    }
    let tls = f
        .tls
        .as_ref()
        .map(|t| p.within("tls", |p| super::listeners::tls(t, p)));
    AdminConfig {
        tls,
        listen,
        token,
        min_in_service: f.min_in_service,
        default_drain_timeout: f.default_drain_timeout,
        hosts: f.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}
