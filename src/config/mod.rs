//! Configuration: the TOML file structs, and validation that turns them into the typed
//! [`Config`] the rest of surge reads.
//!
//! One file per section (`listeners`, `proxy`, `pool`, `admin`, `provider`, `sim`,
//! `autoscale`, `local_blades`, `cluster`): each holds its file structs (exactly what the TOML says),
//! its typed result, and its own `validate`, which records every problem it finds in a
//! shared [`Problems`] under the section's key path. This file reads the text, runs the
//! sections in order and turns the problems into one [`ConfigError`] naming file, line,
//! key and reason for each, so an operator fixes a file in one pass.
//!
//! Validation is a pure function of the file's text and an [`Environment`] (the values
//! that may override the file, such as `SURGE_ADMIN_TOKEN`), passed in explicitly.
//!
//! Owns: parsing, every check on values, error messages. Must not: be read by anything
//! but through the typed [`Config`] (no module looks at `File*` structs or raw TOML).

mod admin;
mod autoscale;
mod cluster;
mod listeners;
mod local_blades;
mod pool;
mod problems;
mod provider;
mod proxy;
mod sim;
mod waiting_room;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use admin::{AdminConfig, ADMIN_TOKEN_ENV};
pub use autoscale::{AutoscaleConfig, BudgetConfig, Event, PolicyConfig, ScheduleError, Start};
pub use cluster::ClusterConfig;
pub use listeners::{CertPair, ListenerConfig, SelfSigned, TlsConfig};
pub use local_blades::LocalBlades;
pub use pool::{
    Algorithm, BackendSpec, EjectionConfig, HealthConfig, PoolConfig, ShedConfig, StickyConfig,
    UpstreamProtocol, UpstreamTlsConfig, MAX_WEIGHT, ROUTE_KEY_ENV, ROUTE_KEY_PREVIOUS_ENV,
};
pub use problems::{is_valid_name, Problem, Problems, NAME_RULE};
pub use provider::{BootstrapConfig, MaasSettings, ProviderConfig, Reach, MAAS_ANY_POOL};
pub use proxy::{AccessLogFormat, Engine, ProxyConfig};
pub use sim::SimSettings;
pub use waiting_room::WaitingRoomConfig;

/// The default configuration, compiled into the binary so that `surge serve` runs even
/// when started outside the repository.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/surge.toml");

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
    /// The file parsed but some values are not acceptable; every problem is listed, one
    /// per line.
    #[error("{}", problems::Listing(file, problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

/// Values from outside the file that take precedence over it. Passed in explicitly so
/// that validation depends on nothing but its inputs (and tests need not touch the
/// process environment).
#[derive(Clone)]
pub struct Environment {
    /// `SURGE_ADMIN_TOKEN`: overrides `admin.token`, keeping the secret out of files.
    pub admin_token: Option<String>,
    /// Cores of the machine: `proxy.workers = 0` means one worker per core.
    pub cores: usize,
    /// Reads a file the configuration names (`provider.bootstrap.user_data`).
    pub read_file: fn(&Path) -> std::io::Result<String>,
    /// This host's name: the default `cluster.instance`.
    pub hostname: String,
    /// `SURGE_ROUTE_KEY` and `SURGE_ROUTE_KEY_PREVIOUS`: the route cookie keys.
    pub route_key: Option<String>,
    pub route_key_previous: Option<String>,
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Environment")
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("cores", &self.cores)
            .field("hostname", &self.hostname)
            .field("route_key", &self.route_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Environment {
    /// The overrides this process was started with.
    pub fn from_process() -> Self {
        Self {
            admin_token: std::env::var(ADMIN_TOKEN_ENV).ok(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            read_file: |p| std::fs::read_to_string(p),
            hostname: hostname(),
            route_key: std::env::var(pool::ROUTE_KEY_ENV)
                .ok()
                .filter(|k| !k.is_empty()),
            route_key_previous: std::env::var(pool::ROUTE_KEY_PREVIOUS_ENV)
                .ok()
                .filter(|k| !k.is_empty()),
        }
    }
}

/// The host's name (the kernel's, as `hostname` prints it), or "" when it cannot be read
/// (then `cluster.instance` must be set).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// The whole file, section by section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    proxy: proxy::FileProxy,
    pool: pool::FilePool,
    #[serde(default)]
    admin: admin::FileAdmin,
    #[serde(default)]
    provider: Option<provider::FileProvider>,
    #[serde(default)]
    sim: Option<sim::FileSim>,
    #[serde(default)]
    autoscale: Option<autoscale::FileAutoscale>,
    #[serde(default)]
    local_blades: Option<local_blades::FileLocalBlades>,
    #[serde(default)]
    listeners: Vec<listeners::FileListener>,
    #[serde(default)]
    cluster: Option<cluster::FileCluster>,
    #[serde(default)]
    waiting_room: Option<waiting_room::FileWaitingRoom>,
}

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
    /// Several instances coordinated through etcd (`None`: standalone).
    pub cluster: Option<ClusterConfig>,
}

impl Config {
    /// Reads and validates `path`, with this process's environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` with this process's environment overrides; `path` is
    /// used in messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Self::parse_with(text, path, &Environment::from_process())
    }

    /// Parses and validates `text` with the overrides in `env`: a pure function of its
    /// inputs.
    pub fn parse_with(text: &str, path: &Path, env: &Environment) -> Result<Config, ConfigError> {
        let file = path.to_path_buf();
        let de = toml::Deserializer::new(text);
        let raw: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.span().map_or(0, |s| problems::line_at(text, s.start));
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
        validate(&raw, env, file).map_err(|(file, mut problems)| {
            problems::locate(text, &mut problems);
            ConfigError::Invalid { file, problems }
        })
    }
}

/// Runs every section's checks; either the typed config or every problem found.
fn validate(
    raw: &FileConfig,
    env: &Environment,
    source: PathBuf,
) -> Result<Config, (PathBuf, Vec<Problem>)> {
    let mut problems = Problems::default();
    let listeners = listeners::validate(raw.proxy.listen.as_deref(), &raw.listeners, &mut problems);
    let proxy = problems.within("proxy", |p| {
        proxy::validate(&raw.proxy, listeners, env.cores, p)
    });
    if proxy.trusted_proxies.is_empty() {
        for (i, l) in proxy.listeners.iter().enumerate() {
            if l.proxy_protocol {
                problems.bad(
                    &format!("listeners[{i}].proxy_protocol"),
                    "needs proxy.trusted_proxies: the addresses of the balancers allowed to \
                     send the PROXY header (anyone else could claim any client address)",
                );
            }
        }
    }
    let provider = raw
        .provider
        .as_ref()
        .map(|f| problems.within("provider", |p| provider::validate(f, env, p)));
    let local_blades = raw
        .local_blades
        .as_ref()
        .map(|f| problems.within("local_blades", |p| local_blades::validate(f, p)));
    let mut pool = problems.within("pool", |p| {
        let other_sources =
            local_blades.as_ref().is_some_and(|l| l.count > 0) || provider.is_some();
        pool::validate(&raw.pool, other_sources, env, p)
    });
    let shedding = pool.shed.max_in_flight_per_node > 0;
    pool.waiting_room = raw.waiting_room.as_ref().and_then(|w| {
        problems.within("waiting_room", |p| {
            waiting_room::validate(w, shedding, env, p)
        })
    });
    let admin = problems.within("admin", |p| admin::validate(&raw.admin, env, p));
    let wants_sim = provider.as_ref().is_some_and(|p| p.api_url.is_none());
    let sim = wants_sim.then(|| {
        problems.within("sim", |p| {
            sim::validate(raw.sim.as_ref(), local_blades.as_ref(), p)
        })
    });
    let autoscale = raw.autoscale.as_ref().map(|f| {
        problems.within("autoscale", |p| {
            autoscale::validate(f, provider.as_ref(), p)
        })
    });
    let cluster = raw
        .cluster
        .as_ref()
        .map(|f| problems.within("cluster", |p| cluster::validate(f, env, p)));
    if cluster.is_some() && pool.sticky.as_ref().is_some_and(|s| s.route_key.is_none()) {
        problems.within("pool", |p| {
            p.within("sticky", |p| {
                p.bad(
                    "route_key_file",
                    format!("in a cluster every instance must sign route cookies with one key, or a cart moving to another instance loses its blade: set {} (the same on every instance)", pool::ROUTE_KEY_ENV),
                )
            })
        });
    }
    if !problems.is_empty() {
        return Err((source, problems.into_list()));
    }
    let mut proxy = proxy;
    proxy.upstream_tls = pool.tls.clone();
    Ok(Config {
        source,
        proxy,
        pool,
        admin,
        provider,
        sim,
        autoscale,
        local_blades,
        cluster,
    })
}

#[cfg(test)]
mod tests;
