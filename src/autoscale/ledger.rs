//! The order ledger: every server surge ordered, from before the order is sent until it is
//! released, persisted in the data directory so that a restart, a reload or an upgrade
//! knows what is already on its way. An order counts as supply until its server shows in
//! a listing, or until its deadline, after which it is looked up by its request tag once
//! more and reported before it is forgotten: nothing is ordered twice for one need.
//!
//! Written before the order is sent (write-ahead): an order whose answer is lost, or a
//! process that dies right after sending, still leaves the entry that finds the server.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Where an order is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    /// Sent (or about to be); its server not seen in a listing yet.
    Placed,
    /// Its server is in the provider's inventory.
    Seen,
    /// Released to the provider (kept for the cost of the day).
    Released,
    /// Never seen by its deadline, not found by its request tag: reported and given up.
    Lost,
    /// The provider refused it (no server was created).
    Refused,
}

/// One order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The `surge-request` tag it carries.
    pub request_id: String,
    /// Zone, by name.
    pub zone: String,
    pub offer: String,
    /// When it was placed (billing starts here: Elastic Metal bills by started hour).
    #[serde(with = "humantime_serde")]
    pub placed_at: SystemTime,
    /// The provider's server id, once known.
    #[serde(default)]
    pub device_id: Option<String>,
    pub state: OrderState,
    /// Price per hour of the offer when ordered (0 when the vendor does not say).
    #[serde(default)]
    pub price_per_hour: f64,
    /// When it was released, for the cost.
    #[serde(default, with = "humantime_serde")]
    pub released_at: Option<SystemTime>,
    /// Why it was ordered, in words (the decision's reasons).
    #[serde(default)]
    pub reason: String,
}

impl Order {
    /// Whether it still counts as capacity on its way (its server not seen yet).
    pub fn in_flight(&self) -> bool {
        self.state == OrderState::Placed
    }

    /// Whether a server from it exists or may exist (billed).
    pub fn billed(&self) -> bool {
        matches!(self.state, OrderState::Placed | OrderState::Seen)
    }
}

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("order ledger {file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("order ledger {file}: not a ledger: {source}")]
    Corrupt {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// How long released, lost and refused orders are kept (for the cost of the day and the
/// status page).
const KEEP_ENDED: Duration = Duration::from_secs(48 * 3600);

/// The orders, in the order they were placed.
#[derive(Debug, Default)]
pub struct Ledger {
    /// `None`: in memory only (tests, or no data directory).
    file: Option<PathBuf>,
    pub orders: Vec<Order>,
}

impl Ledger {
    /// The ledger kept in `file` (empty if the file does not exist yet).
    pub fn open(file: &Path) -> Result<Self, LedgerError> {
        let orders = match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| LedgerError::Corrupt {
                file: file.to_path_buf(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(LedgerError::Io {
                    file: file.to_path_buf(),
                    source,
                })
            }
        };
        Ok(Self {
            file: Some(file.to_path_buf()),
            orders,
        })
    }

    /// What the ledger's file holds now (`None`: an in-memory ledger, or no file yet),
    /// for taking over what another process wrote to it.
    pub fn reread(&self) -> Result<Option<Vec<u8>>, LedgerError> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        match std::fs::read(file) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LedgerError::Io {
                file: file.clone(),
                source,
            }),
        }
    }

    /// A ledger that is not written anywhere.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Writes the ledger (to a temporary file renamed over the old one, so a crash leaves
    /// one or the other whole) after forgetting orders ended long ago.
    pub fn save(&mut self, now: SystemTime) -> Result<(), LedgerError> {
        self.orders.retain(|o| {
            o.billed()
                || o.released_at
                    .unwrap_or(o.placed_at)
                    .checked_add(KEEP_ENDED)
                    .is_some_and(|until| until > now)
        });
        let Some(file) = &self.file else {
            return Ok(());
        };
        let io = |source| LedgerError::Io {
            file: file.clone(),
            source,
        };
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let bytes =
            serde_json::to_vec_pretty(&self.orders).map_err(|source| LedgerError::Corrupt {
                file: file.clone(),
                source,
            })?;
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, file).map_err(io)
    }

    /// The orders as JSON: what the file holds, and what a cluster leader keeps in etcd.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.orders).unwrap_or_default()
    }

    /// Takes over the orders a previous leader recorded (`json`, as [`Ledger::to_json`]
    /// wrote it): its entries win; orders only this ledger has (placed by this process
    /// while it led before) are kept. Nothing placed is ever dropped.
    pub fn take_over(&mut self, json: &[u8]) -> Result<(), serde_json::Error> {
        let theirs: Vec<Order> = serde_json::from_slice(json)?;
        let mut merged = theirs;
        for o in self.orders.drain(..) {
            if !merged.iter().any(|m| m.request_id == o.request_id) {
                merged.push(o);
            }
        }
        merged.sort_by_key(|o| o.placed_at);
        self.orders = merged;
        Ok(())
    }

    /// The order with `request_id`.
    pub fn get_mut(&mut self, request_id: &str) -> Option<&mut Order> {
        self.orders.iter_mut().find(|o| o.request_id == request_id)
    }

    /// The order that created `device_id`.
    pub fn by_device(&self, device_id: &str) -> Option<&Order> {
        self.orders
            .iter()
            .find(|o| o.device_id.as_deref() == Some(device_id))
    }

    /// Orders placed within `period` before `now` (for the orders-per-hour budget).
    pub fn placed_within(&self, period: Duration, now: SystemTime) -> usize {
        self.orders
            .iter()
            .filter(|o| o.state != OrderState::Refused)
            .filter(|o| {
                now.duration_since(o.placed_at)
                    .is_ok_and(|age| age < period)
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, state: OrderState, placed_at: SystemTime) -> Order {
        Order {
            request_id: id.into(),
            zone: "fr-par-2".into(),
            offer: "EM-A115X-SSD".into(),
            placed_at,
            device_id: None,
            state,
            price_per_hour: 0.21,
            released_at: None,
            reason: "test".into(),
        }
    }

    #[test]
    fn survives_a_restart_and_forgets_only_old_ended_orders() {
        let dir = std::env::temp_dir().join(format!("surge-ledger-{}", fastrand::u64(..)));
        let file = dir.join("orders.json");
        let now = SystemTime::now();
        let old = now - Duration::from_secs(3 * 24 * 3600);
        let mut ledger = Ledger::open(&file).expect("a new ledger");
        ledger.orders.push(order("a", OrderState::Placed, now));
        ledger.orders.push(order("b", OrderState::Released, old));
        ledger.orders.push(order("c", OrderState::Seen, old));
        ledger.save(now).expect("saved");
        let again = Ledger::open(&file).expect("read back");
        let ids: Vec<&str> = again.orders.iter().map(|o| o.request_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"], "a server still billed is never forgotten");
        assert_eq!(again.placed_within(Duration::from_secs(3600), now), 1);
        std::fs::write(&file, b"{nope").unwrap();
        assert!(matches!(
            Ledger::open(&file),
            Err(LedgerError::Corrupt { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_new_leader_takes_the_old_ones_orders_and_keeps_its_own() {
        let now = SystemTime::now();
        let mut old_leader = Ledger::in_memory();
        old_leader.orders.push(order("a", OrderState::Seen, now));
        old_leader
            .orders
            .push(order("b", OrderState::Placed, now + Duration::from_secs(1)));
        let mut new_leader = Ledger::in_memory();
        new_leader.orders.push(order("a", OrderState::Placed, now));
        new_leader.orders.push(order(
            "z",
            OrderState::Released,
            now - Duration::from_secs(60),
        ));
        new_leader.take_over(&old_leader.to_json()).unwrap();
        let got: Vec<(&str, OrderState)> = new_leader
            .orders
            .iter()
            .map(|o| (o.request_id.as_str(), o.state))
            .collect();
        assert_eq!(
            got,
            [
                ("z", OrderState::Released),
                ("a", OrderState::Seen),
                ("b", OrderState::Placed)
            ]
        );
        assert!(new_leader.take_over(b"[{").is_err());
        assert_eq!(new_leader.orders.len(), 3, "a bad record changes nothing");
    }
}
