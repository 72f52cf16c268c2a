//! Two real `surge serve` processes in one cluster over a real etcd (Debian's
//! `etcd-server`, started here on loopback ports picked at run time), ordering from the
//! simulator over HTTP: one leader orders, both serve every blade; the leader's death,
//! pause or an etcd outage orders nothing twice and fails no request; operator intent
//! reaches both and outlives an upgrade.
#![cfg(feature = "cluster")]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use surge::admin::api::{AutoscalerStatus, ClusterView, NodeList};
use surge::admin::client::AdminClient;
use surge::sim::{Faults, SimHandle};

use common::process::{capture_lines, eventually_async, signal, successor_pids};
use common::scaling::{external_sim, Load};
use common::*;

const SURGE: &str = env!("CARGO_BIN_EXE_surge");
const TOKEN: &str = "cluster-test-token";
/// The instances' lease: a dead leader is replaced within it.
const TTL: Duration = Duration::from_secs(2);

fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "surge-cluster-{what}-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A one-member etcd on loopback with a data directory of its own; killed by PID when
/// dropped.
struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client: u16,
    peer: u16,
}

impl Etcd {
    async fn start() -> Etcd {
        let mut e = Etcd {
            child: None,
            dir: scratch("etcd"),
            client: free_port(),
            peer: free_port(),
        };
        e.run().await;
        e
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    async fn run(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .arg("--name=t")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={}", self.endpoint()))
            .arg(format!("--advertise-client-urls={}", self.endpoint()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t={peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd runs (Debian: etcd-server; .ci/run installs it)");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client));
        let healthy = eventually_async(Duration::from_secs(20), || async move {
            get(&client(), addr, "/health")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await;
        assert!(healthy, "etcd did not become healthy on {addr}");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `surge serve` process of the cluster (and any process an upgrade handed over to).
struct Lb {
    instance: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    proxy: SocketAddr,
    admin: AdminClient,
    dir: PathBuf,
}

/// What an instance is in front of.
struct Shop {
    etcd: String,
    cluster: String,
    static_blade: SocketAddr,
    /// The simulator's URL, key variable and blade port, when it autoscales.
    sim: Option<(String, String, u16)>,
    extra_backends: Vec<SocketAddr>,
    /// Shedding and a waiting room whose door starts held.
    room: bool,
}

impl Lb {
    fn start(instance: &str, shop: &Shop) -> Lb {
        let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dir = scratch(instance);
        let mut text = format!(
            r#"
[proxy]
listen = "{proxy}"
workers = 1
access_log = false
shutdown_grace = "2s"
[admin]
listen = "{admin}"
[pool]
slow_start = "0s"
[pool.sticky]
cookie = "cart"
route_cookie = "surge_route"
[pool.health]
interval = "100ms"
timeout = "100ms"
rise = 1
fall = 2
[[pool.backends]]
id = "static-1"
address = "{}"
"#,
            shop.static_blade
        );
        for (i, b) in shop.extra_backends.iter().enumerate() {
            text.push_str(&format!(
                "[[pool.backends]]\nid = \"static-{}\"\naddress = \"{b}\"\n",
                i + 2
            ));
        }
        if shop.room {
            text.push_str(
                "[pool.shed]\nmax_in_flight_per_node = 8\n[waiting_room]\nheld = true\nrefresh = \"1s\"\nabandon_after = \"10s\"\n",
            );
        }
        if let Some((url, key_env, port)) = &shop.sim {
            text.push_str(&format!(
                r#"
[provider]
kind = "scaleway"
api_url = "{url}"
zones = ["fr-par-2"]
offer = "EM-A115X-SSD"
secret_key_env = "{key_env}"
blade_port = {port}
call_timeout = "2s"
max_attempts = 4
private_network = "pn-test"
[autoscale]
interval = "200ms"
metrics_window = "1s"
target_connections_per_node = 20.0
up_period = "1s"
down_period = "500ms"
scale_down_window = "60s"
drain_timeout = "2s"
release_margin = "1h"
ledger = "{}"
max_client_share = 1.0
"#,
                dir.join("ledger.json").display()
            ));
        }
        text.push_str(&format!(
            "[cluster]\netcd = [\"{}\"]\nname = \"{}\"\ninstance = \"{instance}\"\nlease_ttl = \"{}\"\n",
            shop.etcd,
            shop.cluster,
            humantime::format_duration(TTL)
        ));
        let config = dir.join("surge.toml");
        std::fs::write(&config, text).expect("config written");
        let mut cmd = Command::new(SURGE);
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env("SURGE_ADMIN_TOKEN", TOKEN)
            // One route cookie key for the cluster: a cart moving instance keeps its blade.
            .env("SURGE_ROUTE_KEY", "cluster-test-route-key-0123456789abcdef")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((_, key_env, _)) = &shop.sim {
            cmd.env(key_env, std::env::var(key_env).unwrap_or_default());
        }
        let mut child = cmd.spawn().expect("surge runs");
        let lines = capture_lines(&mut child);
        Lb {
            instance: instance.to_owned(),
            child,
            lines,
            proxy,
            admin: AdminClient::new(&format!("http://{admin}"), Some(TOKEN.into())),
            dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn line_count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    fn lines_since(&self, n: usize) -> Vec<String> {
        self.lines.lock().unwrap()[n..].to_vec()
    }

    async fn cluster(&self) -> Option<ClusterView> {
        self.admin
            .call(Method::GET, "/v1/cluster", None::<&()>)
            .await
            .ok()
    }

    async fn nodes(&self) -> Option<NodeList> {
        self.admin.nodes().await.ok()
    }

    async fn autoscaler(&self) -> Option<AutoscalerStatus> {
        self.admin
            .call(Method::GET, "/v1/autoscaler", None::<&()>)
            .await
            .ok()
    }

    async fn leading(&self) -> bool {
        self.cluster().await.is_some_and(|c| c.leading)
    }

    /// (id, state) of every node, sorted.
    async fn pool(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .nodes()
            .await
            .map(|l| l.nodes.into_iter().map(|n| (n.id, n.state)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    async fn wait_serving(&self) {
        let proxy = self.proxy;
        let ok = eventually_async(Duration::from_secs(20), || async move {
            get(&client(), proxy, "/").await.is_ok()
        })
        .await;
        assert!(
            ok,
            "{} did not start serving:\n{}",
            self.instance,
            self.output()
        );
    }

    /// Pids named in "process N now serves" lines (successors of an upgrade).
    fn successors(&self) -> Vec<u32> {
        successor_pids(&self.lines.lock().unwrap())
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        signal(self.pid(), libc::SIGCONT);
        for pid in self.successors() {
            signal(pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A simulator of its own (key in `key_env`), a static blade, and the shop around them.
async fn shop(key_env: &str, etcd: &Etcd) -> (Shop, SimHandle, Vec<surge::blade::BladeHandle>) {
    let key = format!("{}-key", key_env.to_ascii_lowercase());
    std::env::set_var(key_env, &key);
    let port = free_port();
    let sim = external_sim(Faults::default(), Duration::from_millis(300), &key, port).await;
    let blade = blades(1, Duration::from_millis(1)).await;
    let shop = Shop {
        etcd: etcd.endpoint(),
        cluster: format!("shop{}", fastrand::u32(..)),
        static_blade: blade[0].addr,
        sim: Some((sim.url(), key_env.to_owned(), port)),
        extra_backends: Vec::new(),
        room: false,
    };
    (shop, sim, blade)
}

/// Waits until exactly one of `lbs` leads and all agree on who; returns its index.
async fn one_leader(lbs: &[&Lb], limit: Duration) -> usize {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        let mut views = Vec::new();
        for lb in lbs {
            views.push(lb.cluster().await);
        }
        let leading: Vec<usize> = views
            .iter()
            .enumerate()
            .filter(|(_, v)| v.as_ref().is_some_and(|v| v.leading))
            .map(|(i, _)| i)
            .collect();
        let agreed = views.iter().all(|v| {
            v.as_ref().is_some_and(|v| {
                v.leader.as_deref() == leading.first().map(|&i| lbs[i].instance.as_str())
            })
        });
        if leading.len() == 1 && agreed {
            return leading[0];
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out = String::new();
    for lb in lbs {
        out.push_str(&format!("{}: {:?}\n", lb.instance, lb.cluster().await));
    }
    panic!("no single leader within {limit:?}:\n{out}");
}

/// The state of node `static-2` on `lb`.
async fn state_on(lb: &Lb) -> Option<String> {
    lb.nodes()
        .await
        .and_then(|l| l.nodes.into_iter().find(|n| n.id == "static-2"))
        .map(|n| n.state)
}

/// The backend id surge gives a simulated server.
fn backend_of(device: &str) -> String {
    format!("bm-{}", device.chars().take(8).collect::<String>())
}

/// Waits until the provider runs exactly what `leader` wants (desired minus the static
/// node) and every one of `lbs` serves all of it; returns the desired count.
async fn converged(sim: &SimHandle, leader: &Lb, lbs: &[&Lb], limit: Duration) -> usize {
    let until = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < until {
        let desired = leader.autoscaler().await.map_or(0, |s| s.desired);
        let servers = sim.server_ids();
        let mut all_serve = desired > 1 && servers.len() + 1 == desired;
        for lb in lbs {
            let pool = lb.pool().await;
            let in_service: Vec<&str> = pool
                .iter()
                .filter(|(_, s)| s == "in_service")
                .map(|(id, _)| id.as_str())
                .collect();
            all_serve &= in_service.len() == desired
                && servers
                    .iter()
                    .all(|d| in_service.contains(&backend_of(d).as_str()));
            last = format!(
                "desired {desired}, servers {servers:?}, {}: {pool:?}",
                lb.instance
            );
        }
        if all_serve {
            return desired;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "not converged within {limit:?}: {last}\nleader output:\n{}",
        leader.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pair_under_a_tenfold_ramp_orders_once_and_both_serve_every_blade() {
    let etcd = Etcd::start().await;
    let (shop, sim, _blade) = shop("SURGE_CLUSTER_PAIR_KEY", &etcd).await;
    let a = Lb::start("lb-1", &shop);
    let b = Lb::start("lb-2", &shop);
    a.wait_serving().await;
    b.wait_serving().await;
    let leader = one_leader(&[&a, &b], Duration::from_secs(10)).await;
    let (leader, follower) = if leader == 0 { (&a, &b) } else { (&b, &a) };
    // 10 new connections per second in all, then ten times that, split across both.
    let la = Load::start(a.proxy, 5);
    let lb = Load::start(b.proxy, 5);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for step in 1..=9u64 {
        la.set_rate(5 + 5 * step);
        lb.set_rate(5 + 5 * step);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The ramp is over: once the pool has caught up, it stays put.
    let first = converged(&sim, leader, &[&a, &b], Duration::from_secs(40)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut desired = converged(&sim, leader, &[&a, &b], Duration::from_secs(20)).await;
    if desired != first {
        // Still catching up with the end of the ramp at the first look.
        tokio::time::sleep(Duration::from_secs(2)).await;
        desired = converged(&sim, leader, &[&a, &b], Duration::from_secs(20)).await;
    }
    // Each instance alone sees half the traffic: the leader sized the pool from the sum.
    assert!(
        desired >= 4,
        "100/s at 20 per node wants about 5 nodes, the leader wanted {desired}"
    );
    let ordered_by_follower: Vec<String> = follower
        .lines_since(0)
        .into_iter()
        .filter(|l| l.contains("server ordered"))
        .collect();
    assert!(
        ordered_by_follower.is_empty(),
        "the follower ordered: {ordered_by_follower:?}"
    );
    // Steady: nothing more is ordered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sim.server_count() + 1,
        leader.autoscaler().await.map_or(0, |s| s.desired),
        "ordered exactly the desired count"
    );
    assert!(
        eventually_async(Duration::from_secs(3), || async {
            a.pool().await == b.pool().await
        })
        .await,
        "both pools hold the same blades: {:?} vs {:?}",
        a.pool().await,
        b.pool().await
    );
    let (ok_a, failed_a) = la.stop().await;
    let (ok_b, failed_b) = lb.stop().await;
    assert!(
        failed_a.is_empty() && failed_b.is_empty(),
        "failed requests: {failed_a:?} {failed_b:?}"
    );
    assert!(ok_a > 100 && ok_b > 100, "load ran: {ok_a} + {ok_b}");
    let view = a.cluster().await.expect("cluster view");
    assert_eq!(view.members.len(), 2, "{view:?}");
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_mid_scale_up_hands_over_within_the_lease_and_orders_nothing_twice() {
    let etcd = Etcd::start().await;
    let (shop, sim, _blade) = shop("SURGE_CLUSTER_KILL_KEY", &etcd).await;
    let a = Lb::start("lb-1", &shop);
    let b = Lb::start("lb-2", &shop);
    a.wait_serving().await;
    b.wait_serving().await;
    let leader = one_leader(&[&a, &b], Duration::from_secs(10)).await;
    let (mut leader, survivor) = if leader == 0 { (a, b) } else { (b, a) };
    let load = Load::start(survivor.proxy, 100);
    assert!(
        eventually(Duration::from_secs(20), || sim.server_count() >= 1).await,
        "no scale-up began:\n{}",
        leader.output()
    );
    let _ = leader.child.kill();
    let _ = leader.child.wait();
    let killed = Instant::now();
    assert!(
        eventually_async(Duration::from_secs(10), || survivor.leading()).await,
        "the survivor never led"
    );
    let took = killed.elapsed();
    // The lease ends at most a TTL after its last renewal, which came before the kill;
    // etcd looks for expired leases every 500 ms.
    assert!(
        took <= TTL + Duration::from_millis(1500),
        "took {took:?} to lead (lease {TTL:?})"
    );
    let desired = converged(&sim, &survivor, &[&survivor], Duration::from_secs(40)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sim.server_count() + 1,
        desired,
        "nothing ordered twice: {:?}",
        sim.server_ids()
    );
    let pool = survivor.pool().await;
    for d in sim.server_ids() {
        assert!(
            pool.iter().any(|(id, _)| *id == backend_of(&d)),
            "server {d} orphaned: {pool:?}"
        );
    }
    let (ok, failed) = load.stop().await;
    assert!(
        failed.is_empty(),
        "the survivor failed requests: {failed:?}"
    );
    assert!(ok > 200, "load ran: {ok}");
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_stopped_past_its_lease_orders_nothing_after_waking() {
    let etcd = Etcd::start().await;
    let (shop, sim, _blade) = shop("SURGE_CLUSTER_STOP_KEY", &etcd).await;
    let a = Lb::start("lb-1", &shop);
    let b = Lb::start("lb-2", &shop);
    a.wait_serving().await;
    b.wait_serving().await;
    let leader = one_leader(&[&a, &b], Duration::from_secs(10)).await;
    let (stopped, other) = if leader == 0 { (&a, &b) } else { (&b, &a) };
    let load = Load::start(other.proxy, 80);
    assert!(
        eventually(Duration::from_secs(20), || sim.server_count() >= 1).await,
        "no scale-up began"
    );
    // Mid scale-up: the leader freezes (a GC pause, SIGSTOP) for twice its lease.
    signal(stopped.pid(), libc::SIGSTOP);
    assert!(
        eventually_async(Duration::from_secs(10), || other.leading()).await,
        "the other instance never led"
    );
    let desired = converged(&sim, other, &[other], Duration::from_secs(40)).await;
    let before = stopped.line_count();
    let mut at_wake = sim.server_ids();
    at_wake.sort();
    signal(stopped.pid(), libc::SIGCONT);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Nothing new reached the provider after waking. (A call that was in flight when
    // the process froze may still log its answer on waking: its server was ordered, and
    // fenced, before the freeze, and the other instance took it over from the ledger.)
    let mut now = sim.server_ids();
    now.sort();
    assert_eq!(
        now, at_wake,
        "the provider changed after the old leader woke"
    );
    let woke: Vec<String> = stopped
        .lines_since(before)
        .into_iter()
        .filter(|l| l.contains("server ordered") || l.contains("server released"))
        .filter(|l| !at_wake.iter().any(|d| l.contains(&format!("device={d}"))))
        .collect();
    assert!(
        woke.is_empty(),
        "the woken leader wrote to the provider: {woke:?}"
    );
    assert!(
        !stopped.leading().await,
        "the woken process still thinks it leads"
    );
    assert_eq!(sim.server_count() + 1, desired, "{:?}", sim.server_ids());
    assert_eq!(
        one_leader(&[&a, &b], Duration::from_secs(5)).await,
        usize::from(leader == 0),
        "the other instance keeps the lead"
    );
    let (_, failed) = load.stop().await;
    assert!(failed.is_empty(), "{failed:?}");
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_through_one_instance_holds_on_the_other_and_outlives_an_upgrade() {
    let etcd = Etcd::start().await;
    let backends = blades(2, Duration::from_millis(1)).await;
    let shop = Shop {
        etcd: etcd.endpoint(),
        cluster: format!("shop{}", fastrand::u32(..)),
        static_blade: backends[0].addr,
        sim: None,
        extra_backends: vec![backends[1].addr],
        room: false,
    };
    let a = Lb::start("lb-1", &shop);
    let b = Lb::start("lb-2", &shop);
    a.wait_serving().await;
    b.wait_serving().await;
    let drained = a
        .admin
        .drain("static-2", Some(Duration::from_secs(60)), false)
        .await;
    assert!(drained.is_ok(), "{drained:?}");
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            state_on(&b).await.as_deref() == Some("draining")
        })
        .await,
        "B never drained static-2: {:?}",
        b.pool().await
    );
    let http = client();
    for _ in 0..30 {
        let r = get(&http, b.proxy, "/catalog").await.expect("B answers");
        assert_eq!(r.status, 200);
        assert_ne!(
            r.blade(),
            backends[1].id,
            "B sent new work to the drained node"
        );
    }
    // An upgrade of A: the new process reads the drain back from etcd.
    let upgraded: Result<surge::admin::api::HandedOver, _> =
        a.admin.call(Method::POST, "/v1/upgrade", None::<&()>).await;
    // The answer names the new process ("... process N now serves ...").
    let new_pid = match &upgraded {
        Ok(done) => *successor_pids(std::slice::from_ref(&done.result))
            .last()
            .expect("the answer names the new process"),
        Err(e) => panic!("{e:?}\n{}", a.output()),
    };
    assert!(
        eventually_async(Duration::from_secs(20), || async {
            a.cluster()
                .await
                .is_some_and(|c| c.members.iter().any(|m| m.pid == Some(new_pid)))
        })
        .await,
        "the new process {new_pid} never joined: {:?}\n{}",
        a.cluster().await,
        a.output()
    );
    assert_eq!(
        state_on(&a).await.as_deref(),
        Some("draining"),
        "the drain was lost on upgrade"
    );
    // Undrained through B: back in service on both.
    assert!(b.admin.undrain("static-2").await.is_ok());
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            state_on(&a).await.as_deref() == Some("in_service")
        })
        .await,
        "A never undrained: {:?}",
        a.pool().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_seconds_without_etcd_fail_no_request_order_nothing_and_converge_after() {
    let mut etcd = Etcd::start().await;
    let (shop, sim, _blade) = shop("SURGE_CLUSTER_ETCD_KEY", &etcd).await;
    let a = Lb::start("lb-1", &shop);
    let b = Lb::start("lb-2", &shop);
    a.wait_serving().await;
    b.wait_serving().await;
    let leader = one_leader(&[&a, &b], Duration::from_secs(10)).await;
    let la = Load::start(a.proxy, 30);
    let lb = Load::start(b.proxy, 30);
    let lead = if leader == 0 { &a } else { &b };
    let desired = converged(&sim, lead, &[&a, &b], Duration::from_secs(40)).await;
    let servers = {
        let mut s = sim.server_ids();
        s.sort();
        s
    };
    let pools = (a.pool().await, b.pool().await);
    etcd.kill();
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut now = sim.server_ids();
        now.sort();
        assert_eq!(now, servers, "the provider changed while etcd was away");
        assert_eq!(
            (a.pool().await, b.pool().await),
            pools,
            "a pool changed while etcd was away"
        );
    }
    for lb in [&a, &b] {
        assert!(!lb.leading().await, "{} leads without etcd", lb.instance);
    }
    etcd.run().await;
    let leader = one_leader(&[&a, &b], Duration::from_secs(15)).await;
    let lead = if leader == 0 { &a } else { &b };
    let after = converged(&sim, lead, &[&a, &b], Duration::from_secs(20)).await;
    assert_eq!(after, desired, "the size changed across the outage");
    let (_, failed_a) = la.stop().await;
    let (_, failed_b) = lb.stop().await;
    assert!(
        failed_a.is_empty() && failed_b.is_empty(),
        "{failed_a:?} {failed_b:?}"
    );
    sim.stop();
}

/// A waiting-room ticket enters once across the cluster: used on one instance, then
/// shown to the other, it is a replay (a fresh place at the end), not a second way in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ticket_used_on_one_instance_does_not_enter_on_the_other() {
    let etcd = Etcd::start().await;
    let backends = blades(1, Duration::from_millis(1)).await;
    let shop = Shop {
        etcd: etcd.endpoint(),
        cluster: format!("shop{}", fastrand::u32(..)),
        static_blade: backends[0].addr,
        sim: None,
        extra_backends: Vec::new(),
        room: true,
    };
    let a = Lb::start("lb-1", &shop);
    let b = Lb::start("lb-2", &shop);
    a.wait_serving().await;
    b.wait_serving().await;
    let c = client();
    let page = |addr: SocketAddr, cookie: String| {
        let c = c.clone();
        async move {
            send(
                &c,
                Method::GET,
                addr,
                "/",
                &[("accept", "text/html"), ("cookie", &cookie)],
                "",
            )
            .await
            .expect("an answer")
        }
    };
    // The doors are held: the visitor gets a place on A.
    let first = page(a.proxy, String::new()).await;
    assert_eq!(first.status, 503, "the door is held");
    let ticket = format!(
        "surge_queue={}",
        first.set_cookie("surge_queue").expect("a ticket")
    );
    for lb in [&a, &b] {
        let opened: serde_json::Value = lb
            .admin
            .call(Method::POST, "/v1/waiting-room/close", None::<&()>)
            .await
            .expect("the door opens");
        assert_eq!(opened["held"], false);
    }
    assert_eq!(page(a.proxy, ticket.clone()).await.status, 200, "in on A");
    let again = page(b.proxy, ticket.clone()).await;
    assert_eq!(
        again.status, 503,
        "the ticket used on A let its holder (or whoever copied it) in on B too"
    );
    let fresh = again.set_cookie("surge_queue").expect("a fresh place");
    assert_ne!(format!("surge_queue={fresh}"), ticket);
}
