//! Restarts of the real `surge` binary under traffic: SIGTERM finishes what is in flight,
//! an upgrade in place (SIGUSR2 or the admin API) hands the sockets to a new process and
//! loses no request, a reload with a broken config is refused and changes nothing.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::process::{capture_lines, eventually_async, successor_pids};
use common::*;

const SURGE: &str = env!("CARGO_BIN_EXE_surge");
const TOKEN: &str = "restart-test-token";

/// A `surge serve` process and every process that took over from it; all are killed
/// when the test ends, however it ends.
struct Surge {
    first: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    proxy: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
}

impl Surge {
    fn start(backends: &[SocketAddr]) -> Surge {
        Self::start_as(std::path::Path::new(SURGE), backends)
    }

    /// [`Surge::start`] with the binary at `exe` (a path that may go through symlinks).
    fn start_as(exe: &std::path::Path, backends: &[SocketAddr]) -> Surge {
        Self::start_with(exe, backends, &[])
    }

    /// [`Surge::start_as`] with extra environment variables.
    fn start_with(exe: &std::path::Path, backends: &[SocketAddr], env: &[(&str, &str)]) -> Surge {
        let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dir = std::env::temp_dir().join(format!(
            "surge-restart-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("surge.toml");
        std::fs::write(&config, config_text(proxy, admin, backends)).unwrap();
        let mut first = Command::new(exe)
            .envs(env.iter().copied())
            .args(["serve", "--config"])
            .arg(&config)
            .env("SURGE_ADMIN_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Successors inherit these pipes: their lines arrive here too.
        let lines = capture_lines(&mut first);
        Surge {
            first,
            lines,
            proxy,
            admin,
            config,
        }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Pids named in "process N now serves" lines.
    fn successors(&self) -> Vec<u32> {
        successor_pids(&self.lines.lock().unwrap())
    }

    async fn wait_serving(&self) {
        let ok = eventually_async(Duration::from_secs(20), || async {
            get(&client(), self.proxy, "/").await.is_ok()
        })
        .await;
        assert!(ok, "surge did not start serving:\n{}", self.output());
    }
}

impl Drop for Surge {
    fn drop(&mut self) {
        for pid in self.successors() {
            signal(pid, "KILL");
        }
        let _ = self.first.kill();
        let _ = self.first.wait();
    }
}

fn config_text(proxy: SocketAddr, admin: SocketAddr, backends: &[SocketAddr]) -> String {
    let mut text = format!(
        "[proxy]\nlisten = \"{proxy}\"\nworkers = 2\naccess_log = false\nshutdown_grace = \"10s\"\n\
         handover_probation = \"3s\"\n[admin]\nlisten = \"{admin}\"\n[pool]\nalgorithm = \"round-robin\"\n"
    );
    for (i, b) in backends.iter().enumerate() {
        text.push_str(&format!(
            "[[pool.backends]]\nid = \"blade-{}\"\naddress = \"{b}\"\n",
            i + 1
        ));
    }
    text
}

/// Sends a signal by name.
fn signal(pid: u32, sig: &str) {
    let signo = match sig {
        "TERM" => libc::SIGTERM,
        "HUP" => libc::SIGHUP,
        "USR2" => libc::SIGUSR2,
        _ => libc::SIGKILL,
    };
    common::process::signal(pid, signo);
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its parent) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Steady traffic until stopped: shoppers on kept-alive connections and shoppers who
/// open a new connection per request (every new visitor does). Returns (ok, failures).
fn steady_load(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, tokio::task::JoinHandle<Vec<String>>) {
    let ok = Arc::new(AtomicU64::new(0));
    let counted = ok.clone();
    let task = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for n in 0..6 {
            let (stop, ok) = (stop.clone(), counted.clone());
            tasks.push(tokio::spawn(async move {
                let mut failures = Vec::new();
                let c = client();
                while !stop.load(Ordering::Relaxed) {
                    let result = if n % 2 == 0 {
                        get(&c, addr, "/catalog").await.map(|r| r.status.as_u16())
                    } else {
                        fresh_connection_get(addr).await
                    };
                    match result {
                        Ok(200) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(s) => failures.push(format!("status {s}")),
                        Err(e) => failures.push(format!("{e:#}")),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                failures
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    });
    (ok, task)
}

/// One request on its own connection (`Connection: close`), as a new visitor sends it.
async fn fresh_connection_get(addr: SocketAddr) -> anyhow::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /catalog HTTP/1.1\r\nhost: shop\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no response: {:?}", &text[..text.len().min(80)]))?;
    Ok(status)
}

async fn admin_post(surge: &Surge, path: &str) -> Reply {
    let reply = send(
        &client(),
        http::Method::POST,
        surge.admin,
        path,
        &[("authorization", &format!("Bearer {TOKEN}"))],
        "",
    )
    .await;
    match reply {
        Ok(r) => r,
        Err(e) => panic!("admin call {path}: {e:#}\n{}", surge.output()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let blade = blades(1, Duration::from_millis(1500)).await;
    let mut surge = Surge::start(&[blade[0].addr]);
    blade[0].set_latency(Duration::ZERO);
    surge.wait_serving().await;
    blade[0].set_latency(Duration::from_millis(1500));
    let addr = surge.proxy;
    let slow = tokio::spawn(async move { get(&client(), addr, "/catalog").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(surge.first.id(), "TERM");
    let reply = slow.await.unwrap();
    assert_eq!(
        reply.as_ref().map(|r| r.status.as_u16()).ok(),
        Some(200),
        "the request in flight at SIGTERM was not finished: {reply:?}\n{}",
        surge.output()
    );
    let status = exit_within(&mut surge.first, Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit: {status:?}\n{}",
        surge.output()
    );
    assert!(
        tokio::net::TcpStream::connect(surge.proxy).await.is_err(),
        "still accepting after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_in_place_under_steady_load_lose_no_request() {
    let blade = blades(2, Duration::from_millis(2)).await;
    let surge = Surge::start(&[blade[0].addr, blade[1].addr]);
    surge.wait_serving().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, load) = steady_load(surge.proxy, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // First by signal, as an operator's script would.
    let first = surge.first.id();
    signal(first, "USR2");
    let handed = eventually_async(Duration::from_secs(20), || async {
        surge.successors().len() == 1 && !alive(first)
    })
    .await;
    assert!(handed, "no hand-over:\n{}", surge.output());
    let after_first = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Then through the admin API, which the new process now serves.
    let second = surge.successors()[0];
    let reply = admin_post(&surge, "/v1/upgrade").await;
    assert_eq!(reply.status, 200, "{:?}\n{}", reply.body, surge.output());
    let gone = eventually_async(Duration::from_secs(20), || async { !alive(second) }).await;
    assert!(gone, "second process did not exit:\n{}", surge.output());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let failures = load.await.unwrap();
    let total = ok.load(Ordering::Relaxed);
    eprintln!("upgrades: {total} requests ok, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} requests failed across two upgrades: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        surge.output()
    );
    assert!(
        after_first > 50 && total > after_first + 50,
        "load ran throughout"
    );
    let third = surge.successors();
    assert_eq!(third.len(), 2, "{}", surge.output());
    assert!(alive(third[1]), "the last process serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_reload_is_refused_and_a_good_one_takes_over() {
    let blade = blades(2, Duration::ZERO).await;
    let surge = Surge::start(&[blade[0].addr]);
    surge.wait_serving().await;
    let good = std::fs::read_to_string(&surge.config).unwrap();

    // A typo in a key: refused by the admin API, naming file and key; nothing changes.
    std::fs::write(&surge.config, good.replace("workers = 2", "wokers = 2")).unwrap();
    let reply = admin_post(&surge, "/v1/config/reload").await;
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    assert_eq!(reply.status, 422, "{text}");
    assert!(
        text.contains("surge.toml") && text.contains("wokers"),
        "names file and key: {text}"
    );
    // A bad value, by SIGHUP: refused too, said on stderr.
    std::fs::write(
        &surge.config,
        good.replace(
            "shutdown_grace = \"10s\"",
            "shutdown_grace = \"ten seconds\"",
        ),
    )
    .unwrap();
    signal(surge.first.id(), "HUP");
    let said = eventually(Duration::from_secs(5), || {
        surge.output().contains("shutdown_grace")
    })
    .await;
    assert!(said, "{}", surge.output());
    assert!(alive(surge.first.id()), "the old process keeps serving");
    assert!(surge.successors().is_empty());
    let r = get(&client(), surge.proxy, "/catalog").await.unwrap();
    assert_eq!((r.status.as_u16(), r.blade()), (200, "blade-1".to_owned()));

    // A good change (a second frontend): a new process serves it.
    std::fs::write(
        &surge.config,
        config_text(surge.proxy, surge.admin, &[blade[0].addr, blade[1].addr]),
    )
    .unwrap();
    let reply = admin_post(&surge, "/v1/config/reload").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let both = eventually_async(Duration::from_secs(10), || async {
        let c = client();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..6 {
            if let Ok(r) = get(&c, surge.proxy, "/catalog").await {
                seen.insert(r.blade());
            }
        }
        seen.len() == 2
    })
    .await;
    assert!(both, "the reloaded config's second blade gets traffic");
    let first = surge.first.id();
    assert!(
        eventually_async(Duration::from_secs(10), || async { !alive(first) }).await,
        "the old process exits after the hand-over"
    );
}

/// A `current -> release-N` layout: after the symlink moves to the next release, an
/// upgrade runs the new release (not the file the old process resolved at start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_runs_the_release_the_current_symlink_points_to_now() {
    let dir = scratch("releases");
    release(&dir, "release-1");
    release(&dir, "release-2");
    let current = dir.join("current");
    std::os::unix::fs::symlink(dir.join("release-1"), &current).unwrap();
    let blade = blades(1, Duration::from_millis(1)).await;
    let surge = Surge::start_as(&current.join("surge"), &[blade[0].addr]);
    surge.wait_serving().await;
    std::fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(dir.join("release-2"), &current).unwrap();
    let r = admin_post(&surge, "/v1/upgrade").await;
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&r.body),
        surge.output()
    );
    let pid = new_process(&r);
    let runs = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        runs,
        dir.join("release-2").join("surge"),
        "the upgrade re-ran the old release"
    );
    drop(surge);
    let _ = std::fs::remove_dir_all(dir);
}

/// Under systemd (`Type=notify`, `NotifyAccess=all`): READY=1 once serving; an upgrade
/// says RELOADING=1, and the new process names itself MAINPID and says READY=1; SIGTERM
/// says STOPPING=1. Read from a notification socket of the test's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_reloading_the_new_main_pid_and_stopping() {
    let dir = scratch("notify");
    let path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let blade = blades(1, Duration::from_millis(1)).await;
    let surge = Surge::start_with(
        std::path::Path::new(SURGE),
        &[blade[0].addr],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let next = || {
        let mut buf = [0u8; 1024];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = next();
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");
    surge.wait_serving().await;
    let r = admin_post(&surge, "/v1/upgrade").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let new_pid = new_process(&r);
    let reloading = next();
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let took_over = next();
    assert!(
        took_over.lines().any(|l| l == format!("MAINPID={new_pid}"))
            && took_over.lines().any(|l| l == "READY=1"),
        "{took_over}"
    );
    // The old process exits without a word: the service goes on in the new one.
    assert!(
        eventually(Duration::from_secs(10), || !alive(surge.first.id())).await,
        "the old process did not exit"
    );
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1024];
    let left = socket
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    assert!(
        left.is_err(),
        "the old process said more on its way out: {left:?}"
    );
    socket.set_nonblocking(false).unwrap();
    signal(new_pid, "TERM");
    let stopping = next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    drop(surge);
    let _ = std::fs::remove_dir_all(dir);
}

/// The new process dies right after it took over: the old one kept copies of the
/// sockets for `proxy.handover_probation`, serves on them again (connections that came
/// meanwhile wait in the listen queue), and can hand over again later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_process_serves_again_if_the_new_one_dies_right_after_taking_over() {
    let blade = blades(1, Duration::from_millis(1)).await;
    let surge = Surge::start(&[blade[0].addr]);
    surge.wait_serving().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, load) = steady_load(surge.proxy, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = admin_post(&surge, "/v1/upgrade").await;
    assert_eq!(r.status, 200, "{}", surge.output());
    let doomed = new_process(&r);
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(doomed, "KILL");
    let again = eventually(Duration::from_secs(5), || {
        surge.output().contains("serves again")
    })
    .await;
    assert!(
        again,
        "the old process did not take over again:\n{}",
        surge.output()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        ok.load(Ordering::Relaxed) > before + 50,
        "nothing served after the take-back:\n{}",
        surge.output()
    );
    assert!(alive(surge.first.id()), "the old process exited");
    stop.store(true, Ordering::Relaxed);
    let failures = load.await.unwrap();
    // At most the requests the killed process had in hand (one per load task).
    assert!(failures.len() <= 6, "{failures:?}\n{}", surge.output());
    // The admin API is back too, and the process can hand over again.
    let r = admin_post(&surge, "/v1/upgrade").await;
    assert_eq!(r.status, 200, "{}", surge.output());
    let next = new_process(&r);
    assert_ne!(next, doomed);
    surge.wait_serving().await;
    let gone = eventually(Duration::from_secs(15), || !alive(surge.first.id())).await;
    assert!(
        gone,
        "the old process stayed after a hand-over that held:\n{}",
        surge.output()
    );
}

/// SIGTERM while a hand-over waits for a new process that never gets ready: the old
/// process stops at once (not after the 60 s ready timeout), and the new one is stopped
/// too, not left holding copies of the sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_hand_over_stops_both_processes() {
    let dir = scratch("stuck");
    release(&dir, "release-1");
    std::fs::create_dir_all(dir.join("release-2")).unwrap();
    // The next release hangs before it serves.
    let pid_file = dir.join("stuck.pid");
    let stuck = dir.join("release-2").join("surge");
    std::fs::write(
        &stuck,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 60\n",
            pid_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&stuck, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let current = dir.join("current");
    std::os::unix::fs::symlink(dir.join("release-1"), &current).unwrap();
    let blade = blades(1, Duration::from_millis(1)).await;
    let mut surge = Surge::start_as(&current.join("surge"), &[blade[0].addr]);
    surge.wait_serving().await;
    std::fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(dir.join("release-2"), &current).unwrap();
    signal(surge.first.id(), "USR2");
    assert!(
        eventually(Duration::from_secs(10), || pid_file.exists()).await,
        "the stuck release never started"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stuck_pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    signal(surge.first.id(), "TERM");
    let exited = exit_within(&mut surge.first, Duration::from_secs(15)).await;
    assert!(
        exited.is_some(),
        "SIGTERM during a hand-over was ignored:\n{}",
        surge.output()
    );
    assert!(
        eventually(Duration::from_secs(5), || !alive(stuck_pid)).await,
        "the half-started process {stuck_pid} was left running"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A fresh scratch directory for one test.
fn scratch(what: &str) -> PathBuf {
    common::scratch_dir(what)
}

/// `dir/name/surge`: this build's binary installed as a release (a hard link, or a copy
/// across file systems).
fn release(dir: &std::path::Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join(name)).unwrap();
    let to = dir.join(name).join("surge");
    if std::fs::hard_link(SURGE, &to).is_err() {
        std::fs::copy(SURGE, &to).unwrap();
    }
    to
}

/// The new process an upgrade answer names ("... process N now serves ..."): read from
/// the answer, not the log, which may come a moment later.
fn new_process(r: &Reply) -> u32 {
    let result = r.json()["result"].as_str().unwrap_or_default().to_owned();
    *successor_pids(std::slice::from_ref(&result))
        .last()
        .unwrap_or_else(|| panic!("the answer names no new process: {result}"))
}

/// The process's exit status, if it exits within `limit`.
async fn exit_within(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The memory settings an operator counts on for thousands of idle shoppers: the serving
/// process is out of transparent huge pages (with them, every 2 MiB stretch the heap
/// touches is resident) and has its thread that hands freed memory back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_process_keeps_its_idle_memory_small() {
    let blade = blades(1, Duration::ZERO).await;
    let surge = Surge::start(&[blade[0].addr]);
    surge.wait_serving().await;
    let pid = surge.first.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "huge pages not refused:\n{status}");
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    assert!(
        threads.iter().any(|t| t == "surge-purge"),
        "no purge thread among {threads:?}"
    );
}
