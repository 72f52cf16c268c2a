//! Restarts that lose no request: a running surge hands its listening sockets to a new
//! process (a new binary, or the same one with a changed config), waits until that
//! process says it is serving, and only then stops accepting, finishes its in-flight
//! requests and exits.
//!
//! The sockets themselves travel, not their addresses: connections waiting in a
//! listen queue at the moment of the switch are accepted by the new process instead of
//! being reset, which is what binding a second `SO_REUSEPORT` socket cannot promise.
//! They travel the systemd way (`LISTEN_FDS`, descriptors from 3), so the same code
//! takes sockets from systemd socket activation too. One more descriptor, a Unix socket,
//! carries the new process's "ready".
//!
//! Sits on the top floor with `serve`. Owns: passing sockets and readiness between
//! processes. Must not: decide when to restart (signals and the admin API do).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tokio::io::AsyncReadExt;

/// Index (among the inherited descriptors) of the readiness socket.
const READY_INDEX_ENV: &str = "SURGE_READY_FD_INDEX";
/// First descriptor number of inherited sockets (systemd's convention).
const FIRST_FD: i32 = 3;
/// What the new process writes when it serves.
const READY: &[u8] = b"ready\n";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffError {
    #[error("inherited descriptor {index} is not usable: {source}")]
    Inherited {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot copy a listening socket for the new process: {0}")]
    Dup(#[source] std::io::Error),
    #[error("cannot start the new process {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("descriptors for the new process collide")]
    Collision,
    #[error("the new process exited before it was serving ({0}); this one keeps serving")]
    Exited(String),
    #[error("the new process was not serving within {0:?}; stopped it, this one keeps serving")]
    Timeout(Duration),
}

/// Sockets received from a predecessor (or from systemd), by local address.
#[derive(Debug, Default)]
pub struct Inherited {
    listeners: HashMap<SocketAddr, Vec<TcpListener>>,
    ready: Option<UnixStream>,
}

impl Inherited {
    /// Takes the descriptors named by `LISTEN_FDS`, if any. Call it before any thread
    /// starts: it clears those variables from the environment.
    pub fn from_env() -> Result<Self, HandoffError> {
        let ready_index: Option<usize> = std::env::var(READY_INDEX_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        std::env::remove_var(READY_INDEX_ENV);
        let mut fds = listenfd::ListenFd::from_env();
        let mut out = Inherited::default();
        for index in 0..fds.len() {
            if Some(index) == ready_index {
                out.ready = fds
                    .take_custom::<UnixStream>(index, libc::AF_UNIX, libc::SOCK_STREAM, "unix")
                    .map_err(|source| HandoffError::Inherited { index, source })?;
                continue;
            }
            let listener = fds
                .take_tcp_listener(index)
                .map_err(|source| HandoffError::Inherited { index, source })?;
            if let Some(l) = listener {
                let addr = l
                    .local_addr()
                    .map_err(|source| HandoffError::Inherited { index, source })?;
                out.listeners.entry(addr).or_default().push(l);
            }
        }
        Ok(out)
    }

    /// Every inherited socket listening on `addr` (none if the port is 0: a new one).
    pub fn take(&mut self, addr: SocketAddr) -> Vec<TcpListener> {
        self.listeners.remove(&addr).unwrap_or_default()
    }

    /// Closes the sockets inherited and not taken (the new config dropped those
    /// listeners) and returns their addresses.
    pub fn close_leftover(&mut self) -> Vec<SocketAddr> {
        self.listeners.drain().map(|(addr, _)| addr).collect()
    }

    /// Whether this process took over from a predecessor.
    pub fn from_predecessor(&self) -> bool {
        self.ready.is_some()
    }

    /// Tells the predecessor that this process serves; it then stops accepting.
    pub fn ready(&mut self) {
        if let Some(mut s) = self.ready.take() {
            if let Err(e) = s.write_all(READY) {
                tracing::warn!(error = %e, "could not tell the previous process we are ready");
            }
        }
    }
}

/// How to start the next process: the path this binary was started as (a new binary
/// installed at that path, or a `current -> release-N` symlink moved, is what an upgrade
/// runs) and the same arguments.
#[derive(Debug, Clone)]
pub struct Successor {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    /// How long the new process may take to serve before the switch is called off.
    pub ready_timeout: Duration,
}

/// The path this process was started as (`argv[0]`), not what it resolves to: `exe`
/// (`current_exe`) follows symlinks, so a `current -> release-N` layout would re-run the
/// old release. A bare name was found on `PATH` and is looked up there again at upgrade.
/// `None` when `argv[0]` names nothing that exists (then `current_exe` is used).
fn started_as() -> Option<PathBuf> {
    let argv0 = PathBuf::from(std::env::args_os().next()?);
    if argv0.components().count() > 1 {
        return argv0.exists().then_some(argv0);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .any(|dir| dir.join(&argv0).is_file())
        .then_some(argv0)
}

impl Successor {
    /// The running process's own command line.
    pub fn of_this_process(ready_timeout: Duration) -> Option<Self> {
        Some(Self {
            exe: started_as().or_else(|| std::env::current_exe().ok())?,
            args: std::env::args_os().skip(1).collect(),
            ready_timeout,
        })
    }

    /// Starts the new process with copies of `sockets` and waits until it serves.
    /// Returns it, for the caller to watch it a while (see [`watch`]). On any failure the
    /// new process is stopped and the caller keeps serving; the sockets are never closed
    /// under the caller.
    pub async fn start(
        &self,
        sockets: &[TcpListener],
    ) -> Result<std::process::Child, HandoffError> {
        let mut mappings = Vec::with_capacity(sockets.len() + 1);
        for (i, s) in sockets.iter().enumerate() {
            let copy = s.try_clone().map_err(HandoffError::Dup)?;
            mappings.push(FdMapping {
                parent_fd: OwnedFd::from(copy),
                child_fd: FIRST_FD + fd_offset(i),
            });
        }
        let (ours, theirs) = UnixStream::pair().map_err(HandoffError::Dup)?;
        mappings.push(FdMapping {
            parent_fd: OwnedFd::from(theirs),
            child_fd: FIRST_FD + fd_offset(sockets.len()),
        });
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.args(&self.args)
            .env("LISTEN_FDS", (sockets.len() + 1).to_string())
            .env(READY_INDEX_ENV, sockets.len().to_string())
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS_FIRST_FD");
        cmd.fd_mappings(mappings)
            .map_err(|_| HandoffError::Collision)?;
        let spawned = cmd.spawn();
        // Our copies of the child's descriptors close here, so a child that dies closes
        // the readiness socket's last other end and we read end-of-file.
        drop(cmd);
        let child = spawned.map_err(|source| HandoffError::Spawn {
            exe: self.exe.clone(),
            source,
        })?;
        // Until it says ready, the new process is stopped if this wait is given up for any
        // reason, including this future being dropped (SIGTERM during a hand-over).
        let mut pending = Pending(Some(child));
        let waited = tokio::time::timeout(self.ready_timeout, read_ready(ours)).await;
        let failure = match waited {
            Ok(Ok(true)) => {
                if let Some(child) = pending.0.take() {
                    return Ok(child);
                }
                HandoffError::Exited("unknown".into())
            }
            Ok(Ok(false)) => match pending.0.as_mut() {
                Some(child) => HandoffError::Exited(exit_status(child)),
                None => HandoffError::Exited("unknown".into()),
            },
            Ok(Err(e)) => HandoffError::Exited(e.to_string()),
            Err(_) => HandoffError::Timeout(self.ready_timeout),
        };
        Err(failure)
    }
}

/// Watches a new process that said it serves for `probation`: `Some(how it ended)` if
/// it exited within it (the caller serves again on the sockets it kept), `None` if it
/// is still running at the end. Polls: the child is this process's, and a wait that
/// blocks would hold a runtime thread.
pub async fn watch(child: &mut std::process::Child, probation: Duration) -> Option<String> {
    let until = tokio::time::Instant::now() + probation;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status.to_string()),
            Ok(None) => {}
            Err(e) => return Some(format!("cannot be watched: {e}")),
        }
        if tokio::time::Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

/// How often [`watch`] looks at the new process.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// A new process that has not said ready yet: killed (and reaped) when dropped.
struct Pending(Option<std::process::Child>);

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn fd_offset(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX - FIRST_FD)
}

/// Whether the other end said "ready" before closing.
async fn read_ready(ours: UnixStream) -> std::io::Result<bool> {
    ours.set_nonblocking(true)?;
    let mut s = tokio::net::UnixStream::from_std(ours)?;
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(false);
        }
        got.extend_from_slice(&buf[..n]);
        if got.starts_with(READY) {
            return Ok(true);
        }
    }
}

fn exit_status(child: &mut std::process::Child) -> String {
    // It closed the socket; give it a moment to finish exiting so the status is known.
    for _ in 0..20 {
        if let Ok(Some(status)) = child.try_wait() {
            return status.to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    "closed the readiness socket without saying ready".into()
}
