//! Configuration: the TOML file structs, and `validate()` that turns them into the typed
//! [`Config`] the rest of surge reads.
//!
//! Owns: parsing, every check on values, error messages that name the file, the key path and
//! the reason. Must not: be read by anything but through the typed [`Config`] (no module
//! looks at `File*` structs or raw TOML).

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::str::FromStr;

use chrono::{DateTime, FixedOffset};
use chrono_tz::Tz;
use serde::Deserialize;

/// The default configuration, compiled into the binary so that `surge serve` runs even
/// when started outside the repository.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/surge.toml");

/// Where `surge serve` looks for its configuration when no `--config` is given.
pub const DEFAULT_PATH: &str = "config/surge.toml";

/// Why a configuration could not be loaded. Each variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type or an unknown key.
    #[error("{file}:{line}: {key}: {reason}")]
    Parse {
        file: PathBuf,
        /// 1-based line of the offending value, 0 when unknown.
        line: usize,
        /// Dotted key path, e.g. `pool.health.interval`.
        key: String,
        reason: String,
    },
    /// The file parsed but some values are not acceptable; every problem is listed.
    #[error("{}", Problems(file, problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

/// One semantic problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `pool.backends[1].address`.
    pub key: String,
    pub reason: String,
}

struct Problems<'a>(&'a PathBuf, &'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.1.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}: {}", self.0.display(), p.key, p.reason)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// File structs: exactly what the TOML says, no interpretation.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    proxy: FileProxy,
    pool: FilePool,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    provider: Option<FileProvider>,
    #[serde(default)]
    sim: Option<FileSim>,
    #[serde(default)]
    autoscale: Option<FileAutoscale>,
    #[serde(default)]
    local_blades: Option<FileLocalBlades>,
    #[serde(default)]
    listeners: Vec<FileListener>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListener {
    listen: String,
    #[serde(default)]
    tls: Option<FileTls>,
    #[serde(default)]
    h2c: bool,
    #[serde(default)]
    redirect_https: Option<String>,
    #[serde(default, with = "humantime_serde")]
    hsts: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    #[serde(default)]
    certificates: Vec<FileCert>,
    #[serde(default)]
    self_signed: Option<FileSelfSigned>,
    #[serde(default = "default_watch_interval", with = "humantime_serde")]
    watch_interval: Duration,
}

fn default_watch_interval() -> Duration {
    Duration::from_secs(2)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCert {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSelfSigned {
    dir: PathBuf,
    #[serde(default = "default_self_signed_names")]
    names: Vec<String>,
}

fn default_self_signed_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileAutoscale {
    paused: bool,
    standby: usize,
    min: usize,
    max: usize,
    target_connections_per_node: f64,
    tolerance: f64,
    max_in_flight_per_node: f64,
    #[serde(with = "humantime_serde")]
    max_p99: Duration,
    #[serde(with = "humantime_serde")]
    interval: Duration,
    #[serde(with = "humantime_serde")]
    metrics_window: Duration,
    #[serde(with = "humantime_serde")]
    scale_up_window: Duration,
    #[serde(with = "humantime_serde")]
    scale_down_window: Duration,
    up_percent: f64,
    up_nodes: usize,
    #[serde(with = "humantime_serde")]
    up_period: Duration,
    #[serde(with = "humantime_serde")]
    down_period: Duration,
    #[serde(with = "humantime_serde")]
    drain_timeout: Duration,
    schedule: Vec<FileEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEvent {
    name: String,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(with = "humantime_serde")]
    duration: Duration,
    #[serde(default = "default_lead", with = "humantime_serde")]
    lead: Duration,
    min: usize,
}

fn default_lead() -> Duration {
    Duration::from_secs(15 * 60)
}

impl Default for FileAutoscale {
    fn default() -> Self {
        Self {
            paused: false,
            standby: 0,
            min: 2,
            max: 20,
            target_connections_per_node: 250.0,
            tolerance: 0.1,
            max_in_flight_per_node: 200.0,
            max_p99: Duration::ZERO,
            interval: Duration::from_secs(1),
            metrics_window: Duration::from_secs(10),
            scale_up_window: Duration::ZERO,
            scale_down_window: Duration::from_secs(300),
            up_percent: 100.0,
            up_nodes: 4,
            up_period: Duration::from_secs(15),
            down_period: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(300),
            schedule: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProvider {
    kind: String,
    api_url: String,
    zones: Vec<String>,
    #[serde(default)]
    project_id: String,
    #[serde(default = "default_secret_key_env")]
    secret_key_env: String,
    offer: String,
    #[serde(default)]
    os_id: String,
    #[serde(default = "default_blade_port")]
    blade_port: u16,
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    call_timeout: Duration,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
}

fn default_secret_key_env() -> String {
    "SCW_SECRET_KEY".into()
}
fn default_blade_port() -> u16 {
    80
}
fn default_call_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_attempts() -> u32 {
    5
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileSim {
    listen: String,
    #[serde(with = "humantime_serde")]
    delivery: Duration,
    #[serde(with = "humantime_serde")]
    install: Duration,
    capacity: usize,
    blade_port: u16,
    state_file: Option<PathBuf>,
    spread: f64,
    time_scale: f64,
}

impl Default for FileSim {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            delivery: Duration::from_secs(3),
            install: Duration::from_secs(2),
            capacity: 32,
            blade_port: 18_000,
            state_file: None,
            spread: 0.0,
            time_scale: 1.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileAdmin {
    listen: String,
    token: Option<String>,
    min_in_service: usize,
    #[serde(with = "humantime_serde")]
    default_drain_timeout: Duration,
}

impl Default for FileAdmin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
            token: None,
            min_in_service: 1,
            default_drain_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileProxy {
    listen: Option<String>,
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
    max_header_bytes: usize,
    max_uri_bytes: usize,
    max_headers: usize,
    max_body_bytes: u64,
    #[serde(with = "humantime_serde")]
    body_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    max_requests_per_connection: u32,
    max_connections: usize,
    max_connections_per_ip: usize,
    requests_per_second_per_ip: u32,
    access_log: bool,
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
            max_header_bytes: 16 * 1024,
            max_uri_bytes: 8 * 1024,
            max_headers: 100,
            max_body_bytes: 8 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_requests_per_connection: 1000,
            max_connections: 50_000,
            max_connections_per_ip: 1000,
            requests_per_second_per_ip: 0,
            access_log: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePool {
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
    #[serde(default)]
    protocol: UpstreamProtocol,
    #[serde(default)]
    backends: Vec<FileBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileShed {
    max_in_flight_per_node: u32,
    #[serde(with = "humantime_serde")]
    queue_timeout: Duration,
    queue_size: u64,
    priority_prefixes: Vec<String>,
    priority_headroom_percent: u32,
}

impl Default for FileShed {
    fn default() -> Self {
        Self {
            max_in_flight_per_node: 0,
            queue_timeout: Duration::from_millis(200),
            queue_size: 1024,
            priority_prefixes: vec!["/checkout".into(), "/cart".into()],
            priority_headroom_percent: 25,
        }
    }
}

fn default_pool_name() -> String {
    "shop".into()
}

fn default_slow_start() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSticky {
    #[serde(default = "default_sticky_cookie")]
    cookie: String,
    #[serde(default = "default_route_cookie")]
    route_cookie: String,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLocalBlades {
    count: usize,
    #[serde(default, with = "humantime_serde")]
    latency: Duration,
    #[serde(default)]
    cpu_work: u32,
}

// ---------------------------------------------------------------------------------------
// Typed, validated configuration.
// ---------------------------------------------------------------------------------------

/// A validated configuration. Only [`Config::load`] and [`Config::parse`] make one.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for messages.
    pub source: PathBuf,
    pub proxy: ProxyConfig,
    pub pool: PoolConfig,
    pub admin: AdminConfig,
    /// Where blades are ordered, if anywhere.
    pub provider: Option<ProviderConfig>,
    /// The in-process simulator, when `provider.api_url = "sim"`.
    pub sim: Option<SimSettings>,
    /// The autoscaler (needs `[provider]`).
    pub autoscale: Option<AutoscaleConfig>,
    /// Sample shop frontends the process starts itself on loopback (the demo default).
    pub local_blades: Option<LocalBlades>,
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
    /// Time a shopper's connection may take to send a complete request head; also closes
    /// idle keep-alive connections.
    pub header_read_timeout: Duration,
    /// How long an idle pooled connection to a backend is kept.
    pub upstream_idle_timeout: Duration,
    /// On shutdown, how long in-flight requests are given to finish.
    pub shutdown_grace: Duration,
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
    /// Time a shopper has to send a whole request body; slower gets 408.
    pub body_read_timeout: Duration,
    /// A connection on which no request has started for this long is closed gracefully
    /// (HTTP/2: GOAWAY; requests in progress finish). HTTP/1.1 keep-alive connections
    /// are usually closed sooner, by `header_read_timeout`.
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
    /// One log line per request on target `surge::access`.
    pub access_log: bool,
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
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("min_in_service", &self.min_in_service)
            .field("default_drain_timeout", &self.default_drain_timeout)
            .finish()
    }
}

/// A bare-metal provider to order blades from.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Only `scaleway` (Elastic Metal) so far.
    pub kind: String,
    /// Base URL of the API, or `None` for the in-process simulator (`api_url = "sim"`).
    pub api_url: Option<String>,
    /// Zones in order of preference (the second is the disaster-recovery site).
    pub zones: Vec<String>,
    pub project_id: String,
    /// Environment variable holding the secret key (never the key itself in a file).
    pub secret_key_env: String,
    /// Offer name to order, e.g. `EM-A115X-SSD`.
    pub offer: String,
    pub os_id: String,
    /// Port the shop frontend listens on on each ordered server.
    pub blade_port: u16,
    pub call_timeout: Duration,
    pub max_attempts: u32,
}

/// The autoscaler.
#[derive(Debug, Clone)]
pub struct AutoscaleConfig {
    /// Start paused (the admin API resumes it).
    pub paused: bool,
    /// Warm spare blades kept delivered and healthy at no traffic.
    pub standby: usize,
    pub policy: PolicyConfig,
    /// How often the loop runs (observe, decide, reconcile).
    pub interval: Duration,
    /// Rates are averaged over this window.
    pub metrics_window: Duration,
    /// Deadline for carts bound to a node being scaled in.
    pub drain_timeout: Duration,
    /// Offer to order (from `provider.offer`).
    pub offer: String,
    /// Known events that raise the minimum.
    pub schedule: Vec<Event>,
}

/// The in-process BMaaS simulator.
#[derive(Debug, Clone)]
pub struct SimSettings {
    pub listen: SocketAddr,
    pub delivery: Duration,
    pub install: Duration,
    pub capacity: usize,
    pub blade_port: u16,
    pub state_file: Option<PathBuf>,
    /// Lognormal σ of delivery and install times (0: exact).
    pub spread: f64,
    /// Durations are divided by this.
    pub time_scale: f64,
}

/// Environment variable that overrides `admin.token` (keeps the secret out of files).
pub const ADMIN_TOKEN_ENV: &str = "SURGE_ADMIN_TOKEN";

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

/// One address shoppers connect to.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    /// TLS termination; `None` for plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Plain listeners: accept HTTP/2 with prior knowledge (h2c) besides HTTP/1.1.
    pub h2c: bool,
    /// Plain listeners: answer every request with a 308 to this `https://` origin.
    pub redirect_https: Option<String>,
    /// TLS listeners: `Strict-Transport-Security: max-age=…` on every response.
    pub hsts: Option<Duration>,
}

/// Certificates of a TLS listener. Paths are relative to the working directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// Chosen by SNI (the names each certificate is valid for); the first is the default
    /// for clients that send no name or one no certificate covers.
    pub certificates: Vec<CertPair>,
    /// Generate a self-signed certificate into this folder at first start (demo, tests).
    pub self_signed: Option<SelfSigned>,
    /// How often the files are checked for changes (rotation without a restart).
    pub watch_interval: Duration,
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where a generated self-signed certificate lives and the names it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfSigned {
    pub dir: PathBuf,
    pub names: Vec<String>,
}

/// Cart affinity: which cookie identifies a shopper's session.
#[derive(Debug, Clone)]
pub struct StickyConfig {
    /// Cookie set by the frontend that names the cart (`cart`).
    pub cookie: String,
    /// Cookie surge sets to remember which backend holds the cart.
    pub route_cookie: String,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub algorithm: Algorithm,
    pub sticky: Option<StickyConfig>,
    /// How long a backend entering service takes to ramp from 10% to its full weight.
    pub slow_start: Duration,
    pub health: HealthConfig,
    pub ejection: EjectionConfig,
    /// Load shedding (off when `max_in_flight_per_node` is 0).
    pub shed: ShedConfig,
    /// HTTP/1.1 or h2c to the backends.
    pub protocol: UpstreamProtocol,
    pub backends: Vec<BackendSpec>,
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

/// One backend named in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub id: String,
    pub addr: SocketAddr,
    pub weight: u32,
}

/// Demo frontends started in-process.
#[derive(Debug, Clone)]
pub struct LocalBlades {
    pub count: usize,
    /// Added service time per request.
    pub latency: Duration,
    /// Rounds of hashing per request, to cost CPU like a real frontend.
    pub cpu_work: u32,
}

// --- Typed settings read by `pool`, `autoscale` (they re-export them): defined here so
// that `config`, the lowest floor, imports nothing from above it. ---

/// Shedding settings.
#[derive(Debug, Clone)]
pub struct ShedConfig {
    /// Requests in flight per in-service node before new ones wait (0: never shed).
    pub max_in_flight_per_node: u32,
    /// Longest a request waits for room before it is shed.
    pub queue_timeout: Duration,
    /// Requests waiting at once; beyond it, shed at once.
    pub queue_size: u64,
    /// Path prefixes that get priority (cart, checkout).
    pub priority_prefixes: Vec<String>,
    /// Extra room above the limit for priority requests, in percent.
    pub priority_headroom_percent: u32,
}

/// The policy's knobs.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub min: usize,
    pub max: usize,
    /// New connections per second one in-service node should carry.
    pub target_connections_per_node: f64,
    /// No change while `metric / target` is within `1 ± tolerance`.
    pub tolerance: f64,
    /// Above this many requests in flight per in-service node, scale up regardless.
    pub max_in_flight_per_node: f64,
    /// Above this p99 (request to response head), add a node per decision; `None`: off.
    pub max_p99: Option<Duration>,
    /// Scale up to the lowest recommendation of this window (0: at once).
    pub scale_up_window: Duration,
    /// Scale down only to the highest recommendation of this window.
    pub scale_down_window: Duration,
    /// Per `up_period`, grow by at most max(`up_percent`% of current, `up_nodes`).
    pub up_percent: f64,
    pub up_nodes: usize,
    pub up_period: Duration,
    /// Shrink by at most one node per `down_period`.
    pub down_period: Duration,
}

/// When an event starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// One instant (`2026-11-27T08:00:00+01:00`).
    At(DateTime<FixedOffset>),
    /// Every occurrence of a cron line (`sec min hour day-of-month month day-of-week`)
    /// in a time zone.
    Cron(Box<cron::Schedule>, Tz),
}

/// One scheduled event.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub start: Start,
    /// How long the event lasts from its start.
    pub duration: Duration,
    /// How long before the start the minimum is raised.
    pub lead: Duration,
    /// The minimum while active.
    pub min: usize,
}

/// Why an event line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("`{0}` is not an RFC 3339 time with an offset (e.g. 2026-11-27T08:00:00+01:00)")]
    BadTime(String),
    #[error("`{0}` is not a cron line (sec min hour day month weekday): {1}")]
    BadCron(String, String),
    #[error("`{0}` is not a time zone name (e.g. Europe/Paris)")]
    BadZone(String),
}

impl Start {
    pub fn at(text: &str) -> Result<Self, ScheduleError> {
        DateTime::parse_from_rfc3339(text)
            .map(Start::At)
            .map_err(|_| ScheduleError::BadTime(text.to_owned()))
    }

    pub fn cron(line: &str, zone: &str) -> Result<Self, ScheduleError> {
        let schedule = cron::Schedule::from_str(line)
            .map_err(|e| ScheduleError::BadCron(line.to_owned(), e.to_string()))?;
        let tz = Tz::from_str(zone).map_err(|_| ScheduleError::BadZone(zone.to_owned()))?;
        Ok(Start::Cron(Box::new(schedule), tz))
    }
}

/// Largest weight a backend may have; keeps round-robin sequences short.
pub const MAX_WEIGHT: u32 = 1000;

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is used in messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.to_path_buf();
        let de = toml::Deserializer::new(text);
        let raw: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| {
                    text.as_bytes()[..s.start.min(text.len())]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count()
                        + 1
                })
                .unwrap_or(0);
            ConfigError::Parse {
                file: file.clone(),
                line,
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                reason: inner.message().trim().replace('\n', "; "),
            }
        })?;
        validate(raw, file)
    }
}

fn validate(raw: FileConfig, source: PathBuf) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let mut bad = |key: &str, reason: String| {
        problems.push(Problem {
            key: key.to_string(),
            reason,
        })
    };

    let p = &raw.proxy;
    let mut listeners = Vec::new();
    if raw.listeners.is_empty() {
        let text = p.listen.as_deref().unwrap_or("127.0.0.1:8080");
        let listen = text.parse::<SocketAddr>().unwrap_or_else(|_| {
            bad(
                "proxy.listen",
                format!("`{text}` is not an IP:port address"),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        listeners.push(ListenerConfig {
            listen,
            tls: None,
            h2c: false,
            redirect_https: None,
            hsts: None,
        });
    } else if p.listen.is_some() {
        bad(
            "proxy.listen",
            "give the listeners either as proxy.listen or as [[listeners]], not both".into(),
        );
    }
    let mut seen_addrs = HashSet::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        let key = |k: &str| format!("listeners[{i}].{k}");
        let listen = l.listen.parse::<SocketAddr>().unwrap_or_else(|_| {
            bad(
                &key("listen"),
                format!("`{}` is not an IP:port address", l.listen),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        if listen.port() != 0 && !seen_addrs.insert(listen) {
            bad(&key("listen"), format!("{listen} is listed twice"));
        }
        let tls = l.tls.as_ref().map(|t| {
            if t.certificates.is_empty() && t.self_signed.is_none() {
                bad(
                    &key("tls"),
                    "needs [[listeners.tls.certificates]] (cert and key PEM files) or self_signed"
                        .into(),
                );
            }
            if let Some(ss) = &t.self_signed {
                if ss.names.is_empty() {
                    bad(
                        &key("tls.self_signed.names"),
                        "needs at least one name".into(),
                    );
                }
            }
            if t.watch_interval.is_zero() {
                bad(&key("tls.watch_interval"), "must be greater than 0".into());
            }
            TlsConfig {
                certificates: t
                    .certificates
                    .iter()
                    .map(|c| CertPair {
                        cert: c.cert.clone(),
                        key: c.key.clone(),
                    })
                    .collect(),
                self_signed: t.self_signed.as_ref().map(|s| SelfSigned {
                    dir: s.dir.clone(),
                    names: s.names.clone(),
                }),
                watch_interval: t.watch_interval,
            }
        });
        if tls.is_some() && (l.h2c || l.redirect_https.is_some()) {
            bad(
                &key("tls"),
                "h2c and redirect_https are for plain listeners (TLS listeners speak h2 by ALPN)"
                    .into(),
            );
        }
        if tls.is_none() && l.hsts.is_some() {
            bad(&key("hsts"), "only TLS listeners can send HSTS".into());
        }
        if let Some(r) = &l.redirect_https {
            let ok = r
                .parse::<http::Uri>()
                .ok()
                .filter(|u| u.scheme_str() == Some("https") && u.authority().is_some())
                .is_some_and(|u| u.path() == "/" || u.path().is_empty());
            if !ok {
                bad(
                    &key("redirect_https"),
                    format!("`{r}` must be an https:// origin, e.g. \"https://shop.example\""),
                );
            }
        }
        listeners.push(ListenerConfig {
            listen,
            tls,
            h2c: l.h2c,
            redirect_https: l
                .redirect_https
                .as_ref()
                .map(|r| r.trim_end_matches('/').to_owned()),
            hsts: l.hsts,
        });
    }
    if p.workers > 256 {
        bad("proxy.workers", format!("{} is more than 256", p.workers));
    }
    for (key, d) in [
        ("proxy.connect_timeout", p.connect_timeout),
        ("proxy.response_timeout", p.response_timeout),
        ("proxy.header_read_timeout", p.header_read_timeout),
        ("proxy.upstream_idle_timeout", p.upstream_idle_timeout),
        ("proxy.idle_timeout", p.idle_timeout),
    ] {
        if d.is_zero() {
            bad(key, "must be greater than 0".into());
        }
    }
    if !(8192..=1024 * 1024).contains(&p.max_header_bytes) {
        bad(
            "proxy.max_header_bytes",
            format!("{} is outside 8192..=1048576", p.max_header_bytes),
        );
    }
    if !(256..=p.max_header_bytes).contains(&p.max_uri_bytes) {
        bad(
            "proxy.max_uri_bytes",
            format!(
                "{} is outside 256..=max_header_bytes ({})",
                p.max_uri_bytes, p.max_header_bytes
            ),
        );
    }
    if !(8..=1000).contains(&p.max_headers) {
        bad(
            "proxy.max_headers",
            format!("{} is outside 8..=1000", p.max_headers),
        );
    }
    if p.max_body_bytes > 1 << 30 {
        bad(
            "proxy.max_body_bytes",
            format!(
                "{} is more than 1 GiB (bodies are held in memory)",
                p.max_body_bytes
            ),
        );
    }
    if p.body_read_timeout.is_zero() {
        bad("proxy.body_read_timeout", "must be greater than 0".into());
    }
    if p.max_requests_per_connection == 0 {
        bad(
            "proxy.max_requests_per_connection",
            "must be at least 1".into(),
        );
    }
    if p.max_connections == 0 {
        bad("proxy.max_connections", "must be at least 1".into());
    }

    let pool = &raw.pool;
    if pool.name.is_empty() || !pool.name.bytes().all(is_name_byte) {
        bad(
            "pool.name",
            format!("`{}` must be non-empty and use only a-z 0-9 - _", pool.name),
        );
    }
    let sticky = pool.sticky.as_ref().map(|s| {
        for (key, name) in [
            ("pool.sticky.cookie", &s.cookie),
            ("pool.sticky.route_cookie", &s.route_cookie),
        ] {
            if name.is_empty() || !name.bytes().all(is_cookie_name_byte) {
                bad(key, format!("`{name}` is not a valid cookie name"));
            }
        }
        if s.cookie == s.route_cookie {
            bad(
                "pool.sticky.route_cookie",
                "must differ from pool.sticky.cookie".into(),
            );
        }
        StickyConfig {
            cookie: s.cookie.clone(),
            route_cookie: s.route_cookie.clone(),
        }
    });

    let h = &pool.health;
    if !h.path.starts_with('/') {
        bad(
            "pool.health.path",
            format!("`{}` must start with /", h.path),
        );
    }
    if h.interval.is_zero() {
        bad("pool.health.interval", "must be greater than 0".into());
    }
    if h.timeout.is_zero() || h.timeout > h.interval {
        bad(
            "pool.health.timeout",
            format!(
                "{} must be greater than 0 and at most pool.health.interval ({})",
                humantime::format_duration(h.timeout),
                humantime::format_duration(h.interval)
            ),
        );
    }
    if h.rise == 0 {
        bad("pool.health.rise", "must be at least 1".into());
    }
    if h.fall == 0 {
        bad("pool.health.fall", "must be at least 1".into());
    }
    let e = &pool.ejection;
    if e.max_percent > 100 {
        bad(
            "pool.ejection.max_percent",
            format!("{} is more than 100", e.max_percent),
        );
    }
    if e.consecutive_failures > 0 && (e.base_time.is_zero() || e.max_time < e.base_time) {
        bad(
            "pool.ejection.max_time",
            "base_time must be > 0 and max_time ≥ base_time".into(),
        );
    }

    let a = &raw.admin;
    let admin_listen = a.listen.parse::<SocketAddr>().unwrap_or_else(|_| {
        bad(
            "admin.listen",
            format!("`{}` is not an IP:port address", a.listen),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    });
    let admin_token = std::env::var(ADMIN_TOKEN_ENV)
        .ok()
        .or_else(|| a.token.clone())
        .filter(|t| !t.is_empty());
    if let Some(t) = &admin_token {
        if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            bad(
                "admin.token",
                "must be at least 16 printable ASCII characters without spaces".into(),
            );
        }
    } else if !admin_listen.ip().is_loopback() {
        bad(
            "admin.token",
            format!(
                "required when admin.listen ({admin_listen}) is not a loopback address: set admin.token or {ADMIN_TOKEN_ENV}"
            ),
        );
    }
    if a.default_drain_timeout.is_zero() {
        bad(
            "admin.default_drain_timeout",
            "must be greater than 0".into(),
        );
    }

    let provider = raw.provider.as_ref().map(|p| {
        if p.kind != "scaleway" {
            bad(
                "provider.kind",
                format!("`{}` is not supported (supported: scaleway)", p.kind),
            );
        }
        let api_url = match p.api_url.as_str() {
            "sim" => None,
            url if url.starts_with("https://")
                || url.starts_with("http://127.")
                || url.starts_with("http://localhost") =>
            {
                Some(url.trim_end_matches('/').to_owned())
            }
            url => {
                bad(
                    "provider.api_url",
                    format!("`{url}` must be \"sim\", an https:// URL, or http:// on loopback"),
                );
                None
            }
        };
        if p.zones.is_empty() {
            bad("provider.zones", "list at least one zone".into());
        }
        if p.offer.is_empty() {
            bad(
                "provider.offer",
                "name the offer to order, e.g. EM-A115X-SSD".into(),
            );
        }
        if p.max_attempts == 0 {
            bad("provider.max_attempts", "must be at least 1".into());
        }
        if p.call_timeout.is_zero() {
            bad("provider.call_timeout", "must be greater than 0".into());
        }
        ProviderConfig {
            kind: p.kind.clone(),
            api_url,
            zones: p.zones.clone(),
            project_id: p.project_id.clone(),
            secret_key_env: p.secret_key_env.clone(),
            offer: p.offer.clone(),
            os_id: p.os_id.clone(),
            blade_port: p.blade_port,
            call_timeout: p.call_timeout,
            max_attempts: p.max_attempts,
        }
    });
    let wants_sim = provider.as_ref().is_some_and(|p| p.api_url.is_none());
    let sim = match (&raw.sim, wants_sim) {
        (_, false) => None,
        (file, true) => {
            let default = FileSim::default();
            let f = file.as_ref().unwrap_or(&default);
            let listen = f.listen.parse::<SocketAddr>().unwrap_or_else(|_| {
                bad(
                    "sim.listen",
                    format!("`{}` is not an IP:port address", f.listen),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            });
            if !listen.ip().is_loopback() {
                bad("sim.listen", format!("{listen} is not a loopback address"));
            }
            if !(0.0..=3.0).contains(&f.spread) {
                bad("sim.spread", format!("{} is outside 0..=3", f.spread));
            }
            if !(f.time_scale > 0.0 && f.time_scale.is_finite()) {
                bad(
                    "sim.time_scale",
                    format!("{} must be a positive number", f.time_scale),
                );
            }
            Some(SimSettings {
                listen,
                delivery: f.delivery,
                install: f.install,
                capacity: f.capacity,
                blade_port: f.blade_port,
                state_file: f.state_file.clone(),
                spread: f.spread,
                time_scale: f.time_scale,
            })
        }
    };

    let autoscale = raw.autoscale.as_ref().map(|a| {
        if provider.is_none() {
            bad(
                "autoscale",
                "needs a [provider] to order blades from".into(),
            );
        }
        if a.max == 0 || a.min > a.max {
            bad(
                "autoscale.max",
                format!("must be ≥ 1 and ≥ autoscale.min ({})", a.min),
            );
        }
        if a.target_connections_per_node.is_nan() || a.target_connections_per_node <= 0.0 {
            bad(
                "autoscale.target_connections_per_node",
                "must be greater than 0".into(),
            );
        }
        if !(0.0..1.0).contains(&a.tolerance) {
            bad(
                "autoscale.tolerance",
                format!("{} is outside 0..1", a.tolerance),
            );
        }
        if a.max_in_flight_per_node.is_nan() || a.max_in_flight_per_node <= 0.0 {
            bad(
                "autoscale.max_in_flight_per_node",
                "must be greater than 0".into(),
            );
        }
        for (key, d) in [
            ("autoscale.interval", a.interval),
            ("autoscale.metrics_window", a.metrics_window),
        ] {
            if d.is_zero() {
                bad(key, "must be greater than 0".into());
            }
        }
        let mut schedule = Vec::new();
        for (i, e) in a.schedule.iter().enumerate() {
            let key = format!("autoscale.schedule[{i}]");
            let start = match (&e.at, &e.cron, &e.timezone) {
                (Some(at), None, None) => {
                    Start::at(at).map_err(|err| (format!("{key}.at"), err.to_string()))
                }
                (None, Some(line), Some(zone)) => {
                    Start::cron(line, zone).map_err(|err| (format!("{key}.cron"), err.to_string()))
                }
                (None, Some(_), None) => Err((
                    format!("{key}.timezone"),
                    "a cron line needs a time zone, e.g. Europe/Paris".into(),
                )),
                _ => Err((
                    key.clone(),
                    "give either `at` (RFC 3339) or `cron` with `timezone`".into(),
                )),
            };
            match start {
                Ok(start) => schedule.push(Event {
                    name: e.name.clone(),
                    start,
                    duration: e.duration,
                    lead: e.lead,
                    min: e.min,
                }),
                Err((k, reason)) => bad(&k, reason),
            }
            if e.min > a.max {
                bad(
                    &format!("{key}.min"),
                    format!("{} is above autoscale.max ({})", e.min, a.max),
                );
            }
        }
        AutoscaleConfig {
            schedule,
            paused: a.paused,
            standby: a.standby,
            policy: PolicyConfig {
                min: a.min,
                max: a.max,
                target_connections_per_node: a.target_connections_per_node,
                tolerance: a.tolerance,
                max_in_flight_per_node: a.max_in_flight_per_node,
                max_p99: (!a.max_p99.is_zero()).then_some(a.max_p99),
                scale_up_window: a.scale_up_window,
                scale_down_window: a.scale_down_window,
                up_percent: a.up_percent,
                up_nodes: a.up_nodes,
                up_period: a.up_period,
                down_period: a.down_period,
            },
            interval: a.interval,
            metrics_window: a.metrics_window,
            drain_timeout: a.drain_timeout,
            offer: provider
                .as_ref()
                .map(|p| p.offer.clone())
                .unwrap_or_default(),
        }
    });

    for (i, prefix) in pool.shed.priority_prefixes.iter().enumerate() {
        if !prefix.starts_with('/') {
            bad(
                &format!("pool.shed.priority_prefixes[{i}]"),
                format!("`{prefix}` must start with /"),
            );
        }
    }

    let local_count = raw.local_blades.as_ref().map_or(0, |l| l.count);
    if let Some(l) = &raw.local_blades {
        if l.count > 64 {
            bad("local_blades.count", format!("{} is more than 64", l.count));
        }
    }
    if pool.backends.is_empty() && local_count == 0 && provider.is_none() {
        bad(
            "pool.backends",
            "no backends: list at least one [[pool.backends]], set local_blades.count, or configure [provider]".into(),
        );
    }
    let mut backends = Vec::with_capacity(pool.backends.len());
    let mut seen_addr = HashSet::new();
    let mut seen_id = HashSet::new();
    for (i, b) in pool.backends.iter().enumerate() {
        let key = format!("pool.backends[{i}]");
        let addr = match b.address.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                bad(
                    &format!("{key}.address"),
                    format!("`{}` is not an IP:port address", b.address),
                );
                continue;
            }
        };
        if !seen_addr.insert(addr) {
            bad(
                &format!("{key}.address"),
                format!("duplicate address {addr}"),
            );
        }
        if b.weight == 0 || b.weight > MAX_WEIGHT {
            bad(
                &format!("{key}.weight"),
                format!("{} is outside 1..={MAX_WEIGHT}", b.weight),
            );
        }
        let id = b.id.clone().unwrap_or_else(|| format!("static-{i}"));
        if id.is_empty() || !id.bytes().all(is_name_byte) {
            bad(
                &format!("{key}.id"),
                format!("`{id}` must be non-empty and use only a-z 0-9 - _"),
            );
        }
        if !seen_id.insert(id.clone()) {
            bad(&format!("{key}.id"), format!("duplicate id `{id}`"));
        }
        backends.push(BackendSpec {
            id,
            addr,
            weight: b.weight,
        });
    }

    if !problems.is_empty() {
        return Err(ConfigError::Invalid {
            file: source,
            problems,
        });
    }
    let workers = if p.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        p.workers
    };
    Ok(Config {
        source,
        proxy: ProxyConfig {
            listeners,
            workers,
            connect_timeout: p.connect_timeout,
            response_timeout: p.response_timeout,
            header_read_timeout: p.header_read_timeout,
            upstream_idle_timeout: p.upstream_idle_timeout,
            shutdown_grace: p.shutdown_grace,
            max_header_bytes: p.max_header_bytes,
            max_uri_bytes: p.max_uri_bytes,
            max_headers: p.max_headers,
            max_body_bytes: p.max_body_bytes,
            body_read_timeout: p.body_read_timeout,
            idle_timeout: p.idle_timeout,
            max_requests_per_connection: p.max_requests_per_connection,
            max_connections: p.max_connections,
            max_connections_per_ip: p.max_connections_per_ip,
            requests_per_second_per_ip: p.requests_per_second_per_ip,
            access_log: p.access_log,
        },
        pool: PoolConfig {
            name: pool.name.clone(),
            algorithm: pool.algorithm,
            sticky,
            slow_start: pool.slow_start,
            health: HealthConfig {
                path: h.path.clone(),
                interval: h.interval,
                timeout: h.timeout,
                rise: h.rise,
                fall: h.fall,
            },
            ejection: EjectionConfig {
                consecutive_failures: e.consecutive_failures,
                base_time: e.base_time,
                max_time: e.max_time,
                max_percent: e.max_percent,
            },
            shed: ShedConfig {
                max_in_flight_per_node: pool.shed.max_in_flight_per_node,
                queue_timeout: pool.shed.queue_timeout,
                queue_size: pool.shed.queue_size,
                priority_prefixes: pool.shed.priority_prefixes.clone(),
                priority_headroom_percent: pool.shed.priority_headroom_percent,
            },
            protocol: pool.protocol,
            backends,
        },
        admin: AdminConfig {
            listen: admin_listen,
            token: admin_token,
            min_in_service: a.min_in_service,
            default_drain_timeout: a.default_drain_timeout,
        },
        provider,
        sim,
        autoscale,
        local_blades: raw.local_blades.map(|l| LocalBlades {
            count: l.count,
            latency: l.latency,
            cpu_work: l.cpu_work,
        }),
    })
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
}

/// RFC 6265 cookie-name is an RFC 9110 token.
fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn embedded_default_is_valid() {
        let cfg = parse(EMBEDDED_DEFAULT).expect("embedded default must validate");
        assert_eq!(
            cfg.proxy.listeners[0].listen,
            "127.0.0.1:8080".parse().unwrap()
        );
        assert!(cfg.local_blades.map_or(0, |l| l.count) >= 2);
    }

    #[test]
    fn unknown_key_names_its_path_and_line() {
        let err = parse("[pool]\nname = \"x\"\n[pool.health]\nintervall = \"2s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:4"), "{err}");
        assert!(err.contains("pool.health"), "{err}");
        assert!(err.contains("unknown field `intervall`"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let err = parse(
            "[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n[pool.health]\ninterval = \"2 parsecs\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("pool.health.interval"), "{err}");
    }

    #[test]
    fn every_semantic_problem_is_listed() {
        let err = parse(
            r#"
            [proxy]
            listen = "nowhere"
            [pool]
            [[pool.backends]]
            address = "127.0.0.1:9001"
            [[pool.backends]]
            address = "127.0.0.1:9001"
            weight = 0
            "#,
        )
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("expected Invalid, got {err}");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "proxy.listen",
                "pool.backends[1].address",
                "pool.backends[1].weight"
            ]
        );
        assert_eq!(err.to_string().lines().count(), 3);
    }

    #[test]
    fn a_public_admin_address_needs_a_token() {
        if std::env::var(ADMIN_TOKEN_ENV).is_ok() {
            return; // the environment supplies one
        }
        let err = parse("[admin]\nlisten = \"0.0.0.0:9090\"\n[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.token: required"), "{err}");
        let ok = parse("[admin]\nlisten = \"0.0.0.0:9090\"\ntoken = \"0123456789abcdef0123\"\n[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n");
        assert!(ok.is_ok());
    }

    #[test]
    fn scheduled_events_are_checked() {
        let base = "[pool]\nbackends = [{address = \"127.0.0.1:1\"}]\n[provider]\nkind = \"scaleway\"\napi_url = \"sim\"\nzones = [\"fr-par-2\"]\noffer = \"EM-A115X-SSD\"\n[autoscale]\nmax = 10\n";
        let ok = format!("{base}[[autoscale.schedule]]\nname = \"bf\"\nat = \"2026-11-27T08:00:00+01:00\"\nduration = \"4h\"\nmin = 8\n[[autoscale.schedule]]\nname = \"fri\"\ncron = \"0 0 8 * * Fri\"\ntimezone = \"Europe/Paris\"\nduration = \"1h\"\nmin = 4\n");
        let cfg = parse(&ok).expect("valid schedule");
        assert_eq!(cfg.autoscale.map(|a| a.schedule.len()), Some(2));
        let bad = format!("{base}[[autoscale.schedule]]\nname = \"x\"\ncron = \"0 0 8 * * Fri\"\nduration = \"1h\"\nmin = 40\n");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("autoscale.schedule[0].timezone"), "{err}");
        assert!(
            err.contains("autoscale.schedule[0].min: 40 is above"),
            "{err}"
        );
    }

    #[test]
    fn no_backends_is_refused() {
        let err = parse("[pool]\n").unwrap_err().to_string();
        assert!(err.contains("pool.backends: no backends"), "{err}");
    }
}
