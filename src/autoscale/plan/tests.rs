//! The plan, case by case: inventory + pool + ledger + memory + time → actions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use proptest::prelude::*;

use super::*;
use crate::autoscale::ledger::{Order, OrderState};
use crate::provider::{Device, DeviceState};

const HOUR: Duration = Duration::from_secs(3600);
const MIN: Duration = Duration::from_secs(60);

fn device(id: &str, state: DeviceState, ip: Option<&str>) -> Device {
    Device {
        id: id.into(),
        name: id.into(),
        state,
        vendor_status: format!("{state:?}"),
        address: ip.map(|a| a.parse::<IpAddr>().unwrap()),
        tags: vec!["surge-pool=shop".into()],
        zone: "z1".into(),
        offer_id: "o".into(),
        created_at: None,
    }
}

fn node(id: &str, state: State) -> Node {
    Node {
        id: id.into(),
        state,
        origin: Origin::Provisioned,
        in_state_for: Duration::from_secs(30),
        drain_done: false,
        healthy: true,
        last_probe_error: None,
    }
}

fn known(device_id: &str) -> Known {
    Known {
        zone: "z1".into(),
        device_id: device_id.into(),
    }
}

fn rules() -> Rules {
    Rules {
        blade_port: 80,
        standby: 0,
        drain_timeout: Duration::from_secs(60),
        missing_limit: 3,
        order_deadline: 20 * MIN,
        unanswered_order_wait: Duration::from_secs(30),
        release_margin: 5 * MIN,
        down_release_after: 10 * MIN,
        budget: Budget::default(),
        private_network: false,
        bootstrap_timeout: 20 * MIN,
        bootstrap_failure_limit: 3,
    }
}

fn order(id: &str, placed_at: SystemTime, device_id: Option<&str>, state: OrderState) -> Order {
    Order {
        request_id: id.into(),
        zone: "z1".into(),
        offer: "EM".into(),
        placed_at,
        device_id: device_id.map(Into::into),
        state,
        price_per_hour: 0.25,
        released_at: None,
        reason: String::new(),
    }
}

/// One case's inputs, owned.
struct Case {
    desired: usize,
    zones: Vec<ZoneListing>,
    looked_up: HashMap<String, LookUp>,
    addresses: HashMap<String, IpAddr>,
    nodes: Vec<Node>,
    ledger: Vec<Order>,
    memory: Memory,
    rules: Rules,
    offer_price: Option<f64>,
    now: Instant,
    wall: SystemTime,
}

impl Case {
    fn new(desired: usize, devices: Vec<Device>, nodes: Vec<Node>) -> Self {
        Self {
            desired,
            zones: vec![ZoneListing {
                zone: "z1".into(),
                devices,
                complete: true,
            }],
            looked_up: HashMap::new(),
            addresses: HashMap::new(),
            nodes,
            ledger: Vec::new(),
            memory: Memory {
                adopted_once: true,
                ..Memory::default()
            },
            rules: rules(),
            offer_price: Some(0.25),
            now: Instant::now(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_780_800),
        }
    }

    /// Nodes in the pool that surge knows the servers of (`bm-<device>` ids).
    fn knowing(mut self, pairs: &[(&str, &str)]) -> Self {
        for (id, dev) in pairs {
            self.memory.known.insert((*id).into(), known(dev));
        }
        self
    }

    fn plan(&self) -> Plan {
        plan(&Inputs {
            desired: self.desired,
            zones: &self.zones,
            looked_up: &self.looked_up,
            addresses: &self.addresses,
            nodes: &self.nodes,
            ledger: &self.ledger,
            memory: &self.memory,
            rules: &self.rules,
            offer_price: self.offer_price,
            now: self.now,
            wall: self.wall,
        })
    }
}

fn orders(p: &Plan) -> usize {
    p.actions
        .iter()
        .map(|a| match a {
            Action::Order { count, .. } => *count,
            _ => 0,
        })
        .sum()
}

fn has(p: &Plan, f: impl Fn(&Action) -> bool) -> bool {
    p.actions.iter().any(f)
}

#[test]
fn a_delivered_server_is_adopted_toward_service_and_nothing_more_is_ordered() {
    let c = Case::new(
        2,
        vec![device("dev00001", DeviceState::Ready, Some("127.0.1.1"))],
        vec![node("bm-static", State::InService)],
    );
    let p = c.plan();
    assert!(
        has(
            &p,
            |a| matches!(a, Action::Adopt { id, spare: false, .. } if id == "bm-dev00001")
        ),
        "{p:?}"
    );
    assert_eq!(orders(&p), 0, "{p:?}");
}

#[test]
fn short_of_desired_orders_the_difference_capped_per_round() {
    let c = Case::new(20, vec![], vec![node("bm-a", State::InService)]);
    let p = c.plan();
    assert_eq!(orders(&p), MAX_ORDERS_PER_ROUND);
    let c = Case::new(
        3,
        vec![device("d-on-way", DeviceState::Provisioning, None)],
        vec![node("bm-a", State::InService)],
    );
    assert_eq!(orders(&c.plan()), 1, "the server on its way counts");
}

#[test]
fn an_order_not_yet_listed_counts_as_supply_until_its_deadline() {
    let mut c = Case::new(2, vec![], vec![node("bm-a", State::InService)]);
    c.ledger.push(order(
        "r1",
        c.wall - 5 * MIN,
        Some("dev-r1"),
        OrderState::Placed,
    ));
    let p = c.plan();
    assert_eq!(orders(&p), 0, "ordered again while the list lags: {p:?}");
    // Past the deadline: one last look-up by its tag, still counted this round.
    c.ledger[0].placed_at = c.wall - 25 * MIN;
    let p = c.plan();
    assert!(has(
        &p,
        |a| matches!(a, Action::LookUpOrder { request_id, .. } if request_id == "r1")
    ));
    // Its server shows: seen.
    let mut d = device("dev-r1", DeviceState::Provisioning, None);
    d.tags.push("surge-request=r1".into());
    c.zones[0].devices.push(d);
    let p = c.plan();
    assert!(has(
        &p,
        |a| matches!(a, Action::Seen { request_id, device_id } if request_id == "r1" && device_id == "dev-r1")
    ));
    assert_eq!(orders(&p), 0);
}

/// An order that got no answer (a 5xx, a timeout: it may stand) counts as on its way,
/// never sent again, and is looked up by its tag after `unanswered_order_wait` rather
/// than the whole order deadline: not found then, the need is ordered again.
#[test]
fn an_unanswered_order_is_looked_up_after_its_own_wait() {
    let mut c = Case::new(2, vec![], vec![node("bm-a", State::InService)]);
    let secs = Duration::from_secs;
    c.ledger
        .push(order("r2", c.wall - secs(10), None, OrderState::Placed));
    let p = c.plan();
    assert_eq!(orders(&p), 0, "{p:?}");
    assert!(
        !has(&p, |a| matches!(a, Action::LookUpOrder { .. })),
        "{p:?}"
    );
    c.ledger[0].placed_at = c.wall - secs(40);
    let p = c.plan();
    assert!(has(
        &p,
        |a| matches!(a, Action::LookUpOrder { request_id, .. } if request_id == "r2")
    ));
    assert_eq!(orders(&p), 0, "still counted this round: {p:?}");
}

#[test]
fn nothing_is_ordered_or_removed_on_an_incomplete_listing() {
    let mut c =
        Case::new(3, vec![], vec![node("bm-a", State::InService)]).knowing(&[("bm-a", "a")]);
    c.zones[0].complete = false;
    let p = c.plan();
    assert_eq!(orders(&p), 0);
    assert!(
        !has(&p, |a| matches!(
            a,
            Action::Drain { .. } | Action::Remove { .. } | Action::Missing { .. }
        )),
        "{p:?}"
    );
}

#[test]
fn an_empty_listing_removes_nothing_and_a_look_up_decides() {
    // Two known nodes, one empty (but complete-looking) listing.
    let nodes = vec![
        node("bm-a", State::InService),
        node("bm-b", State::InService),
    ];
    let mut c = Case::new(2, vec![], nodes).knowing(&[("bm-a", "a"), ("bm-b", "b")]);
    let p = c.plan();
    assert!(
        !has(&p, |a| matches!(
            a,
            Action::Drain { .. } | Action::Remove { .. } | Action::Release { .. }
        )),
        "{p:?}"
    );
    assert_eq!(
        p.actions
            .iter()
            .filter(|a| matches!(a, Action::Missing { .. }))
            .count(),
        2
    );
    assert_eq!(orders(&p), 0, "a missing server still serves: not replaced");
    // The look-ups say one is there (the listing lied) and the other is gone.
    c.looked_up.insert(
        "a".into(),
        LookUp::Present(device("a", DeviceState::Ready, Some("127.0.1.1"))),
    );
    c.looked_up.insert("b".into(), LookUp::Gone);
    c.memory.missing.insert("bm-a".into(), 1);
    let p = c.plan();
    assert!(has(
        &p,
        |a| matches!(a, Action::Present { id } if id == "bm-a")
    ));
    assert!(
        has(
            &p,
            |a| matches!(a, Action::Drain { id, why: DrainWhy::Vanished } if id == "bm-b")
        ),
        "drained, not dropped: {p:?}"
    );
    assert!(!has(&p, |a| matches!(a, Action::Remove { .. })));
}

#[test]
fn missing_from_enough_complete_listings_drains_the_node() {
    let mut c =
        Case::new(1, vec![], vec![node("bm-a", State::InService)]).knowing(&[("bm-a", "a")]);
    c.looked_up.insert("a".into(), LookUp::Unknown);
    c.memory.missing.insert("bm-a".into(), 2);
    let p = c.plan();
    assert!(
        has(
            &p,
            |a| matches!(a, Action::Drain { id, why: DrainWhy::Vanished } if id == "bm-a")
        ),
        "{p:?}"
    );
    // Once drained, it leaves the pool.
    let mut drained = node("bm-a", State::Draining);
    drained.drain_done = true;
    c.nodes = vec![drained];
    c.memory.draining.insert("bm-a".into(), DrainWhy::Vanished);
    assert!(has(
        &c.plan(),
        |a| matches!(a, Action::Remove { id } if id == "bm-a")
    ));
}

#[test]
fn spares_are_promoted_first_and_replaced() {
    let nodes = vec![node("bm-a", State::InService), node("bm-s", State::Standby)];
    let mut c = Case::new(2, vec![], nodes).knowing(&[("bm-a", "a"), ("bm-s", "s")]);
    c.rules.standby = 1;
    c.zones[0].devices = vec![
        device("a", DeviceState::Ready, Some("127.0.1.1")),
        device("s", DeviceState::Ready, Some("127.0.1.2")),
    ];
    let p = c.plan();
    assert!(has(
        &p,
        |a| matches!(a, Action::Promote { id } if id == "bm-s")
    ));
    assert_eq!(orders(&p), 1, "the promoted spare is replaced: {p:?}");
}

#[test]
fn scale_in_drains_the_node_whose_paid_hour_ends_soonest() {
    let nodes = vec![
        node("bm-old", State::InService),
        node("bm-new", State::InService),
        node("static", State::InService),
    ];
    let mut c = Case::new(
        2,
        vec![
            device("old", DeviceState::Ready, Some("127.0.1.1")),
            device("new", DeviceState::Ready, Some("127.0.1.2")),
        ],
        nodes,
    )
    .knowing(&[("bm-old", "old"), ("bm-new", "new")]);
    c.nodes[2].origin = Origin::Static;
    // "old" was placed 50 minutes ago (its hour ends in 10), "new" 20 minutes ago.
    c.ledger.push(order(
        "r-old",
        c.wall - 50 * MIN,
        Some("old"),
        OrderState::Seen,
    ));
    c.ledger.push(order(
        "r-new",
        c.wall - 20 * MIN,
        Some("new"),
        OrderState::Seen,
    ));
    let p = c.plan();
    assert!(
        has(
            &p,
            |a| matches!(a, Action::Drain { id, why: DrainWhy::ScaleIn } if id == "bm-old")
        ),
        "{p:?}"
    );
    assert!(!has(
        &p,
        |a| matches!(a, Action::Drain { id, .. } if id == "bm-new")
    ));
}

#[test]
fn a_drained_node_is_released_only_near_the_end_of_its_paid_hour_else_parked() {
    let mut drained = node("bm-a", State::Draining);
    drained.drain_done = true;
    let mut c = Case::new(
        1,
        vec![device("a", DeviceState::Ready, Some("127.0.1.1"))],
        vec![drained, node("static", State::InService)],
    )
    .knowing(&[("bm-a", "a")]);
    c.nodes[1].origin = Origin::Static;
    c.memory.draining.insert("bm-a".into(), DrainWhy::ScaleIn);
    // 10 minutes into its hour: releasing saves nothing, keep it as a spare.
    c.ledger
        .push(order("r", c.wall - 10 * MIN, Some("a"), OrderState::Seen));
    let p = c.plan();
    assert!(
        has(&p, |a| matches!(a, Action::Park { id } if id == "bm-a")),
        "{p:?}"
    );
    assert!(!has(&p, |a| matches!(a, Action::Release { .. })));
    // 57 minutes in (3 left, margin 5): released.
    c.ledger[0].placed_at = c.wall - 57 * MIN;
    let p = c.plan();
    assert!(
        has(
            &p,
            |a| matches!(a, Action::Release { device_id, node: Some(n), .. } if device_id == "a" && n == "bm-a")
        ),
        "{p:?}"
    );
    // A surplus spare follows the same clock: kept at 10 minutes, released at 57 (an
    // hour and 57 minutes in counts the same).
    let mut c = Case::new(
        1,
        vec![device("a", DeviceState::Ready, Some("127.0.1.1"))],
        vec![
            node("bm-a", State::Standby),
            node("static", State::InService),
        ],
    )
    .knowing(&[("bm-a", "a")]);
    c.nodes[1].origin = Origin::Static;
    c.ledger
        .push(order("r", c.wall - 10 * MIN, Some("a"), OrderState::Seen));
    assert!(!has(&c.plan(), |a| matches!(a, Action::Release { .. })));
    c.ledger[0].placed_at = c.wall - (HOUR + 57 * MIN);
    assert!(has(
        &c.plan(),
        |a| matches!(a, Action::Release { device_id, .. } if device_id == "a")
    ));
}

#[test]
fn an_operators_undrain_takes_the_node_out_of_scale_in_without_blocking_it() {
    // bm-a was being scaled in; the operator undrained it.
    let nodes = vec![
        node("bm-a", State::InService),
        node("bm-b", State::InService),
        node("static", State::InService),
    ];
    let mut c = Case::new(
        1,
        vec![
            device("a", DeviceState::Ready, Some("127.0.1.1")),
            device("b", DeviceState::Ready, Some("127.0.1.2")),
        ],
        nodes,
    )
    .knowing(&[("bm-a", "a"), ("bm-b", "b")]);
    c.nodes[2].origin = Origin::Static;
    c.memory.draining.insert("bm-a".into(), DrainWhy::ScaleIn);
    let p = c.plan();
    assert!(has(
        &p,
        |a| matches!(a, Action::OperatorKept { id } if id == "bm-a")
    ));
    assert!(
        has(
            &p,
            |a| matches!(a, Action::Drain { id, .. } if id == "bm-b")
        ),
        "scale-in goes on with another node: {p:?}"
    );
    // Later rounds never pick the operator's node.
    c.memory.draining.clear();
    c.memory.operator_kept.insert("bm-a".into());
    c.nodes.retain(|n| n.id != "bm-b");
    let p = c.plan();
    assert!(
        !has(
            &p,
            |a| matches!(a, Action::Drain { id, .. } if id == "bm-a")
        ),
        "{p:?}"
    );
}

#[test]
fn failed_servers_are_drained_if_serving_then_released() {
    let c = Case::new(
        1,
        vec![device("f", DeviceState::Failed, None)],
        vec![node("static", State::InService)],
    );
    let p = c.plan();
    assert!(has(
        &p,
        |a| matches!(a, Action::Release { device_id, node: None, .. } if device_id == "f")
    ));
    let mut c = Case::new(
        1,
        vec![device("f", DeviceState::Failed, Some("127.0.1.1"))],
        vec![node("bm-f", State::InService)],
    )
    .knowing(&[("bm-f", "f")]);
    let p = c.plan();
    assert!(has(
        &p,
        |a| matches!(a, Action::Drain { id, why: DrainWhy::Broken } if id == "bm-f")
    ));
    assert!(
        !has(&p, |a| matches!(a, Action::Release { .. })),
        "released while serving: {p:?}"
    );
    let mut drained = node("bm-f", State::Draining);
    drained.drain_done = true;
    c.nodes = vec![drained];
    c.memory.draining.insert("bm-f".into(), DrainWhy::Broken);
    assert!(has(
        &c.plan(),
        |a| matches!(a, Action::Release { device_id, .. } if device_id == "f")
    ));
}

#[test]
fn a_node_down_for_long_is_released_and_replaced() {
    let mut down = node("bm-d", State::Down);
    down.in_state_for = 11 * MIN;
    let c = Case::new(
        1,
        vec![device("d", DeviceState::Ready, Some("127.0.1.1"))],
        vec![down],
    )
    .knowing(&[("bm-d", "d")]);
    let p = c.plan();
    assert!(
        has(
            &p,
            |a| matches!(a, Action::Release { device_id, .. } if device_id == "d")
        ),
        "{p:?}"
    );
    assert_eq!(orders(&p), 1, "a down node is no capacity");
}

#[test]
fn a_ready_server_without_an_address_is_counted_not_reordered() {
    let mut c = Case::new(
        2,
        vec![device("n", DeviceState::Ready, None)],
        vec![node("static", State::InService)],
    );
    c.ledger
        .push(order("r", c.wall - 5 * MIN, Some("n"), OrderState::Seen));
    let p = c.plan();
    assert_eq!(orders(&p), 0, "{p:?}");
    assert!(!p.summary.notes.is_empty());
    c.ledger[0].placed_at = c.wall - 30 * MIN;
    assert!(has(
        &c.plan(),
        |a| matches!(a, Action::Release { device_id, .. } if device_id == "n")
    ));
}

#[test]
fn releases_are_retried_on_their_back_off_and_confirmed_when_gone() {
    let mut c = Case::new(
        1,
        vec![device("x", DeviceState::Ready, Some("127.0.1.1"))],
        vec![node("static", State::InService)],
    );
    c.memory.releasing.insert(
        "x".into(),
        Releasing {
            zone: "z1".into(),
            failures: 2,
            next_try: Some(c.now + MIN),
        },
    );
    assert!(
        !has(&c.plan(), |a| matches!(a, Action::Release { .. })),
        "before its back-off"
    );
    c.memory.releasing.get_mut("x").unwrap().next_try = Some(c.now);
    assert!(has(
        &c.plan(),
        |a| matches!(a, Action::Release { device_id, .. } if device_id == "x")
    ));
    c.zones[0].devices.clear();
    assert!(has(
        &c.plan(),
        |a| matches!(a, Action::Released { device_id } if device_id == "x")
    ));
}

#[test]
fn the_budget_stops_orders_and_says_why() {
    let mut c = Case::new(5, vec![], vec![node("static", State::InService)]);
    c.rules.budget.max_servers = Some(2);
    c.ledger
        .push(order("r1", c.wall - 2 * HOUR, Some("d1"), OrderState::Seen));
    let p = c.plan();
    assert_eq!(orders(&p), 1, "{p:?}");
    assert!(
        p.summary
            .budget_reached
            .as_deref()
            .is_some_and(|r| r.contains("at most 2")),
        "{p:?}"
    );
    c.rules.budget = Budget {
        max_orders_per_hour: Some(3),
        ..Budget::default()
    };
    c.ledger
        .push(order("r2", c.wall - 10 * MIN, Some("d2"), OrderState::Seen));
    c.ledger
        .push(order("r3", c.wall - 20 * MIN, Some("d3"), OrderState::Seen));
    c.desired = 10;
    assert_eq!(orders(&c.plan()), 1);
    c.rules.budget = Budget {
        max_price_per_hour: Some(1.0),
        ..Budget::default()
    };
    // Three servers at 0.25/h: room for one more.
    let p = c.plan();
    assert_eq!(orders(&p), 1, "{p:?}");
    assert!(p.summary.budget_reached.is_some());
}

#[test]
fn the_first_adoption_puts_a_previous_surges_servers_back_into_service() {
    let mut c = Case::new(
        1,
        vec![
            device("a", DeviceState::Ready, Some("127.0.1.1")),
            device("b", DeviceState::Ready, Some("127.0.1.2")),
        ],
        vec![node("static", State::InService)],
    );
    c.memory.adopted_once = false;
    c.rules.standby = 1;
    let p = c.plan();
    let spares: Vec<bool> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Adopt { spare, .. } => Some(*spare),
            _ => None,
        })
        .collect();
    assert_eq!(spares, [true, false], "{p:?}");
}

#[test]
fn billing_hours() {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_780_800);
    assert_eq!(paid_hour_ends(t0, t0 + 10 * MIN), t0 + HOUR);
    assert_eq!(paid_hour_ends(t0, t0 + HOUR), t0 + 2 * HOUR);
    assert!(!release_due(t0, t0 + 50 * MIN, 5 * MIN));
    assert!(release_due(t0, t0 + 56 * MIN, 5 * MIN));
}

// --- Whatever the inventory and listing faults: never more than the gap is ordered, and
// no serving node is released without a drain. ---

fn any_state() -> impl Strategy<Value = DeviceState> {
    prop_oneof![
        Just(DeviceState::Requested),
        Just(DeviceState::Provisioning),
        Just(DeviceState::Installing),
        Just(DeviceState::Ready),
        Just(DeviceState::Failed),
        Just(DeviceState::Deleting),
    ]
}

fn any_node_state() -> impl Strategy<Value = State> {
    prop_oneof![
        Just(State::Warming),
        Just(State::InService),
        Just(State::Draining),
        Just(State::Down),
        Just(State::Maint),
        Just(State::Standby),
    ]
}

proptest! {
    #[test]
    fn plan_never_overorders_nor_releases_a_serving_node(
        servers in proptest::collection::vec((any_state(), any::<bool>(), proptest::option::of(any_node_state()), any::<bool>(), 0u64..7200), 0..12),
        desired in 0usize..15,
        standby in 0usize..3,
        complete in any::<bool>(),
        unseen in 0usize..4,
        drained in any::<bool>(),
    ) {
        let mut c = Case::new(desired, vec![], vec![]);
        c.rules.standby = standby;
        c.zones[0].complete = complete;
        for (n, (state, listed, in_pool, has_ip, age)) in servers.iter().enumerate() {
            let id = format!("d{n:07}");
            let d = device(&id, *state, has_ip.then_some("127.0.1.9"));
            let backend = backend_id(&d);
            if *listed {
                c.zones[0].devices.push(d);
            }
            if let Some(s) = in_pool {
                let mut nd = node(&backend, *s);
                nd.drain_done = drained;
                c.nodes.push(nd);
                c.memory.known.insert(backend.clone(), known(&id));
                if *s == State::Draining {
                    c.memory.draining.insert(backend, DrainWhy::ScaleIn);
                }
            }
            c.ledger.push(order(&format!("r{n}"), c.wall - Duration::from_secs(*age), Some(&id), OrderState::Seen));
        }
        for u in 0..unseen {
            c.ledger.push(order(&format!("u{u}"), c.wall - MIN, None, OrderState::Placed));
        }
        let p = c.plan();
        // Supply counted independently: serving or warming nodes, spares, servers on
        // their way not yet in the pool, orders not yet seen.
        let in_pool: std::collections::HashSet<&str> = c.nodes.iter().map(|n| n.id.as_str()).collect();
        let nodes_supply = c.nodes.iter().filter(|n| matches!(n.state, State::InService | State::Warming | State::Standby)).count();
        let on_the_way = c.zones[0].devices.iter().filter(|d| !in_pool.contains(backend_id(d).as_str())).filter(|d| matches!(d.state, DeviceState::Requested | DeviceState::Provisioning | DeviceState::Installing | DeviceState::Ready)).count();
        let supply = nodes_supply + on_the_way + unseen;
        let gap = (desired + standby).saturating_sub(supply);
        prop_assert!(orders(&p) <= gap, "ordered {} for a gap of {gap}: {:?}", orders(&p), p);
        if !complete {
            prop_assert_eq!(orders(&p), 0);
        }
        let state_of = |id: &str| c.nodes.iter().find(|n| n.id == id).map(|n| n.state);
        for a in &p.actions {
            if let Action::Release { node: Some(id), .. } = a {
                let s = state_of(id);
                prop_assert!(!matches!(s, Some(State::InService | State::Warming)), "released serving {id} ({s:?}) without a drain: {p:?}");
            }
            if let Action::Remove { id } = a {
                prop_assert!(c.nodes.iter().any(|n| &n.id == id && n.state == State::Draining && n.drain_done), "removed {id} undrained");
            }
        }
    }
}

#[test]
fn a_node_an_operator_deleted_has_its_server_released_not_adopted_again() {
    // The operator deleted bm-a through the admin API: drained, then out of the pool.
    let c = Case::new(
        1,
        vec![device("a", DeviceState::Ready, Some("127.0.1.1"))],
        vec![node("static", State::InService)],
    )
    .knowing(&[("bm-a", "a")]);
    let p = c.plan();
    assert!(
        has(&p, |a| matches!(a, Action::Forget { id } if id == "bm-a")),
        "{p:?}"
    );
    assert!(
        has(
            &p,
            |a| matches!(a, Action::Release { device_id, node: None, .. } if device_id == "a")
        ),
        "{p:?}"
    );
    assert!(
        !has(&p, |a| matches!(a, Action::Adopt { .. })),
        "adopted again: {p:?}"
    );
    // Its server already gone from the listing: only forgotten.
    let c = Case::new(1, vec![], vec![node("static", State::InService)]).knowing(&[("bm-a", "a")]);
    let p = c.plan();
    assert!(has(&p, |a| matches!(a, Action::Forget { .. })));
    assert!(!has(&p, |a| matches!(a, Action::Release { .. })));
}

#[test]
fn a_bootstrap_that_never_gets_healthy_is_released_and_three_in_a_row_stop_orders() {
    let mut booting = node("bm-b", State::Warming);
    booting.in_state_for = 21 * MIN;
    booting.last_probe_error = Some("connect failed".into());
    let mut c = Case::new(
        2,
        vec![device("b", DeviceState::Ready, Some("127.0.1.1"))],
        vec![node("static", State::InService), booting],
    )
    .knowing(&[("bm-b", "b")]);
    c.memory.booting.insert("bm-b".into());
    let p = c.plan();
    assert!(
        has(
            &p,
            |a| matches!(a, Action::Release { device_id, why, .. } if device_id == "b" && why.contains("connect failed"))
        ),
        "{p:?}"
    );
    assert!(has(
        &p,
        |a| matches!(a, Action::BootFailed { id, .. } if id == "bm-b")
    ));
    assert_eq!(
        orders(&p),
        1,
        "past its deadline a warming node is no capacity: replaced"
    );
    assert!(p.summary.bootstrap_alarm.is_none());
    // The third failure in a row: no more orders, and the alarm says why.
    c.memory.bootstrap_failures = 2;
    let p = c.plan();
    assert_eq!(orders(&p), 0, "{p:?}");
    let alarm = p.summary.bootstrap_alarm.clone().unwrap_or_default();
    assert!(
        alarm.contains("bootstrap is failing") && alarm.contains("connect failed"),
        "{alarm}"
    );
    // Within its deadline a slow bootstrap counts as on its way: nothing ordered.
    c.memory.bootstrap_failures = 0;
    c.nodes[1].in_state_for = 5 * MIN;
    let p = c.plan();
    assert_eq!(orders(&p), 0, "{p:?}");
    assert!(!has(&p, |a| matches!(a, Action::Release { .. })));
    // Healthy: booted, the failure streak ends.
    c.nodes[1].state = State::InService;
    assert!(has(
        &c.plan(),
        |a| matches!(a, Action::Booted { id } if id == "bm-b")
    ));
}

#[test]
fn with_a_private_network_blades_are_reached_on_their_private_address() {
    let mut c = Case::new(
        2,
        vec![device("p", DeviceState::Ready, Some("127.0.1.1"))],
        vec![node("static", State::InService)],
    );
    c.rules.private_network = true;
    let p = c.plan();
    assert!(
        !has(&p, |a| matches!(a, Action::Adopt { .. })),
        "adopted without a private address: {p:?}"
    );
    assert_eq!(
        orders(&p),
        0,
        "a server waiting for its private address is on its way"
    );
    c.addresses.insert("p".into(), "127.1.0.1".parse().unwrap());
    let p = c.plan();
    assert!(
        has(
            &p,
            |a| matches!(a, Action::Adopt { addr, .. } if addr.ip().to_string() == "127.1.0.1")
        ),
        "{p:?}"
    );
}
