//! Load-test plans: the TOML file an operator writes (`loadtests/*.toml`), validated into
//! a [`Plan`]. Errors name the file, the key and the reason, like surge's own config.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::schedule::Stage;

/// Why a plan could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {key}: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePlan {
    target: String,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_queue_patience", with = "humantime_serde")]
    queue_patience: Duration,
    #[serde(default)]
    stages: Vec<FileStage>,
    #[serde(default)]
    closed: Option<FileClosed>,
    #[serde(default)]
    abort_early: bool,
    #[serde(default = "one_client")]
    clients: u32,
    scenarios: Vec<Scenario>,
    #[serde(default)]
    slo: Vec<FileSlo>,
}

fn one_client() -> u32 {
    1
}

/// Most source addresses a plan may spread its sessions over (127.0.0.2 onward).
pub const MAX_CLIENTS: u32 = 1 << 20;

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// How long a shopper stays on a waiting page before giving up.
fn default_queue_patience() -> Duration {
    Duration::from_secs(120)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStage {
    #[serde(with = "humantime_serde")]
    duration: Duration,
    rate: f64,
    #[serde(default)]
    ramp_to: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClosed {
    users: usize,
    #[serde(with = "humantime_serde")]
    duration: Duration,
}

/// A named session: its steps run in order on one connection with one cookie jar.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default = "one")]
    pub weight: u32,
    pub steps: Vec<Step>,
}

fn one() -> u32 {
    1
}

/// One request of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub name: String,
    #[serde(default = "get")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub body: Option<String>,
    /// Expected status; anything else counts as an error.
    #[serde(default = "ok")]
    pub expect: u16,
    /// Pause before this step (a shopper reading the page).
    #[serde(default, with = "humantime_serde")]
    pub think: Duration,
}

fn get() -> String {
    "GET".into()
}
fn ok() -> u16 {
    200
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSlo {
    /// `p50`, `p90`, `p99`, `p999` or `error_rate`.
    metric: String,
    /// A step name; the whole run when absent.
    #[serde(default)]
    step: Option<String>,
    /// A duration (`"300ms"`) for percentiles, a fraction (`"0.001"`) for error rates.
    below: String,
}

/// How load is offered.
#[derive(Debug, Clone, PartialEq)]
pub enum Model {
    /// New sessions arrive on a timeline fixed in advance, whatever the target does:
    /// what shoppers do. Latency counts from each request's intended start.
    Open(Vec<Stage>),
    /// `users` loops, each sending its next request when the last one answered (wrk's
    /// model). Useful for peak throughput; a slow target slows the load, so its latency
    /// figures hide stalls (coordinated omission) and the report says so.
    Closed { users: usize, duration: Duration },
}

/// Whether `clients` source addresses can reach `target`: several only toward loopback
/// (127.0.0.0/8 or `localhost`), where every 127.x.y.z is this machine's.
fn check_clients(target: &str, clients: u32) -> Result<(), String> {
    if clients == 0 || clients > MAX_CLIENTS {
        return Err(format!("must be between 1 and {MAX_CLIENTS}"));
    }
    if clients == 1 {
        return Ok(());
    }
    let host = target
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
        .unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "{clients} source addresses need a loopback target (127.x.y.z or localhost), not `{host}`: on any other network they would not be this machine's"
        ))
    }
}

/// The source address of session `n` among `clients` (127.0.0.2 onward), when more than
/// one.
pub fn client_address(n: usize, clients: u32) -> Option<std::net::IpAddr> {
    (clients > 1).then(|| {
        let base = u32::from(std::net::Ipv4Addr::new(127, 0, 0, 2));
        std::net::IpAddr::V4(std::net::Ipv4Addr::from(base + (n as u32 % clients)))
    })
}

/// A validated plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: String,
    pub timeout: Duration,
    /// How long a session waits in a waiting room before it is abandoned.
    pub queue_patience: Duration,
    pub model: Model,
    pub scenarios: Vec<Scenario>,
    pub slos: Vec<Slo>,
    /// Stop as soon as an SLO can no longer pass (open model only).
    pub abort_early: bool,
    /// Source addresses sessions are spread over (1: the kernel's choice). More than one
    /// needs a loopback target: session `n` connects from 127.0.0.2 + (n mod clients), so
    /// a per-client share cap sees many shoppers, as on a sale's morning.
    pub clients: u32,
    /// Admin API of the surge under test: its autoscaler's desired and in-service counts
    /// are recorded on the report's timeline. Set from the command line.
    pub admin: Option<AdminWatch>,
}

/// Where to read the autoscaler's state from during a run.
#[derive(Debug, Clone)]
pub struct AdminWatch {
    pub url: String,
    pub token: Option<String>,
}

/// What an SLO limits.
#[derive(Debug, Clone, PartialEq)]
pub enum SloLimit {
    /// The quantile (0.99 for p99) must be below the duration.
    Latency(f64, Duration),
    /// The share of failed requests must be below this fraction.
    ErrorRate(f64),
}

/// One threshold from the plan.
#[derive(Debug, Clone)]
pub struct Slo {
    /// As the operator wrote it: `p99 of checkout < 500ms`.
    pub label: String,
    /// A step name; the whole run when `None`.
    pub step: Option<String>,
    pub limit: SloLimit,
}

impl Plan {
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<Plan, PlanError> {
        let invalid = |key: &str, reason: String| PlanError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let raw: FilePlan = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                invalid(
                    &e.path().to_string(),
                    e.into_inner().message().replace('\n', "; "),
                )
            })?;
        let fail = |(key, reason): (String, String)| invalid(&key, reason);
        check_target(&raw.target).map_err(|reason| invalid("target", reason))?;
        check_clients(&raw.target, raw.clients).map_err(|reason| invalid("clients", reason))?;
        check_scenarios(&raw.scenarios).map_err(fail)?;
        let model = model_of(&raw).map_err(fail)?;
        let slos = raw
            .slo
            .iter()
            .enumerate()
            .map(|(i, s)| slo_of(i, s, &raw.scenarios))
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;
        Ok(Plan {
            target: raw.target.trim_end_matches('/').to_owned(),
            timeout: raw.timeout,
            queue_patience: raw.queue_patience,
            model,
            scenarios: raw.scenarios,
            slos,
            abort_early: raw.abort_early,
            clients: raw.clients,
            admin: None,
        })
    }

    /// The scenario session `n` runs: a deterministic weighted pick, so two runs of one
    /// plan offer the same mix and the request count of a run is known in advance.
    pub fn scenario_of(&self, n: usize) -> usize {
        let weights: Vec<u32> = self.scenarios.iter().map(|s| s.weight).collect();
        weighted_pick(&weights, n)
    }
}

/// Which of the weighted items the `n`-th draw takes: `n` is scattered by a
/// multiplicative hash, so consecutive draws mix and any run of draws follows the weights.
pub fn weighted_pick(weights: &[u32], n: usize) -> usize {
    let total: u32 = weights.iter().sum();
    let mut slot = (n as u32).wrapping_mul(2_654_435_761) % total.max(1);
    for (i, w) in weights.iter().enumerate() {
        if slot < *w {
            return i;
        }
        slot -= w;
    }
    0
}

/// The target must be a valid `http://` URL.
fn check_target(target: &str) -> Result<(), String> {
    if !target.starts_with("http://") {
        return Err(format!("`{target}` must be an http:// URL"));
    }
    if target.parse::<http::Uri>().is_err() {
        return Err(format!("`{target}` is not a valid URL"));
    }
    Ok(())
}

/// At least one scenario, each weighted and with steps of valid methods and paths. A
/// problem as (key, reason).
fn check_scenarios(scenarios: &[Scenario]) -> Result<(), (String, String)> {
    if scenarios.is_empty()
        || scenarios
            .iter()
            .any(|s| s.steps.is_empty() || s.weight == 0)
    {
        return Err((
            "scenarios".into(),
            "need at least one scenario, each with a weight ≥ 1 and a step".into(),
        ));
    }
    for (i, s) in scenarios.iter().enumerate() {
        for (j, step) in s.steps.iter().enumerate() {
            if http::Method::from_bytes(step.method.as_bytes()).is_err() {
                return Err((
                    format!("scenarios[{i}].steps[{j}].method"),
                    format!("`{}` is not an HTTP method", step.method),
                ));
            }
            if !step.path.starts_with('/') || step.path.parse::<http::Uri>().is_err() {
                return Err((
                    format!("scenarios[{i}].steps[{j}].path"),
                    format!("`{}` must be a path starting with /", step.path),
                ));
            }
        }
    }
    Ok(())
}

/// The arrival model: `[[stages]]` (open) or `[closed]`, exactly one of them.
fn model_of(raw: &FilePlan) -> Result<Model, (String, String)> {
    let bad = |key: &str, reason: &str| Err((key.to_owned(), reason.to_owned()));
    match (&raw.closed, raw.stages.is_empty()) {
        (Some(_), false) => bad(
            "closed",
            "give either [[stages]] (open model) or [closed], not both",
        ),
        (None, true) => bad(
            "stages",
            "need [[stages]] (open model) or [closed] (users in a loop)",
        ),
        (Some(c), true) => {
            if c.users == 0 || c.duration.is_zero() {
                return bad("closed", "users and duration must be above zero");
            }
            Ok(Model::Closed {
                users: c.users,
                duration: c.duration,
            })
        }
        (None, false) => {
            let ok = |r: f64| r.is_finite() && r >= 0.0;
            if let Some(i) = raw
                .stages
                .iter()
                .position(|s| !ok(s.rate) || !s.ramp_to.is_none_or(ok))
            {
                return bad(&format!("stages[{i}]"), "rates must be finite and ≥ 0");
            }
            Ok(Model::Open(
                raw.stages
                    .iter()
                    .map(|s| Stage {
                        duration: s.duration,
                        rate: s.rate,
                        ramp_to: s.ramp_to,
                    })
                    .collect(),
            ))
        }
    }
}

/// SLO `i`: a latency quantile or the error rate below a limit, for all steps or one
/// named step.
fn slo_of(i: usize, s: &FileSlo, scenarios: &[Scenario]) -> Result<Slo, (String, String)> {
    let q = match s.metric.as_str() {
        "p50" => Some(0.5),
        "p90" => Some(0.9),
        "p99" => Some(0.99),
        "p999" => Some(0.999),
        "error_rate" => None,
        m => {
            return Err((
                format!("slo[{i}].metric"),
                format!("`{m}`: use p50, p90, p99, p999 or error_rate"),
            ))
        }
    };
    let below = |e: String| (format!("slo[{i}].below"), e);
    let limit = match q {
        Some(q) => SloLimit::Latency(
            q,
            humantime::parse_duration(&s.below).map_err(|e| below(e.to_string()))?,
        ),
        None => SloLimit::ErrorRate(
            s.below
                .trim_end_matches('%')
                .parse::<f64>()
                .map(|v| if s.below.ends_with('%') { v / 100.0 } else { v })
                .map_err(|e| below(e.to_string()))?,
        ),
    };
    if let Some(step) = &s.step {
        if !scenarios
            .iter()
            .any(|sc| sc.steps.iter().any(|st| &st.name == step))
        {
            return Err((
                format!("slo[{i}].step"),
                format!("no scenario has a step named `{step}`"),
            ));
        }
    }
    Ok(Slo {
        label: format!(
            "{} of {} < {}",
            s.metric,
            s.step.as_deref().unwrap_or("all steps"),
            s.below
        ),
        step: s.step.clone(),
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCEN: &str = "[[scenarios]]\nname = \"b\"\nsteps = [{ name = \"c\", path = \"/c\" }]\n";

    #[test]
    fn closed_and_open_are_exclusive_and_one_is_needed() {
        let both = format!(
            "target = \"http://h\"\n[closed]\nusers = 2\nduration = \"1s\"\n[[stages]]\nduration = \"1s\"\nrate = 1.0\n{SCEN}"
        );
        let e = Plan::parse(&both, "p.toml").unwrap_err().to_string();
        assert!(e.starts_with("p.toml: closed:"), "{e}");
        let none = format!("target = \"http://h\"\n{SCEN}");
        let e = Plan::parse(&none, "p.toml").unwrap_err().to_string();
        assert!(e.starts_with("p.toml: stages:"), "{e}");
        let closed =
            format!("target = \"http://h\"\n[closed]\nusers = 2\nduration = \"1s\"\n{SCEN}");
        let p = Plan::parse(&closed, "p.toml").unwrap();
        assert_eq!(
            p.model,
            Model::Closed {
                users: 2,
                duration: Duration::from_secs(1)
            }
        );
    }

    #[test]
    fn bad_step_method_path_and_slo_step_are_named() {
        let open = "target = \"http://h\"\n[[stages]]\nduration = \"1s\"\nrate = 1.0\n";
        let bad_path = format!(
            "{open}[[scenarios]]\nname = \"b\"\nsteps = [{{ name = \"c\", path = \"c\" }}]\n"
        );
        let e = Plan::parse(&bad_path, "p.toml").unwrap_err().to_string();
        assert!(e.contains("scenarios[0].steps[0].path"), "{e}");
        let bad_slo =
            format!("{open}{SCEN}[[slo]]\nmetric = \"p99\"\nstep = \"nope\"\nbelow = \"1s\"\n");
        let e = Plan::parse(&bad_slo, "p.toml").unwrap_err().to_string();
        assert!(e.contains("slo[0].step") && e.contains("nope"), "{e}");
    }

    #[test]
    fn the_weighted_pick_follows_the_weights() {
        let text = "target = \"http://h\"\n[[stages]]\nduration = \"1s\"\nrate = 1.0\n\
            [[scenarios]]\nname = \"a\"\nweight = 3\nsteps = [{ name = \"c\", path = \"/c\" }]\n\
            [[scenarios]]\nname = \"b\"\nsteps = [{ name = \"c\", path = \"/c\" }]\n";
        let p = Plan::parse(text, "p.toml").unwrap();
        let a = (0..4000).filter(|n| p.scenario_of(*n) == 0).count();
        assert!((2900..3100).contains(&a), "{a} of 4000 for weight 3:1");
    }
}
