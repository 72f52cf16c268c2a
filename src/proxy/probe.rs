//! Active health probes over the proxy's own HTTP client, handed to `pool::health` so
//! that the pool does not depend on the HTTP engine.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::pool::health::{ProbeError, Prober};

/// Probes with `GET {path}`; any 2xx within the timeout is healthy. Over HTTPS when the
/// pool's blades speak it (`[pool.tls]`), verified as requests are.
#[derive(Debug, Clone)]
pub struct HttpProber {
    client: Client<HttpConnector, Empty<Bytes>>,
    tls: Option<super::tls::UpstreamTls>,
}

impl HttpProber {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(connector);
        Self { client, tls: None }
    }

    /// Probes over HTTPS with `tls` (a new connection per probe: a few per interval).
    pub fn with_tls(mut self, tls: Option<super::tls::UpstreamTls>) -> Self {
        self.tls = tls;
        self
    }

    /// One probe over HTTPS.
    async fn probe_tls(
        tls: &super::tls::UpstreamTls,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(), ProbeError> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|_| ProbeError::Connect)?;
        let stream = tls
            .connector
            .connect(tls.name_for(addr), stream)
            .await
            .map_err(|e| ProbeError::Request(Box::new(e)))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| ProbeError::Request(Box::new(e)))?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "surge-health")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ProbeError::BadRequest(Box::new(e)))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ProbeError::Request(Box::new(e)))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(ProbeError::Status(status.as_u16()))
        }
    }
}

impl Prober for HttpProber {
    async fn probe(
        &self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<(), ProbeError> {
        if let Some(tls) = &self.tls {
            return match tokio::time::timeout(timeout, Self::probe_tls(tls, addr, path)).await {
                Ok(r) => r,
                Err(_) => Err(ProbeError::Timeout(timeout)),
            };
        }
        let uri: Uri = format!("http://{addr}{path}")
            .parse()
            .map_err(|e| ProbeError::BadRequest(Box::new(e)))?;
        let req = Request::get(uri)
            .header(http::header::USER_AGENT, "surge-health")
            .body(Empty::new())
            .map_err(|e| ProbeError::BadRequest(Box::new(e)))?;
        let check = async {
            let resp = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    ProbeError::Connect
                } else {
                    ProbeError::Request(Box::new(e))
                }
            })?;
            let status = resp.status();
            // Read the body so the connection can be reused for the next probe.
            let _ = resp.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(ProbeError::Status(status.as_u16()))
            }
        };
        match tokio::time::timeout(timeout, check).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(timeout)),
        }
    }
}
