//! `[sim]`: the in-process BMaaS simulator, used when `provider.api_url = "sim"`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::listeners::socket_addr;
use super::{LocalBlades, Problems};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileSim {
    listen: String,
    #[serde(with = "humantime_serde")]
    delivery: Duration,
    #[serde(with = "humantime_serde")]
    install: Duration,
    capacity: usize,
    blade_port: u16,
    state_file: Option<PathBuf>,
    spread: f64,
    time_scale: f64,
    #[serde(with = "humantime_serde")]
    blade_latency: Option<Duration>,
    blade_cpu_work: Option<u32>,
}

impl Default for FileSim {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            delivery: Duration::from_secs(3),
            install: Duration::from_secs(2),
            capacity: 32,
            blade_port: 18_000,
            state_file: None,
            spread: 0.0,
            time_scale: 1.0,
            blade_latency: None,
            blade_cpu_work: None,
        }
    }
}

/// The in-process BMaaS simulator.
#[derive(Debug, Clone)]
pub struct SimSettings {
    /// Where its API listens (loopback only).
    pub listen: SocketAddr,
    /// Median time from order to delivered hardware.
    pub delivery: Duration,
    /// Median time for the OS install once delivered.
    pub install: Duration,
    /// Servers that may exist at once before offers go out of stock.
    pub capacity: usize,
    /// Port the simulated servers' blades listen on.
    pub blade_port: u16,
    /// Keeps servers across restarts of the simulator.
    pub state_file: Option<PathBuf>,
    /// Lognormal σ of delivery and install times (0: exact).
    pub spread: f64,
    /// Durations are divided by this.
    pub time_scale: f64,
    /// Service time of the simulated servers' blades (default: `local_blades.latency`),
    /// so provisioned blades are as slow as the shop's real frontends.
    pub blade_latency: Duration,
    /// CPU work per request of those blades (default: `local_blades.cpu_work`).
    pub blade_cpu_work: u32,
}

/// Checks `[sim]` (keys relative to it); a missing section means the defaults. The
/// blades' cost defaults to the demo blades' (`local`).
pub(super) fn validate(
    f: Option<&FileSim>,
    local: Option<&LocalBlades>,
    p: &mut Problems,
) -> SimSettings {
    let default = FileSim::default();
    let f = f.unwrap_or(&default);
    let listen = socket_addr(&f.listen, "listen", p);
    if !listen.ip().is_loopback() {
        p.bad("listen", format!("{listen} is not a loopback address"));
    }
    if !(0.0..=3.0).contains(&f.spread) {
        p.bad("spread", format!("{} is outside 0..=3", f.spread));
    }
    if !(f.time_scale > 0.0 && f.time_scale.is_finite()) {
        p.bad(
            "time_scale",
            format!("{} must be a positive number", f.time_scale),
        );
    }
    SimSettings {
        listen,
        delivery: f.delivery,
        install: f.install,
        capacity: f.capacity,
        blade_port: f.blade_port,
        state_file: f.state_file.clone(),
        spread: f.spread,
        time_scale: f.time_scale,
        blade_latency: f
            .blade_latency
            .or(local.map(|l| l.latency))
            .unwrap_or(DEFAULT_BLADE_LATENCY),
        blade_cpu_work: f.blade_cpu_work.or(local.map(|l| l.cpu_work)).unwrap_or(0),
    }
}

/// Service time of a simulated server's blade when neither `[sim]` nor `[local_blades]`
/// says.
const DEFAULT_BLADE_LATENCY: Duration = Duration::from_millis(2);
