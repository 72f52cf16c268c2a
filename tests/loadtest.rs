//! The load-test harness against real blades on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::*;
use surge::loadtest::{self, Plan};

fn plan(target: std::net::SocketAddr, stages: &str, slo: &str) -> Plan {
    let text = format!(
        "target = \"http://{target}\"\n{stages}\n[[scenarios]]\nname = \"browse\"\nsteps = [{{ name = \"catalog\", path = \"/catalog\" }}]\n{slo}"
    );
    Plan::parse(&text, "test-plan.toml").expect("valid plan")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p50_against_a_20ms_blade_is_20_to_25ms_and_the_rate_is_kept() {
    let blades = blades(1, Duration::from_millis(20)).await;
    let p = plan(
        blades[0].addr,
        "[[stages]]\nduration = \"3s\"\nrate = 100.0\n",
        "",
    );
    let report = loadtest::run(&p).await;
    let p50 = report.quantile(Some("catalog"), 0.5).unwrap();
    assert!(
        p50 >= Duration::from_millis(20) && p50 <= Duration::from_millis(25),
        "p50 {p50:?}\n{}",
        report.table()
    );
    assert_eq!(report.started_sessions, 300);
    let rate = report.arrival_rate();
    assert!(
        (rate - 100.0).abs() / 100.0 < 0.02,
        "achieved {rate:.1}/s for 100/s"
    );
    assert!(report.passed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_stall_shows_in_p99_where_a_closed_loop_hides_it() {
    let blades = blades(1, Duration::ZERO).await;
    let addr = blades[0].addr;
    let p = plan(addr, "[[stages]]\nduration = \"3s\"\nrate = 100.0\n", "");
    let run = tokio::spawn(async move { loadtest::run(&p).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    blades[0].stall(Duration::from_secs(1));
    let report = run.await.unwrap();
    let p99 = report.quantile(None, 0.99).unwrap();
    assert!(
        p99 >= Duration::from_millis(500),
        "open model p99 {p99:?} misses the stall\n{}",
        report.table()
    );

    // The same stall seen by one closed-loop client: one slow request among many fast ones.
    let c = client();
    let mut latencies = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    let mut stalled = false;
    while Instant::now() < until {
        if !stalled && Instant::now() + Duration::from_secs(2) > until {
            blades[0].stall(Duration::from_secs(1));
            stalled = true;
        }
        let t = Instant::now();
        get(&c, addr, "/catalog").await.unwrap();
        latencies.push(t.elapsed());
    }
    latencies.sort_unstable();
    let closed_p99 = latencies[latencies.len() * 99 / 100];
    assert!(
        closed_p99 < Duration::from_millis(100),
        "closed loop p99 {closed_p99:?} ({} requests)",
        latencies.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_slo_exits_1_and_says_by_how_much() {
    let blades = blades(1, Duration::from_millis(20)).await;
    let dir = std::env::temp_dir().join(format!(
        "surge-lt-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("plan.toml");
    std::fs::write(
        &file,
        format!(
            "target = \"http://{}\"\n[[stages]]\nduration = \"1s\"\nrate = 20.0\n[[scenarios]]\nname = \"b\"\nsteps = [{{ name = \"catalog\", path = \"/catalog\" }}]\n[[slo]]\nmetric = \"p99\"\nbelow = \"5ms\"\n[[slo]]\nmetric = \"error_rate\"\nbelow = \"1%\"\n",
            blades[0].addr
        ),
    )
    .unwrap();
    let dir2 = dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_surge"))
            .args(["loadtest"])
            .arg(&file)
            .arg("--out")
            .arg(dir.join("out"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("SLO FAILED p99 of all steps < 5ms"),
        "{stdout}"
    );
    assert!(stdout.contains("over by"), "{stdout}");
    assert!(stdout.contains("SLO passed error_rate"), "{stdout}");
    let html = std::fs::read_to_string(dir2.join("out").join("report.html")).unwrap();
    assert!(
        html.contains("<svg") && html.contains("polyline"),
        "no plots"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir2.join("out").join("report.json")).unwrap())
            .unwrap();
    let timeline = json["timeline"].as_array().unwrap();
    assert!(!timeline.is_empty());
    assert_eq!(
        timeline
            .iter()
            .map(|b| b["sessions"].as_u64().unwrap())
            .sum::<u64>(),
        20
    );
}

#[test]
fn the_shipped_plans_parse() {
    for name in ["smoke.toml", "sales-day.toml", "closed.toml", "chaos.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("loadtests")
            .join(name);
        let plan = Plan::load(&path).unwrap_or_else(|e| panic!("{e}"));
        if name == "closed.toml" {
            assert!(matches!(plan.model, loadtest::Model::Closed { .. }));
            continue;
        }
        assert!(
            matches!(&plan.model, loadtest::Model::Open(stages) if !stages.is_empty()),
            "{name}"
        );
    }
    let err = Plan::parse(
        "target = \"http://x\"\nstages = []\nscenarios = []\n",
        "bad.toml",
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("bad.toml: scenarios:"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_closed_model_loops_users_on_kept_connections_and_says_so() {
    let blades = blades(1, Duration::from_millis(2)).await;
    let p = plan(
        blades[0].addr,
        "[closed]\nusers = 4\nduration = \"1s\"\n",
        "[[slo]]\nmetric = \"error_rate\"\nbelow = \"0.1%\"\n",
    );
    let t = Instant::now();
    let report = loadtest::run(&p).await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let table = report.table();
    assert!(
        table.starts_with("closed model: 4 users") && table.contains("NOT corrected"),
        "{table}"
    );
    // 4 users against a 2 ms blade for 1 s: hundreds of requests, not one per user.
    assert!(report.request_rate() > 200.0, "{table}");
    assert!(report.passed(), "{table}");
    // Kept alive: far fewer connections than requests.
    assert!(
        blades[0].connections() <= 8,
        "{} connections for {} requests",
        blades[0].connections(),
        report.started_sessions
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_early_stops_once_an_slo_cannot_pass_and_says_which() {
    let blades = blades(1, Duration::from_millis(30)).await;
    let mut p = plan(
        blades[0].addr,
        "[[stages]]\nduration = \"8s\"\nrate = 50.0\n",
        "[[slo]]\nmetric = \"p90\"\nbelow = \"5ms\"\n",
    );
    p.abort_early = true;
    let t = Instant::now();
    let report = loadtest::run(&p).await;
    let took = t.elapsed();
    let table = report.table();
    // p90 < 5 ms fails once 10% of the run's 400 requests (41) are slow: within ~1-2 s.
    assert!(took < Duration::from_secs(4), "ran {took:?}\n{table}");
    assert!(!report.passed());
    let why = report.aborted.as_deref().unwrap_or_default();
    assert!(
        why.contains("p90 of all steps < 5ms") && why.contains("cannot pass"),
        "{table}"
    );
    assert!(report.started_sessions < 400, "{table}");
    assert!(table.contains("ABORTED"), "{table}");
}
