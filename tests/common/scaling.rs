//! Autoscaling test rig: surge in front of one static blade ordering from a simulator, an
//! open-model load of new connections, and the autoscaler's status.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use surge::config::Config;
use surge::pool::State;
use surge::sim::{self, Faults, SimConfig, SimHandle};

/// The vendor API an autoscaling test orders from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    ElasticMetal,
    Maas,
}

impl Vendor {
    /// A key of the vendor's shape for a test's environment variable `env`.
    pub fn key(self, env: &str) -> String {
        let e = env.to_ascii_lowercase();
        match self {
            Vendor::ElasticMetal => format!("{e}-key"),
            Vendor::Maas => format!("{e}-consumer:{e}-token:{e}-secret"),
        }
    }

    /// The `[provider]` keys that differ between vendors.
    fn provider_keys(self) -> &'static str {
        match self {
            Vendor::ElasticMetal => {
                "kind = \"scaleway\"\nzones = [\"fr-par-2\"]\noffer = \"EM-A115X-SSD\"\nprivate_network = \"pn-test\"\n"
            }
            Vendor::Maas => "kind = \"maas\"\nzones = [\"rack1\"]\n",
        }
    }

    fn provider_tables(self) -> &'static str {
        match self {
            Vendor::ElasticMetal => "",
            Vendor::Maas => "[provider.maas]\ntags = [\"blade\"]\nmin_cpu_count = 4\n",
        }
    }
}

/// Surge in front of one static blade, ordering from `api_url` ("sim" = in-process).
pub fn surge_config(
    static_blade: SocketAddr,
    api_url: &str,
    key_env: &str,
    blade_port: u16,
    autoscale: &str,
) -> Config {
    surge_config_for(
        Vendor::ElasticMetal,
        static_blade,
        api_url,
        key_env,
        blade_port,
        autoscale,
    )
}

/// [`surge_config`] ordering from `vendor`'s API.
pub fn surge_config_for(
    vendor: Vendor,
    static_blade: SocketAddr,
    api_url: &str,
    key_env: &str,
    blade_port: u16,
    autoscale: &str,
) -> Config {
    let provider_keys = vendor.provider_keys();
    let provider_tables = vendor.provider_tables();
    // One ledger per surge (a restarted one reads its predecessor's).
    let ledger = std::env::temp_dir()
        .join(format!(
            "surge-ledger-{}-{}.json",
            std::process::id(),
            fastrand::u64(..)
        ))
        .display()
        .to_string();
    let text = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
workers = 1
access_log = false
shutdown_grace = "2s"
[admin]
listen = "127.0.0.1:0"
[pool]
slow_start = "0s"
[pool.health]
interval = "100ms"
timeout = "100ms"
rise = 1
fall = 2
[[pool.backends]]
id = "static-1"
address = "{static_blade}"
[provider]
{provider_keys}api_url = "{api_url}"
secret_key_env = "{key_env}"
blade_port = {blade_port}
call_timeout = "2s"
max_attempts = 4
{provider_tables}[sim]
listen = "127.0.0.1:0"
delivery = "300ms"
install = "200ms"
capacity = 20
blade_port = {blade_port}
[autoscale]
interval = "200ms"
metrics_window = "1s"
target_connections_per_node = 20.0
up_period = "1s"
down_period = "500ms"
scale_down_window = "2s"
drain_timeout = "2s"
release_margin = "1h"
ledger = "{ledger}"
# The test's load comes from one address.
max_client_share = 1.0
{autoscale}
"#
    );
    Config::parse(&text, Path::new("autoscale-test.toml")).expect("valid test config")
}

/// Open-model load: `rate` new connections per second, each one GET, counted.
pub struct Load {
    rate: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    pub fn start(addr: SocketAddr, rate: u64) -> Self {
        let rate = Arc::new(AtomicU64::new(rate));
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let (r, s, o, f) = (rate.clone(), stop.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            // No idle connections kept: every arrival is a new connection, as shoppers are.
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http();
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let per_sec = r.load(Ordering::Relaxed).max(1);
                next += Duration::from_secs_f64(1.0 / per_sec as f64);
                tokio::time::sleep_until(next.into()).await;
                let (client, o, f) = (client.clone(), o.clone(), f.clone());
                tokio::spawn(async move {
                    let uri = format!("http://{addr}/catalog");
                    let req = http::Request::get(uri)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    match client.request(req).await {
                        Ok(resp) if resp.status() == 200 => {
                            let _ = resp.into_body().collect().await;
                            o.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(resp) => f.lock().unwrap().push(resp.status().to_string()),
                        Err(e) => f.lock().unwrap().push(e.to_string()),
                    }
                });
            }
        });
        Self {
            rate,
            stop,
            ok,
            failed,
            task,
        }
    }

    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    pub async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let failed = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

/// The autoscaler's status document, as `GET /v1/autoscaler` shows it.
pub fn status_of(surge: &surge::serve::Running) -> surge::admin::api::AutoscalerStatus {
    surge::admin::api::AutoscalerStatus::of(
        surge.autoscaler.as_ref().expect("an autoscaler"),
        &surge.pool,
    )
}

pub fn in_service(surge: &surge::serve::Running) -> usize {
    surge.pool.snapshot().count(State::InService)
}

/// A simulator of its own on loopback, for tests that restart surge or need faults.
pub async fn external_sim(
    faults: Faults,
    delivery: Duration,
    key: &str,
    blade_port: u16,
) -> SimHandle {
    external_sim_for(Vendor::ElasticMetal, faults, delivery, key, blade_port).await
}

/// [`external_sim`] speaking `vendor`'s API (MAAS: 20 machines in zone `rack1`).
pub async fn external_sim_for(
    vendor: Vendor,
    faults: Faults,
    delivery: Duration,
    key: &str,
    blade_port: u16,
) -> SimHandle {
    let mut cfg = SimConfig::demo(SocketAddr::from(([127, 0, 0, 1], 0)), key);
    if vendor == Vendor::Maas {
        cfg.api = surge::sim::SimApi::Maas;
        cfg.zones = vec!["rack1".into()];
        cfg.machines_per_zone = 20;
    }
    cfg.delivery = delivery;
    cfg.install = delivery / 3;
    cfg.blade_port = blade_port;
    cfg.faults = faults;
    sim::start(cfg).await.unwrap()
}

/// A simulator of its own (its key in environment variable `key_env`), one static blade,
/// and configs of a surge ordering from that simulator with the real client.
pub struct OwnSim {
    pub sim: SimHandle,
    pub blade: Vec<surge::blade::BladeHandle>,
    /// The port the simulator's blades listen on.
    pub port: u16,
    key_env: String,
}

/// Starts an [`OwnSim`] with `faults` (deliveries in 300 ms).
pub async fn own_sim(key_env: &str, faults: Faults) -> OwnSim {
    let key = format!("{}-key", key_env.to_ascii_lowercase());
    std::env::set_var(key_env, &key);
    let port = super::free_port();
    let sim = external_sim(faults, Duration::from_millis(300), &key, port).await;
    OwnSim {
        sim,
        blade: super::blades(1, Duration::from_millis(1)).await,
        port,
        key_env: key_env.to_owned(),
    }
}

impl OwnSim {
    /// Surge in front of the static blade, ordering from this simulator; `autoscale` as
    /// in [`surge_config`].
    pub fn config(&self, autoscale: &str) -> Config {
        surge_config(
            self.blade[0].addr,
            &self.sim.url(),
            &self.key_env,
            self.port,
            autoscale,
        )
    }
}
