//! The systemd notification protocol (`sd_notify` over `NOTIFY_SOCKET`), so that a
//! `Type=notify` unit knows when surge serves, follows the process that takes over after
//! a reload or an upgrade (`MAINPID=`, with `NotifyAccess=all`) instead of killing the
//! cgroup with the old one, and sees a stop coming. Without `NOTIFY_SOCKET` (not under
//! systemd) every call does nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    // The variable stays set: a successor started by a hand-over notifies too.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify");
    }
}

/// Serving. A process that took over also names itself the unit's main process.
pub fn ready(took_over: bool) {
    if took_over {
        send(&[
            NotifyState::MainPid(std::process::id()),
            NotifyState::Ready,
            NotifyState::Status("serving (took over from the previous process)"),
        ]);
    } else {
        send(&[NotifyState::Ready, NotifyState::Status("serving")]);
    }
}

/// A hand-over (reload or upgrade) started.
pub fn reloading(what: &str) {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status(what)];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// A hand-over was refused or failed: this process goes on serving.
pub fn still_serving(why: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(why)]);
}

/// Stopping (SIGTERM, Ctrl-C).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}
