//! The simulated fleet, vendor-neutral: servers and the phases they go through from
//! order to deletion, their loopback addresses, and the state file that keeps them across
//! restarts. Each vendor API ([`super::elastic_metal`]) maps [`Phase`] onto its own
//! status words.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::SimError;
use crate::blade::BladeHandle;

/// How long a deleted server stays visible (`deleting`) before it is gone.
const DELETE_LINGER: Duration = Duration::from_millis(200);

/// Where a server is between order and use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Ordered, hardware not yet allocated.
    Ordered,
    /// Hardware on its way.
    Delivering,
    /// Hardware delivered, operating system not yet being installed.
    Delivered,
    /// Operating system being installed.
    Installing,
    /// Usable: its blade serves.
    Ready,
    /// The order failed.
    Failed,
}

/// One simulated server. Serialized to the state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Server {
    pub id: String,
    pub name: String,
    pub zone: String,
    pub offer_id: String,
    pub project_id: String,
    pub tags: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    pub phase: Phase,
    /// Deleted and about to be gone.
    #[serde(default)]
    pub deleting: bool,
    pub ip: Option<Ipv4Addr>,
    /// Whether this order is doomed to end in `Failed`.
    pub doomed: bool,
    /// This server's own delivery and install times in milliseconds (sampled at order
    /// time).
    #[serde(default)]
    pub delivery_ms: u64,
    #[serde(default)]
    pub install_ms: u64,
    /// When it was ordered (phases advance from here).
    #[serde(skip)]
    pub ordered_at: Option<Instant>,
    /// When it was deleted.
    #[serde(skip)]
    pub deleting_at: Option<Instant>,
    /// The user-data it was ordered with (decoded), run at "first boot".
    #[serde(default)]
    pub user_data: Option<String>,
    /// SSH key ids it was ordered with.
    #[serde(default)]
    pub ssh_key_ids: Vec<String>,
    /// The private network it is attached to, and its address there.
    #[serde(default)]
    pub private_network: Option<String>,
    #[serde(default)]
    pub private_ip: Option<Ipv4Addr>,
}

/// What a server's user-data asks of the simulator: lines `#surge-sim <directive>` in
/// it (ignored by a real cloud-init, which reads them as comments).
///
/// - `#surge-sim never-healthy`: the frontend never starts (health checks fail);
/// - `#surge-sim healthy-after 30s`: it starts that long after the server is ready;
/// - `#surge-sim latency 20ms`: its service time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Boot {
    pub never_healthy: bool,
    pub delay: Duration,
    pub latency: Option<Duration>,
}

impl Boot {
    /// The directives in `user_data` (unknown ones are ignored, as cloud-init would).
    pub fn of(user_data: Option<&str>) -> Self {
        let mut boot = Boot::default();
        for line in user_data.unwrap_or("").lines() {
            let Some(directive) = line.trim().strip_prefix("#surge-sim") else {
                continue;
            };
            let mut words = directive.split_whitespace();
            match (words.next(), words.next().map(humantime::parse_duration)) {
                (Some("never-healthy"), _) => boot.never_healthy = true,
                (Some("healthy-after"), Some(Ok(d))) => boot.delay = d,
                (Some("latency"), Some(Ok(d))) => boot.latency = Some(d),
                _ => {}
            }
        }
        boot
    }
}

impl Server {
    /// The phase it should be in at `age` since its order.
    fn phase_at(&self, age: Duration) -> Phase {
        let delivery = Duration::from_millis(self.delivery_ms);
        let install = Duration::from_millis(self.install_ms);
        match self.phase {
            done @ (Phase::Failed | Phase::Ready) => done,
            _ if age < delivery / 4 => Phase::Ordered,
            _ if age < delivery => Phase::Delivering,
            _ if self.doomed => Phase::Failed,
            _ if age < delivery + install / 2 => Phase::Delivered,
            _ if age < delivery + install => Phase::Installing,
            _ => Phase::Ready,
        }
    }
}

/// Every server of the simulator, and the blades serving for ready ones.
#[derive(Default)]
pub struct Fleet {
    pub servers: BTreeMap<String, Server>,
    /// Blades started for ready servers, by server id.
    pub blades: BTreeMap<String, BladeHandle>,
    /// Number of the next server's address (see [`ip_for`]).
    pub next_ip: u32,
    /// Orders still to have their answer "lost" (see `Faults::lose_orders`).
    pub lose_orders: u64,
    /// Orders still to be answered with a 500 once made (see `Faults::create_then_5xx`).
    pub create_then_5xx: u64,
    /// Listings still to answer empty (see `Faults::empty_listings`).
    pub empty_listings: u64,
    /// Listings still to skip their first page (see `Faults::skip_pages`).
    pub skip_pages: u64,
    /// Servers whose frontend is starting (a boot delay), so it is not started twice.
    pub booting: std::collections::BTreeSet<String>,
}

impl Fleet {
    /// A fleet holding `servers` (from a state file), numbering new ones after them.
    pub fn with(servers: BTreeMap<String, Server>, faults: &super::Faults) -> Self {
        let next_ip = servers
            .values()
            .filter_map(|s| s.ip)
            .map(ip_index)
            .max()
            .map_or(1, |i| i + 1);
        Self {
            servers,
            blades: BTreeMap::new(),
            next_ip,
            lose_orders: faults.lose_orders,
            create_then_5xx: faults.create_then_5xx,
            empty_listings: faults.empty_listings,
            skip_pages: faults.skip_pages,
            booting: Default::default(),
        }
    }

    /// Whether the order just made is to be answered with a 500 (and one fewer after).
    pub fn fail_after_create(&mut self) -> bool {
        let fail = self.create_then_5xx > 0;
        self.create_then_5xx = self.create_then_5xx.saturating_sub(1);
        fail
    }

    /// The address for a new server.
    pub fn next_address(&mut self) -> Ipv4Addr {
        let n = self.next_ip;
        self.next_ip += 1;
        ip_for(n)
    }

    /// Attaches server `id` to private network `network`: its address there is on
    /// 127.1.x.y, mirroring its public 127.0.x.y one. `None` when there is no such server.
    /// A frontend already running on the public address moves to the private one (the
    /// returned blade is to be stopped; the next tick starts it there).
    pub fn attach(&mut self, id: &str, network: &str) -> Option<Option<BladeHandle>> {
        let server = self.servers.get_mut(id)?;
        server.private_network = Some(network.to_owned());
        server.private_ip = server.ip.map(|ip| {
            let o = ip.octets();
            Ipv4Addr::new(127, 1, o[2] - 1, o[3])
        });
        Some(self.blades.remove(id))
    }

    /// Marks server `id` deleted (idempotent); `None` when there is no such server.
    pub fn delete(&mut self, id: &str, now: Instant) -> Option<&Server> {
        let server = self.servers.get_mut(id)?;
        if server.deleting_at.is_none() {
            server.deleting = true;
            server.deleting_at = Some(now);
        }
        Some(server)
    }

    /// One step of every server's lifecycle at `now`. Returns the servers whose blades
    /// should start (id, address), the blades to stop, and whether anything changed.
    pub fn advance(&mut self, now: Instant) -> (Vec<(String, Ipv4Addr)>, Vec<BladeHandle>, bool) {
        let mut start = Vec::new();
        let mut gone = Vec::new();
        let mut changed = false;
        for s in self.servers.values_mut() {
            if let Some(t) = s.deleting_at {
                if now.duration_since(t) >= DELETE_LINGER {
                    gone.push(s.id.clone());
                }
                continue;
            }
            let age = s
                .ordered_at
                .map_or(Duration::MAX, |t| now.duration_since(t));
            let phase = s.phase_at(age);
            if phase != s.phase {
                changed = true;
                s.phase = phase;
            }
        }
        // Ready servers without a running blade: just became ready, or restored from a
        // state file.
        for s in self.servers.values() {
            if s.phase == Phase::Ready
                && s.deleting_at.is_none()
                && !self.blades.contains_key(&s.id)
                && !self.booting.contains(&s.id)
            {
                // On a private network the frontend listens there only.
                if let Some(ip) = s.private_ip.or(s.ip) {
                    start.push((s.id.clone(), ip));
                }
            }
        }
        let mut stop = Vec::new();
        for id in gone {
            self.servers.remove(&id);
            if let Some(b) = self.blades.remove(&id) {
                stop.push(b);
            }
            changed = true;
        }
        (start, stop, changed)
    }
}

/// Server number `n` (from 1) lives on 127.0.(1 + n/250).(n%250).
fn ip_for(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, (1 + n / 250) as u8, (n % 250).max(1) as u8)
}

fn ip_index(ip: Ipv4Addr) -> u32 {
    let o = ip.octets();
    (u32::from(o[2]) - 1) * 250 + u32::from(o[3])
}

/// The servers in `file`, their timings restarted (finished ones stay finished); none
/// when the file does not exist yet.
pub fn load(file: &Path) -> Result<BTreeMap<String, Server>, SimError> {
    let bad = |reason: String| SimError::State {
        file: file.to_path_buf(),
        reason,
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(bad(e.to_string())),
    };
    let list: Vec<Server> = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let now = Instant::now();
    Ok(list
        .into_iter()
        .map(|mut s| {
            s.ordered_at = Some(now);
            if s.deleting {
                s.deleting_at = Some(now);
            }
            (s.id.clone(), s)
        })
        .collect())
}

/// Writes the servers to `file` (through a temporary file, so a crash leaves the old one).
pub fn save(file: &Path, fleet: &Fleet) -> Result<(), String> {
    let list: Vec<&Server> = fleet.servers.values().collect();
    let bytes = serde_json::to_vec_pretty(&list).map_err(|e| e.to_string())?;
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, file))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(doomed: bool) -> Server {
        Server {
            id: "s1".into(),
            name: "n".into(),
            zone: "z".into(),
            offer_id: "o".into(),
            project_id: String::new(),
            tags: Vec::new(),
            created_at: String::new(),
            phase: Phase::Ordered,
            deleting: false,
            ip: Some(ip_for(1)),
            doomed,
            delivery_ms: 1000,
            install_ms: 1000,
            ordered_at: None,
            deleting_at: None,
            user_data: None,
            ssh_key_ids: Vec::new(),
            private_network: None,
            private_ip: None,
        }
    }

    #[test]
    fn user_data_directives_choose_how_the_server_boots() {
        let ud = "#cloud-config\n#surge-sim healthy-after 3s\n#surge-sim latency 20ms\npackages: [nginx]\n";
        assert_eq!(
            Boot::of(Some(ud)),
            Boot {
                never_healthy: false,
                delay: Duration::from_secs(3),
                latency: Some(Duration::from_millis(20)),
            }
        );
        assert!(Boot::of(Some("#!/bin/sh\n#surge-sim never-healthy\n")).never_healthy);
        assert_eq!(Boot::of(None), Boot::default());
        assert_eq!(Boot::of(Some("#surge-sim dance 3s\n")), Boot::default());
    }

    #[test]
    fn phases_follow_delivery_then_install() {
        let s = server(false);
        let at = |ms| s.phase_at(Duration::from_millis(ms));
        assert_eq!(at(100), Phase::Ordered);
        assert_eq!(at(500), Phase::Delivering);
        assert_eq!(at(1200), Phase::Delivered);
        assert_eq!(at(1700), Phase::Installing);
        assert_eq!(at(2000), Phase::Ready);
        assert_eq!(
            server(true).phase_at(Duration::from_millis(1200)),
            Phase::Failed
        );
    }

    #[test]
    fn addresses_are_numbered_after_restored_servers() {
        let mut servers = BTreeMap::new();
        let mut s = server(false);
        s.ip = Some(ip_for(7));
        servers.insert(s.id.clone(), s);
        let mut fleet = Fleet::with(servers, &super::super::Faults::default());
        assert_eq!(fleet.next_address(), ip_for(8));
        assert_eq!(ip_for(251), Ipv4Addr::new(127, 0, 2, 1));
        assert_eq!(ip_index(ip_for(251)), 251);
    }
}
