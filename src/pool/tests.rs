use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::config::StickyConfig;

fn settings(algorithm: Algorithm, sticky: bool) -> PoolSettings {
    PoolSettings {
        name: "test".into(),
        algorithm,
        sticky: sticky.then(|| StickyConfig {
            cookie: "cart".into(),
            route_cookie: "surge_route".into(),
            route_key: None,
            route_key_previous: None,
            route_key_file: "data/route.key".into(),
            route_ttl: Duration::from_secs(3600),
        }),
        slow_start: Duration::from_secs(10),
        ejection: EjectionConfig {
            consecutive_failures: 3,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(60),
            max_percent: 50,
        },
        shed: None,
        protocol: Default::default(),
        node_max_in_flight: 0,
        waiting_room: None,
    }
}

fn backends(n: usize) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            Arc::new(Backend::new(
                &format!("b{i}"),
                SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)),
                1,
                Origin::Static,
            ))
        })
        .collect()
}

fn pool(n: usize, algorithm: Algorithm, sticky: bool) -> Pool {
    Pool::new(settings(algorithm, sticky), backends(n))
}

fn picks(pool: &Pool, req: &Pick<'_>, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let g = pool.pick(req).expect("a backend");
        *counts.entry(g.backend().id.to_string()).or_default() += 1;
    }
    counts
}

#[test]
fn in_flight_is_counted_while_the_guard_lives() {
    let p = pool(1, Algorithm::P2cEwma, false);
    let g = p.pick(&Pick::default()).unwrap();
    assert_eq!(g.backend().in_flight(), 1);
    let b = g.backend().clone();
    drop(g);
    assert_eq!(b.in_flight(), 0);
    assert_eq!(b.requests(), 1);
}

#[test]
fn counters_survive_a_new_table() {
    let p = pool(2, Algorithm::P2cEwma, false);
    let g = p.pick(&Pick::default()).unwrap();
    let id = g.backend().id.to_string();
    p.add(backends(3).pop().unwrap()).unwrap();
    let t = p.snapshot();
    assert_eq!(t.generation, 1);
    assert_eq!(t.get(&id).unwrap().backend.in_flight(), 1);
    drop(g);
    assert_eq!(t.get(&id).unwrap().backend.in_flight(), 0);
}

#[test]
fn round_robin_follows_weights_exactly() {
    let mut bs = backends(3);
    bs[0] = Arc::new(Backend::new("heavy", bs[0].addr, 3, Origin::Static));
    let p = Pool::new(settings(Algorithm::RoundRobin, false), bs);
    let counts = picks(&p, &Pick::default(), 500);
    assert_eq!(counts["heavy"], 300);
    assert_eq!(counts["b1"], 100);
    assert_eq!(counts["b2"], 100);
}

#[test]
fn p2c_prefers_the_less_loaded_backend() {
    let p = pool(2, Algorithm::P2cEwma, false);
    // Hold 20 requests on b0: every pick after that must go to b1.
    let b0 = p.snapshot().get("b0").unwrap().backend.clone();
    let _held: Vec<InFlight> = (0..20)
        .map(|_| InFlight::new(b0.clone(), State::InService))
        .collect();
    let counts = picks(&p, &Pick::default(), 100);
    assert_eq!(counts.get("b1"), Some(&100));
}

#[test]
fn p2c_prefers_the_faster_backend() {
    let p = pool(2, Algorithm::P2cEwma, false);
    let now = Instant::now();
    let t = p.snapshot();
    t.get("b0")
        .unwrap()
        .backend
        .latency
        .observe(Duration::from_millis(50), now);
    t.get("b1")
        .unwrap()
        .backend
        .latency
        .observe(Duration::from_millis(1), now);
    let counts = picks(&p, &Pick::default(), 100);
    assert_eq!(counts.get("b1"), Some(&100));
}

#[test]
fn a_cart_hashes_to_one_backend_and_moves_only_when_it_leaves() {
    let p = pool(5, Algorithm::P2cEwma, true);
    let req = Pick {
        sticky_key: Some(b"cart-42"),
        ..Pick::default()
    };
    let counts = picks(&p, &req, 50);
    assert_eq!(counts.len(), 1, "{counts:?}");
    let home = counts.keys().next().unwrap().clone();
    // Another backend leaving does not move the cart.
    let other = if home == "b0" { "b1" } else { "b0" };
    p.remove(other).unwrap();
    assert_eq!(picks(&p, &req, 10).get(&home), Some(&10));
    // Its own backend leaving does.
    p.remove(&home).unwrap();
    assert!(!picks(&p, &req, 10).contains_key(&home));
}

#[test]
fn a_node_at_its_ceiling_is_skipped_and_a_cart_bound_to_it_waits() {
    for algorithm in [Algorithm::P2cEwma, Algorithm::RoundRobin] {
        let mut s = settings(algorithm, true);
        s.node_max_in_flight = 3;
        let p = Pool::new(s, backends(3));
        let cart = Pick {
            sticky_key: Some(b"cart-42"),
            ..Pick::default()
        };
        // One client pins itself with one cart: three requests reach its node...
        let held: Vec<InFlight> = (0..3).map(|_| p.pick(&cart).unwrap()).collect();
        let home = held[0].backend().id.clone();
        assert!(held.iter().all(|g| g.backend().id == home), "{algorithm:?}");
        // ... and the rest spill over to the others, never the full node.
        let spilled = picks(&p, &cart, 20);
        assert!(!spilled.contains_key(&*home), "{algorithm:?}: {spilled:?}");
        assert!(!picks(&p, &Pick::default(), 50).contains_key(&*home));
        // A cart bound to the full node is not moved (the node holds it): refused.
        let bound = Pick {
            route: Some(&home),
            ..cart
        };
        assert_eq!(p.pick(&bound).err(), Some(NoPick::BoundNodeFull));
        // Every node full: nothing.
        let more: Vec<InFlight> = (0..6).map(|_| p.pick(&Pick::default()).unwrap()).collect();
        assert_eq!(p.pick(&Pick::default()).err(), Some(NoPick::Nothing));
        drop(more);
        drop(held);
        assert_eq!(p.pick(&bound).unwrap().backend().id, home, "room again");
    }
}

#[test]
fn route_cookie_reaches_a_draining_backend_until_the_deadline() {
    let p = pool(3, Algorithm::P2cEwma, true);
    p.drain("b1", Duration::from_millis(200)).unwrap();
    let bound = Pick {
        sticky_key: Some(b"c"),
        route: Some("b1"),
        ..Pick::default()
    };
    assert_eq!(picks(&p, &bound, 20).get("b1"), Some(&20));
    // New sessions never land there.
    assert!(!picks(&p, &Pick::default(), 200).contains_key("b1"));
    std::thread::sleep(Duration::from_millis(250));
    let bound = Pick {
        now_ns: nanos_since_epoch(Instant::now()),
        ..bound
    };
    assert!(!picks(&p, &bound, 20).contains_key("b1"));
}

#[test]
fn drain_is_idempotent_and_keeps_the_first_deadline() {
    let p = pool(2, Algorithm::P2cEwma, false);
    let d1 = p.drain("b0", Duration::from_secs(300)).unwrap();
    let gen = p.snapshot().generation;
    let d2 = p.drain("b0", Duration::from_secs(5)).unwrap();
    assert_eq!(d1, d2);
    assert_eq!(
        p.snapshot().generation,
        gen,
        "a repeated drain publishes nothing"
    );
    assert_eq!(
        p.drain("nope", Duration::from_secs(1)),
        Err(PoolError::UnknownBackend("nope".into()))
    );
}

#[test]
fn drain_is_done_when_nothing_is_in_flight() {
    let p = pool(2, Algorithm::RoundRobin, false);
    let g = loop {
        let g = p.pick(&Pick::default()).unwrap();
        if &*g.backend().id == "b0" {
            break g;
        }
    };
    p.drain("b0", Duration::from_secs(300)).unwrap();
    assert_eq!(p.drain_done("b0", Instant::now()), Some(false));
    drop(g);
    assert_eq!(p.drain_done("b0", Instant::now()), Some(true));
}

#[test]
fn consecutive_failures_eject_but_never_past_max_percent() {
    let p = pool(4, Algorithm::P2cEwma, false);
    let t = p.snapshot_full();
    let b = |id: &str| t.get(id).unwrap().backend.clone();
    for _ in 0..3 {
        p.record(&b("b0"), Outcome::Failure);
    }
    assert_eq!(p.snapshot().get("b0").unwrap().state, State::Down);
    for _ in 0..3 {
        p.record(&b("b1"), Outcome::Failure);
    }
    assert_eq!(p.snapshot().get("b1").unwrap().state, State::Down);
    // Two of four are down: a third ejection would pass 50%.
    for _ in 0..3 {
        p.record(&b("b2"), Outcome::Failure);
    }
    assert_eq!(p.snapshot().get("b2").unwrap().state, State::InService);
}

#[test]
fn a_success_resets_the_failure_streak() {
    let p = pool(2, Algorithm::P2cEwma, false);
    let b = p.snapshot().get("b0").unwrap().backend.clone();
    p.record(&b, Outcome::Failure);
    p.record(&b, Outcome::Failure);
    p.record(&b, Outcome::Success);
    p.record(&b, Outcome::Failure);
    assert_eq!(p.snapshot().get("b0").unwrap().state, State::InService);
}

#[test]
fn slow_start_ramps_from_a_tenth_to_full_weight() {
    let b = backends(1).pop().unwrap();
    let b = Arc::new(Backend::new("w", b.addr, 100, Origin::Static));
    let now = Instant::now();
    let mut m = Member::new(b, State::InService, now);
    m.slow_start = true;
    let ss = Duration::from_secs(10);
    assert_eq!(m.effective_weight(now, ss), 10);
    assert_eq!(m.effective_weight(now + Duration::from_secs(5), ss), 55);
    assert_eq!(m.effective_weight(now + Duration::from_secs(10), ss), 100);
    m.state = State::Draining;
    assert_eq!(m.effective_weight(now + Duration::from_secs(10), ss), 0);
}

#[test]
fn warming_backends_get_no_traffic_and_duplicates_are_refused() {
    let p = pool(1, Algorithm::P2cEwma, false);
    let extra = Arc::new(Backend::new(
        "new",
        SocketAddr::from(([127, 0, 0, 1], 20_000)),
        1,
        Origin::Provisioned,
    ));
    p.add(extra.clone()).unwrap();
    assert_eq!(p.snapshot().get("new").unwrap().state, State::Warming);
    assert!(!picks(&p, &Pick::default(), 50).contains_key("new"));
    assert_eq!(
        p.add(extra.clone()),
        Err(PoolError::DuplicateId("new".into()))
    );
    let same_addr = Arc::new(Backend::new("other", extra.addr, 1, Origin::Static));
    assert_eq!(
        p.add(same_addr),
        Err(PoolError::DuplicateAddress(extra.addr))
    );
}

#[test]
fn a_retry_avoids_the_failed_backend() {
    for algorithm in [Algorithm::P2cEwma, Algorithm::RoundRobin] {
        let p = pool(3, algorithm, true);
        let failed = p.snapshot().get("b1").unwrap().backend.clone();
        let req = Pick {
            sticky_key: Some(b"cart"),
            route: Some("b1"),
            avoid: Some(&failed),
            ..Pick::default()
        };
        assert!(!picks(&p, &req, 100).contains_key("b1"));
    }
    let p = pool(1, Algorithm::P2cEwma, false);
    let only = p.snapshot().get("b0").unwrap().backend.clone();
    let req = Pick {
        avoid: Some(&only),
        ..Pick::default()
    };
    assert_eq!(
        p.pick(&req).err(),
        Some(NoPick::Nothing),
        "no second backend to retry on"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Drain(usize),
    Undrain(usize),
    Eject(usize),
    Remove(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..8usize).prop_map(Op::Drain),
        (0..8usize).prop_map(Op::Undrain),
        (0..8usize).prop_map(Op::Eject),
        (0..8usize).prop_map(Op::Remove),
    ]
}

proptest! {
    /// Whatever operators and ejection do, a request without a binding only ever lands on
    /// an in-service backend, and one exists to land on unless none is in service.
    #[test]
    fn unbound_requests_only_reach_in_service_backends(
        ops in proptest::collection::vec(op(), 0..20),
        rr in any::<bool>(),
    ) {
        let algorithm = if rr { Algorithm::RoundRobin } else { Algorithm::P2cEwma };
        let p = pool(8, algorithm, true);
        for op in ops {
            let id = |i: usize| format!("b{i}");
            match op {
                Op::Drain(i) => { let _ = p.drain(&id(i), Duration::from_secs(60)); }
                Op::Undrain(i) => { let _ = p.undrain(&id(i)); }
                Op::Eject(i) => { let _ = p.eject(&id(i)); }
                Op::Remove(i) => { let _ = p.remove(&id(i)); }
            }
        }
        let t = p.snapshot_full();
        let in_service = t.count(State::InService);
        for key in [None, Some(&b"cart-1"[..])] {
            let req = Pick { sticky_key: key, ..Pick::default() };
            for _ in 0..32 {
                match p.pick(&req) {
                    Ok(g) => {
                        let m = t.get(&g.backend().id).unwrap();
                        prop_assert_eq!(m.state, State::InService);
                    }
                    Err(_) => prop_assert_eq!(in_service, 0),
                }
            }
        }
    }
}

#[test]
fn latency_estimate_jumps_to_peaks_and_decays_when_idle() {
    let e = PeakEwma::new();
    let now = Instant::now();
    assert_eq!(e.get_ns(), 0.0, "no sample yet");
    e.observe(Duration::from_millis(1), now);
    e.observe(Duration::from_millis(50), now);
    assert_eq!(e.get_ns(), 50e6, "a peak is taken at once");
    e.observe(Duration::from_millis(1), now + Duration::from_secs(10));
    let after = e.get_ns();
    assert!(
        after < 20e6 && after > 1e6,
        "decays towards lower samples: {after}"
    );
    let t = nanos_since_epoch(now + Duration::from_secs(60));
    assert!(e.at(t) < after / 50.0, "an idle backend's estimate fades");
}
