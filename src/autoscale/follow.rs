//! What an instance that does not lead does with the leader's roles: its pool follows the
//! leader's provisioned nodes (added, promoted, parked, drained, removed), so that every
//! instance serves the same blades and none sends work to a server being released.
//! [`follow`] decides (pure); [`round`] is the follower's round: it reads the inventory
//! through the reconciler (never writing to the provider) and applies the decisions to
//! the pool.
//!
//! A node an operator gave an instruction for (drain, maintenance, removal) is the
//! operator's: roles never move it. A node the roles list whose server a complete listing
//! no longer shows is not added (the roles may be a dead leader's).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::plan::{Node, ZoneListing};
use super::problem::Problem;
use super::reconcile::{Following, Report};
use crate::cluster::{Role, Roles};
use crate::pool::{Backend, Origin, Pool, State};
use crate::provider::Provider;

/// A round of an instance that does not lead: the inventory is read (nothing is written
/// to the provider) and the pool follows the leader's `roles`; `operator` holds the
/// nodes an operator gave an instruction for.
pub(super) async fn round<P: Provider>(
    r: Following<'_, P>,
    roles: Option<&Roles>,
    operator: &HashSet<String>,
    now: Instant,
) -> Report {
    let mut report = Report::default();
    let zones = r.inventory(&mut report).await;
    let nodes = r.nodes(now);
    if let Some(roles) = roles {
        for action in follow(roles, &zones, &nodes, operator) {
            apply(r.pool(), r.drain_timeout(), action, &mut report);
        }
    }
    let table = r.pool().snapshot();
    report.in_service = table.count(State::InService);
    report.pending = table.count(State::Warming);
    report.standby = table.count(State::Standby);
    report.draining = table.count(State::Draining);
    report.devices = zones.iter().map(|z| z.devices.len()).sum();
    report.orders = r.orders().to_vec();
    report.notes.push(match roles {
        Some(r) => format!("following the leader {}: it orders and releases", r.leader),
        None => "no leader has published its nodes yet".into(),
    });
    report
}

/// One decision applied to this instance's pool.
fn apply(pool: &Pool, drain_timeout: Duration, action: FollowAction, report: &mut Report) {
    let outcome = match &action {
        FollowAction::Add {
            id,
            address,
            standby,
        } => {
            let backend = Arc::new(Backend::new(id, *address, 1, Origin::Provisioned));
            if *standby {
                pool.add_standby(backend)
            } else {
                pool.add(backend)
            }
        }
        FollowAction::Promote { id } => {
            pool.promote(id);
            Ok(())
        }
        FollowAction::Park { id } => {
            pool.park(id);
            Ok(())
        }
        FollowAction::Drain { id } => pool.drain(id, drain_timeout).map(|_| ()),
        FollowAction::Undrain { id } => pool.undrain(id).map(|_| ()),
        FollowAction::Remove { id } => pool.remove(id).map(|_| ()),
    };
    match outcome {
        Ok(()) => tracing::info!(?action, "following the leader"),
        Err(e) => report.errors.push(Problem::Follow {
            action: format!("{action:?}"),
            error: e.to_string(),
        }),
    }
}

/// One change to this instance's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowAction {
    /// Add the node: warming toward service, or as a spare.
    Add {
        id: String,
        address: SocketAddr,
        standby: bool,
    },
    Promote {
        id: String,
    },
    Park {
        id: String,
    },
    Drain {
        id: String,
    },
    Undrain {
        id: String,
    },
    /// Out of the pool: the leader no longer has it, and this instance's drain is over.
    Remove {
        id: String,
    },
}

/// The changes that make `nodes` follow `roles`; `operator` holds the ids an operator
/// gave an instruction for.
pub fn follow(
    roles: &Roles,
    zones: &[ZoneListing],
    nodes: &[Node],
    operator: &HashSet<String>,
) -> Vec<FollowAction> {
    let mut out = Vec::new();
    let by_id: HashMap<&str, &Node> = nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let listed: HashSet<&str> = zones
        .iter()
        .flat_map(|z| z.devices.iter().map(|d| d.id.as_str()))
        .collect();
    let gone = |zone: &str, device: &str| {
        zones.iter().any(|z| z.zone == zone && z.complete) && !listed.contains(device)
    };
    for e in roles.nodes.iter().filter(|e| !operator.contains(&e.id)) {
        let id = e.id.clone();
        let state = by_id.get(e.id.as_str()).map(|n| n.state);
        match (e.role, state) {
            (Role::Serving | Role::Standby, None) if !gone(&e.zone, &e.device_id) => {
                out.push(FollowAction::Add {
                    id,
                    address: e.address,
                    standby: e.role == Role::Standby,
                });
            }
            (Role::Serving, Some(State::Standby)) => out.push(FollowAction::Promote { id }),
            (Role::Serving, Some(State::Draining)) => out.push(FollowAction::Undrain { id }),
            (Role::Standby, Some(State::InService | State::Warming | State::Down)) => {
                out.push(FollowAction::Drain { id })
            }
            (Role::Standby, Some(State::Draining)) => out.push(FollowAction::Park { id }),
            (Role::Draining, Some(State::InService | State::Warming | State::Down)) => {
                out.push(FollowAction::Drain { id })
            }
            (Role::Draining, Some(State::Standby)) => out.push(FollowAction::Drain { id }),
            _ => {}
        }
    }
    let in_roles: HashSet<&str> = roles.nodes.iter().map(|e| e.id.as_str()).collect();
    for n in nodes.iter().filter(|n| {
        n.origin == Origin::Provisioned
            && !in_roles.contains(n.id.as_str())
            && !operator.contains(&n.id)
    }) {
        let id = n.id.clone();
        match n.state {
            State::Draining if n.drain_done => out.push(FollowAction::Remove { id }),
            State::Draining => {}
            State::Standby | State::Maint => out.push(FollowAction::Remove { id }),
            _ => out.push(FollowAction::Drain { id }),
        }
    }
    out
}

/// The provisioned nodes of this instance's pool that may still get work or have it in
/// flight (in service, or draining and not done): a leader releases none of these.
pub fn busy(nodes: &[Node]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.origin == Origin::Provisioned)
        .filter(|n| n.state == State::InService || (n.state == State::Draining && !n.drain_done))
        .map(|n| n.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::RoleEntry;
    use crate::provider::{Device, DeviceState};
    use std::time::Duration;

    fn entry(id: &str, role: Role) -> RoleEntry {
        RoleEntry {
            id: id.into(),
            address: "127.1.0.1:80".parse().unwrap(),
            zone: "fr-par-2".into(),
            device_id: format!("dev-{id}"),
            role,
            why: None,
        }
    }

    fn node(id: &str, state: State, drain_done: bool) -> Node {
        Node {
            id: id.into(),
            state,
            origin: Origin::Provisioned,
            in_state_for: Duration::ZERO,
            drain_done,
            healthy: true,
            last_probe_error: None,
        }
    }

    fn listing(ids: &[&str], complete: bool) -> Vec<ZoneListing> {
        vec![ZoneListing {
            zone: "fr-par-2".into(),
            devices: ids
                .iter()
                .map(|id| Device {
                    id: format!("dev-{id}"),
                    name: (*id).into(),
                    state: DeviceState::Ready,
                    vendor_status: "ready/completed".into(),
                    address: None,
                    tags: Vec::new(),
                    zone: "fr-par-2".into(),
                    offer_id: "offer".into(),
                    created_at: None,
                })
                .collect(),
            complete,
        }]
    }

    #[test]
    fn the_pool_follows_the_leaders_roles() {
        let roles = Roles {
            leader: "lb-1".into(),
            at_ms: 0,
            nodes: vec![
                entry("new", Role::Serving),
                entry("spare", Role::Standby),
                entry("up", Role::Serving),
                entry("in", Role::Draining),
                entry("parked", Role::Standby),
                entry("dead", Role::Serving),
            ],
        };
        let nodes = vec![
            node("up", State::Standby, false),
            node("in", State::InService, false),
            node("parked", State::Draining, true),
            node("released", State::InService, false),
            node("released-drained", State::Draining, true),
        ];
        let zones = listing(&["new", "spare", "up", "in", "parked"], true);
        let got = follow(&roles, &zones, &nodes, &HashSet::new());
        let addr = "127.1.0.1:80".parse().unwrap();
        assert_eq!(
            got,
            vec![
                FollowAction::Add {
                    id: "new".into(),
                    address: addr,
                    standby: false
                },
                FollowAction::Add {
                    id: "spare".into(),
                    address: addr,
                    standby: true
                },
                FollowAction::Promote { id: "up".into() },
                FollowAction::Drain { id: "in".into() },
                FollowAction::Park {
                    id: "parked".into()
                },
                // "dead": its server is not in a complete listing: not added.
                FollowAction::Drain {
                    id: "released".into()
                },
                FollowAction::Remove {
                    id: "released-drained".into()
                },
            ]
        );
        // An incomplete listing proves nothing gone: the leader's word stands.
        let partial = listing(&[], false);
        let got = follow(&roles, &partial, &[], &HashSet::new());
        assert!(got.contains(&FollowAction::Add {
            id: "dead".into(),
            address: addr,
            standby: false
        }));
    }

    #[test]
    fn an_operators_node_is_never_moved_by_roles() {
        let roles = Roles {
            leader: "lb-1".into(),
            at_ms: 0,
            nodes: vec![entry("kept", Role::Serving)],
        };
        let nodes = vec![
            node("kept", State::Draining, false),
            node("theirs", State::Draining, true),
        ];
        let operator: HashSet<String> = ["kept".to_owned(), "theirs".to_owned()].into();
        assert!(follow(&roles, &listing(&["kept"], true), &nodes, &operator).is_empty());
    }

    #[test]
    fn busy_nodes_are_those_that_may_still_get_work() {
        let nodes = vec![
            node("a", State::InService, false),
            node("b", State::Draining, false),
            node("c", State::Draining, true),
            node("d", State::Standby, false),
            node("e", State::Warming, false),
        ];
        assert_eq!(busy(&nodes), ["a", "b"]);
    }
}
