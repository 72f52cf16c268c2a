//! Helpers for end-to-end tests: real blades and a real surge on 127.0.0.1 ports picked at
//! run time, and a small HTTP client.
#![allow(dead_code)]

pub mod browser;
pub mod process;
pub mod scaling;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use surge::blade::{self, BladeConfig, BladeHandle};
use surge::config::Config;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The blade that answered (`x-surge-blade`), or "" when surge answered itself.
    pub fn blade(&self) -> String {
        self.headers
            .get(blade::BLADE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }

    /// Value of cookie `name` set by this response.
    pub fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub async fn send(
    client: &HttpClient,
    method: Method,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<Reply> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned())))?;
    let resp = client.request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

pub async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    send(client, Method::GET, addr, path, &[], "").await
}

/// Starts `n` blades with ids `blade-1`.. on 127.0.0.1:0.
pub async fn blades(n: usize, latency: Duration) -> Vec<BladeHandle> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.push(
            blade::start(BladeConfig {
                id: format!("blade-{i}"),
                listen: ([127, 0, 0, 1], 0).into(),
                latency,
                cpu_work: 0,
                tls: None,
            })
            .await
            .expect("blade starts"),
        );
    }
    out
}

/// A config in front of `blades`, with `extra` TOML appended to the `[pool]` table (so it
/// may set pool keys and then open sub-tables like `[pool.health]`).
pub fn config(blades: &[BladeHandle], pool_extra: &str) -> Config {
    let mut text = String::from(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 2\naccess_log = false\nshutdown_grace = \"5s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    text.push_str("[pool]\n");
    text.push_str(pool_extra);
    text.push('\n');
    for b in blades {
        text.push_str(&format!(
            "[[pool.backends]]\nid = \"{}\"\naddress = \"{}\"\n",
            b.id, b.addr
        ));
    }
    Config::parse(&text, Path::new("test.toml")).expect("test config is valid")
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// A port free on 127.0.0.1 now; also very likely free on 127.0.1.x, where simulated
/// servers' blades listen, so parallel tests do not share blade addresses.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

/// A fresh scratch directory under the system's temporary directory, named for `what`.
pub fn scratch_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "surge-{what}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A CA, and a blade certificate it signs for 127.0.0.1: (CA PEM, blade TLS config).
pub fn blade_pki() -> (String, std::sync::Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca.pem(), std::sync::Arc::new(server))
}

/// Reads one HTTP/1.1 request for a hand-written blade: its head (lowercased, as such
/// blades match on it) and a body of its `Content-Length`; what follows stays in `buf`
/// for the next call. `None` when the connection ends first.
pub async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < end + 4 + length {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[end + 4..end + 4 + length].to_vec();
    buf.drain(..end + 4 + length);
    Some((head, body))
}
