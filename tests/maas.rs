//! Contract tests: the real MAAS client against the MAAS simulator over HTTP on loopback
//! (OAuth checked by the simulator on every call), and against machine JSON shaped like
//! the vendor's documented answers (`tests/fixtures/maas/`).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::free_port;
use surge::provider::maas::{ApiMachine, Maas, MaasConfig};
use surge::provider::{
    new_request_id, CreateSpec, Device, DeviceState, Provider, ProviderError, Stock,
};
use surge::sim::{self, Faults, SimApi, SimConfig, SimHandle};

const KEY: &str = "sim-consumer:sim-token:sim-secret-of-the-token";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/maas/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

async fn simulator(per_zone: usize, faults: Faults) -> SimHandle {
    let mut cfg = SimConfig::demo(SocketAddr::from(([127, 0, 0, 1], 0)), KEY);
    cfg.api = SimApi::Maas;
    cfg.zones = vec!["rack1".into(), "rack2".into()];
    cfg.machines_per_zone = per_zone;
    cfg.delivery = Duration::from_millis(300);
    cfg.install = Duration::from_millis(300);
    cfg.blade_port = free_port();
    cfg.faults = faults;
    sim::start(cfg).await.unwrap()
}

fn client(sim: &SimHandle, key: &str, zone: &str, call_timeout: Duration) -> Maas {
    Maas::new(MaasConfig {
        api_url: sim.url(),
        api_key: key.parse().unwrap(),
        zone: zone.into(),
        offer: "ready-machines".into(),
        resource_pool: None,
        tags: vec!["blade".into()],
        min_cpu_count: Some(4),
        min_memory_mib: Some(16_384),
        distro_series: "noble".into(),
        erase_on_release: false,
        call_timeout,
        retry: surge::provider::http::Retry {
            max_attempts: 3,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            max_retry_after: Duration::from_secs(60),
        },
    })
    .unwrap()
}

fn spec(name: &str) -> CreateSpec {
    CreateSpec {
        offer_id: "maas".into(),
        name: name.into(),
        pool: "shop".into(),
        request_id: new_request_id(),
        user_data: Some("#cloud-config\npackages: [nginx]\n".into()),
        ssh_key_ids: Vec::new(),
        private_network: None,
    }
}

async fn wait_state(c: &Maas, id: &str, want: DeviceState) -> Device {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let d = c.get(id).await.unwrap();
        if d.state == want || Instant::now() > until {
            assert_eq!(d.state, want, "{d:?}");
            return d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every call through its life: stock, allocate + deploy, Deploying → Deployed with an
/// address whose blade serves, listings by pool and by order, release → Ready (gone
/// from the pool's view), released twice without error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_is_allocated_deployed_listed_and_released() {
    let sim = simulator(3, Faults::default()).await;
    let c = client(&sim, KEY, "rack2", Duration::from_secs(5));
    let offers = c.offers().await.unwrap();
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].stock, Stock::Available, "3 ready machines");
    assert_eq!(
        offers[0].price_per_hour, None,
        "owned hardware has no price"
    );

    let order = spec("shop-blade-1");
    let d = c.create(&order).await.unwrap();
    assert_eq!(d.state, DeviceState::Installing, "{d:?}");
    assert_eq!(d.zone, "rack2");
    assert_eq!(d.tag("surge-pool"), Some("shop"));
    assert_eq!(d.tag("surge-request"), Some(order.request_id.as_str()));
    assert_eq!(d.name, "shop-blade-1");
    let ready = wait_state(&c, &d.id, DeviceState::Ready).await;
    assert_eq!(ready.vendor_status, "Deployed");
    let addr = ready.address.expect("a deployed machine has an address");
    let blade_up = common::eventually(Duration::from_secs(5), || {
        sim.blade_addr(&d.id).is_some_and(|b| b.ip() == addr)
    })
    .await;
    assert!(blade_up, "the blade runs on the machine's address");
    assert_eq!(
        sim.ordered_with(&d.id).and_then(|o| o.user_data).as_deref(),
        order.user_data.as_deref(),
        "the user-data reached the machine"
    );
    assert_eq!(c.offers().await.unwrap()[0].stock, Stock::Low, "2 left");

    // Creating the same order again finds the machine, allocates nothing more.
    let again = c.create(&order).await.unwrap();
    assert_eq!(again.id, d.id);
    assert_eq!(sim.machines_allocated(), 1);

    let by_pool = c.list("surge-pool=shop").await.unwrap();
    assert_eq!(by_pool.iter().map(|d| &d.id).collect::<Vec<_>>(), [&d.id]);
    let by_order = c
        .list(&format!("surge-request={}", order.request_id))
        .await
        .unwrap();
    assert_eq!(by_order.len(), 1);
    assert!(c.list("surge-pool=other").await.unwrap().is_empty());
    let all = c.inventory("").await.unwrap();
    assert!(all.complete);
    assert_eq!(all.devices.len(), 1, "only allocated machines count");
    assert!(
        client(&sim, KEY, "rack1", Duration::from_secs(5))
            .list("surge-pool=shop")
            .await
            .unwrap()
            .is_empty(),
        "another zone's client does not see it"
    );

    c.delete(&d.id).await.unwrap();
    assert_eq!(c.get(&d.id).await.unwrap().state, DeviceState::Deleting);
    c.delete(&d.id).await.expect("releasing twice is fine");
    wait_state(&c, &d.id, DeviceState::Gone).await;
    c.delete(&d.id)
        .await
        .expect("releasing a released machine is fine");
    assert!(c.list("surge-pool=shop").await.unwrap().is_empty());
    assert_eq!(sim.machines_allocated(), 0);
    assert_eq!(c.offers().await.unwrap()[0].stock, Stock::Available);
    sim.stop();
}

/// A failing deployment maps to Failed; nothing matching maps to out of stock; an
/// unknown machine to not found; bad credentials (wrong secret, so a wrong PLAINTEXT
/// signature) to unauthorized; an outage to a transient error after retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_come_back_as_typed_errors_and_states() {
    let sim = simulator(
        1,
        Faults {
            order_error_share: 1.0,
            ..Faults::default()
        },
    )
    .await;
    let c = client(&sim, KEY, "rack1", Duration::from_secs(5));
    let d = c.create(&spec("doomed")).await.unwrap();
    let failed = wait_state(&c, &d.id, DeviceState::Failed).await;
    assert_eq!(failed.vendor_status, "Failed deployment");
    // The only machine of the zone is taken: nothing matches.
    match c.create(&spec("more")).await {
        Err(ProviderError::OutOfStock(why)) => assert!(why.contains("409"), "{why}"),
        other => panic!("no machine left gave {other:?}"),
    }
    assert_eq!(c.offers().await.unwrap()[0].stock, Stock::Empty);
    match c.get("nosuch").await {
        Err(ProviderError::NotFound(_)) => {}
        other => panic!("{other:?}"),
    }
    let wrong = client(
        &sim,
        "sim-consumer:sim-token:not-the-secret",
        "rack1",
        Duration::from_secs(5),
    );
    match wrong.offers().await {
        Err(ProviderError::Unauthorized(why)) => assert!(why.contains("401"), "{why}"),
        other => panic!("a wrong signature gave {other:?}"),
    }
    let unknown_token = client(
        &sim,
        "sim-consumer:other-token:sim-secret-of-the-token",
        "rack1",
        Duration::from_secs(5),
    );
    assert!(matches!(
        unknown_token.offers().await,
        Err(ProviderError::Unauthorized(_))
    ));
    // No OAuth at all: MAAS's 401.
    let raw = reqwest::get(format!("{}/api/2.0/machines/", sim.url()))
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 401);

    sim.set_faults(Faults {
        server_error_share: 1.0,
        ..Faults::default()
    });
    match c.offers().await {
        Err(ProviderError::Transient(why)) => assert!(why.contains("503"), "{why}"),
        other => panic!("an outage gave {other:?}"),
    }
    sim.set_faults(Faults::default());
    c.delete(&d.id)
        .await
        .expect("a failed deployment is released");
    wait_state(&c, &d.id, DeviceState::Gone).await;
    sim.stop();
}

/// The allocation is made but its answer comes too late (the client gives up): the
/// retry finds the machine no order claims and takes it; exactly one is allocated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_allocation_answer_allocates_exactly_one_machine() {
    let sim = simulator(
        4,
        Faults {
            lose_orders: 1,
            lost_delay: Duration::from_secs(2),
            ..Faults::default()
        },
    )
    .await;
    let c = client(&sim, KEY, "rack1", Duration::from_millis(500));
    let order = spec("lost");
    let d = c
        .create(&order)
        .await
        .expect("the order completes despite the lost answer");
    assert_eq!(d.tag("surge-request"), Some(order.request_id.as_str()));
    assert_eq!(
        sim.machines_allocated(),
        1,
        "one machine allocated, not two"
    );
    wait_state(&c, &d.id, DeviceState::Ready).await;
    // A second order is its own machine.
    let second = c.create(&spec("second")).await.unwrap();
    assert_ne!(second.id, d.id);
    assert_eq!(sim.machines_allocated(), 2);
    sim.stop();
}

/// MAAS allocates and then its gateway answers 500: the client looks before anything
/// else, finds the machine no order claims and takes it. Before, a 5xx was retried as it
/// was: a second machine allocated for one order (and the first left allocated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_after_an_allocation_allocates_exactly_one_machine() {
    let sim = simulator(
        4,
        Faults {
            create_then_5xx: 1,
            ..Faults::default()
        },
    )
    .await;
    let c = client(&sim, KEY, "rack1", Duration::from_secs(2));
    let order = spec("gateway");
    let d = c
        .create(&order)
        .await
        .expect("the allocation is found and the order completes");
    assert_eq!(d.tag("surge-request"), Some(order.request_id.as_str()));
    assert_eq!(
        sim.machines_allocated(),
        1,
        "one machine allocated, not two"
    );
    sim.stop();
}

/// Machine JSON as the vendor documents it (a full `GET machines/{id}/` and a listing).
#[test]
fn documented_machine_json_is_read() {
    let m: ApiMachine = serde_json::from_str(&fixture("machine-deployed.json")).unwrap();
    let d = Device::from(m);
    assert_eq!(d.id, "4y3h7n");
    assert_eq!(
        d.name, "shop-blade-7f3a",
        "the name surge gave it, from owner data"
    );
    assert_eq!(d.state, DeviceState::Ready);
    assert_eq!(d.vendor_status, "Deployed");
    assert_eq!(d.address, Some("10.20.0.47".parse().unwrap()), "IPv4 first");
    assert_eq!(d.zone, "rack2");
    assert_eq!(d.offer_id, "frontends");
    assert_eq!(d.tag("surge-pool"), Some("shop"));
    assert_eq!(
        d.tag("surge-request"),
        Some("0b9c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3")
    );
    assert!(d.tags.contains(&"ssd".to_owned()));
    assert_eq!(d.created_at, None);

    let list: Vec<ApiMachine> = serde_json::from_str(&fixture("machines.json")).unwrap();
    let states: Vec<DeviceState> = list.into_iter().map(|m| Device::from(m).state).collect();
    assert_eq!(
        states,
        [
            DeviceState::Ready,
            DeviceState::Installing,
            DeviceState::Failed,
            DeviceState::Gone
        ]
    );
}
