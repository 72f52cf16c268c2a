//! `[[listeners]]` (or the one plain `proxy.listen`): where shoppers connect, with TLS.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Problems;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListener {
    listen: String,
    #[serde(default)]
    tls: Option<FileTls>,
    #[serde(default)]
    h2c: bool,
    #[serde(default)]
    redirect_https: Option<String>,
    #[serde(default, with = "humantime_serde")]
    hsts: Option<Duration>,
    #[serde(default)]
    proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
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
    /// Every connection starts with a PROXY protocol header (v1 or v2) naming the real
    /// client, sent by an L4 balancer in `proxy.trusted_proxies`; others are closed.
    pub proxy_protocol: bool,
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

/// Placeholder address for a value that did not parse (the problem is recorded; the
/// config is refused, so it is never bound).
pub(super) const UNPARSED_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Parses `text` as `IP:port`, recording a problem under `key` if it is not one.
pub(super) fn socket_addr(text: &str, key: &str, problems: &mut Problems) -> SocketAddr {
    text.parse().unwrap_or_else(|_| {
        problems.bad(key, format!("`{text}` is not an IP:port address"));
        UNPARSED_ADDR
    })
}

/// The listeners: `[[listeners]]`, or else one plain listener at `proxy.listen`
/// (default `127.0.0.1:8080`). Never empty.
pub(super) fn validate(
    proxy_listen: Option<&str>,
    listeners: &[FileListener],
    problems: &mut Problems,
) -> Vec<ListenerConfig> {
    if listeners.is_empty() {
        let text = proxy_listen.unwrap_or("127.0.0.1:8080");
        return vec![ListenerConfig {
            listen: socket_addr(text, "proxy.listen", problems),
            tls: None,
            h2c: false,
            redirect_https: None,
            hsts: None,
            proxy_protocol: false,
        }];
    }
    if proxy_listen.is_some() {
        problems.bad(
            "proxy.listen",
            "give the listeners either as proxy.listen or as [[listeners]], not both",
        );
    }
    let mut seen = HashSet::new();
    listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            problems.within(&format!("listeners[{i}]"), |p| {
                let listener = one(l, p);
                if listener.listen.port() != 0 && !seen.insert(listener.listen) {
                    p.bad("listen", format!("{} is listed twice", listener.listen));
                }
                listener
            })
        })
        .collect()
}

fn one(l: &FileListener, p: &mut Problems) -> ListenerConfig {
    let listen = socket_addr(&l.listen, "listen", p);
    let tls = l.tls.as_ref().map(|t| p.within("tls", |p| tls(t, p)));
    if tls.is_some() && (l.h2c || l.redirect_https.is_some()) {
        p.bad(
            "tls",
            "h2c and redirect_https are for plain listeners (TLS listeners speak h2 by ALPN)",
        );
    }
    if tls.is_none() && l.hsts.is_some() {
        p.bad("hsts", "only TLS listeners can send HSTS");
    }
    if let Some(r) = &l.redirect_https {
        let ok = r
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme_str() == Some("https") && u.authority().is_some())
            .is_some_and(|u| u.path() == "/" || u.path().is_empty());
        if !ok {
            p.bad(
                "redirect_https",
                format!("`{r}` must be an https:// origin, e.g. \"https://shop.example\""),
            );
        }
    }
    ListenerConfig {
        listen,
        tls,
        h2c: l.h2c,
        redirect_https: l
            .redirect_https
            .as_ref()
            .map(|r| r.trim_end_matches('/').to_owned()),
        hsts: l.hsts,
        proxy_protocol: l.proxy_protocol,
    }
}

/// A `tls` table (a listener's, or the admin API's): certificates or self-signed.
pub(super) fn tls(t: &FileTls, p: &mut Problems) -> TlsConfig {
    if t.certificates.is_empty() && t.self_signed.is_none() {
        p.bad(
            "",
            "needs [[listeners.tls.certificates]] (cert and key PEM files) or self_signed",
        );
    }
    if t.self_signed.as_ref().is_some_and(|s| s.names.is_empty()) {
        p.bad("self_signed.names", "needs at least one name");
    }
    if t.watch_interval.is_zero() {
        p.bad("watch_interval", "must be greater than 0");
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
}
