//! `[proxy]`: the shopper-facing request path: workers, timeouts, limits.

use std::time::Duration;

use serde::Deserialize;

use super::{ListenerConfig, Problems};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileProxy {
    pub(super) listen: Option<String>,
    workers: usize,
    #[serde(with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    response_timeout: Duration,
    #[serde(with = "humantime_serde")]
    header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    upstream_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    handover_probation: Duration,
    max_header_bytes: usize,
    max_uri_bytes: usize,
    max_headers: usize,
    max_body_bytes: u64,
    max_buffered_body_bytes: u64,
    #[serde(with = "humantime_serde")]
    body_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    body_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    max_requests_per_connection: u32,
    max_connections: usize,
    max_connections_per_ip: usize,
    requests_per_second_per_ip: u32,
    max_new_connections_per_second_per_ip: u32,
    access_log: bool,
    access_log_format: AccessLogFormat,
    trusted_proxies: Vec<String>,
    engine: Engine,
}

/// Which HTTP/1.1 implementation serves shoppers (HTTP/2 is hyper's either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Surge's own engine (`proxy::h1`): no buffers held by idle connections, nothing
    /// allocated per request, WebSocket tunnelled.
    #[default]
    Surge,
    /// hyper's HTTP/1.1 server and client: a second implementation to fall back on;
    /// to be retired once the engine also carries requests to h2c blades.
    Hyper,
}

/// How access-log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// `key=value` pairs after the time and level, as the rest of the log.
    #[default]
    Text,
    /// One JSON object per line (the same fields, numbers as numbers), for a log
    /// shipper; the rest of the log stays text.
    Json,
}

impl Default for FileProxy {
    fn default() -> Self {
        Self {
            listen: None,
            workers: 0,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            upstream_idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            handover_probation: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_uri_bytes: 8 * 1024,
            max_headers: 100,
            max_body_bytes: 8 * 1024 * 1024,
            max_buffered_body_bytes: 256 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_requests_per_connection: 1000,
            max_connections: 50_000,
            max_connections_per_ip: 1000,
            requests_per_second_per_ip: 0,
            max_new_connections_per_second_per_ip: 0,
            access_log: true,
            access_log_format: AccessLogFormat::Text,
            trusted_proxies: Vec::new(),
            engine: Engine::default(),
        }
    }
}

/// The shopper-facing listener and the upstream request path.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where shoppers connect: `[[listeners]]`, or one plain listener at `proxy.listen`.
    /// Never empty.
    pub listeners: Vec<ListenerConfig>,
    /// Number of worker threads, each with its own single-threaded runtime and its own
    /// `SO_REUSEPORT` listener. Always ≥ 1 here (0 in the file means one per core).
    pub workers: usize,
    /// Time allowed to open a TCP connection to a backend.
    pub connect_timeout: Duration,
    /// Time allowed from sending a request to a backend until its response head arrives.
    pub response_timeout: Duration,
    /// Time a shopper's connection may take to send a complete request head (the first
    /// one from the connection's start; later ones from their first byte on the surge
    /// engine, from the previous answer on hyper's, where it also closes idle keep-alive
    /// connections).
    pub header_read_timeout: Duration,
    /// How long an idle pooled connection to a backend is kept.
    pub upstream_idle_timeout: Duration,
    /// On shutdown, how long in-flight requests are given to finish.
    pub shutdown_grace: Duration,
    /// After a hand-over, how long the old process keeps copies of the sockets and
    /// watches the new one: if it dies within this, the old one serves again.
    pub handover_probation: Duration,
    /// Largest request head (request line + headers) accepted, in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Longest request target accepted, in bytes; longer gets 414.
    pub max_uri_bytes: usize,
    /// Most header fields in one request; more gets 431.
    pub max_headers: usize,
    /// Largest request body, in bytes; larger gets 413. Bodies are read whole before a
    /// backend is picked (like nginx's request buffering), so a slow or malformed body
    /// never ties up or reaches a frontend.
    pub max_body_bytes: u64,
    /// Request bodies held in memory at once, across every connection; beyond it a new
    /// body waits up to a second for room, then gets 503.
    pub max_buffered_body_bytes: u64,
    /// Time a shopper has to send a whole request body; slower gets 408.
    pub body_read_timeout: Duration,
    /// A response body that makes no progress for this long is cut (visibly: a broken
    /// chunked body, a reset stream): a backend that stalls mid-body, or a shopper that
    /// stops reading, cannot hold a backend connection, an in-flight slot or a shed
    /// slot, or keep a drain from finishing.
    pub body_idle_timeout: Duration,
    /// A connection on which no request has started for this long is closed gracefully
    /// (HTTP/2: GOAWAY; requests in progress finish). On the surge engine this is also
    /// how long an HTTP/1.1 keep-alive connection waits for its next request (holding
    /// no buffer meanwhile); on hyper's, `header_read_timeout` closes it sooner.
    pub idle_timeout: Duration,
    /// Requests served on one HTTP/1.1 connection before surge asks the shopper to
    /// reconnect (`Connection: close`), so long-lived connections rebalance over workers.
    pub max_requests_per_connection: u32,
    /// Open shopper connections over all listeners and workers; beyond it new ones are
    /// refused at once (503 on plain listeners, closed on TLS ones).
    pub max_connections: usize,
    /// Open connections from one client address; 0 = no limit.
    pub max_connections_per_ip: usize,
    /// Requests per second from one client address (1-second windows); beyond it 429.
    /// 0 = no limit. Mind shoppers behind a shared NAT or a CDN when setting it.
    pub requests_per_second_per_ip: u32,
    /// New connections per second from one client address (IPv6: its /64); beyond it
    /// refused at accept (a connect/close flood). 0 = no limit.
    pub max_new_connections_per_second_per_ip: u32,
    /// One log line per request on target `surge::access`.
    pub access_log: bool,
    /// Text or JSON lines; read when the process starts (a reload is a new process, so it
    /// takes the new format).
    pub access_log_format: AccessLogFormat,
    /// HTTPS to the blades (`[pool.tls]`, copied here for the request path).
    pub upstream_tls: Option<super::UpstreamTlsConfig>,
    /// Peers (a cloud load balancer, a CDN) whose `X-Forwarded-For` is kept and appended
    /// to; from anyone else it is replaced by the peer's address. Their `Forwarded`,
    /// `X-Forwarded-Host`, `-Port` and `X-Real-IP` pass; anyone else's are dropped
    /// (`headers::CLIENT_CLAIMS`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// HTTP/1.1 engine for shoppers: `surge` (default) or `hyper`. Listeners with h2c and
    /// h2c blades are always served by hyper.
    pub engine: Engine,
}

/// Checks `[proxy]` (keys relative to it) and resolves `workers = 0` to one per core of
/// the `cores` the machine has.
pub(super) fn validate(
    f: &FileProxy,
    listeners: Vec<ListenerConfig>,
    cores: usize,
    p: &mut Problems,
) -> ProxyConfig {
    if f.workers > 256 {
        p.bad("workers", format!("{} is more than 256", f.workers));
    }
    if f.handover_probation > Duration::from_secs(600) {
        p.bad(
            "handover_probation",
            "is more than 10m (the old process lingers that long after every hand-over)",
        );
    }
    for (key, d) in [
        ("connect_timeout", f.connect_timeout),
        ("response_timeout", f.response_timeout),
        ("header_read_timeout", f.header_read_timeout),
        ("upstream_idle_timeout", f.upstream_idle_timeout),
        ("idle_timeout", f.idle_timeout),
        ("body_read_timeout", f.body_read_timeout),
        ("body_idle_timeout", f.body_idle_timeout),
    ] {
        if d.is_zero() {
            p.bad(key, "must be greater than 0");
        }
    }
    if !(8192..=1024 * 1024).contains(&f.max_header_bytes) {
        p.bad(
            "max_header_bytes",
            format!("{} is outside 8192..=1048576", f.max_header_bytes),
        );
    }
    if !(256..=f.max_header_bytes).contains(&f.max_uri_bytes) {
        p.bad(
            "max_uri_bytes",
            format!(
                "{} is outside 256..=max_header_bytes ({})",
                f.max_uri_bytes, f.max_header_bytes
            ),
        );
    }
    if !(8..=1000).contains(&f.max_headers) {
        p.bad(
            "max_headers",
            format!("{} is outside 8..=1000", f.max_headers),
        );
    }
    if f.max_body_bytes > 1 << 30 {
        p.bad(
            "max_body_bytes",
            format!(
                "{} is more than 1 GiB (bodies are held in memory)",
                f.max_body_bytes
            ),
        );
    }
    if f.max_buffered_body_bytes < f.max_body_bytes {
        p.bad(
            "max_buffered_body_bytes",
            format!(
                "{} is less than max_body_bytes ({}): one body would never fit",
                f.max_buffered_body_bytes, f.max_body_bytes
            ),
        );
    }
    if f.max_requests_per_connection == 0 {
        p.bad("max_requests_per_connection", "must be at least 1");
    }
    if f.max_connections == 0 {
        p.bad("max_connections", "must be at least 1");
    }
    let mut trusted_proxies = Vec::new();
    for (i, t) in f.trusted_proxies.iter().enumerate() {
        let net = t
            .parse::<ipnet::IpNet>()
            .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match net {
            Ok(n) => trusted_proxies.push(n.trunc()),
            Err(_) => p.bad(
                &format!("trusted_proxies[{i}]"),
                format!("`{t}` is not an address or a CIDR block (e.g. 10.0.0.0/8, 2001:db8::/32)"),
            ),
        }
    }
    let workers = if f.workers == 0 {
        cores.max(1)
    } else {
        f.workers
    };
    ProxyConfig {
        listeners,
        workers,
        connect_timeout: f.connect_timeout,
        response_timeout: f.response_timeout,
        header_read_timeout: f.header_read_timeout,
        upstream_idle_timeout: f.upstream_idle_timeout,
        shutdown_grace: f.shutdown_grace,
        handover_probation: f.handover_probation,
        max_header_bytes: f.max_header_bytes,
        max_uri_bytes: f.max_uri_bytes,
        max_headers: f.max_headers,
        max_body_bytes: f.max_body_bytes,
        max_buffered_body_bytes: f.max_buffered_body_bytes,
        body_read_timeout: f.body_read_timeout,
        body_idle_timeout: f.body_idle_timeout,
        idle_timeout: f.idle_timeout,
        max_requests_per_connection: f.max_requests_per_connection,
        max_connections: f.max_connections,
        max_connections_per_ip: f.max_connections_per_ip,
        requests_per_second_per_ip: f.requests_per_second_per_ip,
        max_new_connections_per_second_per_ip: f.max_new_connections_per_second_per_ip,
        access_log: f.access_log,
        access_log_format: f.access_log_format,
        upstream_tls: None,
        trusted_proxies,
        engine: f.engine,
    }
}
