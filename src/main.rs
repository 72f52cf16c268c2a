//! The `surge` command line. No logic lives here: each subcommand calls into the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use surge::config::{self, Config};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Opts the process out of transparent huge pages, first thing in `main`. The allocator
/// asks the kernel for them on its arenas (and kernels set to `always` give them
/// unasked), so the first byte touched in a 2 MiB stretch makes all of it resident: a
/// worker's heap of small objects (thousands of idle connections' few words each) spread
/// over a few stretches then costs several times its size. Measured with 10,000 idle
/// keep-alive connections (`loadtests/idle-rss.sh`): 83 MB resident with huge pages,
/// 44 MB without; the proxy's CPU per request, in 9 side-by-side rounds
/// (`loadtests/compare.sh`), moved by +4% at 50 connections and -5% at 200 (medians),
/// within the machine's noise.
fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of
        // ours; it sets a flag of this process that the kernel checks at page faults.
        // Failing (a kernel without it) leaves things as they were, which is fine.
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

/// Starts the thread that hands freed memory back to the kernel every [`PURGE_EVERY`]
/// (`surge serve` only: the other commands are short). The allocator purges what was
/// freed a second ago only when it next runs, so after a burst (500 shoppers' requests in
/// progress hold 16 KiB buffers each) a worker that goes quiet kept the burst's pages for
/// good: 2.9 KiB per idle connection instead of 2.3. Purging at once instead
/// (`MIMALLOC_PURGE_DELAY=0`) gives the same memory but costs 5-12% more CPU per request
/// when every request opens a connection (pages freed and taken again, page faults).
fn start_purger() {
    let purger = std::thread::Builder::new()
        .name("surge-purge".into())
        .spawn(|| {
            loop {
                std::thread::sleep(PURGE_EVERY);
                // SAFETY: takes no pointer; mimalloc's collection is thread-safe (it
                // purges the arenas' pages whose delay has passed).
                unsafe { libmimalloc_sys::mi_collect(false) };
            }
        });
    // Without it memory comes back later, at the allocator's next use: not a reason to
    // stop.
    drop(purger);
}

/// How often freed memory is handed back (after the allocator's own delay of a second).
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Parser)]
#[command(
    name = "surge",
    version,
    about = "Autoscaling L7 load balancer for e-commerce frontends"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (and, per config, the demo frontends).
    Serve {
        /// Configuration file. Default: config/surge.toml if it exists, else the copy
        /// built into the binary.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a sample shop frontend.
    Blade {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        #[arg(long, default_value = "blade")]
        id: String,
        /// Added service time per request, e.g. "20ms".
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        latency: Duration,
        /// Rounds of hashing per request (CPU cost).
        #[arg(long, default_value_t = 0)]
        cpu_work: u32,
    },
    /// Validate a configuration file; prints every problem and exits 1 if there is one.
    CheckConfig { file: PathBuf },
    /// Run a load-test plan (open model); exits 1 when an SLO fails.
    Loadtest(LoadtestArgs),
    /// Run the bare-metal simulator (Scaleway Elastic Metal or MAAS API) on loopback.
    Sim(SimArgs),
    /// List the pool's nodes (calls the admin API).
    Nodes {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drain a node: no new requests or carts; in-flight requests and bound carts finish.
    Drain {
        id: String,
        /// Deadline for bound carts, e.g. "300s" (default: admin.default_drain_timeout).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Drain even if fewer than admin.min_in_service nodes would remain.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Put a drained (or maintained) node back.
    Undrain {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(clap::Args)]
struct SimArgs {
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// The vendor API to speak: `elastic-metal` (Scaleway) or `maas` (Canonical MAAS 2.0).
    #[arg(long, default_value = "elastic-metal", value_parser = ["elastic-metal", "maas"])]
    api: String,
    /// Elastic Metal: the secret key clients send as X-Auth-Token. MAAS: the API key
    /// (consumer_key:token_key:token_secret) requests must be signed with.
    #[arg(long, env = "SURGE_SIM_TOKEN", hide_env_values = true)]
    token: String,
    /// MAAS: zones and commissioned machines in each.
    #[arg(long, value_delimiter = ',', default_value = "rack1,rack2")]
    maas_zones: Vec<String>,
    #[arg(long, default_value_t = 8)]
    machines_per_zone: usize,
    /// Order to delivered hardware.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    delivery: Duration,
    /// OS install after delivery.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    install: Duration,
    /// Spread of delivery/install times (lognormal σ; 0 = exact).
    #[arg(long, default_value_t = 0.0)]
    spread: f64,
    /// Time compression: durations are divided by this.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// `realistic`: 10 min delivery, 5 min install, σ 0.4 (combine with --time-scale).
    #[arg(long)]
    realistic: bool,
    /// Servers that may exist at once before offers go out of stock.
    #[arg(long, default_value_t = 32)]
    capacity: usize,
    /// Port of the blades started on each ready server's 127.0.1.x address.
    #[arg(long, default_value_t = 18000)]
    blade_port: u16,
    /// Keep servers in this JSON file across restarts.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Share of orders that end in `error` (0..=1).
    #[arg(long, default_value_t = 0.0)]
    order_error_share: f64,
    /// Answer every Nth request with 429 (0 = never).
    #[arg(long, default_value_t = 0)]
    rate_limit_every: u64,
    /// Retry-After seconds on those 429s.
    #[arg(long, default_value_t = 1)]
    retry_after: u64,
    /// Share of requests answered 503 (0..=1).
    #[arg(long, default_value_t = 0.0)]
    server_error_share: f64,
    /// Offer names to report out of stock.
    #[arg(long)]
    out_of_stock: Vec<String>,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Base URL of the admin API.
    #[arg(
        long = "admin",
        env = "SURGE_ADMIN_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    url: String,
    /// Bearer token.
    #[arg(long, env = "SURGE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file of the CA (or the self-signed certificate) an `https://` admin API's
    /// certificate is checked against, besides the public roots.
    #[arg(long = "admin-ca", env = "SURGE_ADMIN_CA")]
    ca: Option<PathBuf>,
}

fn main() -> ExitCode {
    without_huge_pages();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Blade {
            listen,
            id,
            latency,
            cpu_work,
        } => blade(surge::blade::BladeConfig {
            id,
            listen,
            latency,
            cpu_work,
            tls: None,
        }),
        Command::Nodes { admin, json } => admin_call(admin, |c| async move {
            let list = c.nodes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", surge::admin::client::table(&list.nodes));
            }
            Ok(())
        }),
        Command::Drain {
            id,
            timeout,
            force,
            admin,
        } => admin_call(admin, |c| async move {
            let node = c.drain(&id, timeout, force).await?;
            print!("{}", surge::admin::client::table(&[node]));
            Ok(())
        }),
        Command::Undrain { id, admin } => admin_call(admin, |c| async move {
            let node = c.undrain(&id).await?;
            print!("{}", surge::admin::client::table(&[node]));
            Ok(())
        }),
        Command::Sim(args) => sim(args),
        Command::Loadtest(args) => match loadtest(args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("surge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(&p)?),
        None if Path::new(config::DEFAULT_PATH).exists() => {
            Ok(Config::load(Path::new(config::DEFAULT_PATH))?)
        }
        None => Ok(Config::parse(
            config::EMBEDDED_DEFAULT,
            Path::new("(embedded config/surge.toml)"),
        )?),
    }
}

fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    // First, before any thread exists: this clears the hand-over variables from the
    // environment.
    let inherited = surge::handoff::Inherited::from_env()?;
    start_purger();
    let config_path = config.or_else(|| {
        let default = PathBuf::from(config::DEFAULT_PATH);
        default.exists().then_some(default)
    });
    let cfg = load_config(config_path.clone())?;
    let _log = surge::telemetry::init_logging("info", cfg.proxy.access_log_format);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    let restarts = surge::serve::Restarts {
        config_path,
        successor: surge::handoff::Successor::of_this_process(
            surge::serve::SUCCESSOR_READY_TIMEOUT,
        ),
        inherited,
    };
    runtime.block_on(surge::serve::run(cfg, restarts))?;
    Ok(())
}

fn admin_call<F, Fut>(args: AdminArgs, f: F) -> anyhow::Result<()>
where
    F: FnOnce(surge::admin::client::AdminClient) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let client = match &args.ca {
        Some(file) => {
            let pem = std::fs::read(file)
                .with_context(|| format!("cannot read the admin CA {}", file.display()))?;
            surge::admin::client::AdminClient::with_ca(&args.url, args.token, &pem)?
        }
        None => surge::admin::client::AdminClient::new(&args.url, args.token),
    };
    runtime.block_on(f(client))
}

#[derive(clap::Args, Debug)]
struct LoadtestArgs {
    /// The plan (see loadtests/*.toml and docs/operations.md).
    #[arg(required_unless_present = "compare")]
    file: Option<PathBuf>,
    /// Instead of running: overlay two runs' report.json (before, after) into
    /// compare.html (in --out, or here) and print their figures side by side.
    #[arg(long, num_args = 2, value_names = ["BEFORE", "AFTER"], conflicts_with = "file")]
    compare: Option<Vec<PathBuf>>,
    /// Write `report.json` and `report.html` into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stop as soon as an SLO can no longer pass (as `abort_early = true` in the file).
    #[arg(long)]
    abort_early: bool,
    /// A surge admin API (e.g. http://127.0.0.1:9090): record its autoscaler's desired
    /// and in-service node counts on the report's timeline.
    #[arg(long)]
    admin: Option<String>,
    /// Bearer token for `--admin`.
    #[arg(long, env = "SURGE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Worker threads generating load (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

/// `surge loadtest --compare BEFORE AFTER`: the table on stdout, compare.html in `out`.
fn compare_reports(pair: &[PathBuf], out: Option<PathBuf>) -> anyhow::Result<()> {
    use surge::loadtest::compare;
    let read = |path: &PathBuf| -> anyhow::Result<compare::Run> {
        let text =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("{}: not JSON", path.display()))?;
        // A report's folder names its run better than "report.json".
        let label = path.parent().and_then(|p| p.file_name()).map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(compare::Run::from_json(&label, &json)?)
    };
    let [first, second] = pair else {
        anyhow::bail!("--compare takes two report.json files");
    };
    let (mut before, mut after) = (read(first)?, read(second)?);
    if before.label == after.label {
        before.label = pair[0].display().to_string();
        after.label = pair[1].display().to_string();
    }
    print!("{}", compare::table(&before, &after));
    let dir = out.unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let page = dir.join("compare.html");
    std::fs::write(&page, compare::html(&before, &after))
        .with_context(|| format!("cannot write {}", page.display()))?;
    println!("comparison: {}", page.display());
    Ok(())
}

/// Runs a plan; `Ok(false)` when an SLO failed or the run was aborted.
fn loadtest(args: LoadtestArgs) -> anyhow::Result<bool> {
    let LoadtestArgs {
        file,
        compare,
        out,
        abort_early,
        admin,
        token,
        threads,
    } = args;
    if let Some(pair) = compare {
        return compare_reports(&pair, out).map(|()| true);
    }
    let file = file.context("a plan file, or --compare BEFORE AFTER")?;
    let mut plan = surge::loadtest::Plan::load(&file)?;
    plan.abort_early |= abort_early;
    if let Some(url) = admin {
        anyhow::ensure!(
            url.starts_with("http://"),
            "--admin {url}: must be an http:// URL"
        );
        plan.admin = Some(surge::loadtest::AdminWatch { url, token });
    }
    let runtime = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.max(1))
            .enable_all()
            .build(),
        None => tokio::runtime::Runtime::new(),
    }
    .context("cannot start the runtime")?;
    let report = runtime.block_on(surge::loadtest::run(&plan));
    print!("{}", report.table());
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("report.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&report.json())?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let html = dir.join("report.html");
        std::fs::write(&html, report.html())
            .with_context(|| format!("cannot write {}", html.display()))?;
        println!("report: {} and {}", path.display(), html.display());
    }
    Ok(report.passed())
}

fn sim(args: SimArgs) -> anyhow::Result<()> {
    let _log = surge::telemetry::init_logging("info", Default::default());
    let mut cfg = if args.realistic {
        surge::sim::SimConfig::realistic(args.listen, &args.token)
    } else {
        let mut cfg = surge::sim::SimConfig::demo(args.listen, &args.token);
        cfg.delivery = args.delivery;
        cfg.install = args.install;
        cfg.spread = args.spread;
        cfg
    };
    cfg.time_scale = args.time_scale;
    cfg.capacity = args.capacity;
    let maas = args.api == "maas";
    if maas {
        args.token
            .parse::<surge::provider::maas::ApiKey>()
            .context("--api maas takes --token consumer_key:token_key:token_secret")?;
        cfg.api = surge::sim::SimApi::Maas;
        cfg.zones = args.maas_zones;
        cfg.machines_per_zone = args.machines_per_zone;
    }
    cfg.blade_port = args.blade_port;
    cfg.state_file = args.state_file;
    cfg.faults = surge::sim::Faults {
        order_error_share: args.order_error_share,
        out_of_stock: args.out_of_stock,
        rate_limit_every: args.rate_limit_every,
        retry_after_secs: args.retry_after,
        server_error_share: args.server_error_share,
        ..surge::sim::Faults::default()
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(async {
        let zones = cfg.zones.join(", ");
        let handle = surge::sim::start(cfg).await?;
        if maas {
            println!(
                "surge sim: MAAS 2.0 API on {}/api/2.0/ (zones {zones})",
                handle.url()
            );
        } else {
            println!(
                "surge sim: Elastic Metal API on {}/baremetal/v1/zones/fr-par-2 (and nl-ams-1)",
                handle.url()
            );
        }
        tokio::signal::ctrl_c().await.ok();
        handle.stop();
        anyhow::Ok(())
    })
}

fn blade(cfg: surge::blade::BladeConfig) -> anyhow::Result<()> {
    let _log = surge::telemetry::init_logging("info", Default::default());
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(async {
        let handle = surge::blade::start(cfg).await?;
        println!("surge blade `{}` on http://{}", handle.id, handle.addr);
        tokio::signal::ctrl_c().await.ok();
        handle.kill();
        anyhow::Ok(())
    })
}
