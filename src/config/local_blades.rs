//! `[local_blades]`: sample shop frontends the process starts itself on loopback (the
//! demo default).

use std::time::Duration;

use serde::Deserialize;

use super::Problems;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLocalBlades {
    count: usize,
    #[serde(default, with = "humantime_serde")]
    latency: Duration,
    #[serde(default)]
    cpu_work: u32,
}

/// Demo frontends started in-process.
#[derive(Debug, Clone)]
pub struct LocalBlades {
    pub count: usize,
    /// Added service time per request.
    pub latency: Duration,
    /// Rounds of hashing per request, to cost CPU like a real frontend.
    pub cpu_work: u32,
}

/// Most demo blades one process starts.
const MAX_LOCAL_BLADES: usize = 64;

/// Checks `[local_blades]` (keys relative to it).
pub(super) fn validate(f: &FileLocalBlades, p: &mut Problems) -> LocalBlades {
    if f.count > MAX_LOCAL_BLADES {
        p.bad(
            "count",
            format!("{} is more than {MAX_LOCAL_BLADES}", f.count),
        );
    }
    LocalBlades {
        count: f.count,
        latency: f.latency,
        cpu_work: f.cpu_work,
    }
}
