//! Contract tests: the real Scaleway Elastic Metal client against the simulator over HTTP
//! on loopback, and against response bodies shaped like the vendor's documented ones.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::free_port;
use surge::provider::scaleway::{ApiOffers, ApiServer, ApiServers, Scaleway, ScalewayConfig};
use surge::provider::{
    new_request_id, CreateSpec, Device, DeviceState, Offer, Provider, ProviderError, Stock,
};
use surge::sim::{self, Faults, SimConfig, SimHandle};

const TOKEN: &str = "scw-secret-key-for-tests";
const OFFER: &str = "b0d2b4a4-e2f4-4b1b-9e2a-0f5e3c1a9a01";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

async fn simulator(delivery: Duration, faults: Faults) -> SimHandle {
    let mut cfg = SimConfig::demo(SocketAddr::from(([127, 0, 0, 1], 0)), TOKEN);
    cfg.delivery = delivery;
    cfg.install = delivery / 2;
    cfg.capacity = 500;
    cfg.blade_port = free_port();
    cfg.faults = faults;
    sim::start(cfg).await.unwrap()
}

fn client(sim: &SimHandle, token: &str, call_timeout: Duration) -> Scaleway {
    Scaleway::new(ScalewayConfig {
        api_url: sim.url(),
        zone: "fr-par-2".into(),
        project_id: "c3a5a8d6-2e0e-4b5f-8a51-4a1e3b8c9f10".into(),
        secret_key: token.into(),
        os_id: "os-ubuntu-24.04".into(),
        call_timeout,
        retry: surge::provider::http::Retry {
            max_attempts: 4,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            max_retry_after: Duration::from_secs(300),
        },
    })
    .unwrap()
}

fn spec(name: &str) -> CreateSpec {
    CreateSpec {
        offer_id: OFFER.into(),
        name: name.into(),
        pool: "shop".into(),
        request_id: new_request_id(),
        user_data: None,
        ssh_key_ids: Vec::new(),
        private_network: None,
    }
}

#[test]
fn the_vendors_documented_bodies_parse() {
    let offers: ApiOffers = serde_json::from_str(&fixture("scaleway_offers.json")).unwrap();
    let offers: Vec<Offer> = offers.offers.into_iter().map(Offer::from).collect();
    assert_eq!(offers[0].name, "EM-A115X-SSD");
    assert_eq!(offers[0].stock, Stock::Available);
    assert_eq!(offers[0].price_per_hour, Some(0.21));
    assert_eq!(offers[1].stock, Stock::Empty);

    let server: ApiServer = serde_json::from_str(&fixture("scaleway_server_ready.json")).unwrap();
    let d = Device::from(server);
    assert_eq!(d.state, DeviceState::Ready);
    assert_eq!(
        d.address,
        Some("51.159.10.21".parse().unwrap()),
        "IPv4 preferred"
    );
    assert_eq!(d.tag("surge-pool"), Some("shop"));
    assert_eq!(d.vendor_status, "ready/completed");

    let list: ApiServers =
        serde_json::from_str(&fixture("scaleway_servers_installing.json")).unwrap();
    let states: Vec<DeviceState> = list
        .servers
        .into_iter()
        .map(|s| Device::from(s).state)
        .collect();
    assert_eq!(states, [DeviceState::Installing, DeviceState::Provisioning]);
    assert_eq!(list.total_count, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_is_ordered_delivered_served_and_released() {
    let sim = simulator(Duration::from_millis(400), Faults::default()).await;
    let scw = client(&sim, TOKEN, Duration::from_secs(2));
    let offers = scw.offers().await.unwrap();
    assert!(offers
        .iter()
        .any(|o| o.id == OFFER && o.stock == Stock::Available));

    let created = scw.create(&spec("surge-shop-1")).await.unwrap();
    assert_eq!(created.state, DeviceState::Requested);
    assert_eq!(created.tag("surge-pool"), Some("shop"));
    let mut seen = vec![created.state];
    let until = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let d = scw.get(&created.id).await.unwrap();
        if seen.last() != Some(&d.state) {
            seen.push(d.state);
        }
        if d.state == DeviceState::Ready {
            break d;
        }
        assert!(Instant::now() < until, "not ready: {seen:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(seen.first(), Some(&DeviceState::Requested));
    assert!(
        seen.contains(&DeviceState::Provisioning) && seen.contains(&DeviceState::Installing),
        "{seen:?}"
    );

    // The ready server really serves: its blade answers on the server's own address.
    let ip = ready.address.expect("a ready server has an address");
    let mut blade = None;
    let until = Instant::now() + Duration::from_secs(5);
    while blade.is_none() && Instant::now() < until {
        blade = sim.blade_addr(&created.id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let blade = blade.expect("the simulator started a blade");
    assert_eq!(blade.ip(), ip, "the blade listens on the server's address");
    let health = reqwest::get(format!("http://{blade}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let listed = scw.list("surge-pool=shop").await.unwrap();
    assert_eq!(
        listed.iter().map(|d| &d.id).collect::<Vec<_>>(),
        [&created.id]
    );
    assert!(scw.list("surge-pool=other").await.unwrap().is_empty());

    scw.delete(&created.id).await.unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match scw.get(&created.id).await {
            Err(ProviderError::NotFound(_)) => break,
            Ok(d) => assert!(d.state == DeviceState::Deleting, "{d:?}"),
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < until, "never released");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    scw.delete(&created.id)
        .await
        .expect("deleting a released server is not an error");
    assert!(
        reqwest::get(format!("http://{blade}/healthz"))
            .await
            .is_err(),
        "blade still up"
    );
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_past_a_hundred_servers() {
    let sim = simulator(Duration::from_secs(3600), Faults::default()).await;
    let scw = client(&sim, TOKEN, Duration::from_secs(2));
    for i in 0..130 {
        scw.create(&spec(&format!("surge-shop-{i}"))).await.unwrap();
    }
    let all = scw.list("surge-pool=shop").await.unwrap();
    assert_eq!(all.len(), 130);
    let mut ids: Vec<&str> = all.iter().map(|d| d.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 130, "pages overlap");
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_vendor_error_becomes_its_typed_error() {
    let sim = simulator(Duration::from_secs(3600), Faults::default()).await;
    let scw = client(&sim, TOKEN, Duration::from_secs(2));

    let wrong = client(&sim, "not-the-key", Duration::from_secs(2));
    assert!(matches!(
        wrong.offers().await,
        Err(ProviderError::Unauthorized(_))
    ));
    assert!(matches!(
        scw.get("no-such-server").await,
        Err(ProviderError::NotFound(_))
    ));
    let mut bad = spec("x");
    bad.offer_id = "no-such-offer".into();
    assert!(matches!(
        scw.create(&bad).await,
        Err(ProviderError::Invalid(_))
    ));

    sim.set_faults(Faults {
        out_of_stock: vec!["EM-A115X-SSD".into()],
        ..Faults::default()
    });
    let offers = scw.offers().await.unwrap();
    assert_eq!(
        offers.iter().find(|o| o.id == OFFER).map(|o| o.stock),
        Some(Stock::Empty)
    );
    assert!(matches!(
        scw.create(&spec("y")).await,
        Err(ProviderError::OutOfStock(_))
    ));

    sim.set_faults(Faults {
        server_error_share: 1.0,
        ..Faults::default()
    });
    let e = scw.offers().await.unwrap_err();
    assert!(matches!(e, ProviderError::Transient(_)), "{e}");
    assert!(e.to_string().contains("503"), "{e}");
    assert_eq!(
        sim.server_count(),
        0,
        "no failed order left a server behind"
    );
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_waited_out_for_at_least_retry_after() {
    let sim = simulator(
        Duration::from_secs(3600),
        Faults {
            rate_limit_every: 1,
            retry_after_secs: 1,
            ..Faults::default()
        },
    )
    .await;
    let scw = client(&sim, TOKEN, Duration::from_secs(2));
    // Every request is limited: the client keeps waiting, then reports the limit.
    let t = Instant::now();
    let e = scw.offers().await.unwrap_err();
    assert!(
        matches!(e, ProviderError::RateLimited { retry_after } if retry_after == Duration::from_secs(1)),
        "{e}"
    );
    assert!(
        t.elapsed() >= Duration::from_secs(3),
        "3 retries must wait ≥ 1 s each, waited {:?}",
        t.elapsed()
    );

    // Every second request limited: the retry succeeds after the wait.
    sim.set_faults(Faults {
        rate_limit_every: 2,
        retry_after_secs: 1,
        ..Faults::default()
    });
    let t = Instant::now();
    let mut waited = false;
    for _ in 0..2 {
        scw.offers().await.unwrap();
        waited |= t.elapsed() >= Duration::from_secs(1);
    }
    assert!(waited, "no call waited for Retry-After");
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_answer_is_lost_orders_exactly_one_server() {
    let sim = simulator(
        Duration::from_secs(3600),
        Faults {
            lose_orders: 1,
            lost_delay: Duration::from_secs(2),
            ..Faults::default()
        },
    )
    .await;
    let scw = client(&sim, TOKEN, Duration::from_millis(500));
    let s = spec("surge-shop-lost");
    let device = scw.create(&s).await.unwrap();
    assert_eq!(device.tag("surge-request"), Some(s.request_id.as_str()));
    assert_eq!(sim.server_count(), 1, "the retry ordered a second server");
    let listed = scw
        .list(&format!("surge-request={}", s.request_id))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    sim.stop();
}

/// The vendor takes the order, then its gateway answers 500, and its listings lag the
/// creates: the client cannot tell, so it says `Uncertain` (the order may stand; its
/// caller counts it as on its way) and never sends it again. Before, a 5xx was
/// "transient": looked up behind the lagging list, found nothing, and ordered again,
/// one server a try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_after_the_order_was_taken_orders_one_server_behind_a_lagging_list() {
    let sim = simulator(
        Duration::from_secs(3600),
        Faults {
            create_then_5xx: 4,
            hide_new_for: Duration::from_secs(30),
            ..Faults::default()
        },
    )
    .await;
    let scw = client(&sim, TOKEN, Duration::from_secs(2));
    let s = spec("surge-shop-gateway");
    let outcome = scw.create(&s).await;
    assert!(
        matches!(outcome, Err(ProviderError::Uncertain(_))),
        "{outcome:?}"
    );
    assert_eq!(sim.server_count(), 1, "the 5xx ordered a second server");
    sim.stop();
}

/// In a cluster the leadership fence is asked before every attempt of an order, not once
/// before them all: a term that ends during a back-off (here a 429's) sends nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_of_an_order_asks_the_fence_first() {
    let sim = simulator(
        Duration::from_secs(3600),
        Faults {
            rate_limit_every: 1,
            retry_after_secs: 1,
            ..Faults::default()
        },
    )
    .await;
    let scw = client(&sim, TOKEN, Duration::from_secs(2));
    let asked = std::sync::atomic::AtomicU32::new(0);
    let outcome = surge::provider::order(&scw, &spec("surge-shop-fenced"), || {
        let n = asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::future::ready(if n == 0 {
            Ok(())
        } else {
            Err(ProviderError::Held("the term ended".into()))
        })
    })
    .await;
    assert!(
        matches!(outcome, Err(ProviderError::Held(_))),
        "{outcome:?}"
    );
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(sim.server_count(), 0);
    sim.stop();
}

/// A vendor whose order succeeds but whose answer is not JSON (an HTML page from a
/// proxy in front of it): the order stands, so it is `Uncertain`, never sent again.
/// Before, an unreadable success was "transient" and ordered again, a server a try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_success_to_an_order_is_never_sent_again() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let posts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = posts.clone();
    let vendor = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((head, _)) = common::read_request(&mut s, &mut buf).await {
                    let answer: &[u8] = if head.starts_with("post ") {
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 13\r\n\r\n<html></html>"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 31\r\n\r\n{\"servers\":[],\"total_count\":0}\n"
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let scw = Scaleway::new(ScalewayConfig {
        api_url: format!("http://{addr}"),
        zone: "fr-par-2".into(),
        project_id: "c3a5a8d6-2e0e-4b5f-8a51-4a1e3b8c9f10".into(),
        secret_key: TOKEN.into(),
        os_id: "os-ubuntu-24.04".into(),
        call_timeout: Duration::from_secs(2),
        retry: surge::provider::http::Retry {
            max_attempts: 4,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            max_retry_after: Duration::from_secs(300),
        },
    })
    .unwrap();
    let outcome = scw.create(&spec("surge-shop-html")).await;
    assert!(
        matches!(outcome, Err(ProviderError::Uncertain(_))),
        "{outcome:?}"
    );
    assert_eq!(
        posts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "ordered again"
    );
    vendor.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_can_fail_and_the_simulator_remembers_its_servers() {
    let dir = std::env::temp_dir().join(format!(
        "surge-sim-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("state.json");
    let mut cfg = SimConfig::demo(SocketAddr::from(([127, 0, 0, 1], 0)), TOKEN);
    cfg.delivery = Duration::from_millis(200);
    cfg.install = Duration::from_millis(100);
    cfg.blade_port = free_port();
    cfg.state_file = Some(file.clone());
    cfg.faults.order_error_share = 1.0;
    let sim = sim::start(cfg.clone()).await.unwrap();
    let scw = client(&sim, TOKEN, Duration::from_secs(2));
    let d = scw.create(&spec("doomed")).await.unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while scw.get(&d.id).await.unwrap().state != DeviceState::Failed {
        assert!(Instant::now() < until, "order never failed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    sim.stop();

    cfg.faults = Faults::default();
    let again = sim::start(cfg).await.unwrap();
    let scw = client(&again, TOKEN, Duration::from_secs(2));
    let listed = scw.list("surge-pool=shop").await.unwrap();
    assert_eq!(
        listed.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        [d.id.as_str()]
    );
    assert_eq!(listed[0].state, DeviceState::Failed);
    again.stop();
}
