//! `[pool]`: the backends, how one is picked, cart affinity, health checks, passive
//! ejection and load shedding.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::problems::{is_valid_name, NAME_RULE};
use super::Problems;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePool {
    #[serde(default = "default_pool_name")]
    name: String,
    #[serde(default)]
    algorithm: Algorithm,
    #[serde(default)]
    sticky: Option<FileSticky>,
    #[serde(default = "default_slow_start", with = "humantime_serde")]
    slow_start: Duration,
    #[serde(default)]
    health: FileHealth,
    #[serde(default)]
    ejection: FileEjection,
    #[serde(default)]
    shed: FileShed,
    #[serde(default = "default_node_max_in_flight")]
    node_max_in_flight: u32,
    #[serde(default)]
    protocol: UpstreamProtocol,
    #[serde(default)]
    backends: Vec<FileBackend>,
    #[serde(default)]
    tls: Option<FileUpstreamTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstreamTls {
    ca: std::path::PathBuf,
    #[serde(default)]
    server_name: Option<String>,
}

/// TLS from surge to the blades (shops whose blades are not on a private network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    /// PEM file of the CA (or CAs) the blades' certificates are verified against.
    pub ca: std::path::PathBuf,
    /// The name every blade's certificate must be valid for; `None`: the blade's IP
    /// address (its certificate needs an IP subject alternative name).
    pub server_name: Option<String>,
}

fn default_pool_name() -> String {
    "shop".into()
}

/// Far above what a shop frontend serves at once (the autoscaler's guard is 200), so it
/// never binds in normal running; it stops one client from piling thousands onto a blade.
fn default_node_max_in_flight() -> u32 {
    512
}

fn default_slow_start() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileShed {
    max_in_flight_per_node: u32,
    #[serde(with = "humantime_serde")]
    queue_timeout: Duration,
    #[serde(with = "humantime_serde")]
    admitted_queue_timeout: Duration,
    queue_size: u64,
    priority_prefixes: Vec<String>,
    priority_headroom_percent: u32,
    admitted_reserve_percent: u32,
    admission_cookie: String,
    #[serde(with = "humantime_serde")]
    session_duration: Duration,
}

impl Default for FileShed {
    fn default() -> Self {
        Self {
            max_in_flight_per_node: 0,
            queue_timeout: Duration::from_millis(200),
            admitted_queue_timeout: Duration::from_secs(1),
            queue_size: 1024,
            priority_prefixes: vec!["/checkout".into(), "/cart".into()],
            priority_headroom_percent: 25,
            admitted_reserve_percent: 20,
            admission_cookie: "surge_admit".into(),
            session_duration: Duration::from_secs(30 * 60),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSticky {
    #[serde(default = "default_sticky_cookie")]
    cookie: String,
    #[serde(default = "default_route_cookie")]
    route_cookie: String,
    #[serde(default = "default_route_key_file")]
    route_key_file: PathBuf,
    #[serde(default = "default_route_ttl", with = "humantime_serde")]
    route_ttl: Duration,
}

fn default_route_key_file() -> PathBuf {
    PathBuf::from("data/route.key")
}

fn default_route_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_sticky_cookie() -> String {
    "cart".into()
}

fn default_route_cookie() -> String {
    "surge_route".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileHealth {
    path: String,
    #[serde(with = "humantime_serde")]
    interval: Duration,
    #[serde(with = "humantime_serde")]
    timeout: Duration,
    rise: u32,
    fall: u32,
}

impl Default for FileHealth {
    fn default() -> Self {
        Self {
            path: "/healthz".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileEjection {
    consecutive_failures: u32,
    #[serde(with = "humantime_serde")]
    base_time: Duration,
    #[serde(with = "humantime_serde")]
    max_time: Duration,
    max_percent: u32,
}

impl Default for FileEjection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(300),
            max_percent: 50,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    #[serde(default)]
    id: Option<String>,
    address: String,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Largest weight a backend may have; keeps round-robin sequences short.
pub const MAX_WEIGHT: u32 = 1000;

/// How a pool picks a backend for a request that is not bound to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Power of two random choices, cost = (in-flight + 1) × peak-EWMA latency / weight.
    #[default]
    P2cEwma,
    /// nginx's smooth weighted round robin.
    RoundRobin,
}

/// The protocol surge speaks to a pool's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive connection pools (one request per connection at a time).
    #[default]
    Http1,
    /// HTTP/2 over plain TCP (prior knowledge): one multiplexed connection per backend
    /// per worker.
    H2c,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The pool's name; also the `surge-pool` tag value on ordered servers.
    pub name: String,
    pub algorithm: Algorithm,
    pub sticky: Option<StickyConfig>,
    /// How long a backend entering service takes to ramp from 10% to its full weight.
    pub slow_start: Duration,
    pub health: HealthConfig,
    pub ejection: EjectionConfig,
    /// Load shedding (off when `max_in_flight_per_node` is 0).
    pub shed: ShedConfig,
    /// The waiting room (`[waiting_room]`, top level), with shedding.
    pub waiting_room: Option<super::WaitingRoomConfig>,
    /// Requests one node may have in flight; beyond it selection skips the node (a cart
    /// bound to it gets 503 + `Retry-After` instead of moving). 0: no ceiling.
    pub node_max_in_flight: u32,
    /// HTTP/1.1 or h2c to the backends.
    pub protocol: UpstreamProtocol,
    pub backends: Vec<BackendSpec>,
    /// HTTPS to the blades, verified against a CA; `None`: plain HTTP.
    pub tls: Option<UpstreamTlsConfig>,
}

/// Environment variable holding the route cookie key (shared by a cluster's instances).
pub const ROUTE_KEY_ENV: &str = "SURGE_ROUTE_KEY";
/// Environment variable holding the previous route cookie key, during a rotation.
pub const ROUTE_KEY_PREVIOUS_ENV: &str = "SURGE_ROUTE_KEY_PREVIOUS";
/// Shortest route cookie key.
const ROUTE_KEY_MIN: usize = 32;

/// Cart affinity: which cookie identifies a shopper's session.
#[derive(Debug, Clone)]
pub struct StickyConfig {
    /// Cookie set by the frontend that names the cart (`cart`).
    pub cookie: String,
    /// Cookie surge sets to remember which backend holds the cart (signed).
    pub route_cookie: String,
    /// The key route cookies are signed with, from `SURGE_ROUTE_KEY`; `None`: the key in
    /// `route_key_file` (made at first start).
    pub route_key: Option<Vec<u8>>,
    /// The key before the current one (`SURGE_ROUTE_KEY_PREVIOUS`), still accepted.
    pub route_key_previous: Option<Vec<u8>>,
    pub route_key_file: PathBuf,
    /// How long a route cookie binds a cart.
    pub route_ttl: Duration,
}

/// Active HTTP health checks.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Path probed with `GET`; any 2xx is healthy.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a backend (back) into service.
    pub rise: u32,
    /// Consecutive failures that take a backend out of service.
    pub fall: u32,
}

/// Passive ejection of backends that fail real requests (Envoy's outlier detection).
#[derive(Debug, Clone)]
pub struct EjectionConfig {
    /// Consecutive connect errors or 5xx responses that eject a backend; 0 disables.
    pub consecutive_failures: u32,
    /// First ejection lasts this long; each further one lasts one more `base_time`.
    pub base_time: Duration,
    /// Cap on one ejection's length.
    pub max_time: Duration,
    /// Never eject when this share of the pool (percent) or more is already down.
    pub max_percent: u32,
}

/// Shedding settings.
#[derive(Debug, Clone)]
pub struct ShedConfig {
    /// Requests in flight per in-service node before new ones wait (0: never shed).
    pub max_in_flight_per_node: u32,
    /// Longest a newcomer's request waits for room before it is shed.
    pub queue_timeout: Duration,
    /// Longest the request of a shopper already in waits for room: a refused page of a
    /// shopper who is in is a failed visit (a lost cart), a second's wait is not.
    pub admitted_queue_timeout: Duration,
    /// Requests waiting at once; beyond it, shed at once.
    pub queue_size: u64,
    /// Path prefixes that get priority (cart, checkout).
    pub priority_prefixes: Vec<String>,
    /// Extra room above the limit for priority requests, in percent.
    pub priority_headroom_percent: u32,
    /// Share of the limit, in percent, kept for shoppers already in (a cart, or the
    /// admission cookie): a newcomer is admitted only below the rest.
    pub admitted_reserve_percent: u32,
    /// Cookie surge sets on a newcomer's first admitted request (signed, HttpOnly).
    pub admission_cookie: String,
    /// How long the admission cookie keeps a shopper "in" (renewed past half of it).
    pub session_duration: Duration,
}

/// One backend named in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub id: String,
    pub addr: SocketAddr,
    pub weight: u32,
}

/// Checks `[pool]` (keys relative to it). `other_sources`: whether backends also come
/// from elsewhere (demo blades, a provider), so that an empty `backends` list is fine.
pub(super) fn validate(
    f: &FilePool,
    other_sources: bool,
    env: &super::Environment,
    p: &mut Problems,
) -> PoolConfig {
    if !is_valid_name(&f.name) {
        p.bad("name", format!("`{}` {NAME_RULE}", f.name));
    }
    let sticky = f
        .sticky
        .as_ref()
        .map(|s| p.within("sticky", |p| sticky(s, env, p)));
    let health = p.within("health", |p| health(&f.health, p));
    let ejection = p.within("ejection", |p| ejection(&f.ejection, p));
    let shed = p.within("shed", |p| shed(&f.shed, p));
    if f.backends.is_empty() && !other_sources {
        p.bad(
            "backends",
            "no backends: list at least one [[pool.backends]], set local_blades.count, or configure [provider]",
        );
    }
    let backends = backends(&f.backends, p);
    let tls = f.tls.as_ref().map(|t| {
        p.within("tls", |p| {
            match (env.read_file)(&t.ca) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => {}
                Ok(_) => p.bad("ca", format!("{} holds no PEM certificate", t.ca.display())),
                Err(e) => p.bad("ca", format!("cannot read {}: {e}", t.ca.display())),
            }
            if f.protocol == UpstreamProtocol::H2c {
                p.bad(
                    "",
                    "TLS to the blades speaks HTTP/1.1; h2c is HTTP/2 in clear text",
                );
            }
            if let Some(name) = &t.server_name {
                if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                    p.bad(
                        "server_name",
                        format!("`{name}` is not a DNS name or an IP address"),
                    );
                }
            }
            UpstreamTlsConfig {
                ca: t.ca.clone(),
                server_name: t.server_name.clone(),
            }
        })
    });
    PoolConfig {
        tls,
        name: f.name.clone(),
        algorithm: f.algorithm,
        sticky,
        slow_start: f.slow_start,
        health,
        ejection,
        shed,
        waiting_room: None,
        node_max_in_flight: f.node_max_in_flight,
        protocol: f.protocol,
        backends,
    }
}

fn sticky(s: &FileSticky, env: &super::Environment, p: &mut Problems) -> StickyConfig {
    let key = |var: &str, value: &Option<String>, p: &mut Problems| -> Option<Vec<u8>> {
        let v = value.as_ref()?;
        if v.len() < ROUTE_KEY_MIN {
            p.bad(
                "route_key_file",
                format!("{var} is shorter than {ROUTE_KEY_MIN} bytes: give a longer key (e.g. `openssl rand -hex 32`)"),
            );
        }
        Some(v.as_bytes().to_vec())
    };
    let route_key = key(ROUTE_KEY_ENV, &env.route_key, p);
    let route_key_previous = key(ROUTE_KEY_PREVIOUS_ENV, &env.route_key_previous, p);
    if s.route_ttl < Duration::from_secs(60) || s.route_ttl > Duration::from_secs(366 * 24 * 3600) {
        p.bad("route_ttl", "must be between 1m and 366d");
    }
    for (key, name) in [("cookie", &s.cookie), ("route_cookie", &s.route_cookie)] {
        if name.is_empty() || !name.bytes().all(is_cookie_name_byte) {
            p.bad(key, format!("`{name}` is not a valid cookie name"));
        }
    }
    if s.cookie == s.route_cookie {
        let other = p.path("cookie");
        p.bad("route_cookie", format!("must differ from {other}"));
    }
    StickyConfig {
        cookie: s.cookie.clone(),
        route_cookie: s.route_cookie.clone(),
        route_key,
        route_key_previous,
        route_key_file: s.route_key_file.clone(),
        route_ttl: s.route_ttl,
    }
}

/// RFC 6265 cookie-name is an RFC 9110 token.
fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn health(h: &FileHealth, p: &mut Problems) -> HealthConfig {
    if !h.path.starts_with('/') {
        p.bad("path", format!("`{}` must start with /", h.path));
    }
    if h.interval.is_zero() {
        p.bad("interval", "must be greater than 0");
    }
    if h.timeout.is_zero() || h.timeout > h.interval {
        let interval = p.path("interval");
        p.bad(
            "timeout",
            format!(
                "{} must be greater than 0 and at most {interval} ({})",
                humantime::format_duration(h.timeout),
                humantime::format_duration(h.interval)
            ),
        );
    }
    if h.rise == 0 {
        p.bad("rise", "must be at least 1");
    }
    if h.fall == 0 {
        p.bad("fall", "must be at least 1");
    }
    HealthConfig {
        path: h.path.clone(),
        interval: h.interval,
        timeout: h.timeout,
        rise: h.rise,
        fall: h.fall,
    }
}

fn ejection(e: &FileEjection, p: &mut Problems) -> EjectionConfig {
    if e.max_percent > 100 {
        p.bad("max_percent", format!("{} is more than 100", e.max_percent));
    }
    if e.consecutive_failures > 0 && (e.base_time.is_zero() || e.max_time < e.base_time) {
        p.bad("max_time", "base_time must be > 0 and max_time ≥ base_time");
    }
    EjectionConfig {
        consecutive_failures: e.consecutive_failures,
        base_time: e.base_time,
        max_time: e.max_time,
        max_percent: e.max_percent,
    }
}

fn shed(s: &FileShed, p: &mut Problems) -> ShedConfig {
    for (i, prefix) in s.priority_prefixes.iter().enumerate() {
        if !prefix.starts_with('/') {
            p.bad(
                &format!("priority_prefixes[{i}]"),
                format!("`{prefix}` must start with /"),
            );
        }
    }
    if s.admitted_reserve_percent > 90 {
        p.bad(
            "admitted_reserve_percent",
            format!(
                "{} is above 90: newcomers would never get in",
                s.admitted_reserve_percent
            ),
        );
    }
    if s.admission_cookie.is_empty() || !s.admission_cookie.bytes().all(is_cookie_name_byte) {
        p.bad(
            "admission_cookie",
            format!("`{}` is not a cookie name", s.admission_cookie),
        );
    }
    if s.session_duration < Duration::from_secs(60) {
        p.bad("session_duration", "must be at least 1m");
    }
    ShedConfig {
        max_in_flight_per_node: s.max_in_flight_per_node,
        queue_timeout: s.queue_timeout,
        admitted_queue_timeout: s.admitted_queue_timeout.max(s.queue_timeout),
        queue_size: s.queue_size,
        priority_prefixes: s.priority_prefixes.clone(),
        priority_headroom_percent: s.priority_headroom_percent,
        admitted_reserve_percent: s.admitted_reserve_percent,
        admission_cookie: s.admission_cookie.clone(),
        session_duration: s.session_duration,
    }
}

fn backends(list: &[FileBackend], p: &mut Problems) -> Vec<BackendSpec> {
    let mut out = Vec::with_capacity(list.len());
    let mut seen_addr = HashSet::new();
    let mut seen_id = HashSet::new();
    for (i, b) in list.iter().enumerate() {
        let spec = p.within(&format!("backends[{i}]"), |p| {
            let Ok(addr) = b.address.parse::<SocketAddr>() else {
                p.bad(
                    "address",
                    format!("`{}` is not an IP:port address", b.address),
                );
                return None;
            };
            if !seen_addr.insert(addr) {
                p.bad("address", format!("duplicate address {addr}"));
            }
            if b.weight == 0 || b.weight > MAX_WEIGHT {
                p.bad(
                    "weight",
                    format!("{} is outside 1..={MAX_WEIGHT}", b.weight),
                );
            }
            let id = b.id.clone().unwrap_or_else(|| format!("static-{i}"));
            if !is_valid_name(&id) {
                p.bad("id", format!("`{id}` {NAME_RULE}"));
            }
            if !seen_id.insert(id.clone()) {
                p.bad("id", format!("duplicate id `{id}`"));
            }
            Some(BackendSpec {
                id,
                addr,
                weight: b.weight,
            })
        });
        out.extend(spec);
    }
    out
}
