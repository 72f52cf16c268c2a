//! `[provider]`: the bare-metal provider blades are ordered from.

use std::time::Duration;

use serde::Deserialize;

use super::Problems;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileProvider {
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
    #[serde(default = "default_max_retry_after", with = "humantime_serde")]
    max_retry_after: Duration,
    #[serde(default)]
    watch_zones: Vec<String>,
}

fn default_max_retry_after() -> Duration {
    Duration::from_secs(5 * 60)
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
    /// Time allowed for one API call, retries not included.
    pub call_timeout: Duration,
    /// Tries per API call (1 = no retry).
    pub max_attempts: u32,
    /// Longest `Retry-After` honoured (longer ones are cut to this and logged).
    pub max_retry_after: Duration,
    /// Zones not ordered from but watched for servers carrying the pool's tag (a zone
    /// dropped from `zones`): such servers are reported as unmanaged, never released.
    pub watch_zones: Vec<String>,
}

/// Checks `[provider]` (keys relative to it).
pub(super) fn validate(f: &FileProvider, p: &mut Problems) -> ProviderConfig {
    if f.kind != "scaleway" {
        p.bad(
            "kind",
            format!("`{}` is not supported (supported: scaleway)", f.kind),
        );
    }
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
    if f.offer.is_empty() {
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
        secret_key_env: f.secret_key_env.clone(),
        offer: f.offer.clone(),
        os_id: f.os_id.clone(),
        blade_port: f.blade_port,
        call_timeout: f.call_timeout,
        max_attempts: f.max_attempts,
        max_retry_after: f.max_retry_after,
        watch_zones: f.watch_zones.clone(),
    }
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
