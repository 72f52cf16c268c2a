//! Canonical MAAS (Metal as a Service) 2.0, for shops that run their own racks: machines
//! already enlisted and commissioned (state Ready) are *allocated* to the pool, *deployed*
//! with an OS and the bootstrap user-data, and *released* back to Ready after the rush.
//! Nothing is bought, so there is no price; stock is the number of Ready machines that
//! match the constraints.
//!
//! The API is `{api_url}/api/2.0/`, operations chosen by `?op=`, bodies form-encoded,
//! answers JSON; errors are plain text. Auth is OAuth 1.0a with the PLAINTEXT signature
//! from an API key `consumer_key:token_key:token_secret`.
//!
//! A machine belongs to the pool by its `agent_name` (`surge:<pool>`, set at allocation,
//! cleared by MAAS on release: the equivalent of Elastic Metal's `surge-pool` tag), and to
//! an order by its owner data (`surge-request`, set right after allocation). An allocation
//! whose answer was lost is found again as a machine of the pool's agent that no order
//! claims yet, so a retry never allocates a second one.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::http::{self, Retry};
use super::{
    CreateSpec, Device, DeviceState, Listing, Offer, Provider, ProviderError, Stock, POOL_TAG,
    REQUEST_TAG,
};

/// Owner-data key of the order that allocated a machine.
const OWNER_REQUEST: &str = REQUEST_TAG;
/// Owner-data key of the pool (also in the agent name; kept for operators' eyes).
const OWNER_POOL: &str = POOL_TAG;
/// Owner-data key of the name surge gave the server.
const OWNER_NAME: &str = "surge-name";

/// Ready machines counted as "low" stock, at most.
const LOW_STOCK: usize = 2;

/// An API key as MAAS hands it out: `consumer_key:token_key:token_secret`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub consumer_key: String,
    pub token_key: String,
    pub token_secret: String,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl std::str::FromStr for ApiKey {
    type Err = ProviderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split(':');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(c), Some(k), Some(t), None)
                if !c.is_empty() && !k.is_empty() && !t.is_empty() =>
            {
                Ok(Self {
                    consumer_key: c.to_owned(),
                    token_key: k.to_owned(),
                    token_secret: t.to_owned(),
                })
            }
            _ => Err(ProviderError::Unauthorized(
                "the MAAS API key must be consumer_key:token_key:token_secret".into(),
            )),
        }
    }
}

impl ApiKey {
    /// The `Authorization` header: OAuth 1.0a, PLAINTEXT signature (`consumer secret &
    /// token secret`, the consumer secret being empty for MAAS keys), a fresh nonce and
    /// timestamp per request.
    pub fn authorization(&self, nonce: &str, timestamp: u64) -> String {
        format!(
            "OAuth oauth_version=\"1.0\", oauth_signature_method=\"PLAINTEXT\", \
             oauth_consumer_key=\"{}\", oauth_token=\"{}\", oauth_signature=\"{}\", \
             oauth_nonce=\"{nonce}\", oauth_timestamp=\"{timestamp}\"",
            oauth_escape(&self.consumer_key),
            oauth_escape(&self.token_key),
            // The signature is `escape(consumer secret) & escape(token secret)`, and
            // like every header value it is escaped once more (RFC 5849 §3.4.4, §3.5.1).
            oauth_escape(&format!("&{}", oauth_escape(&self.token_secret))),
        )
    }
}

/// RFC 5849 §3.6 percent-encoding: everything but unreserved characters.
fn oauth_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How to reach one MAAS zone (a room or site) and what to allocate there.
#[derive(Debug, Clone)]
pub struct MaasConfig {
    /// The region controller's URL up to `/MAAS` (`https://maas.shop.internal:5443/MAAS`).
    pub api_url: String,
    pub api_key: ApiKey,
    /// The MAAS zone machines are allocated in.
    pub zone: String,
    /// The name of this zone's one offer (its Ready machines): `provider.offer`, which
    /// the configuration makes the resource pool's name or `ready-machines`.
    pub offer: String,
    /// Resource pool to allocate from (`None`: any).
    pub resource_pool: Option<String>,
    /// Tags a machine must carry.
    pub tags: Vec<String>,
    /// Minimum CPU cores and memory (MiB) of a machine.
    pub min_cpu_count: Option<u32>,
    pub min_memory_mib: Option<u64>,
    /// OS release deployed (`noble`).
    pub distro_series: String,
    /// Erase the disks on release (slower back to Ready; a shop's data never lingers).
    pub erase_on_release: bool,
    pub call_timeout: Duration,
    /// Retries, back-off and the longest `Retry-After` honoured.
    pub retry: Retry,
}

/// The MAAS client for one zone.
#[derive(Debug, Clone)]
pub struct Maas {
    cfg: MaasConfig,
    base: String,
    http: reqwest::Client,
}

// --- The vendor's JSON (unknown fields ignored: a machine has a hundred). ---

/// A machine, as `GET machines/` and the operations answer it.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiMachine {
    pub system_id: String,
    #[serde(default)]
    pub hostname: String,
    /// MAAS's `NODE_STATUS` number; `status_name` says the same in words.
    #[serde(default)]
    pub status: i64,
    #[serde(default)]
    pub status_name: String,
    #[serde(default)]
    pub ip_addresses: Vec<IpAddr>,
    #[serde(default)]
    pub zone: Option<ApiNamed>,
    #[serde(default)]
    pub pool: Option<ApiNamed>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub owner_data: BTreeMap<String, String>,
    #[serde(default)]
    pub tag_names: Vec<String>,
    #[serde(default)]
    pub cpu_count: u32,
    /// MiB.
    #[serde(default)]
    pub memory: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiNamed {
    pub name: String,
}

/// A MAAS status (by name) in the device lifecycle. Ready, New, Commissioning and the
/// like mean the machine is not allocated: released, it is no longer the pool's.
pub fn device_state(status_name: &str) -> DeviceState {
    match status_name {
        "Allocated" => DeviceState::Provisioning,
        "Deploying" => DeviceState::Installing,
        "Deployed" => DeviceState::Ready,
        "Releasing" | "Disk erasing" => DeviceState::Deleting,
        "Failed deployment"
        | "Broken"
        | "Failed releasing"
        | "Failed disk erasing"
        | "Missing"
        | "Rescue mode"
        | "Entering rescue mode"
        | "Exiting rescue mode"
        | "Failed entering rescue mode"
        | "Failed exiting rescue mode" => DeviceState::Failed,
        // Ready, New, Commissioning, Testing, Reserved, Retired...: not allocated.
        _ => DeviceState::Gone,
    }
}

impl From<ApiMachine> for Device {
    fn from(m: ApiMachine) -> Self {
        let mut tags: Vec<String> = m
            .owner_data
            .iter()
            .filter(|(k, _)| k.starts_with("surge-"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        tags.extend(m.tag_names.iter().cloned());
        Device {
            name: m
                .owner_data
                .get(OWNER_NAME)
                .cloned()
                .unwrap_or_else(|| m.hostname.clone()),
            state: device_state(&m.status_name),
            vendor_status: m.status_name.clone(),
            address: m
                .ip_addresses
                .iter()
                .find(|ip| ip.is_ipv4())
                .or_else(|| m.ip_addresses.first())
                .copied(),
            tags,
            zone: m.zone.map(|z| z.name).unwrap_or_default(),
            offer_id: m.pool.map(|p| p.name).unwrap_or_default(),
            // Owned hardware: no bill starts.
            created_at: None,
            id: m.system_id,
        }
    }
}

/// The agent name that marks a machine as the pool's.
pub fn agent_name(pool: &str) -> String {
    format!("surge:{pool}")
}

impl Maas {
    pub fn new(cfg: MaasConfig) -> Result<Self, ProviderError> {
        // No redirects: one would carry the OAuth token to wherever it points.
        let http = http::client(cfg.call_timeout)?;
        let base = format!("{}/api/2.0", cfg.api_url.trim_end_matches('/'));
        Ok(Self { cfg, base, http })
    }

    pub fn zone(&self) -> &str {
        &self.cfg.zone
    }

    /// One exchange: `path` under the API (`/machines/`), `op` if any, query or form
    /// fields. The answer's JSON, or the vendor's words mapped to a typed error.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        op: Option<&str>,
        fields: &[(&str, String)],
    ) -> Result<serde_json::Value, ProviderError> {
        http::counted("maas", self.answer(method, path, op, fields).await)
    }

    /// The exchange itself, uncounted.
    async fn answer(
        &self,
        method: Method,
        path: &str,
        op: Option<&str>,
        fields: &[(&str, String)],
    ) -> Result<serde_json::Value, ProviderError> {
        let call = match op {
            Some(op) => format!("{method} {path}?op={op}"),
            None => format!("{method} {path}"),
        };
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(op) = op {
            req = req.query(&[("op", op)]);
        }
        req = if method == Method::GET {
            req.query(fields)
        } else {
            req.form(fields)
        };
        let nonce = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        req = req
            .header(
                reqwest::header::AUTHORIZATION,
                self.cfg.api_key.authorization(&nonce, now),
            )
            .header(reqwest::header::ACCEPT, "application/json");
        let (status, retry_after, bytes) = http::exchange(&call, req).await?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(serde_json::Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                let what = format!("{call}: unreadable answer: {e}");
                // An allocation that succeeded stands, whatever its answer looked like.
                if op == Some("allocate") {
                    ProviderError::Uncertain(what)
                } else {
                    ProviderError::Transient(what)
                }
            });
        }
        // MAAS answers errors in plain text (sometimes a JSON object of field errors).
        let text: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
        let what = format!("{call}: {} {}", status.as_u16(), text.trim());
        Err(match status {
            StatusCode::TOO_MANY_REQUESTS => self.retry().rate_limited(retry_after),
            StatusCode::SERVICE_UNAVAILABLE if retry_after.is_some() => {
                self.retry().rate_limited(retry_after)
            }
            // An allocation may have happened behind a failing gateway: only a look-up
            // tells (see `allocate`).
            s if s.is_server_error() && op == Some("allocate") => ProviderError::Uncertain(what),
            s if s.is_server_error() => ProviderError::Transient(what),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ProviderError::Unauthorized(what),
            StatusCode::NOT_FOUND => ProviderError::NotFound(what),
            // allocate: "No available machine matches constraints".
            StatusCode::CONFLICT if op == Some("allocate") => ProviderError::OutOfStock(what),
            _ => ProviderError::Invalid(what),
        })
    }

    /// [`Maas::exchange`], retried while the error says a retry may help. Only for calls
    /// that are safe to repeat (reads, release, owner data, deploy of an allocated
    /// machine); allocation has its own recovery.
    async fn send(
        &self,
        method: Method,
        path: &str,
        op: Option<&str>,
        fields: &[(&str, String)],
    ) -> Result<serde_json::Value, ProviderError> {
        let what = format!("{method} {path}");
        self.retry()
            .run(&what, || self.exchange(method.clone(), path, op, fields))
            .await
    }

    /// The pool's machines (by agent name), in this zone.
    async fn machines_of(&self, pool: &str) -> Result<Vec<ApiMachine>, ProviderError> {
        let v = self
            .send(
                Method::GET,
                "/machines/",
                None,
                &[
                    ("agent_name", agent_name(pool)),
                    ("zone", self.cfg.zone.clone()),
                ],
            )
            .await?;
        parse(v, "GET /machines/")
    }

    /// Every machine of the zone, whoever holds it.
    async fn zone_machines(&self) -> Result<Vec<ApiMachine>, ProviderError> {
        let v = self
            .send(
                Method::GET,
                "/machines/",
                None,
                &[("zone", self.cfg.zone.clone())],
            )
            .await?;
        parse(v, "GET /machines/")
    }

    async fn machine(&self, id: &str) -> Result<ApiMachine, ProviderError> {
        let v = self
            .send(Method::GET, &format!("/machines/{id}/"), None, &[])
            .await?;
        parse(v, "GET /machines/{id}/")
    }

    /// Records the order on an allocated machine; returns the machine as MAAS then says.
    async fn claim(&self, id: &str, spec: &CreateSpec) -> Result<ApiMachine, ProviderError> {
        let v = self
            .send(
                Method::POST,
                &format!("/machines/{id}/"),
                Some("set_owner_data"),
                &[
                    (OWNER_REQUEST, spec.request_id.clone()),
                    (OWNER_POOL, spec.pool.clone()),
                    (OWNER_NAME, spec.name.clone()),
                ],
            )
            .await?;
        parse(v, "POST /machines/{id}/?op=set_owner_data")
    }

    /// Deploys an allocated machine with the OS and the order's user-data.
    async fn deploy(&self, id: &str, spec: &CreateSpec) -> Result<ApiMachine, ProviderError> {
        let mut fields = vec![
            ("distro_series", self.cfg.distro_series.clone()),
            ("agent_name", agent_name(&spec.pool)),
        ];
        if let Some(ud) = &spec.user_data {
            fields.push(("user_data", http::base64(ud.as_bytes())));
        }
        let v = self
            .send(
                Method::POST,
                &format!("/machines/{id}/"),
                Some("deploy"),
                &fields,
            )
            .await?;
        parse(v, "POST /machines/{id}/?op=deploy")
    }

    /// Allocates one machine for the pool: once, and after an answer that was lost or a
    /// 5xx, by looking for a machine of the pool's agent that no order claims (MAAS
    /// allocation carries no idempotency key).
    async fn allocate(&self, spec: &CreateSpec) -> Result<ApiMachine, ProviderError> {
        let mut fields = vec![
            ("agent_name", agent_name(&spec.pool)),
            ("zone", self.cfg.zone.clone()),
            ("comment", format!("surge order {}", spec.request_id)),
        ];
        if let Some(p) = &self.cfg.resource_pool {
            fields.push(("pool", p.clone()));
        }
        for t in &self.cfg.tags {
            fields.push(("tags", t.clone()));
        }
        if let Some(c) = self.cfg.min_cpu_count {
            fields.push(("cpu_count", c.to_string()));
        }
        if let Some(m) = self.cfg.min_memory_mib {
            fields.push(("mem", m.to_string()));
        }
        let answered = self
            .exchange(Method::POST, "/machines/", Some("allocate"), &fields)
            .await
            .and_then(|v| {
                // An allocation that succeeded stands, whatever its answer looked like.
                parse::<ApiMachine>(v, "POST /machines/?op=allocate")
                    .map_err(|e| ProviderError::Uncertain(e.to_string()))
            });
        match answered {
            // Allocated or not? A machine of ours that no order claims is this one. None
            // means none so far; one a gateway timeout finishes later shows unclaimed,
            // and the next attempt takes it (see `order_once`).
            Err(ProviderError::Uncertain(why)) => match self.unclaimed(&spec.pool).await? {
                Some(m) => Ok(m),
                None => Err(ProviderError::Transient(format!(
                    "{why}; no machine was allocated"
                ))),
            },
            other => other,
        }
    }

    /// An allocated machine of the pool that no order has claimed (an allocation whose
    /// answer was lost).
    async fn unclaimed(&self, pool: &str) -> Result<Option<ApiMachine>, ProviderError> {
        Ok(self
            .machines_of(pool)
            .await?
            .into_iter()
            .find(|m| m.status_name == "Allocated" && !m.owner_data.contains_key(OWNER_REQUEST)))
    }

    /// The machine an earlier attempt of this order allocated, if any.
    async fn find_order(&self, spec: &CreateSpec) -> Result<Option<ApiMachine>, ProviderError> {
        Ok(self.machines_of(&spec.pool).await?.into_iter().find(|m| {
            m.owner_data.get(OWNER_REQUEST) == Some(&spec.request_id)
                && device_state(&m.status_name) != DeviceState::Gone
        }))
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    v: serde_json::Value,
    what: &str,
) -> Result<T, ProviderError> {
    serde_json::from_value(v)
        .map_err(|e| ProviderError::Transient(format!("{what}: unexpected answer: {e}")))
}

impl Provider for Maas {
    /// One offer: the Ready machines of the zone that meet the constraints, counted as
    /// stock (owned hardware has no price).
    async fn offers(&self) -> Result<Vec<Offer>, ProviderError> {
        let mut query = vec![("zone", self.cfg.zone.clone())];
        if let Some(p) = &self.cfg.resource_pool {
            query.push(("pool", p.clone()));
        }
        let v = self.send(Method::GET, "/machines/", None, &query).await?;
        let machines: Vec<ApiMachine> = parse(v, "GET /machines/")?;
        let ready = machines
            .iter()
            .filter(|m| m.status_name == "Ready")
            .filter(|m| self.cfg.tags.iter().all(|t| m.tag_names.contains(t)))
            .filter(|m| self.cfg.min_cpu_count.is_none_or(|c| m.cpu_count >= c))
            .filter(|m| self.cfg.min_memory_mib.is_none_or(|mem| m.memory >= mem))
            .count();
        let stock = match ready {
            0 => Stock::Empty,
            n if n <= LOW_STOCK => Stock::Low,
            _ => Stock::Available,
        };
        Ok(vec![Offer {
            id: self.cfg.offer.clone(),
            name: self.cfg.offer.clone(),
            stock,
            price_per_hour: None,
        }])
    }

    /// MAAS lists are cheap and whole: every attempt looks for its order first.
    /// A machine of the pool that no order claims (an earlier attempt's, whose claim
    /// failed or whose allocation finished late) is taken before allocating another.
    async fn order_once(&self, spec: &CreateSpec, _again: bool) -> Result<Device, ProviderError> {
        let machine = match self.find_order(spec).await? {
            Some(m) => m,
            None => {
                let m = match self.unclaimed(&spec.pool).await? {
                    Some(m) => m,
                    None => self.allocate(spec).await?,
                };
                self.claim(&m.system_id, spec).await?
            }
        };
        if machine.status_name != "Allocated" {
            // Deploying, deployed or failed already: an earlier attempt got this far.
            return Ok(machine.into());
        }
        Ok(self.deploy(&machine.system_id, spec).await?.into())
    }

    fn retry(&self) -> Retry {
        self.cfg.retry
    }

    async fn get(&self, id: &str) -> Result<Device, ProviderError> {
        Ok(self.machine(id).await?.into())
    }

    async fn list(&self, tag: &str) -> Result<Vec<Device>, ProviderError> {
        Ok(self.inventory(tag).await?.devices)
    }

    /// By pool tag: the machines allocated under the pool's agent name; by request tag:
    /// those among them whose owner data names the order; empty: every machine in the
    /// zone (MAAS answers one whole list, so it is always complete).
    async fn inventory(&self, tag: &str) -> Result<Listing, ProviderError> {
        let machines: Vec<ApiMachine> = match tag.split_once('=') {
            Some((POOL_TAG, pool)) => self.machines_of(pool).await?,
            Some((key, value)) => self
                .zone_machines()
                .await?
                .into_iter()
                .filter(|m| m.owner_data.get(key).map(String::as_str) == Some(value))
                .collect(),
            None => self.zone_machines().await?,
        };
        let devices = machines
            .into_iter()
            .map(Device::from)
            .filter(|d| d.state != DeviceState::Gone)
            .collect();
        Ok(Listing {
            devices,
            complete: true,
        })
    }

    /// Releases the machine back to Ready (erasing its disks if configured). A machine
    /// already released, releasing, or unknown is fine.
    async fn delete(&self, id: &str) -> Result<(), ProviderError> {
        let mut fields = vec![("comment", "released by surge".to_owned())];
        if self.cfg.erase_on_release {
            fields.push(("erase", "true".into()));
            fields.push(("quick_erase", "true".into()));
        }
        match self
            .send(
                Method::POST,
                &format!("/machines/{id}/"),
                Some("release"),
                &fields,
            )
            .await
        {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            // "cannot be released in its current state": released already, or on its way.
            Err(ProviderError::Invalid(why)) if why.contains(" 409 ") => {
                match self.machine(id).await {
                    Ok(m)
                        if matches!(
                            device_state(&m.status_name),
                            DeviceState::Gone | DeviceState::Deleting
                        ) =>
                    {
                        Ok(())
                    }
                    Err(ProviderError::NotFound(_)) => Ok(()),
                    Ok(_) => Err(ProviderError::Invalid(why)),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// MAAS has no private networks to attach to: machines are on the shop's own
    /// networks already, reached on their own address.
    async fn attach(&self, _id: &str, network: &str) -> Result<(), ProviderError> {
        Err(ProviderError::Invalid(format!(
            "MAAS machines are not attached to private networks (asked for `{network}`): surge reaches them on their own address"
        )))
    }

    async fn private_address(
        &self,
        id: &str,
        _network: &str,
    ) -> Result<Option<IpAddr>, ProviderError> {
        Ok(self.get(id).await?.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_have_three_parts_and_never_print() {
        let key: ApiKey = "ck:tk:ts".parse().unwrap();
        assert_eq!(key.token_secret, "ts");
        assert!(!format!("{key:?}").contains("ts"));
        for bad in ["ck:tk", "ck:tk:ts:x", "::", "ck::ts", ""] {
            assert!(bad.parse::<ApiKey>().is_err(), "{bad}");
        }
        let h = key.authorization("n1", 42);
        assert!(h.starts_with("OAuth "), "{h}");
        for part in [
            "oauth_signature_method=\"PLAINTEXT\"",
            "oauth_consumer_key=\"ck\"",
            "oauth_token=\"tk\"",
            "oauth_signature=\"%26ts\"",
            "oauth_nonce=\"n1\"",
            "oauth_timestamp=\"42\"",
            "oauth_version=\"1.0\"",
        ] {
            assert!(h.contains(part), "{part} in {h}");
        }
        let odd: ApiKey = "c k:t/k:s&s".parse().unwrap();
        assert!(odd
            .authorization("n", 1)
            .contains("oauth_signature=\"%26s%2526s\""));
    }

    #[test]
    fn maas_states_map_onto_the_lifecycle() {
        for (name, state) in [
            ("Allocated", DeviceState::Provisioning),
            ("Deploying", DeviceState::Installing),
            ("Deployed", DeviceState::Ready),
            ("Releasing", DeviceState::Deleting),
            ("Disk erasing", DeviceState::Deleting),
            ("Failed deployment", DeviceState::Failed),
            ("Broken", DeviceState::Failed),
            ("Failed releasing", DeviceState::Failed),
            ("Ready", DeviceState::Gone),
            ("New", DeviceState::Gone),
            ("Commissioning", DeviceState::Gone),
        ] {
            assert_eq!(device_state(name), state, "{name}");
        }
    }
}
