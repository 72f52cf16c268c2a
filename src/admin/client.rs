//! The client side of the admin API, for `surge nodes`, `surge drain`, `surge undrain`.

use std::time::Duration;

use http::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::{DrainRequest, ErrorBody, Node, NodeList};

/// Time allowed for one admin call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("bad admin URL `{0}`")]
    Url(String),
    #[error("the admin API's CA certificate: {0}")]
    Ca(String),
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{status}: {error}: {detail}")]
    Api {
        status: StatusCode,
        error: String,
        detail: String,
    },
    #[error("unexpected answer from the admin API: {0}")]
    Protocol(String),
}

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// A client for `base` (`http://` or `https://`, the latter verified against the
    /// usual public roots).
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self::build(base, token, None).unwrap_or_else(|_| Self {
            base: base.trim_end_matches('/').to_owned(),
            token: None,
            http: reqwest::Client::new(),
        })
    }

    /// A client that also trusts the CA (or self-signed certificate) in `ca_pem`: an
    /// admin API with `admin.tls` and a certificate of the shop's own.
    pub fn with_ca(base: &str, token: Option<String>, ca_pem: &[u8]) -> Result<Self, ClientError> {
        Self::build(base, token, Some(ca_pem))
    }

    fn build(
        base: &str,
        token: Option<String>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ClientError> {
        let mut http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClientError::Ca(e.to_string()))?;
            if certs.is_empty() {
                return Err(ClientError::Ca("no PEM certificate in it".into()));
            }
            for c in certs {
                http = http.add_root_certificate(c);
            }
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.is_empty()),
            http: http.build().map_err(|e| ClientError::Ca(e.to_string()))?,
        })
    }

    /// Calls `method path` with an optional JSON body; returns the answer as the
    /// document type the API documents for it.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{}", self.base, path);
        let parsed = reqwest::Url::parse(&url).map_err(|_| ClientError::Url(url.clone()))?;
        let mut req = self.http.request(method, parsed);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(v) = body {
            req = req.json(v);
        }
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: self.base.clone(),
            reason: error_chain(&e),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        let protocol = |e: serde_json::Error| ClientError::Protocol(format!("{status}: {e}"));
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(protocol)
        } else {
            let body: ErrorBody = serde_json::from_slice(&bytes).map_err(protocol)?;
            Err(ClientError::Api {
                status,
                error: body.error,
                detail: body.detail,
            })
        }
    }

    pub async fn nodes(&self) -> Result<NodeList, ClientError> {
        self.call(Method::GET, "/v1/nodes", None::<&()>).await
    }

    pub async fn drain(
        &self,
        id: &str,
        timeout: Option<Duration>,
        force: bool,
    ) -> Result<Node, ClientError> {
        let body = DrainRequest { timeout, force };
        self.call(Method::POST, &format!("/v1/nodes/{id}/drain"), Some(&body))
            .await
    }

    pub async fn undrain(&self, id: &str) -> Result<Node, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/nodes/{id}/undrain"),
            None::<&()>,
        )
        .await
    }
}

/// An error and its causes on one line (reqwest's own message is only "error sending
/// request"; the cause says "certificate not trusted" or "connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Formats nodes (`GET /v1/nodes` items or one node) as a table for a terminal.
pub fn table(nodes: &[Node]) -> String {
    let header = [
        "ID",
        "ADDRESS",
        "STATE",
        "WEIGHT",
        "IN-FLIGHT",
        "REQUESTS",
        "ERR%",
        "EWMA-MS",
        "DRAIN-DEADLINE",
    ];
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.address.clone(),
                n.state.clone(),
                n.weight.to_string(),
                n.in_flight.to_string(),
                n.requests.to_string(),
                format!("{:.2}", n.error_rate * 100.0),
                format!("{:.2}", n.latency_ewma_ms),
                n.drain_deadline.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}
