//! Canonical MAAS 2.0's API (`/MAAS/api/2.0/`) over the simulated fleet: a fixed
//! inventory of commissioned machines (state Ready) per zone, which clients *allocate*,
//! *deploy* and *release*. A deployment is a fleet server (the fleet's phases become
//! Deploying → Deployed, or Failed deployment when doomed), so the blade starts on the
//! machine's loopback address when it is Deployed and stops on release, exactly as for
//! Elastic Metal orders.
//!
//! Written from the vendor's documentation, sharing nothing with `provider::maas`:
//! OAuth 1.0a PLAINTEXT checked on every call (401 in MAAS's words otherwise), form
//! bodies, `?op=` operations, plain-text errors, MAAS's status numbers and names.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::elastic_metal::{percent_decode, unbase64};
use super::faults::{Faults, OneOff};
use super::fleet::{Fleet, Phase, Server};
use super::{read_body, set_faults_call, Sim};

type Reply = Response<Full<Bytes>>;

/// How long a release takes (longer with a disk erase), before the machine is Ready.
const RELEASE_TIME: Duration = Duration::from_millis(300);
const ERASE_TIME: Duration = Duration::from_millis(900);

/// One machine of the inventory.
#[derive(Debug, Clone)]
pub(super) struct Machine {
    pub system_id: String,
    pub hostname: String,
    pub zone: String,
    pub pool: String,
    pub tags: Vec<String>,
    pub cpu_count: u32,
    pub memory: u64,
    pub ip: Ipv4Addr,
    /// Allocated to a user (Ready when `None`).
    pub owner: Option<String>,
    pub agent_name: String,
    pub owner_data: BTreeMap<String, String>,
    pub distro_series: String,
    /// Release asked at, and whether the disks are erased.
    pub releasing: Option<(Instant, bool)>,
}

/// The machines, by system id.
#[derive(Debug, Default)]
pub(super) struct Inventory {
    pub machines: BTreeMap<String, Machine>,
}

impl Inventory {
    /// `per_zone` Ready machines in each of `zones`, numbered from the fleet's addresses.
    pub fn seed(zones: &[String], per_zone: usize, fleet: &mut Fleet) -> Self {
        let mut machines = BTreeMap::new();
        for zone in zones {
            for n in 1..=per_zone {
                let system_id = system_id();
                machines.insert(
                    system_id.clone(),
                    Machine {
                        hostname: format!("{zone}-node-{n:02}"),
                        zone: zone.clone(),
                        pool: "default".into(),
                        tags: vec!["blade".into()],
                        cpu_count: 8,
                        memory: 32_768,
                        ip: fleet.next_address(),
                        owner: None,
                        agent_name: String::new(),
                        owner_data: BTreeMap::new(),
                        distro_series: String::new(),
                        releasing: None,
                        system_id,
                    },
                );
            }
        }
        Self { machines }
    }

    /// Finishes releases whose time is up (the deployment gone from the fleet).
    fn settle(&mut self, fleet: &Fleet, now: Instant) {
        for m in self.machines.values_mut() {
            if let Some((at, erase)) = m.releasing {
                let takes = if erase { ERASE_TIME } else { RELEASE_TIME };
                if now.duration_since(at) >= takes && !fleet.servers.contains_key(&m.system_id) {
                    m.releasing = None;
                    m.owner = None;
                    m.agent_name.clear();
                    m.owner_data.clear();
                    m.distro_series.clear();
                }
            }
        }
    }
}

/// A MAAS-style system id: six characters of `[a-z0-9]`.
fn system_id() -> String {
    const CHARS: &[u8] = b"abcdefghijkmnpqrstwxy0123456789";
    (0..6)
        .map(|_| CHARS[fastrand::usize(..CHARS.len())] as char)
        .collect()
}

/// MAAS's status (number, name) for a machine, its deployment in the fleet considered.
fn status(m: &Machine, fleet: &Fleet) -> (u8, &'static str) {
    if let Some((_, erase)) = m.releasing {
        return if erase {
            (14, "Disk erasing")
        } else {
            (12, "Releasing")
        };
    }
    if m.owner.is_none() {
        return (4, "Ready");
    }
    match fleet.servers.get(&m.system_id).map(|s| s.phase) {
        None => (10, "Allocated"),
        Some(Phase::Ready) => (6, "Deployed"),
        Some(Phase::Failed) => (11, "Failed deployment"),
        Some(_) => (9, "Deploying"),
    }
}

/// A machine as MAAS shows it (the fields a client reads, and some it does not).
fn machine_json(m: &Machine, fleet: &Fleet) -> Value {
    let (status, status_name) = status(m, fleet);
    let addressed = matches!(status, 6 | 9 | 11);
    json!({
        "system_id": m.system_id,
        "hostname": m.hostname,
        "fqdn": format!("{}.maas", m.hostname),
        "domain": {"name": "maas", "id": 0, "resource_record_count": 0, "ttl": null, "authoritative": true, "is_default": true, "resource_uri": "/MAAS/api/2.0/domains/0/"},
        "status": status,
        "status_name": status_name,
        "status_message": "",
        "status_action": "",
        "node_type": 0,
        "node_type_name": "Machine",
        "architecture": "amd64/generic",
        "osystem": if addressed { "ubuntu" } else { "" },
        "distro_series": m.distro_series,
        "cpu_count": m.cpu_count,
        "memory": m.memory,
        "storage": 480_103.98,
        "power_type": "ipmi",
        "power_state": if addressed { "on" } else { "off" },
        "ip_addresses": if addressed { vec![m.ip.to_string()] } else { Vec::new() },
        "zone": {"name": m.zone, "description": "", "id": 1, "resource_uri": format!("/MAAS/api/2.0/zones/{}/", m.zone)},
        "pool": {"name": m.pool, "description": "Default pool", "id": 0, "resource_uri": "/MAAS/api/2.0/resourcepool/0/"},
        "owner": m.owner,
        "owner_data": m.owner_data,
        "tag_names": m.tags,
        "locked": false,
        "netboot": !addressed,
        "resource_uri": format!("/MAAS/api/2.0/machines/{}/", m.system_id),
    })
}

fn text(status: StatusCode, body: &str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_reply(body: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn not_found() -> Reply {
    text(StatusCode::NOT_FOUND, "No Machine matches the given query.")
}

/// Every `key=value` of a query string or form body, decoded, in order (keys repeat).
fn fields(encoded: &str) -> Vec<(String, String)> {
    encoded
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Whether the `Authorization` header is OAuth 1.0a PLAINTEXT signed with `key`
/// (`consumer:token:secret`), the consumer secret empty.
fn authorized(req: &Request<Incoming>, key: &str) -> Result<(), &'static str> {
    let mut parts = key.splitn(3, ':');
    let (Some(consumer), Some(token), Some(secret)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err("Authorization Error: the simulator has no valid key");
    };
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or("Authorization Error: no Authorization header")?;
    let params = header
        .strip_prefix("OAuth ")
        .ok_or("Authorization Error: not OAuth")?;
    let mut got: BTreeMap<String, String> = BTreeMap::new();
    for p in params.split(',') {
        if let Some((k, v)) = p.trim().split_once('=') {
            got.insert(k.to_owned(), percent_decode(v.trim_matches('"')));
        }
    }
    let get = |k: &str| got.get(k).map(String::as_str).unwrap_or("");
    if get("oauth_signature_method") != "PLAINTEXT" {
        return Err("Authorization Error: unsupported signature method");
    }
    if get("oauth_nonce").is_empty() || get("oauth_timestamp").parse::<u64>().is_err() {
        return Err("Authorization Error: missing nonce or timestamp");
    }
    if get("oauth_consumer_key") != consumer {
        return Err("Authorization Error: Invalid consumer");
    }
    if get("oauth_token") != token {
        return Err("Authorization Error: Invalid access token");
    }
    // PLAINTEXT: escape(consumer secret) "&" escape(token secret).
    let signature = get("oauth_signature");
    let (consumer_secret, token_secret) = signature.split_once('&').unwrap_or(("?", ""));
    if !consumer_secret.is_empty() || percent_decode(token_secret) != secret {
        return Err("Authorization Error: Invalid signature");
    }
    Ok(())
}

/// Answers one request.
pub(super) async fn handle(sim: &Sim, req: Request<Incoming>) -> Reply {
    let n = sim
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    let faults = sim.faults();
    let query = req.uri().query().unwrap_or("").to_owned();
    let q = fields(&query);
    let one_off = field(&q, "sim_fault").and_then(OneOff::parse);
    if let Some(delay) = faults.delay(one_off) {
        tokio::time::sleep(delay).await;
    }
    if let Err(why) = authorized(&req, &sim.cfg.token) {
        return text(StatusCode::UNAUTHORIZED, why);
    }
    if req.uri().path() == "/sim/v1/faults" {
        return match set_faults_call(sim, req).await {
            Ok(done) => done,
            Err((status, reason)) => text(status, &reason),
        };
    }
    if let Some(secs) = faults.rate_limit(n, one_off) {
        let mut r = text(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    if faults.outage(one_off, fastrand::f64()) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unable to connect to the region controller's database; try again.",
        );
    }
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix("/MAAS/api/2.0/") else {
        return text(StatusCode::NOT_FOUND, &format!("Unknown API path {path}"));
    };
    let parts: Vec<String> = rest
        .trim_end_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let method = req.method().clone();
    let op = field(&q, "op").map(str::to_owned);
    let form = if method == Method::POST {
        match read_body(req).await {
            Some(b) => fields(&String::from_utf8_lossy(&b)),
            None => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
        }
    } else {
        Vec::new()
    };
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    match (method, parts.as_slice(), op.as_deref()) {
        (Method::GET, ["machines"], None) => list(sim, &q),
        (Method::POST, ["machines"], Some("allocate")) => {
            allocate(sim, &form, &faults, one_off == Some(OneOff::Lose)).await
        }
        (Method::GET, ["machines", id], None) => {
            read(sim, id, |m, f| json_reply(&machine_json(m, f)))
        }
        (Method::POST, ["machines", id], Some("set_owner_data")) => set_owner_data(sim, id, &form),
        (Method::POST, ["machines", id], Some("deploy")) => deploy(sim, id, &form, &faults),
        (Method::POST, ["machines", id], Some("release")) => release(sim, id, &form),
        (_, ["machines", ..], Some(op)) => text(
            StatusCode::BAD_REQUEST,
            &format!("Unrecognised signature: method={} op={op}", path),
        ),
        _ => text(StatusCode::NOT_FOUND, &format!("Unknown API path {path}")),
    }
}

/// Runs `f` on machine `id` with the fleet, releases settled first.
fn read(sim: &Sim, id: &str, f: impl FnOnce(&Machine, &Fleet) -> Reply) -> Reply {
    let (Ok(fleet), Ok(mut inv)) = (sim.fleet.lock(), sim.maas.lock()) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "state poisoned");
    };
    inv.settle(&fleet, Instant::now());
    match inv.machines.get(id) {
        Some(m) => f(m, &fleet),
        None => not_found(),
    }
}

/// `GET machines/`, filtered by `agent_name`, `zone`, `pool`, `hostname`, `id`.
fn list(sim: &Sim, q: &[(String, String)]) -> Reply {
    let (Ok(fleet), Ok(mut inv)) = (sim.fleet.lock(), sim.maas.lock()) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "state poisoned");
    };
    inv.settle(&fleet, Instant::now());
    let wanted =
        |key: &str, value: &str| q.iter().filter(|(k, _)| k == key).all(|(_, v)| v == value);
    let out: Vec<Value> = inv
        .machines
        .values()
        .filter(|m| {
            wanted("agent_name", &m.agent_name)
                && wanted("zone", &m.zone)
                && wanted("pool", &m.pool)
                && wanted("hostname", &m.hostname)
                && wanted("id", &m.system_id)
        })
        .map(|m| machine_json(m, &fleet))
        .collect();
    json_reply(&Value::Array(out))
}

/// `POST machines/?op=allocate`: the first Ready machine meeting the constraints.
async fn allocate(sim: &Sim, form: &[(String, String)], faults: &Faults, lose: bool) -> Reply {
    let (machine, lost, failed) = {
        let (Ok(mut fleet), Ok(mut inv)) = (sim.fleet.lock(), sim.maas.lock()) else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "state poisoned");
        };
        inv.settle(&fleet, Instant::now());
        let number = |k: &str| field(form, k).map(|v| v.parse::<u64>());
        if matches!(number("cpu_count"), Some(Err(_))) || matches!(number("mem"), Some(Err(_))) {
            return json_reply_status(
                StatusCode::BAD_REQUEST,
                &json!({"cpu_count": ["Invalid number."]}),
            );
        }
        let tags: Vec<&str> = form
            .iter()
            .filter(|(k, _)| k == "tags")
            .flat_map(|(_, v)| v.split(','))
            .filter(|t| !t.is_empty())
            .collect();
        let sold_out = faults.sold_out("maas");
        let found = inv.machines.values_mut().find(|m| {
            m.owner.is_none()
                && m.releasing.is_none()
                && !sold_out
                && field(form, "zone").is_none_or(|z| z == m.zone)
                && field(form, "pool").is_none_or(|p| p == m.pool)
                && tags.iter().all(|t| m.tags.iter().any(|mt| mt == t))
                && number("cpu_count").is_none_or(|c| c.is_ok_and(|c| u64::from(m.cpu_count) >= c))
                && number("mem").is_none_or(|c| c.is_ok_and(|c| m.memory >= c))
        });
        let Some(m) = found else {
            let asked: Vec<String> = form
                .iter()
                .filter(|(k, _)| k != "comment")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            return text(
                StatusCode::CONFLICT,
                &format!(
                    "No available machine matches constraints: [{}]",
                    asked.join(", ")
                ),
            );
        };
        m.owner = Some("surge".into());
        m.agent_name = field(form, "agent_name").unwrap_or("").to_owned();
        let lost = lose || fleet.lose_orders > 0;
        fleet.lose_orders = fleet.lose_orders.saturating_sub(1);
        let failed = fleet.fail_after_create();
        (machine_json(m, &fleet), lost, failed)
    };
    if lost {
        tokio::time::sleep(faults.lost_delay()).await;
    }
    if failed {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error");
    }
    json_reply(&machine)
}

fn json_reply_status(status: StatusCode, body: &Value) -> Reply {
    let mut r = json_reply(body);
    *r.status_mut() = status;
    r
}

/// `POST machines/{id}/?op=set_owner_data`: each field is a key; an empty value removes
/// it. Only the machine's owner may.
fn set_owner_data(sim: &Sim, id: &str, form: &[(String, String)]) -> Reply {
    let (Ok(fleet), Ok(mut inv)) = (sim.fleet.lock(), sim.maas.lock()) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "state poisoned");
    };
    inv.settle(&fleet, Instant::now());
    let Some(m) = inv.machines.get_mut(id) else {
        return not_found();
    };
    if m.owner.is_none() {
        return text(
            StatusCode::FORBIDDEN,
            "You do not have permission to set owner data on a machine you do not own.",
        );
    }
    for (k, v) in form {
        if v.is_empty() {
            m.owner_data.remove(k);
        } else {
            m.owner_data.insert(k.clone(), v.clone());
        }
    }
    json_reply(&machine_json(m, &fleet))
}

/// `POST machines/{id}/?op=deploy`: an Allocated machine starts deploying (a fleet
/// server, its delivery being the power-on and PXE boot, its install curtin's).
fn deploy(sim: &Sim, id: &str, form: &[(String, String)], faults: &Faults) -> Reply {
    let (Ok(mut fleet), Ok(mut inv)) = (sim.fleet.lock(), sim.maas.lock()) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "state poisoned");
    };
    inv.settle(&fleet, Instant::now());
    let Some(m) = inv.machines.get_mut(id) else {
        return not_found();
    };
    let (_, name) = status(m, &fleet);
    if name != "Allocated" {
        return text(
            StatusCode::CONFLICT,
            &format!("Machine cannot be deployed in its current state ('{name}')."),
        );
    }
    let user_data = match field(form, "user_data").map(unbase64) {
        None => None,
        Some(Some(bytes)) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Some(None) => {
            return json_reply_status(
                StatusCode::BAD_REQUEST,
                &json!({"user_data": ["Enter a valid base64-encoded value."]}),
            )
        }
    };
    if let Some(agent) = field(form, "agent_name") {
        m.agent_name = agent.to_owned();
    }
    m.distro_series = field(form, "distro_series").unwrap_or("noble").to_owned();
    let server = Server {
        id: m.system_id.clone(),
        name: m.hostname.clone(),
        zone: m.zone.clone(),
        offer_id: m.pool.clone(),
        project_id: String::new(),
        tags: m.tags.clone(),
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        phase: Phase::Delivered,
        deleting: false,
        ip: Some(m.ip),
        doomed: faults.doomed(fastrand::f64()),
        delivery_ms: sim.cfg.sample(sim.cfg.delivery).as_millis() as u64,
        install_ms: sim.cfg.sample(sim.cfg.install).as_millis() as u64,
        ordered_at: Some(Instant::now()),
        deleting_at: None,
        user_data,
        ssh_key_ids: Vec::new(),
        private_network: None,
        private_ip: None,
    };
    fleet.servers.insert(server.id.clone(), server);
    json_reply(&machine_json(m, &fleet))
}

/// `POST machines/{id}/?op=release`: back to Ready after a while (its deployment, and
/// blade, stopped); with `erase`, through Disk erasing. 409 when not allocated.
fn release(sim: &Sim, id: &str, form: &[(String, String)]) -> Reply {
    let (Ok(mut fleet), Ok(mut inv)) = (sim.fleet.lock(), sim.maas.lock()) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "state poisoned");
    };
    let now = Instant::now();
    inv.settle(&fleet, now);
    let Some(m) = inv.machines.get_mut(id) else {
        return not_found();
    };
    let (_, name) = status(m, &fleet);
    if matches!(name, "Ready" | "Releasing" | "Disk erasing") {
        return text(
            StatusCode::CONFLICT,
            &format!("Machine cannot be released in its current state ('{name}')."),
        );
    }
    let erase = field(form, "erase").is_some_and(|v| v == "true" || v == "1");
    m.releasing = Some((now, erase));
    fleet.delete(id, now);
    json_reply(&machine_json(m, &fleet))
}
