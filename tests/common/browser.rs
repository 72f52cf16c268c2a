//! Headless Chromium (Debian's `chromium`, which `.ci/run` installs) driven over the
//! DevTools protocol: a page is opened, scripts are evaluated in it, and its DOM read, as
//! a user's browser would show it. The browser runs in a process group of its own and is
//! killed by that PID when dropped, whatever the test did.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Browser {
    child: Child,
    socket: Socket,
    next_id: u64,
    _profile: PathBuf,
}

/// The Chromium binary, or a failure naming the package.
pub fn chromium() -> &'static str {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok())
        .expect("headless Chromium is needed (apt-get install chromium; .ci/run does)")
}

impl Browser {
    /// Starts Chromium on `url` and connects to that page.
    pub async fn open(url: &str) -> Browser {
        use std::os::unix::process::CommandExt as _;
        let profile = std::env::temp_dir().join(format!("surge-chromium-{}", fastrand::u64(..)));
        let child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1200,1400",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromium starts");
        // Chromium writes the port it chose into the profile.
        let port_file = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "chromium did not open DevTools");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut browser_guard = Guard(Some(child));
        let ws_url = loop {
            let list = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
                .await
                .ok()
                .map(|r| r.json::<serde_json::Value>());
            if let Some(list) = list {
                if let Ok(list) = list.await {
                    let page = list.as_array().into_iter().flatten().find(|t| {
                        t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url))
                    });
                    if let Some(ws) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
                        break ws.to_owned();
                    }
                }
            }
            assert!(Instant::now() < deadline, "no page target for {url}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("DevTools connection");
        Browser {
            child: browser_guard.0.take().expect("the child"),
            socket,
            next_id: 1,
            _profile: profile,
        }
    }

    /// Sends one DevTools command and returns its `result`, waiting at most `within`.
    async fn call(
        &mut self,
        method: &str,
        params: serde_json::Value,
        within: Duration,
    ) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let call = serde_json::json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::text(call.to_string()))
            .await
            .expect("DevTools send");
        let answer = tokio::time::timeout(within, async {
            while let Some(Ok(msg)) = self.socket.next().await {
                let Ok(text) = msg.to_text() else { continue };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
                    continue;
                };
                if v["id"] == id {
                    return v;
                }
            }
            serde_json::Value::Null
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools did not answer {method} within {within:?}"));
        answer["result"].clone()
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, expression: &str) -> serde_json::Value {
        let params = serde_json::json!(
            {"expression": expression, "returnByValue": true, "awaitPromise": true}
        );
        self.call("Runtime.evaluate", params, Duration::from_secs(10))
            .await["result"]["value"]
            .clone()
    }

    /// Waits until `expression` is true in the page; false after `within`.
    pub async fn wait_for(&mut self, expression: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.eval(expression).await == serde_json::Value::Bool(true) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// A PNG screenshot of the page.
    pub async fn screenshot(&mut self) -> Vec<u8> {
        let params = serde_json::json!({"format": "png"});
        let shot = self
            .call("Page.captureScreenshot", params, Duration::from_secs(20))
            .await;
        base64_decode(shot["data"].as_str().unwrap_or_default())
    }
}

/// Kills a browser that never got as far as a [`Browser`].
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            kill_group(c);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// Kills the browser's process group (its renderers with it) by the browser's PID.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with plain integers.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.wait();
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_default()
}
