//! What went wrong in an autoscaler round, as data: the status page and the log show it
//! in words, and code (tests, alerts to come) can tell one kind from another without
//! reading the words. Errors of the provider keep their type; the pool's, the ledger's
//! and etcd's travel as their messages.

use std::time::Duration;

use super::reconcile::ZoneRefusal;
use crate::provider::ProviderError;

/// One problem met in a round.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error("listing {zone}: incomplete (pages changed while read, or no total); nothing ordered or removed this round")]
    ListingIncomplete { zone: String },
    #[error("listing {zone}: {error}")]
    Listing { zone: String, error: ProviderError },
    #[error("scanning {zone} for unmanaged servers: {error}")]
    ScanUnmanaged { zone: String, error: ProviderError },
    #[error("looking up server {device_id}: {error}")]
    LookUpServer {
        device_id: String,
        error: ProviderError,
    },
    #[error("attaching server {device_id} to private network {network}: {error}")]
    Attach {
        device_id: String,
        network: String,
        error: ProviderError,
    },
    #[error("private address of server {device_id}: {error}")]
    PrivateAddress {
        device_id: String,
        error: ProviderError,
    },
    #[error("adding {id}: {error}")]
    AddNode { id: String, error: String },
    #[error("draining {id}: {error}")]
    Drain { id: String, error: String },
    #[error("server of {id} did not become healthy after its delivery (bootstrap failure {in_a_row} in a row): {error}")]
    Bootstrap {
        id: String,
        in_a_row: u32,
        error: String,
    },
    #[error("looking up order {request_id}: {error}")]
    LookUpOrder {
        request_id: String,
        error: ProviderError,
    },
    #[error("order {request_id} in {zone} got no answer and is not listed under its tag: counted as not placed, ordered again if still needed (a server that shows later is taken in as found running)")]
    OrderUnanswered { request_id: String, zone: String },
    #[error("order {request_id} in {zone} never showed up by its deadline and is not found by its tag: given up (check the provider's console)")]
    OrderNeverShowed { request_id: String, zone: String },
    #[error("{error}; not ordering without a ledger")]
    LedgerNotWritten { error: String },
    #[error("ledger to etcd: {error}; not ordering")]
    LedgerNotShared { error: String },
    #[error("{error}")]
    Ledger { error: String },
    #[error("the previous leader's ledger is unreadable: {error}")]
    LedgerNotTakenOver { error: String },
    #[error("cannot re-read the ledger: {error}")]
    LedgerNotReread { error: String },
    #[error("order {request_id}: {error}")]
    OrderHeld {
        request_id: String,
        error: ProviderError,
    },
    #[error("order {request_id} in {zone}: {error}; counted as on its way until its server shows")]
    OrderUncertain {
        request_id: String,
        zone: String,
        error: ProviderError,
    },
    #[error("{0}")]
    ZoneRefused(ZoneRefusal),
    #[error("releasing {device_id}: zone {zone} is not configured")]
    ReleaseZoneUnknown { device_id: String, zone: String },
    #[error("releasing server {device_id} ({why}) failed (attempt {attempt}): {error}; retrying in {}", humantime::format_duration(*retry_in))]
    ReleaseFailed {
        device_id: String,
        why: String,
        attempt: u32,
        error: ProviderError,
        retry_in: Duration,
    },
    #[error("{action}: {error}")]
    Follow { action: String, error: String },
    #[error("cluster: {error}; the pool is kept as it is")]
    ClusterAway { error: String },
    #[error("publishing the roles to etcd: {error}")]
    Publish { error: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_read_as_the_status_page_shows_them() {
        let failed = Problem::ReleaseFailed {
            device_id: "srv-1".into(),
            why: "scaled in".into(),
            attempt: 2,
            error: ProviderError::Transient("503 Service Unavailable".into()),
            retry_in: Duration::from_secs(90),
        };
        let words = failed.to_string();
        assert!(
            words.starts_with("releasing server srv-1 (scaled in) failed (attempt 2): ")
                && words.ends_with("; retrying in 1m 30s"),
            "{words}"
        );
        let lost = Problem::OrderUnanswered {
            request_id: "r-1".into(),
            zone: "fr-par-2".into(),
        };
        assert!(lost
            .to_string()
            .starts_with("order r-1 in fr-par-2 got no answer"));
    }
}
