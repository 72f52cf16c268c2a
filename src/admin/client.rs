//! The client side of the admin API, for `surge nodes`, `surge drain`, `surge undrain`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
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
    http: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.is_empty()),
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
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
        let uri: Uri = url.parse().map_err(|_| ClientError::Url(url.clone()))?;
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(
                    serde_json::to_vec(v).map_err(|e| ClientError::Protocol(e.to_string()))?,
                )
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| ClientError::Url(format!("{url}: {e}")))?;
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.base.clone(),
            reason,
        };
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
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
