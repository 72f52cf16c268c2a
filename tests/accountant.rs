//! The autoscaler as an accountant, end to end on loopback with the real Elastic Metal
//! client against the simulator: lying listings remove nothing, a lagging list and a
//! lost answer order one server per need (across a restart too), connection floods order
//! nothing, the budget says no, scale-in waits for the paid hour, an operator's undrain
//! leaves scale-in, and a redirecting vendor never sees the key.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::scaling::*;
use common::*;
use surge::autoscale::ledger::Ledger;
use surge::autoscale::reconcile::Reconciler;
use surge::pool::{health, Pool, PoolSettings, State};
use surge::provider::scaleway::{Scaleway, ScalewayConfig};
use surge::provider::{Provider, ProviderError};
use surge::sim::Faults;

/// Checks `ok` every 50 ms for `period`; the first time it fails, says so.
async fn holds_for(
    period: Duration,
    mut ok: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let until = Instant::now() + period;
    while Instant::now() < until {
        ok()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ok()
}

fn members(surge: &surge::serve::Running) -> BTreeSet<(String, &'static str)> {
    surge
        .pool
        .snapshot()
        .members()
        .iter()
        .map(|m| (m.backend.id.to_string(), m.state.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_listing_and_a_skipped_page_remove_nothing_and_order_nothing() {
    let rig = own_sim("SURGE_TEST_SCW_KEY_LYING", Faults::default()).await;
    let sim = &rig.sim;
    let cfg = rig.config("min = 3\nmax = 6\n");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let ready = eventually(Duration::from_secs(10), || in_service(&surge) == 3).await;
    assert!(ready, "{:#?}", status_of(&surge));
    let before = members(&surge);
    assert_eq!(sim.server_count(), 2);

    // Five empty answers in a row (more than missing_listings = 3), then one listing that
    // skips its page: look-ups find every server, nothing is drained, dropped or ordered.
    for faults in [
        Faults {
            empty_listings: 5,
            ..Faults::default()
        },
        Faults {
            skip_pages: 1,
            ..Faults::default()
        },
    ] {
        sim.set_faults(faults.clone());
        let held = holds_for(Duration::from_millis(1500), || {
            let now = members(&surge);
            if now != before {
                return Err(format!("pool changed: {before:?} -> {now:?}"));
            }
            if sim.server_count() != 2 {
                return Err(format!("{} servers", sim.server_count()));
            }
            Ok(())
        })
        .await;
        assert!(
            held.is_ok(),
            "{faults:?}: {held:?}: {:#?}",
            status_of(&surge)
        );
    }
    surge.stop().await;
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_list_and_a_lost_answer_order_one_server_even_across_a_restart() {
    // New servers stay out of listings for 5 s; the first order's answer comes after
    // the client's 2 s timeout.
    let rig = own_sim(
        "SURGE_TEST_SCW_KEY_LAG",
        Faults {
            hide_new_for: Duration::from_secs(5),
            lose_orders: 1,
            lost_delay: Duration::from_secs(4),
            ..Faults::default()
        },
    )
    .await;
    let sim = &rig.sim;
    let cfg = rig.config("min = 2\nmax = 6\n");
    let first = surge::serve::start(&cfg).await.unwrap();
    let ordered = eventually(Duration::from_secs(5), || sim.server_count() >= 1).await;
    assert!(ordered, "nothing ordered: {:#?}", status_of(&first));
    // The answer is lost and the server hidden: it must not be ordered again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        sim.server_count(),
        1,
        "ordered twice: {:#?}",
        status_of(&first)
    );
    // A restart in the middle: the ledger on disk knows the order is on its way.
    first.stop().await;
    let second = surge::serve::start(&cfg).await.unwrap();
    let served = eventually(Duration::from_secs(10), || in_service(&second) == 2).await;
    assert!(served, "{:#?}", status_of(&second));
    assert_eq!(sim.server_count(), 1, "the restart ordered again");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sim.server_count(), 1);
    second.stop().await;
    sim.stop();
}

/// The vendor takes two orders, answers each with a 500, and hides new servers from
/// its listings for 5 s. Each order may stand, so it is sent once, counts against the
/// budget (two servers at most) while unresolved, and is resolved by its tag when its
/// server shows: two servers, both serving. Before, the client ordered again behind
/// the lagging list on every 5xx, and an order whose last try got a 5xx was marked
/// refused, outside every budget, and ordered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_answered_with_a_5xx_are_sent_once_and_count_against_the_budget() {
    let rig = own_sim(
        "SURGE_TEST_SCW_KEY_5XX",
        Faults {
            create_then_5xx: 2,
            hide_new_for: Duration::from_secs(5),
            ..Faults::default()
        },
    )
    .await;
    let sim = &rig.sim;
    let cfg = rig.config("min = 4\nmax = 6\n[autoscale.budget]\nmax_servers = 2\n");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let ordered = eventually(Duration::from_secs(5), || sim.server_count() >= 2).await;
    assert!(ordered, "nothing ordered: {:#?}", status_of(&surge));
    // Hidden and unanswered: neither order may be sent again, nor a third placed.
    let mut most = 0;
    let served = eventually(Duration::from_secs(15), || {
        most = most.max(sim.server_count());
        in_service(&surge) == 3
    })
    .await;
    assert!(served, "{:#?}", status_of(&surge));
    assert_eq!(
        most,
        2,
        "ordered past the budget or twice: {:#?}",
        status_of(&surge)
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sim.server_count(), 2);
    surge.stop().await;
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_flood_and_failed_handshakes_order_nothing_while_shoppers_are_served() {
    let blade = blades(1, Duration::from_millis(1)).await;
    let tls_dir = std::env::temp_dir().join(format!("surge-flood-tls-{}", fastrand::u64(..)));
    let ledger = tls_dir.join("orders.json");
    let text = format!(
        r#"
[[listeners]]
listen = "127.0.0.1:0"
[[listeners]]
listen = "127.0.0.1:0"
[listeners.tls]
self_signed = {{ dir = "{dir}", names = ["localhost"] }}
[proxy]
workers = 1
access_log = false
max_connections_per_ip = 100000
[admin]
listen = "127.0.0.1:0"
[pool]
[pool.health]
interval = "200ms"
timeout = "200ms"
[[pool.backends]]
id = "static-1"
address = "{static_blade}"
[provider]
kind = "scaleway"
api_url = "sim"
zones = ["fr-par-2"]
offer = "EM-A115X-SSD"
blade_port = {blade_port}
private_network = "pn-flood"
[sim]
delivery = "300ms"
install = "100ms"
[autoscale]
min = 1
max = 6
interval = "200ms"
metrics_window = "1s"
target_connections_per_node = 20.0
up_period = "1s"
ledger = "{ledger}"
"#,
        dir = tls_dir.display(),
        static_blade = blade[0].addr,
        blade_port = free_port(),
        ledger = ledger.display(),
    );
    let cfg = surge::config::Config::parse(&text, std::path::Path::new("flood.toml")).unwrap();
    let surge = surge::serve::start(&cfg).await.unwrap();
    let plain = surge.proxy.listeners[0].addr;
    let tls = surge.proxy.listeners[1].addr;
    // The autoscaler's first decision recorded (before it, the status says 0 of
    // nothing): what the flood must not move is the size decided without it.
    let first_round = Instant::now() + Duration::from_secs(10);
    while status_of(&surge).desired == 0 && Instant::now() < first_round {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let connects = Arc::new(AtomicU64::new(0));
    let handshakes = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    // Connect and close, at most 5,000 per second from one address, for 3 s.
    for _ in 0..4 {
        let (stop, connects) = (stop.clone(), connects.clone());
        flood.push(tokio::spawn(async move {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                next += Duration::from_micros(800);
                if let Ok(s) = tokio::net::TcpStream::connect(plain).await {
                    drop(s);
                    connects.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep_until(next.into()).await;
            }
        }));
    }
    // Failed TLS handshakes: a few bytes of garbage, then close.
    {
        let (stop, handshakes) = (stop.clone(), handshakes.clone());
        flood.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = tokio::net::TcpStream::connect(tls).await {
                    let _ = s.write_all(b"\x16\x03\x01\x00\x05hello").await;
                    handshakes.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let c = client();
    let mut desired_seen = BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(3);
    let mut served = 0;
    while Instant::now() < until {
        let r = get(&c, plain, "/catalog")
            .await
            .expect("a shopper's request");
        assert_eq!(r.status, 200, "a shopper was refused during the flood");
        served += 1;
        desired_seen.insert(status_of(&surge).desired);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        let _ = f.await;
    }
    // The meter's window catches up with the flood's last second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    desired_seen.insert(status_of(&surge).desired);
    let connects = connects.load(Ordering::Relaxed);
    eprintln!(
        "flood: {connects} connect/close and {} failed handshakes in 3 s; {served} shopper requests",
        handshakes.load(Ordering::Relaxed)
    );
    assert!(
        connects > 1500,
        "the flood was too weak to mean anything: {connects}"
    );
    assert!(handshakes.load(Ordering::Relaxed) > 100);
    assert!(served >= 20);
    assert_eq!(
        desired_seen.into_iter().collect::<Vec<_>>(),
        [1],
        "{connects} connect/close and failed handshakes moved desired: {:#?}",
        status_of(&surge)
    );
    assert_eq!(
        surge.sim.as_ref().unwrap().server_count(),
        0,
        "a server was ordered"
    );
    surge.stop().await;
    let _ = std::fs::remove_dir_all(tls_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_refuses_orders_at_its_cap_and_says_why() {
    let blade = blades(1, Duration::from_millis(1)).await;
    let cfg = surge_config(
        blade[0].addr,
        "sim",
        "UNUSED_KEY",
        free_port(),
        "min = 5\nmax = 8\n[autoscale.budget]\nmax_servers = 2\n",
    );
    let surge = surge::serve::start(&cfg).await.unwrap();
    let sim = surge.sim.as_ref().unwrap();
    let capped = eventually(Duration::from_secs(10), || {
        let s = status_of(&surge);
        sim.server_count() == 2 && s.budget_reached.is_some()
    })
    .await;
    let status = status_of(&surge);
    assert!(capped, "{status:#?}");
    let reason = status.budget_reached.clone().unwrap_or_default();
    assert!(reason.contains("at most 2"), "{reason}");
    assert!(
        status
            .decisions
            .iter()
            .any(|d| d.reasons.iter().any(|r| r.contains("budget"))),
        "the decision log does not say: {status:#?}"
    );
    assert_eq!(status.cost.servers, 2, "{status:#?}");
    assert!(
        status.cost.per_hour > 0.0,
        "the simulator's offers carry a price"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sim.server_count(), 2, "ordered past the budget");
    surge.stop().await;
}

/// A pool with one static blade, health-checked, and a reconciler ordering from `sim`
/// with the real client, for tests that drive the clock themselves.
struct Rig {
    pool: Arc<Pool>,
    reconciler: Reconciler<Scaleway>,
    sim: surge::sim::SimHandle,
    _blade: Vec<surge::blade::BladeHandle>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Rig {
    async fn new(release_margin: Duration) -> Self {
        let key = "accountant-rig-key";
        let blade_port = free_port();
        let sim = external_sim(
            Faults::default(),
            Duration::from_millis(200),
            key,
            blade_port,
        )
        .await;
        let blade = blades(1, Duration::from_millis(1)).await;
        let cfg = config(&blade, "slow_start = \"0s\"\n[pool.health]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\n");
        let pool = Arc::new(Pool::new(
            PoolSettings::from_config(&cfg.pool),
            vec![Arc::new(surge::pool::Backend::new(
                "static-1",
                blade[0].addr,
                1,
                surge::pool::Origin::Static,
            ))],
        ));
        let (stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(health::run(
            pool.clone(),
            cfg.pool.health.clone(),
            Arc::new(surge::proxy::probe::HttpProber::new(Duration::from_millis(
                200,
            ))),
            rx,
        ));
        let auto = surge::config::Config::parse(
            &format!(
                "[pool]\nbackends = [{{address = \"127.0.0.1:1\"}}]\n[provider]\nkind = \"scaleway\"\napi_url = \"sim\"\nzones = [\"fr-par-2\"]\noffer = \"EM-A115X-SSD\"\nprivate_network = \"pn-rig\"\n[autoscale]\nmin = 1\ndrain_timeout = \"1s\"\nrelease_margin = \"{}s\"\nledger = \"\"\n",
                release_margin.as_secs()
            ),
            std::path::Path::new("rig.toml"),
        )
        .unwrap();
        let rc = surge::autoscale::reconcile_config(
            auto.autoscale.as_ref().unwrap(),
            auto.provider.as_ref(),
            "shop",
            "127.0.0.1:8080",
            blade_port,
        );
        let reconciler = Reconciler::new(
            pool.clone(),
            vec![("fr-par-2".into(), rig_client(&sim, "fr-par-2"))],
            rc,
            Ledger::in_memory(),
        )
        .watching(vec![("nl-ams-1".into(), rig_client(&sim, "nl-ams-1"))]);
        Self {
            pool,
            reconciler,
            sim,
            _blade: blade,
            stop,
        }
    }

    /// Rounds toward `desired` at wall-clock `wall` until `done` or `limit`.
    async fn until(
        &mut self,
        desired: usize,
        wall: SystemTime,
        limit: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            self.reconciler.step_at(desired, Instant::now(), wall).await;
            if done(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    fn count(&self, state: State) -> usize {
        self.pool.snapshot().count(state)
    }
}

/// The real client for one zone of the rig's simulator.
fn rig_client(sim: &surge::sim::SimHandle, zone: &str) -> Scaleway {
    Scaleway::new(ScalewayConfig {
        api_url: sim.url(),
        zone: zone.into(),
        project_id: String::new(),
        secret_key: "accountant-rig-key".into(),
        os_id: "os".into(),
        call_timeout: Duration::from_secs(2),
        retry: surge::provider::http::Retry {
            max_attempts: 3,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            max_retry_after: Duration::from_secs(5),
        },
    })
    .unwrap()
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.sim.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_keeps_a_paid_server_as_a_spare_until_its_hour_is_ending() {
    let mut rig = Rig::new(Duration::from_secs(300)).await;
    let t0 = SystemTime::now();
    let grown = rig
        .until(3, t0, Duration::from_secs(10), |r| {
            r.count(State::InService) == 3
        })
        .await;
    assert!(grown, "did not grow to 3");
    assert_eq!(rig.sim.server_count(), 2);
    // Ten minutes into the paid hour the load is gone: one node is drained, then kept
    // as a spare, not released (releasing saves nothing before the hour ends).
    let ten = t0 + Duration::from_secs(600);
    let parked = rig
        .until(2, ten, Duration::from_secs(10), |r| {
            r.count(State::Standby) == 1
        })
        .await;
    assert!(parked, "not parked");
    assert_eq!(rig.count(State::InService), 2);
    for _ in 0..5 {
        rig.reconciler.step_at(2, Instant::now(), ten).await;
    }
    assert_eq!(
        rig.sim.server_count(),
        2,
        "released 10 minutes into its paid hour"
    );
    // 56 minutes in (4 left, margin 5): released.
    let late = t0 + Duration::from_secs(56 * 60);
    let released = rig
        .until(2, late, Duration::from_secs(10), |r| {
            r.sim.server_count() == 1
        })
        .await;
    assert!(released, "not released near the end of its hour");
    assert_eq!(rig.count(State::Standby), 0);
    assert_eq!(rig.count(State::InService), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_undrain_takes_a_node_out_of_scale_in_which_goes_on() {
    let mut rig = Rig::new(Duration::from_secs(3600)).await;
    let now = SystemTime::now();
    let grown = rig
        .until(4, now, Duration::from_secs(10), |r| {
            r.count(State::InService) == 4
        })
        .await;
    assert!(grown, "did not grow to 4");
    // Scale in to 3: one provisioned node drains...
    rig.reconciler.step_at(3, Instant::now(), now).await;
    let draining: Vec<String> = rig
        .pool
        .snapshot()
        .members()
        .iter()
        .filter(|m| m.state == State::Draining)
        .map(|m| m.backend.id.to_string())
        .collect();
    assert_eq!(draining.len(), 1, "{draining:?}");
    // ...and the operator takes it back.
    assert_eq!(rig.pool.undrain(&draining[0]), Ok(State::InService));
    // Scale-in goes on with another node; the operator's stays in service.
    let done = rig
        .until(3, now, Duration::from_secs(10), |r| {
            r.sim.server_count() == 2
        })
        .await;
    assert!(done, "scale-in stalled after an undrain");
    let kept = rig.pool.snapshot().get(&draining[0]).map(|m| m.state);
    assert_eq!(
        kept,
        Some(State::InService),
        "the operator's node was scaled in"
    );
    for _ in 0..5 {
        rig.reconciler.step_at(3, Instant::now(), now).await;
    }
    assert_eq!(
        rig.pool.snapshot().get(&draining[0]).map(|m| m.state),
        Some(State::InService)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_vendor_gets_no_key() {
    use http_body_util::Full;
    use hyper::service::service_fn;
    // Where the redirect points: records every request it gets.
    let seen = Arc::new(AtomicU64::new(0));
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = target.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    s.fetch_add(1, Ordering::Relaxed);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            bytes::Bytes::from_static(b"{}"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let vendor = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let vendor_addr: SocketAddr = vendor.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = vendor.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let to = format!("http://{target_addr}{}", req.uri().path());
                    async move {
                        let mut r = http::Response::new(Full::new(bytes::Bytes::new()));
                        *r.status_mut() = http::StatusCode::MOVED_PERMANENTLY;
                        r.headers_mut()
                            .insert(http::header::LOCATION, to.parse().unwrap());
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let client = Scaleway::new(ScalewayConfig {
        api_url: format!("http://{vendor_addr}"),
        zone: "fr-par-2".into(),
        project_id: String::new(),
        secret_key: "the-secret-key".into(),
        os_id: "os".into(),
        call_timeout: Duration::from_secs(2),
        retry: surge::provider::http::Retry {
            max_attempts: 3,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            max_retry_after: Duration::from_secs(5),
        },
    })
    .unwrap();
    let err = client.offers().await.unwrap_err();
    assert!(matches!(err, ProviderError::Redirected(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("301") && text.contains(&target_addr.to_string()),
        "{text}"
    );
    assert_eq!(seen.load(Ordering::Relaxed), 0, "the redirect was followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_of_other_pools_and_unordered_zones_are_shown_never_released() {
    let mut rig = Rig::new(Duration::from_secs(3600)).await;
    let other_pool = surge::provider::CreateSpec {
        offer_id: "b0d2b4a4-e2f4-4b1b-9e2a-0f5e3c1a9a01".into(),
        name: "old-name".into(),
        pool: "shop-2025".into(),
        request_id: surge::provider::new_request_id(),
        user_data: None,
        ssh_key_ids: Vec::new(),
        private_network: None,
    };
    let old = rig_client(&rig.sim, "fr-par-2")
        .create(&other_pool)
        .await
        .unwrap();
    let this_pool_elsewhere = surge::provider::CreateSpec {
        name: "dr-site".into(),
        pool: "shop".into(),
        request_id: surge::provider::new_request_id(),
        ..other_pool
    };
    let dr = rig_client(&rig.sim, "nl-ams-1")
        .create(&this_pool_elsewhere)
        .await
        .unwrap();
    let report = rig
        .reconciler
        .step_at(1, Instant::now(), SystemTime::now())
        .await;
    let mut ids: Vec<&str> = report
        .unmanaged
        .iter()
        .map(|u| u.device_id.as_str())
        .collect();
    ids.sort_unstable();
    let mut want = vec![old.id.as_str(), dr.id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want, "{report:#?}");
    assert!(report.unmanaged.iter().any(|u| u.why.contains("shop-2025")));
    assert!(report.unmanaged.iter().any(|u| u.why.contains("nl-ams-1")));
    // Surplus everywhere, and still: never released.
    for _ in 0..10 {
        rig.reconciler
            .step_at(1, Instant::now(), SystemTime::now())
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rig.sim.server_count(),
        2,
        "an unmanaged server was released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_delete_of_a_provisioned_node_releases_its_server() {
    let rig = own_sim("SURGE_TEST_SCW_KEY_DELETE", Faults::default()).await;
    let sim = &rig.sim;
    let cfg = rig.config("min = 2\nmax = 4\n");
    let surge = surge::serve::start(&cfg).await.unwrap();
    let ready = eventually(Duration::from_secs(10), || in_service(&surge) == 2).await;
    assert!(ready, "{:#?}", status_of(&surge));
    let server = sim.server_ids().pop().expect("one server");
    let node = surge::autoscale::reconcile::backend_id(&surge::provider::Device {
        id: server.clone(),
        name: String::new(),
        state: surge::provider::DeviceState::Ready,
        vendor_status: String::new(),
        address: None,
        tags: Vec::new(),
        zone: String::new(),
        offer_id: String::new(),
        created_at: None,
    });
    let c = client();
    let r = send(
        &c,
        http::Method::DELETE,
        surge.admin.local_addr,
        &format!("/v1/nodes/{node}?timeout=1s"),
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 202);
    // Drained, removed, and its server released (a new one replaces it: min = 2).
    let released = eventually(Duration::from_secs(10), || {
        !sim.server_ids().contains(&server)
    })
    .await;
    assert!(
        released,
        "the deleted node's server is still billed: {:#?}",
        status_of(&surge)
    );
    let back = holds_for(Duration::from_millis(1000), || {
        match surge.pool.snapshot().get(&node) {
            Some(_) => Err(format!("{node} was adopted again")),
            None => Ok(()),
        }
    })
    .await;
    assert!(back.is_ok(), "{back:?}");
    surge.stop().await;
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_found_running_without_an_order_is_in_the_cost() {
    let mut rig = Rig::new(Duration::from_secs(3600)).await;
    // Ordered by someone else (an older surge without a ledger) with this pool's tag.
    let spec = surge::provider::CreateSpec {
        offer_id: "b0d2b4a4-e2f4-4b1b-9e2a-0f5e3c1a9a01".into(),
        name: "older".into(),
        pool: "shop".into(),
        request_id: surge::provider::new_request_id(),
        user_data: None,
        ssh_key_ids: Vec::new(),
        private_network: Some("pn-rig".into()),
    };
    let d = rig_client(&rig.sim, "fr-par-2")
        .create(&spec)
        .await
        .unwrap();
    let adopted = rig
        .until(2, SystemTime::now(), Duration::from_secs(10), |r| {
            r.count(State::InService) == 2
        })
        .await;
    assert!(adopted, "not adopted");
    let report = rig
        .reconciler
        .step_at(2, Instant::now(), SystemTime::now())
        .await;
    let entry = report
        .orders
        .iter()
        .find(|o| o.device_id.as_deref() == Some(d.id.as_str()));
    let entry = entry.expect("the adopted server has no ledger entry");
    assert!(entry.price_per_hour > 0.0, "{entry:?}");
    assert!(entry.billed());
    assert_eq!(
        rig.sim.server_count(),
        1,
        "ordered although one was running"
    );
}
