//! Scaleway Elastic Metal's HTTP API (`/baremetal/v1/zones/{zone}/...`) over the
//! simulated fleet: `X-Auth-Token`, offers with stock and price, servers with the vendor's
//! status words, pagination, the vendor's error bodies, and faults worded as the vendor
//! would (429 with `Retry-After`, 503).

use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};

use super::faults::{Faults, OneOff};
use super::fleet::{Phase, Server};
use super::{read_body, set_faults_call, Sim};

type Reply = Response<Full<Bytes>>;

/// The offers the simulator sells: (id, name).
const OFFERS: [(&str, &str); 2] = [
    ("b0d2b4a4-e2f4-4b1b-9e2a-0f5e3c1a9a01", "EM-A115X-SSD"),
    ("c3a1f2d4-5b6e-4c7d-8e9f-0a1b2c3d4e02", "EM-B112X-SSD"),
];

/// The vendor's `status` and `install.status` for a server.
fn statuses(s: &Server) -> (&'static str, &'static str) {
    let (status, install) = match s.phase {
        Phase::Ordered => ("ordered", "to_install"),
        Phase::Delivering => ("delivering", "to_install"),
        Phase::Delivered => ("ready", "to_install"),
        Phase::Installing => ("ready", "installing"),
        Phase::Ready => ("ready", "completed"),
        Phase::Failed => ("error", "error"),
    };
    if s.deleting {
        ("deleting", install)
    } else {
        (status, install)
    }
}

/// A server as the vendor's API shows it.
fn server_json(s: &Server) -> Value {
    let (status, install_status) = statuses(s);
    let ips: Vec<Value> = s
        .ip
        .iter()
        .map(|ip| json!({"id": format!("ip-{}", s.id), "address": ip.to_string(), "reverse": "", "version": "IPv4", "reverse_status": "active", "reverse_status_message": ""}))
        .collect();
    json!({
        "id": s.id, "organization_id": "11111111-1111-4111-8111-111111111111",
        "project_id": s.project_id, "name": s.name, "description": "",
        "updated_at": s.created_at, "created_at": s.created_at,
        "status": status, "offer_id": s.offer_id,
        "offer_name": OFFERS.iter().find(|o| o.0 == s.offer_id).map_or("", |o| o.1),
        "tags": s.tags, "ips": ips, "domain": format!("{}.fr-par-2.baremetal.scw.cloud", s.id),
        "boot_type": "normal", "zone": s.zone,
        "install": {"os_id": "os-ubuntu-24.04", "hostname": s.name, "ssh_key_ids": [], "status": install_status, "user": "ubuntu", "service_user": "service", "service_url": ""},
        "ping_status": if status == "ready" { "ping_status_up" } else { "ping_status_unknown" },
        "options": [], "rescue_server": null,
    })
}

fn reply(status: StatusCode, body: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The vendor's error shape: `{"message", "type"}` (plus resource fields on 404).
fn api_error(status: StatusCode, kind: &str, message: &str) -> Reply {
    reply(status, &json!({"message": message, "type": kind}))
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

fn too_large() -> Reply {
    api_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_arguments",
        "body too large",
    )
}

fn poisoned() -> Reply {
    api_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "state poisoned",
    )
}

/// Answers one request.
pub(super) async fn handle(sim: &Sim, req: Request<Incoming>) -> Reply {
    let n = sim
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    let faults = sim.faults();
    let query = req.uri().query().unwrap_or("").to_owned();
    let one_off = query_param(&query, "sim_fault").and_then(OneOff::parse);
    if let Some(delay) = faults.delay(one_off) {
        tokio::time::sleep(delay).await;
    }
    let token_ok = req
        .headers()
        .get("x-auth-token")
        .is_some_and(|v| v.as_bytes() == sim.cfg.token.as_bytes());
    if !token_ok {
        return api_error(
            StatusCode::UNAUTHORIZED,
            "denied_authentication",
            "authentication is denied: invalid or missing X-Auth-Token",
        );
    }
    if req.uri().path() == "/sim/v1/faults" {
        return match set_faults_call(sim, req).await {
            Ok(done) => done,
            Err((status, reason)) => {
                let kind = match status {
                    StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
                    StatusCode::PAYLOAD_TOO_LARGE => "invalid_arguments",
                    _ => "invalid_argument",
                };
                api_error(status, kind, &reason)
            }
        };
    }
    if let Some(secs) = faults.rate_limit(n, one_off) {
        let mut r = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "rate limit exceeded",
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    if faults.outage(one_off, fastrand::f64()) {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "simulated outage",
        );
    }
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["baremetal", "v3", "zones", _, "servers", id, "private-networks"] => {
            let id = (*id).to_owned();
            return attach(sim, &id, req).await;
        }
        ["ipam", "v1", "regions", _, "ips"] => return ipam_ips(sim, &query),
        _ => {}
    }
    let ["baremetal", "v1", "zones", zone, rest @ ..] = parts.as_slice() else {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route {path}"),
        );
    };
    let zone = (*zone).to_owned();
    if !sim.cfg.zones.contains(&zone) {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("zone {zone} not found"),
        );
    }
    let method = req.method().clone();
    match (method, rest) {
        (Method::GET, ["offers"]) => offers(sim, &faults),
        (Method::GET, ["servers"]) => list(sim, &zone, &query, &faults),
        (Method::POST, ["servers"]) => {
            let Some(body) = read_body(req).await else {
                return too_large();
            };
            create(sim, &zone, &body, &faults, one_off == Some(OneOff::Lose)).await
        }
        (Method::GET, ["servers", id]) => match sim
            .fleet
            .lock()
            .ok()
            .and_then(|f| f.servers.get(*id).map(server_json))
        {
            Some(v) => reply(StatusCode::OK, &v),
            None => not_found(id),
        },
        (Method::DELETE, ["servers", id]) => delete(sim, id),
        _ => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route {path}"),
        ),
    }
}

/// A UUID v4-shaped id, as the vendor's are.
fn new_uuid() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn not_found(id: &str) -> Reply {
    reply(
        StatusCode::NOT_FOUND,
        &json!({"message": "resource is not found", "type": "not_found", "resource": "baremetal_server", "resource_id": id}),
    )
}

/// Whether the offer can be ordered: capacity left and not sold out by a fault.
fn in_stock(sim: &Sim, faults: &Faults, offer_name: &str) -> bool {
    let used = sim.fleet.lock().map_or(0, |f| f.servers.len());
    used < sim.cfg.capacity && !faults.sold_out(offer_name)
}

fn offers(sim: &Sim, faults: &Faults) -> Reply {
    let list: Vec<Value> = OFFERS
        .iter()
        .map(|(id, name)| {
            let stock = if in_stock(sim, faults, name) {
                "available"
            } else {
                "empty"
            };
            json!({
                "id": id, "name": name, "stock": stock, "bandwidth": 1_000_000_000u64,
                "commercial_range": "aluminium",
                "price_per_hour": {"currency_code": "EUR", "units": 0, "nanos": 210_000_000},
                "price_per_month": {"currency_code": "EUR", "units": 139, "nanos": 0},
                "quota_name": "baremetal_em_a115x_ssd", "subscription_period": "hourly",
                "enable": true, "incompatible_os_ids": [], "tags": [],
            })
        })
        .collect();
    reply(
        StatusCode::OK,
        &json!({"offers": list, "total_count": OFFERS.len()}),
    )
}

fn list(sim: &Sim, zone: &str, query: &str, faults: &Faults) -> Reply {
    let tags: Vec<String> = query_param(query, "tags")
        .map(|t| t.split(',').map(percent_decode).collect())
        .unwrap_or_default();
    let status = query_param(query, "status").map(percent_decode);
    let page: usize = query_param(query, "page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let page_size: usize = query_param(query, "page_size")
        .and_then(|p| p.parse().ok())
        .unwrap_or(50)
        .clamp(1, 100);
    let Ok(mut fleet) = sim.fleet.lock() else {
        return poisoned();
    };
    if page == 1 && fleet.empty_listings > 0 {
        fleet.empty_listings -= 1;
        return reply(StatusCode::OK, &json!({"servers": [], "total_count": 0}));
    }
    // A skipped first page: its servers are missing, the total still counts them.
    let skip = page == 1 && fleet.skip_pages > 0;
    if skip {
        fleet.skip_pages -= 1;
    }
    let now = Instant::now();
    let hidden = |s: &Server| {
        !faults.hide_new_for.is_zero()
            && s.ordered_at
                .is_some_and(|t| now.saturating_duration_since(t) < faults.hide_new_for)
    };
    let matching: Vec<&Server> = fleet
        .servers
        .values()
        .filter(|s| s.zone == zone)
        .filter(|s| !hidden(s))
        .filter(|s| tags.iter().all(|t| s.tags.contains(t)))
        .filter(|s| status.as_deref().is_none_or(|st| statuses(s).0 == st))
        .collect();
    let total = matching.len();
    let page = if skip { page + 1 } else { page };
    let servers: Vec<Value> = matching
        .into_iter()
        .skip((page - 1) * page_size)
        .take(page_size)
        .map(server_json)
        .collect();
    reply(
        StatusCode::OK,
        &json!({"servers": servers, "total_count": total}),
    )
}

pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Deserialize)]
struct CreateBody {
    offer_id: String,
    #[serde(default)]
    project_id: String,
    name: String,
    #[serde(default)]
    tags: Vec<String>,
    install: Option<Install>,
    /// Cloud-init user-data, base64 (a bytes field of the API).
    #[serde(default)]
    user_data: Option<String>,
}

#[derive(Deserialize)]
struct Install {
    #[serde(default)]
    ssh_key_ids: Vec<String>,
}

/// Largest user-data accepted, decoded.
const MAX_USER_DATA_BYTES: usize = 64 * 1024;

/// Decodes standard base64 (RFC 4648, padding optional); `None` when it is not.
pub(super) fn unbase64(text: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    Some(out)
}

async fn create(sim: &Sim, zone: &str, body: &[u8], faults: &Faults, lose: bool) -> Reply {
    let order: CreateBody = match serde_json::from_slice(body) {
        Ok(o) => o,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_arguments",
                &format!("invalid body: {e}"),
            )
        }
    };
    let Some((offer_id, offer_name)) = OFFERS.iter().find(|o| o.0 == order.offer_id) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_arguments",
            &format!("offer {} not found", order.offer_id),
        );
    };
    let Some(install) = order.install.filter(|_| !order.name.is_empty()) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_arguments",
            "name and install are required",
        );
    };
    let user_data = match order.user_data.as_deref().map(unbase64) {
        None => None,
        Some(Some(bytes)) if bytes.len() <= MAX_USER_DATA_BYTES => {
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
        Some(Some(_)) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_arguments",
                "user_data is larger than 64 KiB",
            )
        }
        Some(None) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_arguments",
                "user_data is not base64",
            )
        }
    };
    if !in_stock(sim, faults, offer_name) {
        return api_error(
            StatusCode::CONFLICT,
            "out_of_stock",
            &format!("offer {offer_name} is out of stock in {zone}"),
        );
    }
    let (server, lost, failed) = {
        let Ok(mut fleet) = sim.fleet.lock() else {
            return poisoned();
        };
        let ip = fleet.next_address();
        let lost = lose || fleet.lose_orders > 0;
        fleet.lose_orders = fleet.lose_orders.saturating_sub(1);
        let server = Server {
            id: new_uuid(),
            name: order.name,
            zone: zone.to_owned(),
            offer_id: (*offer_id).to_owned(),
            project_id: order.project_id,
            tags: order.tags,
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            phase: Phase::Ordered,
            deleting: false,
            ip: Some(ip),
            doomed: faults.doomed(fastrand::f64()),
            delivery_ms: sim.cfg.sample(sim.cfg.delivery).as_millis() as u64,
            install_ms: sim.cfg.sample(sim.cfg.install).as_millis() as u64,
            ordered_at: Some(Instant::now()),
            deleting_at: None,
            user_data,
            ssh_key_ids: install.ssh_key_ids,
            private_network: None,
            private_ip: None,
        };
        fleet.servers.insert(server.id.clone(), server.clone());
        sim.save(&fleet);
        (server, lost, fleet.fail_after_create())
    };
    if lost {
        tokio::time::sleep(faults.lost_delay()).await;
    }
    if failed {
        return api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        );
    }
    reply(StatusCode::OK, &server_json(&server))
}

/// `POST /baremetal/v3/zones/{zone}/servers/{id}/private-networks`
/// `{"private_network_id"}`: attaches the server; its private address shows in IPAM.
async fn attach(sim: &Sim, id: &str, req: Request<Incoming>) -> Reply {
    #[derive(Deserialize)]
    struct Attach {
        private_network_id: String,
    }
    if req.method() != Method::POST {
        return api_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST",
        );
    }
    let Some(body) = read_body(req).await else {
        return too_large();
    };
    let Ok(a) = serde_json::from_slice::<Attach>(&body) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_arguments",
            "private_network_id is required",
        );
    };
    let Ok(mut fleet) = sim.fleet.lock() else {
        return poisoned();
    };
    let Some(moved) = fleet.attach(id, &a.private_network_id) else {
        return not_found(id);
    };
    if let Some(blade) = moved {
        blade.kill();
    }
    let v = json!({
        "id": format!("spn-{id}"), "server_id": id, "private_network_id": a.private_network_id,
        "status": "attached", "vlan": 1000, "ipam_ip_ids": [format!("ip-priv-{id}")],
    });
    sim.save(&fleet);
    reply(StatusCode::OK, &v)
}

/// `GET /ipam/v1/regions/{region}/ips?resource_id=&private_network_id=`: the private
/// addresses of a server.
fn ipam_ips(sim: &Sim, query: &str) -> Reply {
    let resource = query_param(query, "resource_id").map(percent_decode);
    let network = query_param(query, "private_network_id").map(percent_decode);
    let Ok(fleet) = sim.fleet.lock() else {
        return poisoned();
    };
    let ips: Vec<Value> = fleet
        .servers
        .values()
        .filter(|s| resource.as_deref().is_none_or(|r| r == s.id))
        .filter(|s| s.private_network.is_some())
        .filter(|s| network.is_none() || s.private_network == network)
        .filter_map(|s| {
            s.private_ip.map(|ip| {
                json!({
                    "id": format!("ip-priv-{}", s.id), "address": format!("{ip}/32"), "is_ipv6": false,
                    "resource": {"type": "baremetal_private_nic", "id": s.id},
                    "private_network_id": s.private_network,
                })
            })
        })
        .collect();
    let total = ips.len();
    reply(StatusCode::OK, &json!({"ips": ips, "total_count": total}))
}

fn delete(sim: &Sim, id: &str) -> Reply {
    let Ok(mut fleet) = sim.fleet.lock() else {
        return poisoned();
    };
    let Some(server) = fleet.delete(id, Instant::now()) else {
        return not_found(id);
    };
    let v = server_json(server);
    sim.save(&fleet);
    reply(StatusCode::OK, &v)
}
