//! Applies the operators' intent that a cluster keeps in etcd to this instance's pool:
//! drains, maintenance and removals ordered through any instance, nodes added by hand,
//! the autoscaler's pause. Level-triggered (a node that joins later, or a process that
//! starts later, gets the instruction too), except an undrain (`Kept`), which applies
//! once, when it is seen: the node is the operator's from then on, and a drain the
//! autoscaler or a later instruction starts is not undone by it.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::watch;

use crate::cluster::{Cluster, Intents, NodeIntent};
use crate::pool::{Backend, Origin, Pool, State};

/// Runs until `shutdown`: applies the intent view on every change of it or of the pool.
pub async fn run(
    pool: Arc<Pool>,
    cluster: Arc<Cluster>,
    autoscaler: Option<Arc<crate::autoscale::Shared>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut intents = cluster.intents();
    let mut changes = pool.changes();
    let mut before = Intents::default();
    let mut removing: HashSet<String> = HashSet::new();
    loop {
        let now = intents.borrow_and_update().clone();
        changes.borrow_and_update();
        if now.loaded {
            apply(&pool, &before, &now, &mut removing);
            if let (Some(a), Some(p)) = (&autoscaler, now.paused) {
                if a.is_paused() != p {
                    tracing::info!(paused = p, "autoscaler switched through the cluster");
                    a.set_paused(p);
                }
            }
            before = now;
        }
        tokio::select! {
            r = intents.changed() => if r.is_err() { return },
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// One pass: every standing instruction the pool does not reflect yet, and the
/// instructions withdrawn since `before`.
fn apply(pool: &Arc<Pool>, before: &Intents, now: &Intents, removing: &mut HashSet<String>) {
    let table = pool.snapshot_full();
    for (id, intent) in &now.nodes {
        let Some(m) = table.get(id) else {
            removing.remove(id);
            continue;
        };
        let outcome = match intent {
            NodeIntent::Draining { timeout } => match m.state {
                State::Draining | State::Maint => Ok(()),
                _ => pool.drain(id, *timeout).map(|_| ()),
            },
            NodeIntent::Maintenance => match m.state {
                State::Maint => Ok(()),
                _ => pool.maint(id),
            },
            NodeIntent::Removed { timeout } => {
                if removing.insert(id.clone()) {
                    crate::pool::drain::drain_then_remove(pool, id, *timeout, 0).map(|_| ())
                } else {
                    Ok(())
                }
            }
            NodeIntent::Kept => {
                let new = before.nodes.get(id) != Some(&NodeIntent::Kept);
                if new && matches!(m.state, State::Draining | State::Maint) {
                    pool.undrain(id).map(|_| ())
                } else {
                    Ok(())
                }
            }
        };
        match outcome {
            Ok(()) => {}
            Err(e) => tracing::warn!(backend = %id, error = %e, "cluster intent not applied"),
        }
    }
    for id in before
        .nodes
        .keys()
        .filter(|id| !now.nodes.contains_key(*id))
    {
        if let Some(m) = table.get(id) {
            if matches!(m.state, State::Draining | State::Maint) {
                match pool.undrain(id) {
                    Ok(_) => tracing::info!(backend = %id, "undrained through the cluster"),
                    Err(e) => tracing::warn!(backend = %id, error = %e, "undrain not applied"),
                }
            }
        }
    }
    for (id, node) in &now.statics {
        if table.get(id).is_some() || now.nodes.contains_key(id) {
            continue;
        }
        let backend = Arc::new(Backend::new(id, node.address, node.weight, Origin::Static));
        match pool.add(backend) {
            Ok(()) => {
                tracing::info!(backend = %id, address = %node.address, "node added through the cluster")
            }
            Err(e) => tracing::warn!(backend = %id, error = %e, "node from the cluster not added"),
        }
    }
}
