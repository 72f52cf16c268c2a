//! `[cluster]`: several surge instances in front of one shop, coordinated through etcd.
//! No section: one standalone process, as in the embedded default.

use std::time::Duration;

use serde::Deserialize;

use super::{is_valid_name, Environment, Problems, NAME_RULE};

/// Shortest lease: below this a busy host's scheduling hiccup loses the leadership.
const MIN_LEASE: Duration = Duration::from_secs(2);
/// Longest lease: a dead leader is replaced only after it expires.
const MAX_LEASE: Duration = Duration::from_secs(300);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCluster {
    etcd: Vec<String>,
    #[serde(default = "default_name")]
    name: String,
    #[serde(default)]
    instance: Option<String>,
    #[serde(default = "default_lease", with = "humantime_serde")]
    lease_ttl: Duration,
}

fn default_name() -> String {
    "surge".into()
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

/// Where the instances meet and who this one is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd endpoints (`http://host:port`).
    pub etcd: Vec<String>,
    /// Key prefix: instances with the same name form one cluster.
    pub name: String,
    /// This instance (default: the host name). The old and new process of a reload or an
    /// upgrade share it.
    pub instance: String,
    /// The lease leadership and published readings hang on: a dead leader is replaced
    /// within it.
    pub lease_ttl: Duration,
}

/// Checks `[cluster]` (keys relative to it).
pub(super) fn validate(f: &FileCluster, env: &Environment, p: &mut Problems) -> ClusterConfig {
    if !cfg!(feature = "cluster") {
        p.bad(
            "etcd",
            "this surge was built without the cluster feature: build it with `cargo build --release --features cluster` (needs protoc), or remove [cluster] to run standalone",
        );
    }
    if f.etcd.is_empty() {
        p.bad(
            "etcd",
            "no endpoints: give at least one, e.g. [\"http://127.0.0.1:2379\"]",
        );
    }
    for (i, e) in f.etcd.iter().enumerate() {
        let ok = e
            .strip_prefix("http://")
            .and_then(|rest| rest.rsplit_once(':'))
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            p.bad(
                &format!("etcd[{i}]"),
                format!("`{e}` is not an endpoint: want http://host:port (TLS to etcd is not supported yet)"),
            );
        }
    }
    if !is_valid_name(&f.name) {
        p.bad("name", NAME_RULE);
    }
    let instance = f.instance.clone().unwrap_or_else(|| env.hostname.clone());
    if !is_valid_name(&instance) {
        p.bad(
            "instance",
            match &f.instance {
                Some(_) => NAME_RULE.to_owned(),
                None => format!("the host name `{instance}` is not a usable instance name ({NAME_RULE}): set cluster.instance"),
            },
        );
    }
    if f.lease_ttl < MIN_LEASE || f.lease_ttl > MAX_LEASE {
        p.bad(
            "lease_ttl",
            format!(
                "must be between {} and {}",
                humantime::format_duration(MIN_LEASE),
                humantime::format_duration(MAX_LEASE)
            ),
        );
    }
    ClusterConfig {
        etcd: f.etcd.clone(),
        name: f.name.clone(),
        instance,
        lease_ttl: f.lease_ttl,
    }
}
