//! Scaleway Elastic Metal (`/baremetal/v1/zones/{zone}`), over HTTPS with reqwest and
//! rustls. Auth by `X-Auth-Token`. Retries 5xx, timeouts and connection errors with
//! exponential back-off and jitter, waits at least `Retry-After` on 429, and never orders
//! twice: every order carries a `surge-request` tag that a retry looks for first, and an
//! order answered with a 5xx or not at all is looked up by that tag, never sent again.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{self, Retry};
use super::{
    CreateSpec, Device, DeviceState, Listing, Offer, Provider, ProviderError, Stock, POOL_TAG,
    REQUEST_TAG,
};

/// Servers asked for per page when listing (the API's maximum is 100).
const PAGE_SIZE: usize = 100;

/// Most pages read in one listing (100,000 servers): a vendor answering forever is cut.
const MAX_PAGES: usize = 1000;

/// How to reach one zone of Elastic Metal.
#[derive(Clone)]
pub struct ScalewayConfig {
    /// `https://api.scaleway.com` in production; the simulator's URL in the demo and tests.
    pub api_url: String,
    pub zone: String,
    pub project_id: String,
    /// Secret key sent as `X-Auth-Token`.
    pub secret_key: String,
    /// OS image installed on ordered servers.
    pub os_id: String,
    /// Time allowed for one HTTP call.
    pub call_timeout: Duration,
    /// Retries, back-off and the longest `Retry-After` honoured.
    pub retry: Retry,
}

impl std::fmt::Debug for ScalewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScalewayConfig")
            .field("api_url", &self.api_url)
            .field("zone", &self.zone)
            .field("project_id", &self.project_id)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// The Elastic Metal client.
#[derive(Debug, Clone)]
pub struct Scaleway {
    cfg: ScalewayConfig,
    base: String,
    http: reqwest::Client,
}

// --- The vendor's JSON, as documented (unknown fields ignored: the API grows). ---

#[derive(Debug, Deserialize)]
pub struct ApiOffers {
    #[serde(default)]
    pub offers: Vec<ApiOffer>,
    #[serde(default)]
    pub total_count: u64,
}

#[derive(Debug, Deserialize)]
pub struct ApiOffer {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub stock: String,
    #[serde(default)]
    pub price_per_hour: Option<ApiMoney>,
}

#[derive(Debug, Deserialize)]
pub struct ApiMoney {
    #[serde(default)]
    pub units: i64,
    #[serde(default)]
    pub nanos: i64,
}

#[derive(Debug, Deserialize)]
pub struct ApiServers {
    #[serde(default)]
    pub servers: Vec<ApiServer>,
    /// Missing means the listing cannot be checked for completeness.
    #[serde(default)]
    pub total_count: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct ApiServer {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub install: Option<ApiInstall>,
    #[serde(default)]
    pub ips: Vec<ApiIp>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub offer_id: String,
    #[serde(default)]
    pub created_at: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ApiInstall {
    #[serde(default)]
    pub status: String,
}

#[derive(Debug, Deserialize)]
pub struct ApiIp {
    pub address: String,
    #[serde(default)]
    pub version: String,
}

/// `GET /ipam/v1/regions/{region}/ips`: addresses by resource.
#[derive(Debug, Deserialize)]
pub struct ApiIpamIps {
    #[serde(default)]
    pub ips: Vec<ApiIpamIp>,
}

#[derive(Debug, Deserialize)]
pub struct ApiIpamIp {
    /// CIDR notation: `10.12.0.5/22`.
    pub address: String,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    message: String,
    #[serde(default, rename = "type")]
    kind: String,
}

/// Maps Elastic Metal's server and install status onto [`DeviceState`].
pub fn device_state(status: &str, install: Option<&str>) -> DeviceState {
    match status {
        "ordered" | "unknown" | "" => DeviceState::Requested,
        "delivering" | "starting" | "stopping" | "stopped" | "resetting" | "migrating" => {
            DeviceState::Provisioning
        }
        "ready" => match install {
            None | Some("completed") => DeviceState::Ready,
            Some("error") => DeviceState::Failed,
            Some(_) => DeviceState::Installing,
        },
        "deleting" => DeviceState::Deleting,
        // error, out_of_stock, locked and anything new: not usable, to be released.
        _ => DeviceState::Failed,
    }
}

impl From<ApiServer> for Device {
    fn from(s: ApiServer) -> Self {
        let install = s.install.as_ref().map(|i| i.status.as_str());
        let state = device_state(&s.status, install);
        let ip = |version: &str| {
            s.ips
                .iter()
                .filter(|ip| ip.version == version)
                .find_map(|ip| ip.address.parse::<IpAddr>().ok())
        };
        Device {
            vendor_status: match install {
                Some(i) => format!("{}/{}", s.status, i),
                None => s.status.clone(),
            },
            address: ip("IPv4").or_else(|| ip("IPv6")),
            state,
            id: s.id,
            name: s.name,
            tags: s.tags,
            zone: s.zone,
            offer_id: s.offer_id,
            created_at: s
                .created_at
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(std::time::SystemTime::from),
        }
    }
}

impl From<ApiOffer> for Offer {
    fn from(o: ApiOffer) -> Self {
        Offer {
            stock: match o.stock.as_str() {
                "available" => Stock::Available,
                "low" => Stock::Low,
                _ => Stock::Empty,
            },
            price_per_hour: o
                .price_per_hour
                .map(|m| m.units as f64 + m.nanos as f64 / 1e9),
            id: o.id,
            name: o.name,
        }
    }
}

impl Scaleway {
    pub fn new(cfg: ScalewayConfig) -> Result<Self, ProviderError> {
        // No redirects: one would carry X-Auth-Token to wherever it points.
        let http = http::client(cfg.call_timeout)?;
        let base = format!(
            "{}/baremetal/v1/zones/{}",
            cfg.api_url.trim_end_matches('/'),
            cfg.zone
        );
        Ok(Self { cfg, base, http })
    }

    pub fn zone(&self) -> &str {
        &self.cfg.zone
    }

    /// One HTTP exchange on the zone's v1 API; the vendor's answer mapped to a typed error.
    async fn send_once(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, ProviderError> {
        let url = format!("{}{}", self.base, path);
        self.exchange(method, &url, path, query, body).await
    }

    /// [`Scaleway::exchange`] retried while the error says a retry may help, on any URL
    /// of the API (v1, v3, IPAM).
    async fn send_to(
        &self,
        method: Method,
        url: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, ProviderError> {
        self.retry()
            .run(&format!("{method} {path}"), || {
                self.exchange(method.clone(), url, path, query, body)
            })
            .await
    }

    /// One HTTP exchange with `url` (`path` names it in messages).
    async fn exchange(
        &self,
        method: Method,
        url: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, ProviderError> {
        http::counted(
            "scaleway",
            self.answer(method, url, path, query, body).await,
        )
    }

    /// The exchange itself, uncounted.
    async fn answer(
        &self,
        method: Method,
        url: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, ProviderError> {
        let mut req = self
            .http
            .request(method.clone(), url)
            .header("X-Auth-Token", &self.cfg.secret_key)
            .query(query);
        if let Some(b) = body {
            req = req.json(b);
        }
        let call = format!("{method} {path}");
        let (status, retry_after, bytes) = http::exchange(&call, req).await?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                let what = format!("{method} {path}: unreadable answer: {e}");
                // An order that succeeded stands, whatever its answer looked like.
                if method == Method::POST {
                    ProviderError::Uncertain(what)
                } else {
                    ProviderError::Transient(what)
                }
            });
        }
        let err: ApiError = serde_json::from_slice(&bytes).unwrap_or(ApiError {
            message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            kind: String::new(),
        });
        let what = format!(
            "{method} {path}: {} {} ({})",
            status.as_u16(),
            err.message,
            err.kind
        );
        Err(match (status, err.kind.as_str()) {
            (StatusCode::TOO_MANY_REQUESTS, _) => self.retry().rate_limited(retry_after),
            // An order's gateway may fail after the order was taken: only a look-up
            // tells. Other calls are reads or may be repeated.
            (s, _) if s.is_server_error() && method == Method::POST => {
                ProviderError::Uncertain(what)
            }
            (s, _) if s.is_server_error() => ProviderError::Transient(what),
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _)
            | (_, "permissions_denied" | "denied_authentication") => {
                ProviderError::Unauthorized(what)
            }
            (_, "out_of_stock") => ProviderError::OutOfStock(what),
            (_, "quotas_exceeded") => ProviderError::QuotaExceeded(what),
            (StatusCode::NOT_FOUND, _) | (_, "not_found") => ProviderError::NotFound(what),
            _ => ProviderError::Invalid(what),
        })
    }

    /// [`Scaleway::send_once`], retried while the error says a retry may help.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, ProviderError> {
        let url = format!("{}{}", self.base, path);
        self.send_to(method, &url, path, query, body).await
    }

    fn wait_for(&self, attempt: u32, e: &ProviderError) -> Duration {
        self.retry().wait_for(attempt, e)
    }

    /// The body of `POST /servers` for `spec`: tagged with the pool and the order's
    /// request id, which is how an order whose answer was lost is found.
    fn order_body(&self, spec: &CreateSpec) -> Value {
        let mut body = json!({
            "offer_id": spec.offer_id,
            "project_id": self.cfg.project_id,
            "name": spec.name,
            "description": format!("surge pool {}", spec.pool),
            "tags": [format!("{POOL_TAG}={}", spec.pool), format!("{REQUEST_TAG}={}", spec.request_id)],
            "install": {"os_id": self.cfg.os_id, "hostname": spec.name, "ssh_key_ids": spec.ssh_key_ids},
        });
        if let Some(user_data) = &spec.user_data {
            // A bytes field: base64 in the API's JSON.
            body["user_data"] = Value::from(http::base64(user_data.as_bytes()));
        }
        body
    }

    /// The device a previous attempt of this order created, if any.
    async fn find_order(&self, request_id: &str) -> Result<Option<Device>, ProviderError> {
        let found = self.list(&format!("{REQUEST_TAG}={request_id}")).await?;
        Ok(found.into_iter().find(|d| d.state != DeviceState::Gone))
    }
}

impl Scaleway {
    /// Attaches a new server to the configured private network. A failure is logged,
    /// not returned: the order stands, and a server that never gets a private address is
    /// released by the reconciler after its order deadline.
    async fn attach_new(&self, server: &str, spec: &CreateSpec) {
        let Some(network) = &spec.private_network else {
            return;
        };
        if let Err(e) = Provider::attach(self, server, network).await {
            tracing::warn!(server, network, error = %e, "cannot attach the server to the private network yet; retried when it is delivered");
        }
    }

    /// `/baremetal/v3/zones/{zone}{path}` (private networks live in v3 of the API).
    fn v3(&self, path: &str) -> String {
        format!(
            "{}/baremetal/v3/zones/{}{path}",
            self.cfg.api_url.trim_end_matches('/'),
            self.cfg.zone
        )
    }

    /// The zone's region (`fr-par-2` → `fr-par`), for the IPAM API.
    fn region(&self) -> &str {
        self.cfg
            .zone
            .rsplit_once('-')
            .filter(|(_, n)| n.chars().all(|c| c.is_ascii_digit()))
            .map_or(&self.cfg.zone, |(r, _)| r)
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T, ProviderError> {
    serde_json::from_value(v)
        .map_err(|e| ProviderError::Transient(format!("{what}: unexpected answer: {e}")))
}

impl Provider for Scaleway {
    async fn offers(&self) -> Result<Vec<Offer>, ProviderError> {
        let v = self.send(Method::GET, "/offers", &[], None).await?;
        let offers: ApiOffers = parse(v, "GET /offers")?;
        Ok(offers.offers.into_iter().map(Offer::from).collect())
    }

    async fn order_once(&self, spec: &CreateSpec, again: bool) -> Result<Device, ProviderError> {
        if again {
            if let Some(existing) = self.find_order(&spec.request_id).await? {
                tracing::info!(id = %existing.id, request = %spec.request_id, "order already placed; not ordering again");
                return Ok(existing);
            }
        }
        let body = self.order_body(spec);
        let placed = self
            .send_once(Method::POST, "/servers", &[], Some(&body))
            .await
            .and_then(|v| {
                // A success that cannot be read was still a success.
                parse::<ApiServer>(v, "POST /servers")
                    .map_err(|e| ProviderError::Uncertain(e.to_string()))
            });
        let device = match placed {
            Ok(server) => Device::from(server),
            // It may stand. Look for it once; if the vendor's list does not show it (yet:
            // listings lag), say so rather than order again: the caller counts it as on
            // its way until its server shows under the request tag.
            Err(e @ ProviderError::Uncertain(_)) => {
                tokio::time::sleep(self.wait_for(0, &e)).await;
                match self.find_order(&spec.request_id).await {
                    Ok(Some(existing)) => {
                        tracing::info!(id = %existing.id, request = %spec.request_id, "order placed though its answer was lost");
                        existing
                    }
                    _ => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        self.attach_new(&device.id, spec).await;
        Ok(device)
    }

    fn retry(&self) -> Retry {
        self.cfg.retry
    }

    async fn get(&self, id: &str) -> Result<Device, ProviderError> {
        let path = format!("/servers/{id}");
        let v = self.send(Method::GET, &path, &[], None).await?;
        Ok(Device::from(parse::<ApiServer>(v, &path)?))
    }

    async fn list(&self, tag: &str) -> Result<Vec<Device>, ProviderError> {
        Ok(self.inventory(tag).await?.devices)
    }

    async fn inventory(&self, tag: &str) -> Result<Listing, ProviderError> {
        let mut out: Vec<Device> = Vec::new();
        let mut total: Option<u64> = None;
        let mut complete = true;
        for page in 1.. {
            let mut query = vec![
                ("page", page.to_string()),
                ("page_size", PAGE_SIZE.to_string()),
            ];
            if !tag.is_empty() {
                query.push(("tags", tag.to_owned()));
            }
            let v = self.send(Method::GET, "/servers", &query, None).await?;
            let servers: ApiServers = parse(v, "GET /servers")?;
            match (total, servers.total_count) {
                (_, None) => complete = false,
                (None, Some(t)) => total = Some(t),
                (Some(before), Some(t)) if before != t => {
                    // The list changed between pages: a server may have slid past us.
                    complete = false;
                    total = Some(t);
                }
                _ => {}
            }
            let got = servers.servers.len();
            for d in servers.servers.into_iter().map(Device::from) {
                if !out.iter().any(|o| o.id == d.id) {
                    out.push(d);
                }
            }
            if got < PAGE_SIZE || total.is_none_or(|t| out.len() as u64 >= t) || page >= MAX_PAGES {
                break;
            }
        }
        if total.is_some_and(|t| (out.len() as u64) < t) {
            complete = false;
        }
        Ok(Listing {
            devices: out,
            complete,
        })
    }

    async fn attach(&self, id: &str, network: &str) -> Result<(), ProviderError> {
        let path = format!("/servers/{id}/private-networks");
        let body = json!({"private_network_id": network});
        let url = self.v3(&path);
        self.send_to(Method::POST, &url, &path, &[], Some(&body))
            .await
            .map(drop)
    }

    async fn private_address(
        &self,
        id: &str,
        network: &str,
    ) -> Result<Option<IpAddr>, ProviderError> {
        let path = format!("/ipam/v1/regions/{}/ips", self.region());
        let url = format!("{}{path}", self.cfg.api_url.trim_end_matches('/'));
        let query = [
            ("resource_id", id.to_owned()),
            ("private_network_id", network.to_owned()),
        ];
        let v = self.send_to(Method::GET, &url, &path, &query, None).await?;
        let ips: ApiIpamIps = parse(v, &path)?;
        Ok(ips.ips.iter().find_map(|ip| {
            ip.address
                .split('/')
                .next()
                .and_then(|a| a.parse::<IpAddr>().ok())
        }))
    }

    async fn delete(&self, id: &str) -> Result<(), ProviderError> {
        match self
            .send(Method::DELETE, &format!("/servers/{id}"), &[], None)
            .await
        {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_rfc_4648() {
        assert_eq!(http::base64(b""), "");
        assert_eq!(http::base64(b"f"), "Zg==");
        assert_eq!(http::base64(b"fo"), "Zm8=");
        assert_eq!(http::base64(b"foo"), "Zm9v");
        assert_eq!(http::base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn vendor_states_map_onto_the_lifecycle() {
        assert_eq!(device_state("ordered", None), DeviceState::Requested);
        assert_eq!(
            device_state("delivering", Some("to_install")),
            DeviceState::Provisioning
        );
        assert_eq!(
            device_state("ready", Some("installing")),
            DeviceState::Installing
        );
        assert_eq!(device_state("ready", Some("completed")), DeviceState::Ready);
        assert_eq!(device_state("ready", Some("error")), DeviceState::Failed);
        assert_eq!(device_state("out_of_stock", None), DeviceState::Failed);
        assert_eq!(device_state("deleting", None), DeviceState::Deleting);
    }
}
