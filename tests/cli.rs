//! The real `surge` binary: `check-config` on bad files, and `serve` end to end.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SURGE: &str = env!("CARGO_BIN_EXE_surge");

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "surge-test-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn check_config(text: &str) -> (bool, String) {
    let path = temp_file("surge.toml", text);
    let out = Command::new(SURGE)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills the child if the test fails before it has stopped on its own, so a failed run
/// leaves no server behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const GOOD: &str = "[pool]\n[[pool.backends]]\naddress = \"127.0.0.1:9001\"\n";

#[test]
fn the_shipped_configs_are_valid() {
    for file in [
        "config/surge.toml",
        "config/scaleway.example.toml",
        "config/maas.example.toml",
        "loadtests/chaos-surge.toml",
        "loadtests/budget-surge.toml",
    ] {
        let out = Command::new(SURGE)
            .arg("check-config")
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (ok, err) = check_config(GOOD);
    assert!(ok, "{err}");
}

#[test]
fn each_bad_config_gives_one_clear_error_naming_the_key() {
    let cases = [
        ("unknown key", "[pool]\nalgorithm = \"p2c-ewma\"\nbackend = []\n", "pool.backend: unknown field `backend`"),
        (
            "bad duration",
            "[proxy]\nconnect_timeout = \"fast\"\n[pool]\n[[pool.backends]]\naddress = \"127.0.0.1:1\"\n",
            "proxy.connect_timeout",
        ),
        ("no backends", "[pool]\nname = \"shop\"\n", "pool.backends: no backends"),
        (
            "duplicate address",
            "[pool]\n[[pool.backends]]\naddress = \"127.0.0.1:9001\"\n[[pool.backends]]\naddress = \"127.0.0.1:9001\"\n",
            "pool.backends[1].address: duplicate address 127.0.0.1:9001",
        ),
        ("bad algorithm", "[pool]\nalgorithm = \"fastest\"\n", "pool.algorithm"),
        ("not toml", "[pool\n", "surge.toml:1"),
    ];
    for (name, text, expected) in cases {
        let (ok, err) = check_config(text);
        assert!(!ok, "{name}: accepted");
        assert!(
            err.contains("surge.toml"),
            "{name}: does not name the file: {err}"
        );
        assert!(
            err.contains(expected),
            "{name}: expected `{expected}` in: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{name}: not one line: {err}");
    }
}

#[test]
fn a_missing_file_is_one_line_not_a_panic() {
    let out = Command::new(SURGE)
        .args(["serve", "--config", "/nonexistent/surge.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/surge.toml: cannot read"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_proxies_to_its_demo_blades_and_stops_on_sigterm() {
    let path = temp_file(
        "surge.toml",
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n[pool]\nalgorithm = \"round-robin\"\n[pool.sticky]\n[local_blades]\ncount = 2\n",
    );
    let mut child = KillOnDrop(
        Command::new(SURGE)
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().expect("a start line").unwrap();
    let addr: std::net::SocketAddr = first
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {first:?}"));

    let c = common::client();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let r = common::get(&c, addr, "/catalog").await.unwrap();
        assert_eq!(r.status, 200);
        seen.insert(r.blade());
    }
    assert_eq!(seen.len(), 2, "both demo blades answer: {seen:?}");

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "surge did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    assert!(
        common::get(&c, addr, "/catalog").await.is_err(),
        "still listening"
    );
}

#[test]
fn a_missing_oversized_or_unknown_user_data_is_a_check_config_error_naming_the_key() {
    let dir = temp_file("placeholder", "").parent().unwrap().to_path_buf();
    let big = dir.join("big.yaml");
    std::fs::write(&big, "#cloud-config\n".repeat(6000)).unwrap();
    let unknown = dir.join("unknown.yaml");
    std::fs::write(&unknown, "#cloud-config\nhostname: {{hostname}}\n").unwrap();
    let provider = |user_data: &std::path::Path| {
        format!(
            "[pool]\n[provider]\nkind = \"scaleway\"\napi_url = \"sim\"\nzones = [\"fr-par-2\"]\noffer = \"EM-A115X-SSD\"\nprivate_network = \"pn\"\n[provider.bootstrap]\nuser_data = \"{}\"\n",
            user_data.display()
        )
    };
    for (name, path, expected) in [
        ("missing", dir.join("nope.yaml"), "cannot read"),
        ("oversized", big, "bytes; at most 65536"),
        (
            "unknown variable",
            unknown,
            "unknown variable `{{hostname}}`",
        ),
    ] {
        let (ok, err) = check_config(&provider(&path));
        assert!(!ok, "{name}: accepted");
        assert!(
            err.contains("provider.bootstrap.user_data"),
            "{name}: {err}"
        );
        assert!(
            err.contains(expected),
            "{name}: expected `{expected}` in {err}"
        );
    }
    // Neither a private network nor public addresses: refused, saying what to do.
    let (ok, err) = check_config("[pool]\n[provider]\nkind = \"scaleway\"\napi_url = \"sim\"\nzones = [\"fr-par-2\"]\noffer = \"EM-A115X-SSD\"\n");
    assert!(!ok);
    assert!(
        err.contains("provider.private_network") && err.contains("public_addresses = true"),
        "{err}"
    );
}
