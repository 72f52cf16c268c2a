//! Bare-metal-as-a-service providers: order, watch and release servers ("devices").
//!
//! Owns: the vendor-neutral [`Provider`] trait, the device lifecycle every vendor's states
//! map onto, typed errors, and the vendor clients (`scaleway`). Must not: know about the
//! pool (the autoscaler turns ready devices into backends).

pub mod http;
pub mod maas;
pub mod scaleway;

use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// Where a device is in its life, whatever the vendor calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceState {
    /// Ordered; the vendor has not started on it.
    Requested,
    /// Hardware being delivered.
    Provisioning,
    /// Operating system being installed.
    Installing,
    /// Delivered and installed: usable.
    Ready,
    /// The order or the install failed; the device should be deleted.
    Failed,
    /// Being released.
    Deleting,
    /// Released (the vendor no longer knows it).
    Gone,
}

/// Stock of an offer in a zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stock {
    Empty,
    Low,
    Available,
}

/// Something a provider sells.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    pub id: String,
    pub name: String,
    pub stock: Stock,
    /// Price per hour in the vendor's currency, if it says.
    pub price_per_hour: Option<f64>,
}

/// One server at a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub id: String,
    pub name: String,
    pub state: DeviceState,
    /// The vendor's own status words, for messages (`ready/completed`).
    pub vendor_status: String,
    /// First public IPv4 address (else IPv6), once the vendor has assigned one.
    pub address: Option<IpAddr>,
    pub tags: Vec<String>,
    pub zone: String,
    pub offer_id: String,
    /// When the vendor created it (billing starts here), if it says.
    pub created_at: Option<SystemTime>,
}

/// Every device carrying a tag, and whether the answer can be trusted to be all of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listing {
    /// Deduplicated by id (a page repeated while the list changed).
    pub devices: Vec<Device>,
    /// False when a page was missing or short, or `total_count` was missing or changed
    /// between pages: servers may be missing from `devices`.
    pub complete: bool,
}

impl Device {
    /// The value of tag `key=value` on this device.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find_map(|t| t.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }
}

/// What to order.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub offer_id: String,
    pub name: String,
    /// Pool the device will serve; becomes tag `surge-pool=<pool>`.
    pub pool: String,
    /// Unique per order; becomes tag `surge-request=<id>`, so that a retried order whose
    /// first answer was lost finds the server it already ordered instead of ordering again.
    pub request_id: String,
    /// Cloud-init user-data run at first boot (rendered for this server).
    pub user_data: Option<String>,
    /// The vendor's ids of the SSH keys to install.
    pub ssh_key_ids: Vec<String>,
    /// Private network to attach the server to (surge reaches it there).
    pub private_network: Option<String>,
}

/// Tag naming the pool a device belongs to.
pub const POOL_TAG: &str = "surge-pool";
/// Tag naming the order that created a device.
pub const REQUEST_TAG: &str = "surge-request";

/// What went wrong talking to a provider.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    #[error("rate limited by the provider; retry after {retry_after:?}")]
    RateLimited { retry_after: Duration },
    #[error("out of stock: {0}")]
    OutOfStock(String),
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    #[error("the provider refused our credentials: {0}")]
    Unauthorized(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("the provider refused the request: {0}")]
    Invalid(String),
    /// Worth retrying: a connection that could not be opened, a 5xx to a call that
    /// changes nothing or may be repeated.
    #[error("transient provider failure: {0}")]
    Transient(String),
    /// The call was sent and may have taken effect: its answer was lost (timed out,
    /// connection broken), or was a 5xx or unreadable for an order. Retried for reads
    /// and deletes; an order is looked up by its request tag instead of being sent again.
    #[error("answer lost, outcome unknown: {0}")]
    Uncertain(String),
    /// The vendor answered with a redirect, which surge never follows (the secret key
    /// would go with it).
    #[error("the provider redirected {0}; surge follows no redirects (check provider.api_url)")]
    Redirected(String),
    /// The call was not sent: the caller may not write now (in a cluster, this instance
    /// does not lead). Nothing changed at the provider.
    #[error("not sent: {0}")]
    Held(String),
}

impl ProviderError {
    /// A short name of the kind of error, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::OutOfStock(_) => "out_of_stock",
            ProviderError::QuotaExceeded(_) => "quota_exceeded",
            ProviderError::Unauthorized(_) => "unauthorized",
            ProviderError::NotFound(_) => "not_found",
            ProviderError::Invalid(_) => "invalid",
            ProviderError::Transient(_) => "transient",
            ProviderError::Uncertain(_) => "uncertain",
            ProviderError::Redirected(_) => "redirected",
            ProviderError::Held(_) => "held",
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. }
                | ProviderError::Transient(_)
                | ProviderError::Uncertain(_)
        )
    }
}

/// A bare-metal provider. Calls are retried inside the implementation where that is safe;
/// an error returned here is final for this call.
pub trait Provider: Send + Sync {
    /// Offers with their stock.
    fn offers(&self) -> impl Future<Output = Result<Vec<Offer>, ProviderError>> + Send;
    /// Orders a server; never orders twice for one `spec.request_id`: attempts repeat
    /// only after an error that says the vendor did not take the order (see [`order`]).
    /// `Uncertain`: it may stand, and its server will show under its request tag.
    fn create(
        &self,
        spec: &CreateSpec,
    ) -> impl Future<Output = Result<Device, ProviderError>> + Send
    where
        Self: Sized,
    {
        order(self, spec, || std::future::ready(Ok(())))
    }
    /// One attempt at an order. `again`: an earlier attempt failed in a way that says it
    /// was not taken (looking for it first costs one listing and guards the rest). An
    /// answer that may mean the order was taken (a 5xx, a timeout, a reset, an unreadable
    /// success) is `Uncertain` after one look-up by the request tag, never a retry.
    fn order_once(
        &self,
        spec: &CreateSpec,
        again: bool,
    ) -> impl Future<Output = Result<Device, ProviderError>> + Send;
    /// How this client retries (attempts and back-off).
    fn retry(&self) -> http::Retry;
    fn get(&self, id: &str) -> impl Future<Output = Result<Device, ProviderError>> + Send;
    /// Every device carrying `tag` (`key=value`), across all pages.
    fn list(&self, tag: &str) -> impl Future<Output = Result<Vec<Device>, ProviderError>> + Send;
    /// [`Provider::list`], saying whether the answer is complete (the reconciler trusts
    /// only complete listings to remove anything). An empty `tag`: every server.
    fn inventory(&self, tag: &str) -> impl Future<Output = Result<Listing, ProviderError>> + Send;
    /// Releases a server. Releasing one that is already gone is not an error.
    fn delete(&self, id: &str) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Attaches the server to private network `network` (attaching it again is not an
    /// error).
    fn attach(
        &self,
        id: &str,
        network: &str,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// The server's address in private network `network`, once it has one.
    fn private_address(
        &self,
        id: &str,
        network: &str,
    ) -> impl Future<Output = Result<Option<IpAddr>, ProviderError>> + Send;
}

/// Orders `spec` from `provider`: [`Provider::order_once`] again while an error says
/// the order was not taken and attempts are left, with `may_write` (in a cluster, the
/// leadership fence) checked before every attempt.
pub async fn order<P, F, Fut>(
    provider: &P,
    spec: &CreateSpec,
    may_write: F,
) -> Result<Device, ProviderError>
where
    P: Provider,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), ProviderError>>,
{
    let retry = provider.retry();
    let mut attempt = 0;
    loop {
        may_write().await?;
        match provider.order_once(spec, attempt > 0).await {
            Err(e) if not_taken(&e) && attempt + 1 < retry.max_attempts => {
                tracing::debug!(request = %spec.request_id, error = %e, "order not taken; trying again");
                tokio::time::sleep(retry.wait_for(attempt, &e)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Whether an order's error says the vendor did not take it, and a retry may succeed:
/// rate-limited, or never reached it.
fn not_taken(e: &ProviderError) -> bool {
    matches!(
        e,
        ProviderError::RateLimited { .. } | ProviderError::Transient(_)
    )
}

/// Exponential back-off with full jitter: attempt `n` (0-based) waits a random time up to
/// `base × 2^n`, capped at `max`; a server's `Retry-After` is a floor.
pub fn backoff(
    attempt: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(max);
    let jittered = ceiling.mul_f64(fastrand::f64());
    match retry_after {
        Some(floor) => jittered.max(floor),
        None => jittered,
    }
}

/// A fresh random id for [`CreateSpec::request_id`] (UUID v4 layout).
pub fn new_request_id() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 0..20 {
            let d = backoff(attempt, base, max, None);
            assert!(d <= max);
            assert!(d <= base * 2u32.pow(attempt.min(5)));
        }
        let floor = Duration::from_secs(3);
        assert!(backoff(0, base, max, Some(floor)) >= floor);
    }

    #[test]
    fn request_ids_look_like_uuids_and_differ() {
        let a = new_request_id();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, new_request_id());
    }

    #[test]
    fn tags_are_read_by_key() {
        let d = Device {
            id: "1".into(),
            name: "n".into(),
            state: DeviceState::Ready,
            vendor_status: "ready".into(),
            address: None,
            tags: vec!["surge-pool=shop".into(), "surge-request=abc".into()],
            zone: "fr-par-2".into(),
            offer_id: "o".into(),
            created_at: None,
        };
        assert_eq!(d.tag(POOL_TAG), Some("shop"));
        assert_eq!(d.tag(REQUEST_TAG), Some("abc"));
        assert_eq!(d.tag("surge"), None);
    }
}
