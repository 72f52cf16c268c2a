//! End-to-end behaviour of the data plane: real blades, a real surge, real sockets on
//! 127.0.0.1 ports picked at run time.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;
use surge::config::Engine;
use surge::pool::{Backend, Origin, State};

const FAST_HEALTH: &str =
    "[pool.health]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_requests_evenly() {
    let blades = blades(3, Duration::ZERO).await;
    let cfg = config(&blades, "algorithm = \"round-robin\"");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let c = client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let r = get(&c, surge.proxy.local_addr, "/catalog").await.unwrap();
        assert_eq!(r.status, 200);
        *counts.entry(r.blade()).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 100), "{counts:?}");
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_fewer_requests_to_a_slow_blade() {
    let blades = blades(3, Duration::ZERO).await;
    blades[0].set_latency(Duration::from_millis(40));
    let cfg = config(&blades, "algorithm = \"p2c-ewma\"");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let counts = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..50 {
                let r = get(&c, addr, "/catalog").await.unwrap();
                assert_eq!(r.status, 200);
                *counts.lock().unwrap().entry(r.blade()).or_default() += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    let slow = counts.get("blade-1").copied().unwrap_or(0);
    let fast =
        counts.get("blade-2").copied().unwrap_or(0) + counts.get("blade-3").copied().unwrap_or(0);
    // Round robin would give the slow blade a third (133 of 400).
    assert!(
        slow * 4 < fast / 2,
        "slow blade got {slow}, fast ones {fast}: {counts:?}"
    );
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cart_stays_on_its_blade_and_survives_a_drain() {
    let blades = blades(3, Duration::ZERO).await;
    let cfg = config(&blades, "[pool.sticky]\ncookie = \"cart\"\n");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let c = client();

    let created = send(&c, Method::POST, addr, "/cart", &[], "{\"product\": 7}")
        .await
        .unwrap();
    assert_eq!(created.status, 201);
    let cart = created
        .set_cookie("cart")
        .expect("blade sets the cart cookie");
    let route = created
        .set_cookie("surge_route")
        .expect("surge binds the cart");
    let home = created.blade();
    assert!(
        route.starts_with(&format!("{home}~")),
        "the route cookie names the cart's blade, signed: {route}"
    );
    let cookies = format!("cart={cart}; surge_route={route}");

    for i in 0..100 {
        let r = send(&c, Method::GET, addr, "/cart", &[("cookie", &cookies)], "")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "request {i}: cart lost");
        assert_eq!(r.blade(), home, "request {i} left the cart's blade");
    }

    surge.pool.drain(&home, Duration::from_secs(60)).unwrap();
    for i in 0..20 {
        let r = send(
            &c,
            Method::POST,
            addr,
            "/cart",
            &[("cookie", &cookies)],
            "{\"product\": 2}",
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "request {i} during drain: cart lost");
        assert_eq!(r.blade(), home);
        assert_eq!(
            r.headers["connection"], "close",
            "draining blade's shoppers reconnect"
        );
    }
    for _ in 0..30 {
        let r = send(&c, Method::POST, addr, "/cart", &[], "")
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        assert_ne!(r.blade(), home, "a new cart went to the draining blade");
    }
    let checkout = send(
        &c,
        Method::POST,
        addr,
        "/checkout",
        &[("cookie", &cookies)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(checkout.status, 200);
    assert_eq!(checkout.json()["items"], 21);
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_blade_costs_no_get_and_comes_back_after_restart() {
    let mut blades = blades(3, Duration::from_millis(2)).await;
    let cfg = config(
        &blades,
        &format!("[pool.ejection]\nconsecutive_failures = 3\nbase_time = \"500ms\"\n{FAST_HEALTH}"),
    );
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok) = (stop.clone(), ok.clone());
        load.push(tokio::spawn(async move {
            let c = client();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match get(&c, addr, "/catalog").await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        failures.push(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = blades.remove(0);
    let victim_addr = victim.addr;
    victim.kill();
    let pool = surge.pool.clone();
    let down = eventually(Duration::from_secs(5), || {
        pool.snapshot().get("blade-1").map(|m| m.state) == Some(State::Down)
    })
    .await;
    assert!(down, "killed blade was not taken out");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let restarted = surge::blade::start(surge::blade::BladeConfig {
        id: "blade-1".into(),
        listen: victim_addr,
        latency: Duration::from_millis(2),
        cpu_work: 0,
        tls: None,
    })
    .await
    .unwrap();
    let back = eventually(Duration::from_secs(10), || {
        pool.snapshot().get("blade-1").map(|m| m.state) == Some(State::InService)
    })
    .await;
    assert!(back, "restarted blade did not come back into service");
    let served_before = restarted.served();
    let got_traffic = eventually(Duration::from_secs(5), || {
        restarted.served() > served_before
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for t in load {
        failures.extend(t.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed GETs: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    assert!(got_traffic, "restarted blade gets requests again");
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_table_swaps_under_load_fail_no_request() {
    let blades = blades(4, Duration::ZERO).await;
    let cfg = config(&blades[..2], "");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let extra: Vec<Arc<Backend>> = blades[2..]
        .iter()
        .map(|b| Arc::new(Backend::new(&b.id, b.addr, 1, Origin::Provisioned)))
        .collect();
    let mut all: Vec<Arc<Backend>> = surge
        .pool
        .snapshot()
        .members()
        .iter()
        .map(|m| m.backend.clone())
        .collect();
    all.extend(extra.iter().cloned());

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match get(&c, addr, "/catalog").await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(r.status.to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    let pool = surge.pool.clone();
    let start_gen = pool.snapshot().generation;
    for i in 0..500 {
        let b = &extra[i % 2];
        pool.add_in_service(b.clone()).unwrap();
        tokio::time::sleep(Duration::from_micros(200)).await;
        pool.remove(&b.id).unwrap();
    }
    let swaps = pool.snapshot().generation - start_gen;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for t in load {
        let (o, f) = t.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(swaps >= 1000, "only {swaps} swaps");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 200, "too little load to mean anything: {ok}");
    assert!(
        blades[2].served() + blades[3].served() > 0,
        "added backends took traffic"
    );
    let settled = eventually(Duration::from_secs(2), || {
        all.iter().all(|b| b.in_flight() == 0)
    })
    .await;
    assert!(
        settled,
        "in-flight counters leaked: {:?}",
        all.iter().map(|b| b.in_flight()).collect::<Vec<_>>()
    );
    surge.stop().await;
}

/// What the blade learns of the shopper comes from surge, not from the shopper: the
/// address (`X-Forwarded-For`), the scheme, and no `Forwarded`, `X-Forwarded-Host`,
/// `-Port` or `X-Real-IP` of the shopper's making (a frontend that trusts its proxy
/// would build links to `evil.example`). Behind a proxy of the shop's own, its word
/// passes. Both HTTP/1.1 engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set_and_hop_by_hop_ones_dropped() {
    let blades = blades(1, Duration::ZERO).await;
    let claims = [
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-port", "8443"),
        ("forwarded", "for=203.0.113.9;host=evil.example"),
        ("x-real-ip", "203.0.113.9"),
        // What frameworks read to build URLs or route (Rack, Symfony, IIS rewrite).
        ("x-forwarded-prefix", "/evil"),
        ("x-forwarded-scheme", "https"),
        ("x-forwarded-ssl", "on"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-forwarded-uri", "/admin"),
        ("x-original-host", "evil.example"),
        ("x-forwarded-server", "evil.example"),
        // Client addresses as CDNs say them; client certificates as an mTLS edge does.
        ("true-client-ip", "203.0.113.9"),
        ("x-client-ip", "203.0.113.9"),
        ("x-forwarded-client-cert", "Hash=00;Subject=\"CN=admin\""),
        ("x-client-cert", "MIIB"),
        ("x-ssl-client-cert", "MIIB"),
        ("ssl-client-cert", "MIIB"),
    ];
    let c = client();
    let headers_seen = |surge: std::net::SocketAddr, asked: Vec<(&'static str, &'static str)>| {
        let c = c.clone();
        async move {
            send(&c, Method::GET, surge, "/debug/headers", &asked, "")
                .await
                .unwrap()
        }
    };
    for engine in [Engine::Surge, Engine::Hyper] {
        let mut cfg = config(&blades, "");
        cfg.proxy.engine = engine;
        let surge = surge::serve::start(&cfg).await.unwrap();
        let mut asked = vec![
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "secret"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-request-id", "from-edge-1"),
        ];
        asked.extend(claims);
        let r = headers_seen(surge.proxy.local_addr, asked).await;
        let seen = r.json();
        // 127.0.0.1 is not a trusted proxy here: the made-up chain is replaced.
        assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{engine:?}");
        assert_eq!(seen["x-forwarded-proto"], "http");
        assert_eq!(seen["x-request-id"], "from-edge-1");
        assert!(seen.get("x-hop").is_none(), "{engine:?}: {seen}");
        assert!(seen.get("connection").is_none(), "{engine:?}: {seen}");
        for (name, _) in claims {
            assert!(
                seen.get(name).is_none(),
                "{engine:?}: {name} passed: {seen}"
            );
        }
        assert_eq!(seen["host"], format!("{}", surge.proxy.local_addr));
        assert_eq!(r.headers["x-request-id"], "from-edge-1");

        let fresh = get(&c, surge.proxy.local_addr, "/debug/headers")
            .await
            .unwrap();
        let id = fresh.json()["x-request-id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(id.len(), 25, "generated id: {id}");
        assert_eq!(fresh.headers["x-request-id"], id.as_str());
        surge.stop().await;
        // Behind a proxy of the shop's own (trusted), its chain is kept and appended
        // to, and what it says of the client's host and port passes.
        cfg.proxy.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
        let surge = surge::serve::start(&cfg).await.unwrap();
        let mut asked = vec![("x-forwarded-for", "203.0.113.9")];
        asked.extend(claims);
        let seen = headers_seen(surge.proxy.local_addr, asked).await.json();
        assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        for (name, value) in claims {
            assert_eq!(seen[name], value, "{engine:?}: {seen}");
        }
        surge.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_gives_503_and_a_dead_one_502() {
    let blades = blades(1, Duration::ZERO).await;
    let surge = surge::serve::start(&config(&blades, "")).await.unwrap();
    let c = client();
    let addr = surge.proxy.local_addr;
    blades[0].kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = get(&c, addr, "/catalog").await.unwrap();
    assert_eq!(r.status, 502);
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("frontend failed"), "{body}");
    assert!(
        !body.contains("blade-1"),
        "the body names a backend: {body}"
    );
    let rid = r.headers["x-request-id"].to_str().unwrap();
    assert!(body.contains(rid), "the body gives the request id: {body}");
    surge.pool.drain("blade-1", Duration::from_secs(1)).unwrap();
    let r = get(&c, addr, "/catalog").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    surge.stop().await;
}

/// Sends raw bytes, returns everything the proxy answered before closing.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "connection was not closed");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_or_431_and_reach_no_blade() {
    let blades = blades(1, Duration::ZERO).await;
    let surge = surge::serve::start(&config(&blades, "")).await.unwrap();
    let addr = surge.proxy.local_addr;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"HELLO THERE\r\n\r\n".to_vec(), "400"),
        (
            "two content-lengths",
            b"POST /cart HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab"
                .to_vec(),
            "400",
        ),
        (
            "space before colon",
            b"GET / HTTP/1.1\r\nhost : x\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "huge header",
            [
                b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec(),
                vec![b'a'; 40_000],
                b"\r\n\r\n".to_vec(),
            ]
            .concat(),
            "431",
        ),
    ];
    for (name, req, status) in cases {
        let answer = raw(addr, &req).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{name}: {answer:?}"
        );
    }
    assert_eq!(
        blades[0].served(),
        0,
        "a malformed request reached the blade"
    );
    let ok = get(&client(), addr, "/").await.unwrap();
    assert_eq!(ok.status, 200, "proxy still serves");
    surge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_full_browsing_is_shed_with_503_and_checkout_still_gets_through() {
    let blades = blades(1, Duration::from_millis(400)).await;
    let cfg = config(
        &blades,
        "[pool.shed]\nmax_in_flight_per_node = 4\nqueue_timeout = \"50ms\"\npriority_headroom_percent = 50\n",
    );
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    // A buyer who came in before the rush (surge's admission cookie).
    let first = get(&client(), addr, "/catalog").await.unwrap();
    let buyer = format!("surge_admit={}", first.set_cookie("surge_admit").unwrap());
    // Fill the node: four slow browsing requests.
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(tokio::spawn(async move {
            get(&client(), addr, "/catalog").await.unwrap().status
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let browse = get(&client(), addr, "/catalog").await.unwrap();
    assert_eq!(
        browse.status,
        503,
        "{}",
        String::from_utf8_lossy(&browse.body)
    );
    assert_eq!(browse.headers["retry-after"], "2");
    assert!(String::from_utf8_lossy(&browse.body).contains("more capacity is on its way"));
    assert_eq!(browse.blade(), "", "a shed request reaches no blade");
    let stranger = send(&client(), Method::POST, addr, "/checkout", &[], "")
        .await
        .unwrap();
    assert_eq!(
        stranger.status, 503,
        "checkout's headroom is for shoppers already in, not a newcomer's way around"
    );
    let checkout = send(
        &client(),
        Method::POST,
        addr,
        "/checkout",
        &[("cookie", &buyer)],
        "",
    )
    .await
    .unwrap();
    assert_ne!(
        checkout.status, 503,
        "checkout has headroom above the browsing limit"
    );
    assert_eq!(checkout.blade(), "blade-1");
    for s in slow {
        assert_eq!(s.await.unwrap(), 200, "admitted requests complete");
    }
    // Room again once they are done.
    assert_eq!(get(&client(), addr, "/catalog").await.unwrap().status, 200);
    assert_eq!(surge.pool.traffic.admission.shed.load(Ordering::Relaxed), 2);
    assert_eq!(
        surge
            .pool
            .traffic
            .admission
            .in_flight
            .load(Ordering::Relaxed),
        0,
        "admission counter leaked"
    );
    surge.stop().await;
}

/// Session-aware admission: when the pool is full for newcomers, a shopper already in
/// (the admission cookie surge set on their first answer) is still served; a new visitor,
/// one with a forged cookie, or one with only a cart cookie (which the blade sets,
/// unsigned) is the one turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_shop_holds_back_newcomers_and_serves_shoppers_already_in() {
    let blades = blades(1, Duration::from_millis(600)).await;
    let cfg = config(
        &blades,
        "[pool.sticky]\ncookie = \"cart\"\n[pool.shed]\nmax_in_flight_per_node = 4\nqueue_timeout = \"50ms\"\nadmitted_reserve_percent = 50\n",
    );
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let c = client();
    // A first visit: admitted (the shop is empty), and given the admission cookie.
    let first = get(&c, addr, "/catalog").await.unwrap();
    assert_eq!(first.status, 200);
    let admit = first
        .set_cookie("surge_admit")
        .expect("an admission cookie");
    let raw = first.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        raw.contains("HttpOnly") && raw.contains("Max-Age=1800"),
        "{raw}"
    );
    let admitted = format!("surge_admit={admit}");

    // Two slow requests of shoppers already in: newcomers' share (half of 4) is used.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let cookie = admitted.clone();
        slow.push(tokio::spawn(async move {
            send(
                &client(),
                Method::GET,
                addr,
                "/catalog",
                &[("cookie", &cookie)],
                "",
            )
            .await
            .unwrap()
        }));
    }
    let admission = &surge.pool.traffic.admission;
    assert!(
        eventually(Duration::from_secs(2), || admission
            .in_flight
            .load(Ordering::SeqCst)
            == 2)
        .await
    );
    let newcomer = get(&c, addr, "/catalog").await.unwrap();
    assert_eq!(newcomer.status, 503, "a newcomer is held back");
    assert!(
        newcomer.set_cookie("surge_admit").is_none(),
        "no cookie with a refusal"
    );
    let forged = format!("surge_admit=admitted~{}~{}", u32::MAX, "0".repeat(32));
    for cookie in [forged.as_str(), "surge_admit=garbage"] {
        let r = send(&c, Method::GET, addr, "/catalog", &[("cookie", cookie)], "")
            .await
            .unwrap();
        assert_eq!(r.status, 503, "{cookie} counted as a shopper already in");
    }
    // A shopper already in (surge's cookie) is served; a bare cart cookie is not "in".
    let by_cookie = [("cookie", admitted.as_str())];
    let by_cart = [("cookie", "cart=c-42")];
    let in_by_cookie = send(&c, Method::GET, addr, "/catalog", &by_cookie, "");
    let in_by_cart = send(&c, Method::GET, addr, "/cart", &by_cart, "");
    let (a, b) = tokio::join!(in_by_cookie, in_by_cart);
    assert_eq!(a.unwrap().status, 200);
    assert_eq!(
        b.unwrap().status,
        503,
        "a cart cookie alone (on a priority path) is a newcomer"
    );
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
    assert_eq!(
        get(&c, addr, "/catalog").await.unwrap().status,
        200,
        "room again"
    );
    surge.stop().await;
}

/// A page load by a newcomer, with `cookie` (if any).
async fn page(c: &HttpClient, addr: std::net::SocketAddr, cookie: &str) -> Reply {
    let mut h = vec![("accept", "text/html,application/xhtml+xml")];
    if !cookie.is_empty() {
        h.push(("cookie", cookie));
    }
    send(c, Method::GET, addr, "/", &h, "").await.unwrap()
}

/// What the waiting page's poll answers the holder of `cookie`.
async fn poll(c: &HttpClient, addr: std::net::SocketAddr, cookie: &str) -> serde_json::Value {
    let h: &[(&str, &str)] = if cookie.is_empty() {
        &[]
    } else {
        &[("cookie", cookie)]
    };
    send(c, Method::GET, addr, "/.well-known/surge/queue", h, "")
        .await
        .unwrap()
        .json()
}

/// The place the waiting page shows.
fn place_of(r: &Reply) -> usize {
    let body = String::from_utf8_lossy(&r.body);
    let at = body.find("id=\"place\">").expect("a waiting page") + 11;
    body[at..].split('<').next().unwrap().parse().unwrap()
}

const ROOM: &str = "[pool.sticky]\ncookie = \"cart\"\n[pool.shed]\nmax_in_flight_per_node = 2\nqueue_timeout = \"50ms\"\nadmitted_reserve_percent = 50\n";

fn room_config(blades: &[surge::blade::BladeHandle], room: &str) -> surge::config::Config {
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 2\naccess_log = false\nshutdown_grace = \"5s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[waiting_room]\nrefresh = \"1s\"\nabandon_after = \"20s\"\n{room}\n[pool]\n{ROOM}"
    );
    for b in blades {
        text.push_str(&format!(
            "[[pool.backends]]\nid = \"{}\"\naddress = \"{}\"\n",
            b.id, b.addr
        ));
    }
    surge::config::Config::parse(&text, std::path::Path::new("room.toml")).expect("valid")
}

/// A full shop holds new visitors in a waiting room, in arrival order: a page with their
/// place, refreshed without losing or gaining it; a forged ticket starts at the end; the
/// page's poll tells the place; API clients get the 503; as room frees, the first in line
/// comes in (and gets the admission cookie), and a ticket used once is used up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_shop_queues_new_visitors_in_order_and_lets_them_in_as_room_frees() {
    let blades = blades(1, Duration::from_millis(800)).await;
    let surge = surge::serve::start(&room_config(&blades, ""))
        .await
        .unwrap();
    let addr = surge.proxy.local_addr;
    let c = client();
    // Two shoppers already in (surge's admission cookie, got on their first page) keep
    // the newcomers' share (1 of 2) taken.
    let mut admitted = Vec::new();
    for _ in 0..2 {
        let first = page(&c, addr, "").await;
        assert_eq!(first.status, 200);
        let id = first
            .set_cookie("surge_admit")
            .expect("an admission cookie");
        admitted.push(format!("surge_admit={id}"));
    }
    assert_ne!(admitted[0], admitted[1], "one admission id per visitor");
    let served_before = blades[0].served();
    let mut slow = Vec::new();
    for cookie in admitted {
        slow.push(tokio::spawn(async move {
            send(
                &client(),
                Method::GET,
                addr,
                "/catalog",
                &[("cookie", &cookie)],
                "",
            )
            .await
            .unwrap()
            .status
        }));
    }
    let admission = &surge.pool.traffic.admission;
    assert!(
        eventually(Duration::from_secs(2), || admission
            .in_flight
            .load(Ordering::SeqCst)
            == 2)
        .await
    );

    let a = page(&c, addr, "").await;
    assert_eq!(a.status, 503);
    assert!(a.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(place_of(&a), 1);
    assert!(String::from_utf8_lossy(&a.body).contains("You are in line"));
    let ticket_a = format!(
        "surge_queue={}",
        a.set_cookie("surge_queue").expect("a ticket")
    );
    let b = page(&c, addr, "").await;
    assert_eq!(place_of(&b), 2);
    let ticket_b = format!("surge_queue={}", b.set_cookie("surge_queue").unwrap());
    // Refreshes keep each place.
    assert_eq!(place_of(&page(&c, addr, &ticket_b).await), 2);
    assert_eq!(place_of(&page(&c, addr, &ticket_a).await), 1);
    // A forged ticket (claiming an early place) gets a fresh place at the end.
    let forged = format!("surge_queue=q1.1~{}~{}", u32::MAX, "0".repeat(32));
    let f = page(&c, addr, &forged).await;
    assert_eq!(place_of(&f), 3);
    assert_ne!(f.set_cookie("surge_queue").unwrap(), "q1.1");
    // The page's poll: the holder's place, nothing for anyone else.
    let a_poll = poll(&c, addr, &ticket_a).await;
    assert_eq!(a_poll["place"], 1, "{a_poll}");
    assert_eq!(a_poll["ready"], false);
    assert!(
        poll(&c, addr, "").await["place"].is_null(),
        "nothing for a visitor without a ticket"
    );
    // An API client is not shown a page: the 503 with Retry-After.
    let api = send(
        &c,
        Method::GET,
        addr,
        "/catalog",
        &[("accept", "application/json")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(api.status, 503);
    assert!(api.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(
        blades[0].served() - served_before,
        2,
        "only the two shoppers already in reached the blade"
    );

    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    // Room again: the first in line comes in, with the admission cookie.
    let entered = page(&c, addr, &ticket_a).await;
    assert_eq!(
        entered.status,
        200,
        "{}",
        String::from_utf8_lossy(&entered.body)
    );
    assert!(entered.set_cookie("surge_admit").is_some());
    assert_eq!(
        entered.set_cookie("surge_queue").as_deref(),
        Some(""),
        "the ticket is cleared"
    );
    // The same ticket again is used up: a fresh place at the end.
    let replay = page(&c, addr, &ticket_a).await;
    assert_eq!(replay.status, 503);
    // B was let in by this visit (room for one); the replay goes behind the forger.
    assert_eq!(place_of(&replay), 2, "behind the forger");
    let poll_b = poll(&c, addr, &ticket_b).await;
    assert_eq!(poll_b["ready"], true, "B's page learns it may come in");
    assert_eq!(
        page(&c, addr, &ticket_b).await.status,
        200,
        "and B comes in"
    );
    let status = send(
        &c,
        Method::GET,
        surge.admin.local_addr,
        "/v1/waiting-room",
        &[],
        "",
    )
    .await
    .unwrap()
    .json();
    // B was let in before its visit, so that visit's room was B's: nobody else was
    // let in on it (the forger and the replay wait).
    assert_eq!(status["queued"], 2, "{status}");
    assert_eq!(status["held"], false);
    surge.stop().await;
}

/// Before a sale: the operator holds the door, and every newcomer waits even in an empty
/// shop (shoppers already in are served); closing it lets the line in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_holds_the_door_before_a_sale_and_opens_it() {
    let blades = blades(1, Duration::ZERO).await;
    let surge = surge::serve::start(&room_config(&blades, ""))
        .await
        .unwrap();
    let (addr, admin) = (surge.proxy.local_addr, surge.admin.local_addr);
    let c = client();
    let first = page(&c, addr, "").await;
    assert_eq!(first.status, 200, "an empty shop, the door open");
    let shopper = format!("surge_admit={}", first.set_cookie("surge_admit").unwrap());
    // A cart, and the route cookie surge binds it with (it names only the blade).
    let cart = send(
        &c,
        Method::POST,
        addr,
        "/cart",
        &[("cookie", &shopper)],
        r#"{"product": 3}"#,
    )
    .await
    .unwrap();
    let route = format!(
        "cart=someone-else; surge_route={}",
        cart.set_cookie("surge_route")
            .expect("a route cookie with the cart")
    );
    let held = send(&c, Method::POST, admin, "/v1/waiting-room/open", &[], "")
        .await
        .unwrap();
    assert_eq!(held.json()["held"], true);
    let early = page(&c, addr, "").await;
    assert_eq!(early.status, 503);
    assert_eq!(place_of(&early), 1);
    let ticket = format!("surge_queue={}", early.set_cookie("surge_queue").unwrap());
    let regular = send(
        &c,
        Method::GET,
        addr,
        "/catalog",
        &[("cookie", &shopper)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(regular.status, 200, "a shopper already in is served");
    let cart_only = send(
        &c,
        Method::GET,
        addr,
        "/catalog",
        &[("cookie", "cart=c-1")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(
        cart_only.status, 503,
        "a cart cookie the blade sets (unsigned) is no way past the line"
    );
    let routed = send(&c, Method::GET, addr, "/catalog", &[("cookie", &route)], "")
        .await
        .unwrap();
    assert_eq!(
        routed.status, 503,
        "a route cookie (the same for every cart on its blade) is no pass past the line"
    );
    assert_eq!(page(&c, addr, &ticket).await.status, 503, "still held");
    let opened = send(&c, Method::POST, admin, "/v1/waiting-room/close", &[], "")
        .await
        .unwrap();
    assert_eq!(opened.json()["held"], false);
    assert_eq!(
        page(&c, addr, &ticket).await.status,
        200,
        "let in once the door opens"
    );
    assert_eq!(
        page(&c, addr, "").await.status,
        200,
        "nobody waits: straight in"
    );
    surge.stop().await;
}

/// The waiting page as a shopper's browser shows it: headless Chromium (Debian's
/// `chromium`, which `.ci/run` installs) loads it, and the DOM shows the place and the
/// wait. Bounded: Chromium is stopped after 30 s whatever it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waiting_page_shows_the_place_and_wait_in_a_browser() {
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok()
        })
        .expect("headless Chromium is needed (apt-get install chromium; .ci/run does)");
    let blades = blades(1, Duration::ZERO).await;
    let surge = surge::serve::start(&room_config(&blades, "held = true\n"))
        .await
        .unwrap();
    let addr = surge.proxy.local_addr;
    // Someone is in line already: the browser's visitor is second.
    let first = page(&client(), addr, "").await;
    assert_eq!(place_of(&first), 1);
    let profile = std::env::temp_dir().join(format!("surge-chromium-{}", fastrand::u64(..)));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .args([
                "-s",
                "KILL",
                "30",
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("http://{addr}/"))
            .output()
    })
    .await
    .unwrap()
    .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("You are in line"),
        "{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dom.contains("id=\"place\">2<"),
        "the place is not shown: {dom}"
    );
    assert!(dom.contains("estimated wait"), "{dom}");
    assert_eq!(
        surge
            .pool
            .traffic
            .waiting
            .as_ref()
            .map(|r| r.status(surge::pool::waiting::wall_ms()).queued),
        Some(2),
        "the browser holds the second place"
    );
    surge.stop().await;
}

/// A blade with a live chat: WebSocket (tokio-tungstenite) on an upgrade request, which
/// greets first and echoes every text message; a plain 200 to anything else (health
/// checks).
async fn chat_blade() -> std::net::SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Look at the head without taking it: the WebSocket library reads it.
                let mut head = [0u8; 2048];
                let mut seen = 0;
                for _ in 0..100 {
                    seen = stream.peek(&mut head).await.unwrap_or(0);
                    if seen == 0 || head[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let text = String::from_utf8_lossy(&head[..seen]).to_ascii_lowercase();
                if !text.contains("upgrade: websocket") {
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    return;
                }
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let _ = ws.send(Message::text("hello from the shop")).await;
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(t) = msg {
                        if ws.send(Message::text(format!("echo: {t}"))).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A shop's live chat behind surge: the WebSocket upgrade reaches the blade and its 101
/// comes back, then messages go both ways (the blade speaks first, too); a chat nobody
/// talks on is closed after `proxy.idle_timeout`, and its connection is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_tunnelled_to_its_blade_both_ways_until_idle() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let blade = chat_blade().await;
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 1\naccess_log = false\nidle_timeout = \"1s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[[pool.backends]]\nid = \"chat\"\naddress = \"{blade}\"\n"
    );
    let cfg = surge::config::Config::parse(&text, std::path::Path::new("ws.toml")).unwrap();
    let surge = surge::serve::start(&cfg).await.unwrap();
    let addr = surge.proxy.local_addr;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat"))
        .await
        .expect("the upgrade goes through surge");
    assert_eq!(resp.status(), 101);
    let greeting = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the blade speaks first");
    assert_eq!(
        greeting.unwrap().unwrap(),
        Message::text("hello from the shop")
    );
    for i in 0..3 {
        ws.send(Message::text(format!("stock of sku {i}?")))
            .await
            .unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an answer")
            .unwrap()
            .unwrap();
        assert_eq!(echo, Message::text(format!("echo: stock of sku {i}?")));
    }
    // Nobody talks: surge closes the tunnel after its idle timeout (1 s here).
    let quiet = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the idle tunnel is closed");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_)))),
        "nothing but the end comes: {end:?}"
    );
    assert!(quiet.elapsed() >= Duration::from_millis(900));
    assert!(
        eventually(Duration::from_secs(3), || surge.proxy.limits.open() == 0).await,
        "the tunnel's connection is given back"
    );
    surge.stop().await;
}
