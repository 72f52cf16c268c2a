//! The admin API end to end: real blades, a real surge, HTTP calls on 127.0.0.1.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::Value;
use surge::admin::api;

use common::process::eventually_async;
use common::*;

const TOKEN: &str = "test-token-0123456789abcdef";

fn auth() -> (&'static str, String) {
    ("authorization", format!("Bearer {TOKEN}"))
}

async fn start(
    blade_count: usize,
    pool_extra: &str,
) -> (Vec<surge::blade::BladeHandle>, surge::serve::Running) {
    let blades = blades(blade_count, Duration::from_millis(1)).await;
    let mut cfg = config(&blades, pool_extra);
    cfg.admin.token = Some(TOKEN.into());
    let running = surge::serve::start(&cfg).await.unwrap();
    (blades, running)
}

async fn admin(c: &HttpClient, addr: SocketAddr, method: Method, path: &str, body: &str) -> Reply {
    let (k, v) = auth();
    send(
        c,
        method,
        addr,
        path,
        &[(k, &v), ("content-type", "application/json")],
        body,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_right_token_get_401() {
    let (_blades, surge) = start(1, "").await;
    let addr = surge.admin.local_addr;
    let c = client();
    let mut last_byte_off = TOKEN.to_owned();
    last_byte_off.pop();
    last_byte_off.push('g');
    for header in [
        None,
        Some("Bearer nope".to_owned()),
        Some(format!("Bearer {last_byte_off}")),
        Some(TOKEN.to_owned()),
    ] {
        let headers: Vec<(&str, &str)> = header
            .iter()
            .map(|h| ("authorization", h.as_str()))
            .collect();
        for path in ["/v1/nodes", "/metrics", "/v1/openapi.json"] {
            let r = send(&c, Method::GET, addr, path, &headers, "")
                .await
                .unwrap();
            assert_eq!(r.status, 401, "{path} with {header:?}");
            assert_eq!(r.json()["error"], "unauthorized");
            assert_eq!(r.headers["www-authenticate"], "Bearer");
        }
    }
    let drain = send(&c, Method::POST, addr, "/v1/nodes/blade-1/drain", &[], "{}")
        .await
        .unwrap();
    assert_eq!(drain.status, 401);
    assert_eq!(
        surge.pool.snapshot().get("blade-1").unwrap().state,
        surge::pool::State::InService
    );
    assert_eq!(
        admin(&c, addr, Method::GET, "/v1/nodes", "").await.status,
        200
    );
    for open in ["/healthz", "/readyz"] {
        assert_eq!(
            get(&c, addr, open).await.unwrap().status,
            200,
            "{open} needs no token"
        );
    }
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_listed_and_bad_calls_change_nothing() {
    let (blades, surge) = start(2, "").await;
    let addr = surge.admin.local_addr;
    let c = client();
    let list = admin(&c, addr, Method::GET, "/v1/nodes", "").await.json();
    let nodes = list["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0]["id"], "blade-1");
    assert_eq!(nodes[0]["address"], blades[0].addr.to_string());
    assert_eq!(nodes[0]["state"], "in_service");
    assert_eq!(nodes[0]["origin"], "static");

    let generation = surge.pool.snapshot().generation;
    let bad = [
        (
            Method::POST,
            "/v1/nodes/blade-1/drain",
            "{\"timeout\": ",
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/nodes/blade-1/drain",
            "{\"timeout\": \"soon\"}",
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/nodes/blade-1/drain",
            "{\"timeout\": \"1s\", \"speed\": 1}",
            400,
            "invalid_json",
        ),
        (Method::POST, "/v1/nodes/nope/drain", "{}", 404, "not_found"),
        (Method::GET, "/v1/nodes/nope", "", 404, "not_found"),
        (
            Method::POST,
            "/v1/nodes",
            "{\"address\": \"here\"}",
            400,
            "invalid_argument",
        ),
        (
            Method::POST,
            "/v1/nodes",
            &format!("{{\"address\": \"{}\"}}", blades[0].addr),
            409,
            "conflict",
        ),
        (Method::PUT, "/v1/nodes", "", 405, "method_not_allowed"),
        (Method::GET, "/v2/everything", "", 404, "not_found"),
    ];
    for (method, path, body, status, kind) in bad {
        let r = admin(&c, addr, method.clone(), path, body).await;
        assert_eq!(
            r.status,
            status,
            "{method} {path} {body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["error"], kind, "{method} {path}");
        assert!(r.json()["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let huge = format!("{{\"timeout\": \"{}\"}}", "9".repeat(70_000));
    let r = admin(&c, addr, Method::POST, "/v1/nodes/blade-1/drain", &huge).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        surge.pool.snapshot().generation,
        generation,
        "a rejected call changed the pool"
    );

    // Two in service, minimum one: the first drain is fine, the second refused unless forced.
    let r = admin(
        &c,
        addr,
        Method::POST,
        "/v1/nodes/blade-1/drain",
        "{\"timeout\": \"60s\"}",
    )
    .await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["state"], "draining");
    let again = admin(
        &c,
        addr,
        Method::POST,
        "/v1/nodes/blade-1/drain",
        "{\"timeout\": \"1s\"}",
    )
    .await;
    assert_eq!(again.status, 202, "drain is idempotent");
    assert_eq!(
        again.json()["drain_deadline"],
        r.json()["drain_deadline"],
        "and keeps its deadline"
    );
    let r = admin(&c, addr, Method::POST, "/v1/nodes/blade-2/drain", "{}").await;
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    let r = admin(
        &c,
        addr,
        Method::POST,
        "/v1/nodes/blade-2/drain",
        "{\"force\": true}",
    )
    .await;
    assert_eq!(r.status, 202);
    let r = admin(&c, addr, Method::POST, "/v1/nodes/blade-2/undrain", "").await;
    assert_eq!(r.json()["state"], "in_service");
    let r = admin(&c, addr, Method::POST, "/v1/nodes/blade-2/maint", "").await;
    assert_eq!(r.json()["state"], "maint");
    assert_eq!(
        get(&c, surge.proxy.local_addr, "/catalog")
            .await
            .unwrap()
            .status,
        503,
        "nothing in service"
    );
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_under_load_fails_no_request_and_keeps_carts_home() {
    let (blades, surge) = start(3, "[pool.sticky]\ncookie = \"cart\"\n").await;
    let proxy = surge.proxy.local_addr;
    let stop = Arc::new(AtomicBool::new(false));
    // When the drain call returned; requests starting later must not reach blade-1 unless
    // they belong to a cart bound to it.
    let drained_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let leaks = Arc::new(Mutex::new(Vec::<String>::new()));
    let carts_home = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let mut load = Vec::new();
    for worker in 0..6 {
        let (stop, drained_at, failures, leaks, carts_home) = (
            stop.clone(),
            drained_at.clone(),
            failures.clone(),
            leaks.clone(),
            carts_home.clone(),
        );
        load.push(tokio::spawn(async move {
            let c = client();
            let after_drain = |t: Instant| drained_at.lock().unwrap().is_some_and(|d| t > d);
            while !stop.load(Ordering::Relaxed) {
                if worker % 2 == 0 {
                    // Browsing: no cart, must never reach a drained blade.
                    let t = Instant::now();
                    match get(&c, proxy, "/catalog").await {
                        Ok(r) if r.status == 200 => {
                            if after_drain(t) && r.blade() == "blade-1" {
                                leaks.lock().unwrap().push("browse".into());
                            }
                        }
                        Ok(r) => failures
                            .lock()
                            .unwrap()
                            .push(format!("browse {}", r.status)),
                        Err(e) => failures.lock().unwrap().push(format!("browse {e}")),
                    }
                    continue;
                }
                // A cart session: create, three more lines, look, check out.
                let t = Instant::now();
                let created = match send(&c, Method::POST, proxy, "/cart", &[], "").await {
                    Ok(r) if r.status == 201 => r,
                    Ok(r) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("create {}", r.status));
                        continue;
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(format!("create {e}"));
                        continue;
                    }
                };
                let home = created.blade();
                if after_drain(t) && home == "blade-1" {
                    leaks.lock().unwrap().push("new cart".into());
                }
                let cookie = format!(
                    "cart={}; surge_route={}",
                    created.set_cookie("cart").unwrap_or_default(),
                    created.set_cookie("surge_route").unwrap_or_default()
                );
                let steps = [
                    (Method::POST, "/cart", "{\"product\": 3}"),
                    (Method::POST, "/cart", "{\"product\": 4}"),
                    (Method::GET, "/cart", ""),
                    (Method::POST, "/checkout", ""),
                ];
                for (method, path, body) in steps {
                    match send(
                        &c,
                        method.clone(),
                        proxy,
                        path,
                        &[("cookie", &cookie)],
                        body,
                    )
                    .await
                    {
                        Ok(r) if r.status.is_success() => {
                            if r.blade() != home {
                                failures.lock().unwrap().push(format!(
                                    "{method} {path}: cart left {home} for {}",
                                    r.blade()
                                ));
                            }
                        }
                        Ok(r) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{method} {path} {}", r.status)),
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{method} {path} {e}")),
                    }
                }
                *carts_home.lock().unwrap().entry(home).or_default() += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c = client();
    let r = admin(
        &c,
        surge.admin.local_addr,
        Method::POST,
        "/v1/nodes/blade-1/drain",
        "{\"timeout\": \"3s\"}",
    )
    .await;
    assert_eq!(r.status, 202);
    *drained_at.lock().unwrap() = Some(Instant::now());
    let served_at_drain = blades[0].served();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        leaks.lock().unwrap().is_empty(),
        "new work reached the draining blade: {:?}",
        leaks.lock().unwrap()
    );
    let carts = carts_home.lock().unwrap().clone();
    assert!(
        carts.get("blade-1").copied().unwrap_or(0) > 0,
        "some carts lived on blade-1: {carts:?}"
    );
    assert!(carts.len() == 3, "{carts:?}");
    // Carts bound to blade-1 when the drain began went on being served there.
    assert!(blades[0].served() >= served_at_drain);

    let pool = surge.pool.clone();
    let idle = eventually(Duration::from_secs(2), || {
        pool.snapshot().get("blade-1").unwrap().backend.in_flight() == 0
    })
    .await;
    assert!(idle, "in-flight count of the drained blade did not reach 0");
    let node = admin(
        &c,
        surge.admin.local_addr,
        Method::GET,
        "/v1/nodes/blade-1",
        "",
    )
    .await
    .json();
    assert_eq!(node["state"], "draining");
    assert_eq!(node["drain_done"], true);
    assert_eq!(node["in_flight"], 0);
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_in_the_openapi_document_answers_as_documented() {
    let (_blades, surge) = start(3, "").await;
    let addr = surge.admin.local_addr;
    let c = client();
    let doc = admin(&c, addr, Method::GET, "/v1/openapi.json", "")
        .await
        .json();
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().unwrap();
    let mut calls = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let Ok(method) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            if method == Method::from_bytes(b"PARAMETERS").unwrap() {
                continue;
            }
            let url = path.replace("{id}", "blade-3");
            let body = op["requestBody"]["content"]["application/json"]["example"].clone();
            let body = if body.is_null() {
                String::new()
            } else {
                body.to_string()
            };
            let r = admin(&c, addr, method.clone(), &url, &body).await;
            let documented = &op["responses"][r.status.as_str()];
            assert!(
                !documented.is_null(),
                "{method} {url} answered {} which is not documented",
                r.status
            );
            if let Some(content) = documented["content"].as_object() {
                let ct = r
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                assert!(
                    content.keys().any(|k| ct.starts_with(k.as_str())),
                    "{method} {url}: content-type {ct}"
                );
                if ct.starts_with("application/json") {
                    assert!(!r.json().is_null(), "{method} {url}: body is not JSON");
                }
                // The body is the document type the server, client and docs share.
                let schema = documented["content"]["application/json"]["schema"]["$ref"]
                    .as_str()
                    .unwrap_or("");
                let typed = match (schema, path.as_str(), r.status.as_u16()) {
                    ("#/components/schemas/Node", ..) => {
                        serde_json::from_value::<api::Node>(r.json()).map(drop)
                    }
                    ("#/components/schemas/NodeList", ..) => {
                        serde_json::from_value::<api::NodeList>(r.json()).map(drop)
                    }
                    ("#/components/schemas/Error", ..) => {
                        serde_json::from_value::<api::ErrorBody>(r.json()).map(drop)
                    }
                    (_, "/readyz", _) => serde_json::from_value::<api::Ready>(r.json()).map(drop),
                    (_, "/v1/tls/reload", 200 | 422) => {
                        serde_json::from_value::<api::TlsReload>(r.json()).map(drop)
                    }
                    _ => Ok(()),
                };
                assert!(typed.is_ok(), "{method} {url}: {typed:?}: {}", r.json());
                if schema == "#/components/schemas/Node" {
                    for key in doc["components"]["schemas"]["Node"]["required"]
                        .as_array()
                        .unwrap()
                    {
                        assert!(
                            !r.json()[key.as_str().unwrap()].is_null(),
                            "{method} {url}: no `{key}`"
                        );
                    }
                }
            }
            calls += 1;
        }
    }
    assert!(calls >= 10, "only {calls} operations walked");
    surge.stop().await;
}

/// Minimal check of the Prometheus text format: every sample line is
/// `name{label="value",...} number`.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name_end = key.find('{').unwrap_or(key.len());
        assert!(
            key[..name_end]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad metric name: {line}"
        );
        if name_end < key.len() {
            assert!(key.ends_with('}'), "bad labels: {line}");
        }
        samples.insert(key.to_owned(), value);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_traffic() {
    let (_blades, surge) = start(1, "").await;
    let c = client();
    let scrape = |c: HttpClient| {
        let addr = surge.admin.local_addr;
        async move {
            let r = admin(&c, addr, Method::GET, "/metrics", "").await;
            assert_eq!(r.status, 200);
            assert!(r.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain"));
            parse_exposition(&String::from_utf8_lossy(&r.body))
        }
    };
    for _ in 0..5 {
        assert_eq!(
            get(&c, surge.proxy.local_addr, "/catalog")
                .await
                .unwrap()
                .status,
            200
        );
    }
    let before = scrape(c.clone()).await;
    let key = "surge_requests_total{backend=\"blade-1\",code_class=\"2xx\"}";
    let n0 = before
        .get(key)
        .copied()
        .unwrap_or_else(|| panic!("no {key} in {before:?}"));
    assert!(n0 >= 5.0);
    assert!(before.contains_key("surge_pool_nodes{state=\"in_service\"}"));
    assert!(before
        .keys()
        .any(|k| k.starts_with("surge_request_duration_seconds_bucket")));
    for _ in 0..7 {
        get(&c, surge.proxy.local_addr, "/catalog").await.unwrap();
    }
    let after = scrape(c.clone()).await;
    assert_eq!(after[key], n0 + 7.0);
    assert!(
        after["surge_connections_accepted_total"] >= before["surge_connections_accepted_total"]
    );
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_and_drains_nodes() {
    let (_blades, surge) = start(2, "").await;
    let url = format!("http://{}", surge.admin.local_addr);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_surge"))
            .args(args)
            .args(["--admin", &url])
            .env("SURGE_ADMIN_TOKEN", TOKEN)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = tokio::task::block_in_place(|| run(&["nodes"]));
    assert!(ok, "{err}");
    assert!(out.starts_with("ID"), "{out}");
    assert!(
        out.contains("blade-1") && out.contains("in_service"),
        "{out}"
    );
    let (ok, out, err) =
        tokio::task::block_in_place(|| run(&["drain", "blade-2", "--timeout", "30s"]));
    assert!(ok, "{err}");
    assert!(out.contains("draining"), "{out}");
    let (ok, _, err) = tokio::task::block_in_place(|| run(&["drain", "blade-1"]));
    assert!(!ok, "draining the last node must be refused");
    assert!(err.contains("409") && err.contains("minimum"), "{err}");
    let (ok, out, _) = tokio::task::block_in_place(|| run(&["undrain", "blade-2"]));
    assert!(ok && out.contains("in_service"), "{out}");
    let _ = Value::Null;
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_drain_timeout_is_refused_not_a_crash() {
    let (_blades, surge) = start(3, "").await;
    let addr = surge.admin.local_addr;
    let c = client();
    let r = admin(
        &c,
        addr,
        Method::POST,
        "/v1/nodes/blade-1/drain",
        r#"{"timeout": "300000000000y"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.json());
    assert!(r.json()["detail"]
        .as_str()
        .is_some_and(|d| d.contains("maximum drain")));
    let r = admin(
        &c,
        addr,
        Method::DELETE,
        "/v1/nodes/blade-1?timeout=300000000000y",
        "",
    )
    .await;
    assert_eq!(r.status, 400);
    // The API still answers, and the node was not touched.
    let r = admin(&c, addr, Method::GET, "/v1/nodes/blade-1", "").await;
    assert_eq!(r.json()["state"], "in_service");
    surge.stop().await;
}

/// A request the admin API must refuse: method, path, headers, body, status, error kind.
type Refused<'a> = (
    Method,
    &'a str,
    Vec<(&'a str, &'a str)>,
    &'a str,
    u16,
    &'a str,
);

/// A web page the operator has open cannot drive the admin API: not by a cross-site
/// POST (CSRF, with or without a token), not through a rebound DNS name, not with a body
/// a form can send. Each refusal changes nothing; the CLI's way still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_drive_the_admin_api() {
    let (_blades, surge) = start(2, "").await;
    let addr = surge.admin.local_addr;
    let c = client();
    let (k, v) = auth();
    let own_origin = format!("http://{addr}");
    let rebound = format!("shop-sale.example:{}", addr.port());
    let json = ("content-type", "application/json");
    let generation = surge.pool.snapshot().generation;
    let refused: Vec<Refused> = vec![
        // A cross-site form or fetch() from another origin.
        (
            Method::POST,
            "/v1/nodes/blade-1/drain",
            vec![(k, &v), json, ("origin", "http://evil.example")],
            "{\"force\": true}",
            403,
            "cross_origin",
        ),
        (
            Method::POST,
            "/v1/upgrade",
            vec![(k, &v), ("origin", "null")],
            "",
            403,
            "cross_origin",
        ),
        (
            Method::DELETE,
            "/v1/nodes/blade-2",
            vec![(k, &v), ("sec-fetch-site", "cross-site")],
            "",
            403,
            "cross_origin",
        ),
        // DNS rebinding: the page's own name now points at 127.0.0.1.
        (
            Method::POST,
            "/v1/nodes/blade-1/maint",
            vec![
                (k, &v),
                ("host", &rebound),
                ("origin", "http://shop-sale.example"),
            ],
            "",
            403,
            "forbidden_host",
        ),
        (
            Method::GET,
            "/v1/nodes",
            vec![(k, &v), ("host", &rebound)],
            "",
            403,
            "forbidden_host",
        ),
        // A body a form can send without asking (no preflight).
        (
            Method::POST,
            "/v1/nodes",
            vec![(k, &v), ("content-type", "text/plain")],
            "{\"address\": \"127.0.0.1:9\"}",
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/v1/nodes/blade-1/drain",
            vec![
                (k, &v),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "{\"force\": true}",
            415,
            "unsupported_media_type",
        ),
    ];
    for (method, path, headers, body, status, kind) in refused {
        let r = send(&c, method.clone(), addr, path, &headers, body)
            .await
            .unwrap();
        assert_eq!(
            r.status.as_u16(),
            status,
            "{method} {path} {headers:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["error"], kind, "{method} {path}");
    }
    assert_eq!(
        surge.pool.snapshot().generation,
        generation,
        "a refused call changed the pool"
    );
    assert_eq!(
        surge.pool.snapshot().count(surge::pool::State::InService),
        2
    );
    // The admin API's own origin, and the CLI (no Origin at all), are served.
    let r = send(
        &c,
        Method::POST,
        addr,
        "/v1/nodes/blade-2/drain",
        &[
            (k, &v),
            json,
            ("origin", &own_origin),
            ("sec-fetch-site", "same-origin"),
        ],
        "{\"timeout\": \"1s\"}",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let client = surge::admin::client::AdminClient::new(&own_origin, Some(TOKEN.into()));
    assert!(client.undrain("blade-2").await.is_ok());
    surge.stop().await;
}

/// No client can hold the admin API: a body that never arrives gets 408 (and changes
/// nothing); connections beyond the limit are closed at once, and the API answers again
/// as soon as the idle ones go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_clients_cannot_hold_the_admin_api() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_blades, surge) = start(1, "").await;
    let addr = surge.admin.local_addr;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/nodes/blade-1/drain HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{{\"force\""
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        surge::admin::ADMIN_READ_TIMEOUT + Duration::from_secs(5),
        s.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "a trickling body held the connection");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(
        surge.pool.snapshot().count(surge::pool::State::InService),
        1,
        "the half-sent drain changed the pool"
    );

    let mut idle = Vec::new();
    for _ in 0..surge::admin::MAX_ADMIN_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a connection beyond the limit was kept: {closed:?}"
    );
    drop(idle);
    let c = client();
    let back = eventually_async(Duration::from_secs(3), || async {
        send(
            &c,
            Method::GET,
            addr,
            "/v1/nodes",
            &[(auth().0, &auth().1)],
            "",
        )
        .await
        .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(
        back,
        "the admin API did not come back once the idle clients left"
    );
    surge.stop().await;
}
