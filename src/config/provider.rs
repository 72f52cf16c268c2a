//! `[provider]`: the bare-metal provider blades are ordered from.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Environment, Problems};

/// Largest user-data surge sends (after rendering); cloud-init payloads beyond this are
/// better fetched by the payload itself.
pub const MAX_USER_DATA_BYTES: usize = 64 * 1024;

/// The variables a user-data template may use.
pub const USER_DATA_VARIABLES: [&str; 5] =
    ["server_name", "pool", "zone", "proxy_address", "blade_port"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileProvider {
    kind: String,
    api_url: String,
    zones: Vec<String>,
    #[serde(default)]
    project_id: String,
    /// `api_key_env` is the same key under MAAS's word for the credential.
    #[serde(default, alias = "api_key_env")]
    secret_key_env: Option<String>,
    #[serde(default)]
    offer: String,
    #[serde(default)]
    os_id: String,
    #[serde(default = "default_blade_port")]
    blade_port: u16,
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    call_timeout: Duration,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
    #[serde(default = "default_max_retry_after", with = "humantime_serde")]
    max_retry_after: Duration,
    #[serde(default)]
    watch_zones: Vec<String>,
    #[serde(default)]
    bootstrap: Option<FileBootstrap>,
    #[serde(default)]
    private_network: Option<String>,
    #[serde(default)]
    public_addresses: bool,
    #[serde(default)]
    maas: Option<FileMaas>,
}

/// `[provider.maas]`: what to allocate from a MAAS region (with `kind = "maas"`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMaas {
    #[serde(default)]
    resource_pool: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    min_cpu_count: Option<u32>,
    #[serde(default)]
    min_memory_mib: Option<u64>,
    #[serde(default = "default_distro_series")]
    distro_series: String,
    #[serde(default)]
    erase_on_release: bool,
}

fn default_distro_series() -> String {
    "noble".into()
}

/// The offer name of a MAAS provider: its resource pool, or this for any pool.
pub const MAAS_ANY_POOL: &str = "ready-machines";

/// MAAS constraints and deployment settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaasSettings {
    pub resource_pool: Option<String>,
    pub tags: Vec<String>,
    pub min_cpu_count: Option<u32>,
    pub min_memory_mib: Option<u64>,
    pub distro_series: String,
    pub erase_on_release: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBootstrap {
    user_data: PathBuf,
    #[serde(default)]
    ssh_key_ids: Vec<String>,
    #[serde(default)]
    proxy_address: Option<String>,
}

/// How ordered servers are installed as shop frontends (cloud-init at first boot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapConfig {
    /// The user-data template (cloud-config or a script), as read from `source`.
    pub user_data: String,
    /// The file it was read from, for messages.
    pub source: PathBuf,
    /// SSH keys (the vendor's key ids) installed for the operator's access.
    pub ssh_key_ids: Vec<String>,
    /// `{{proxy_address}}` in the template: where the frontend should expect surge from.
    pub proxy_address: Option<String>,
}

impl BootstrapConfig {
    /// The user-data for one server: every `{{variable}}` replaced.
    pub fn render(&self, vars: &[(&str, &str)]) -> String {
        let mut out = self.user_data.clone();
        for (k, v) in vars {
            out = out.replace(&format!("{{{{{k}}}}}"), v);
        }
        out
    }
}

/// How surge reaches ordered servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// On their address in this private network (Elastic Metal private network id).
    Private(String),
    /// On their public address: only when configured so (`public_addresses = true`),
    /// and warned about.
    Public,
}

fn default_max_retry_after() -> Duration {
    Duration::from_secs(5 * 60)
}

/// Where the credentials are read from by default, per kind.
fn default_secret_key_env(kind: &str) -> String {
    match kind {
        "maas" => "MAAS_API_KEY".into(),
        _ => "SCW_SECRET_KEY".into(),
    }
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

/// A bare-metal provider to order blades from.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// `scaleway` (Elastic Metal) or `maas` (Canonical MAAS, the shop's own racks).
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
    /// Time allowed for one API call, retries not included.
    pub call_timeout: Duration,
    /// Tries per API call (1 = no retry).
    pub max_attempts: u32,
    /// Longest `Retry-After` honoured (longer ones are cut to this and logged).
    pub max_retry_after: Duration,
    /// Zones not ordered from but watched for servers carrying the pool's tag (a zone
    /// dropped from `zones`): such servers are reported as unmanaged, never released.
    pub watch_zones: Vec<String>,
    /// Cloud-init user-data and SSH keys sent with every order.
    pub bootstrap: Option<BootstrapConfig>,
    /// The network surge reaches the blades on.
    pub reach: Reach,
    /// With `kind = "maas"`: constraints and deployment (`[provider.maas]`).
    pub maas: Option<MaasSettings>,
}

/// Checks `[provider]` (keys relative to it).
pub(super) fn validate(f: &FileProvider, env: &Environment, p: &mut Problems) -> ProviderConfig {
    let is_maas = f.kind == "maas";
    let reach = reach(f, is_maas, p);
    if !matches!(f.kind.as_str(), "scaleway" | "maas") {
        p.bad(
            "kind",
            format!("`{}` is not supported (supported: scaleway, maas)", f.kind),
        );
    }
    let maas = maas_settings(f, is_maas, p);
    let offer = match &maas {
        // The one "offer" of a MAAS zone: its Ready machines in the pool.
        Some(m) => {
            if !f.offer.is_empty() {
                p.bad(
                    "offer",
                    "MAAS sells nothing: give constraints in [provider.maas] (resource_pool, tags, min_cpu_count, min_memory_mib) instead",
                );
            }
            m.resource_pool
                .clone()
                .unwrap_or_else(|| MAAS_ANY_POOL.to_owned())
        }
        None => f.offer.clone(),
    };
    let api_url = match f.api_url.as_str() {
        "sim" => None,
        url if api_url_ok(url) => Some(url.trim_end_matches('/').to_owned()),
        url => {
            p.bad(
                "api_url",
                format!(
                    "`{url}` must be \"sim\", an https:// URL, or http:// to a loopback address"
                ),
            );
            None
        }
    };
    if f.zones.is_empty() {
        p.bad("zones", "list at least one zone");
    }
    for (i, z) in f.watch_zones.iter().enumerate() {
        if f.zones.contains(z) {
            p.bad(
                &format!("watch_zones[{i}]"),
                format!("`{z}` is in provider.zones already"),
            );
        }
    }
    if offer.is_empty() {
        p.bad("offer", "name the offer to order, e.g. EM-A115X-SSD");
    }
    if f.max_attempts == 0 {
        p.bad("max_attempts", "must be at least 1");
    }
    if f.call_timeout.is_zero() {
        p.bad("call_timeout", "must be greater than 0");
    }
    ProviderConfig {
        kind: f.kind.clone(),
        api_url,
        zones: f.zones.clone(),
        project_id: f.project_id.clone(),
        secret_key_env: f
            .secret_key_env
            .clone()
            .unwrap_or_else(|| default_secret_key_env(&f.kind)),
        offer,
        os_id: f.os_id.clone(),
        blade_port: f.blade_port,
        call_timeout: f.call_timeout,
        max_attempts: f.max_attempts,
        max_retry_after: f.max_retry_after,
        watch_zones: f.watch_zones.clone(),
        bootstrap: f
            .bootstrap
            .as_ref()
            .and_then(|b| p.within("bootstrap", |p| bootstrap(b, env, p))),
        reach,
        maas,
    }
}

/// How surge reaches delivered servers: a private network (by id) or their public
/// address; MAAS machines always on their own address.
fn reach(f: &FileProvider, is_maas: bool, p: &mut Problems) -> Reach {
    match (&f.private_network, f.public_addresses) {
        // MAAS machines are on the shop's own networks: reached on their own address.
        (None, _) if is_maas => Reach::Public,
        (Some(_), _) if is_maas => {
            p.bad(
                "private_network",
                "MAAS machines are reached on their own address (the shop's network); remove private_network",
            );
            Reach::Public
        }
        (Some(pn), false) if !pn.is_empty() => Reach::Private(pn.clone()),
        (None, true) => Reach::Public,
        (Some(_), true) => {
            p.bad(
                "public_addresses",
                "give either private_network or public_addresses = true, not both",
            );
            Reach::Public
        }
        _ => {
            p.bad(
                "private_network",
                "name the private network surge reaches the blades on (its id), or set public_addresses = true to reach them on the Internet",
            );
            Reach::Public
        }
    }
}

/// `[provider.maas]`, checked (defaults when MAAS has none; refused for other kinds).
fn maas_settings(f: &FileProvider, is_maas: bool, p: &mut Problems) -> Option<MaasSettings> {
    match (&f.maas, is_maas) {
        (Some(m), true) => Some(p.within("maas", |p| {
            if m.distro_series.is_empty() {
                p.bad("distro_series", "name the OS release to deploy, e.g. noble");
            }
            if m.tags.iter().any(String::is_empty) {
                p.bad("tags", "tags must not be empty");
            }
            MaasSettings {
                resource_pool: m.resource_pool.clone().filter(|r| !r.is_empty()),
                tags: m.tags.clone(),
                min_cpu_count: m.min_cpu_count,
                min_memory_mib: m.min_memory_mib,
                distro_series: m.distro_series.clone(),
                erase_on_release: m.erase_on_release,
            }
        })),
        (None, true) => Some(MaasSettings {
            resource_pool: None,
            tags: Vec::new(),
            min_cpu_count: None,
            min_memory_mib: None,
            distro_series: default_distro_series(),
            erase_on_release: false,
        }),
        (Some(_), false) => {
            p.bad("maas", "only with kind = \"maas\"");
            None
        }
        (None, false) => None,
    }
}

/// Reads and checks the user-data template: present, not too big, every `{{variable}}`
/// one surge knows.
fn bootstrap(b: &FileBootstrap, env: &Environment, p: &mut Problems) -> Option<BootstrapConfig> {
    let text = match (env.read_file)(&b.user_data) {
        Ok(t) => t,
        Err(e) => {
            p.bad(
                "user_data",
                format!("cannot read {}: {e}", b.user_data.display()),
            );
            return None;
        }
    };
    if text.len() > MAX_USER_DATA_BYTES - 1024 {
        p.bad(
            "user_data",
            format!(
                "{} is {} bytes; at most {} (less 1 KiB for the variables)",
                b.user_data.display(),
                text.len(),
                MAX_USER_DATA_BYTES
            ),
        );
    }
    let mut rest = text.as_str();
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        let name = after[..end].trim();
        if !USER_DATA_VARIABLES.contains(&name) {
            p.bad(
                "user_data",
                format!(
                    "{}: unknown variable `{{{{{name}}}}}` (known: {})",
                    b.user_data.display(),
                    USER_DATA_VARIABLES.join(", ")
                ),
            );
        }
        rest = &after[end + 2..];
    }
    for (i, k) in b.ssh_key_ids.iter().enumerate() {
        if k.is_empty() {
            p.bad(&format!("ssh_key_ids[{i}]"), "must not be empty");
        }
    }
    Some(BootstrapConfig {
        user_data: text,
        source: b.user_data.clone(),
        ssh_key_ids: b.ssh_key_ids.clone(),
        proxy_address: b.proxy_address.clone(),
    })
}

/// Whether `url` is an absolute `https://` URL, or `http://` to a loopback address (the
/// simulator): parsed, not matched by prefix (`http://127.evil.example` is no loopback).
fn api_url_ok(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return false;
    };
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    uri.query().is_none() && (scheme == "https" || (scheme == "http" && loopback))
}

#[cfg(test)]
mod tests {
    use super::api_url_ok;

    #[test]
    fn api_urls_are_parsed_not_prefix_matched() {
        for ok in [
            "https://api.scaleway.com",
            "http://127.0.0.1:9000",
            "http://localhost:8080",
            "http://[::1]:9000",
        ] {
            assert!(api_url_ok(ok), "{ok}");
        }
        for bad in [
            "http://127.evil.example",
            "http://127.0.0.1.evil.example",
            "http://api.scaleway.com",
            "ftp://127.0.0.1",
            "https://",
            "api.scaleway.com",
        ] {
            assert!(!api_url_ok(bad), "{bad}");
        }
    }
}
