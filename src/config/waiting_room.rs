//! `[waiting_room]`: new visitors held in line while the shop is full, instead of 503.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Environment, Problems};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileWaitingRoom {
    enabled: bool,
    #[serde(with = "humantime_serde")]
    refresh: Duration,
    #[serde(with = "humantime_serde")]
    abandon_after: Duration,
    #[serde(with = "humantime_serde")]
    ticket_ttl: Duration,
    cookie: String,
    page: Option<PathBuf>,
    held: bool,
    max_waiting: usize,
}

impl Default for FileWaitingRoom {
    fn default() -> Self {
        Self {
            enabled: true,
            refresh: Duration::from_secs(5),
            abandon_after: Duration::from_secs(30),
            ticket_ttl: Duration::from_secs(2 * 3600),
            cookie: "surge_queue".into(),
            page: None,
            held: false,
            max_waiting: 1_000_000,
        }
    }
}

/// The waiting room (needs `[pool.shed]`: it opens when newcomers would be shed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingRoomConfig {
    /// How often the waiting page reloads (and `Retry-After`).
    pub refresh: Duration,
    /// A visitor whose page has not asked for this long has left the line.
    pub abandon_after: Duration,
    /// How long a queue ticket stays valid.
    pub ticket_ttl: Duration,
    /// Cookie carrying the signed ticket.
    pub cookie: String,
    /// The page's HTML (`{{place}}`, `{{wait}}`, `{{refresh}}` replaced); the built-in
    /// one when not given.
    pub page: Option<String>,
    /// Start with the door held (a pre-queue before a sale; the admin API opens it).
    pub held: bool,
    /// Most places held at once (about 96 bytes each); beyond it a newcomer gets the
    /// 503 with `Retry-After`.
    pub max_waiting: usize,
}

/// Checks `[waiting_room]` (keys relative to it); `None` when disabled.
pub(super) fn validate(
    f: &FileWaitingRoom,
    shed: bool,
    env: &Environment,
    p: &mut Problems,
) -> Option<WaitingRoomConfig> {
    if !f.enabled {
        return None;
    }
    if !shed {
        p.bad(
            "",
            "needs [pool.shed] with max_in_flight_per_node: the room opens when newcomers would be shed",
        );
    }
    if f.refresh < Duration::from_secs(1) || f.refresh > Duration::from_secs(60) {
        p.bad("refresh", "must be between 1s and 60s");
    }
    if f.abandon_after < f.refresh * 2 {
        p.bad(
            "abandon_after",
            "must be at least twice refresh (a visitor refreshes that often)",
        );
    }
    if f.ticket_ttl < Duration::from_secs(60) || f.ticket_ttl > Duration::from_secs(24 * 3600) {
        p.bad("ticket_ttl", "must be between 1m and 24h");
    }
    if f.max_waiting == 0 || f.max_waiting > 50_000_000 {
        p.bad("max_waiting", "must be between 1 and 50000000");
    }
    if f.cookie.is_empty()
        || !f
            .cookie
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        p.bad("cookie", format!("`{}` is not a cookie name", f.cookie));
    }
    let page = f
        .page
        .as_ref()
        .and_then(|file| match (env.read_file)(file) {
            Ok(text) if text.len() <= 256 * 1024 => Some(text),
            Ok(_) => {
                p.bad("page", format!("{} is larger than 256 KiB", file.display()));
                None
            }
            Err(e) => {
                p.bad("page", format!("cannot read {}: {e}", file.display()));
                None
            }
        });
    Some(WaitingRoomConfig {
        refresh: f.refresh,
        abandon_after: f.abandon_after,
        ticket_ttl: f.ticket_ttl,
        cookie: f.cookie.clone(),
        page,
        held: f.held,
        max_waiting: f.max_waiting,
    })
}
