//! The client side of the admin API, for `surge nodes`, `surge drain`, `surge undrain`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

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

    /// Calls `method path` with an optional JSON body; returns the JSON answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{}", self.base, path);
        let uri: Uri = url.parse().map_err(|_| ClientError::Url(url.clone()))?;
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
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
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("{status}: {e}")))?;
        if status.is_success() {
            Ok(value)
        } else {
            Err(ClientError::Api {
                status,
                error: value["error"].as_str().unwrap_or("error").to_owned(),
                detail: value["detail"].as_str().unwrap_or("").to_owned(),
            })
        }
    }

    pub async fn nodes(&self) -> Result<Value, ClientError> {
        self.call(Method::GET, "/v1/nodes", None).await
    }

    pub async fn drain(
        &self,
        id: &str,
        timeout: Option<Duration>,
        force: bool,
    ) -> Result<Value, ClientError> {
        let mut body = serde_json::json!({"force": force});
        if let Some(t) = timeout {
            body["timeout"] = Value::from(humantime::format_duration(t).to_string());
        }
        self.call(Method::POST, &format!("/v1/nodes/{id}/drain"), Some(body))
            .await
    }

    pub async fn undrain(&self, id: &str) -> Result<Value, ClientError> {
        self.call(Method::POST, &format!("/v1/nodes/{id}/undrain"), None)
            .await
    }
}

/// Formats nodes (`GET /v1/nodes` items or one node) as a table for a terminal.
pub fn table(nodes: &[Value]) -> String {
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
                n["id"].as_str().unwrap_or("?").to_owned(),
                n["address"].as_str().unwrap_or("?").to_owned(),
                n["state"].as_str().unwrap_or("?").to_owned(),
                n["weight"].to_string(),
                n["in_flight"].to_string(),
                n["requests"].to_string(),
                format!("{:.2}", n["error_rate"].as_f64().unwrap_or(0.0) * 100.0),
                format!("{:.2}", n["latency_ewma_ms"].as_f64().unwrap_or(0.0)),
                n["drain_deadline"].as_str().unwrap_or("-").to_owned(),
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
