//! What every vendor client does the same over HTTP: retries with back-off while an
//! error says a retry may help, `Retry-After` honoured up to a cap, redirects refused
//! (credentials would go with them), transport failures told apart (never sent vs answer
//! lost), and messages that never carry a URL (it may hold a token).

use std::future::Future;
use std::time::Duration;

use super::{backoff, ProviderError};

/// Wait when a 429 says nothing.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How a client retries.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Tries per call, the first included.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Longest `Retry-After` honoured (a vendor asking for an hour gets this).
    pub max_retry_after: Duration,
}

impl Retry {
    /// Runs `call` until it succeeds, fails for good, or the attempts are used up.
    /// `what` names the call in the debug log.
    pub async fn run<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Err(e) if e.is_retryable() && attempt + 1 < self.max_attempts => {
                    let wait = self.wait_for(attempt, &e);
                    tracing::debug!(call = what, error = %e, wait = ?wait, "provider call failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// The pause before retry `attempt` (0-based) after `e`.
    pub fn wait_for(&self, attempt: u32, e: &ProviderError) -> Duration {
        let floor = match e {
            ProviderError::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        };
        backoff(attempt, self.backoff_base, self.backoff_max, floor)
    }

    /// A 429's error: its `Retry-After` (or [`DEFAULT_RETRY_AFTER`]), capped.
    pub fn rate_limited(&self, retry_after: Option<Duration>) -> ProviderError {
        let asked = retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
        if asked > self.max_retry_after {
            tracing::warn!(
                asked = %humantime::format_duration(asked),
                honoured = %humantime::format_duration(self.max_retry_after),
                "provider asked to wait longer than provider.max_retry_after; waiting that long only"
            );
        }
        ProviderError::RateLimited {
            retry_after: asked.min(self.max_retry_after),
        }
    }
}

/// Counts one exchange with a vendor's API by its outcome
/// (`surge_provider_calls_total{provider, result}`: `ok` or the error's label) and passes
/// it on.
pub fn counted<T>(
    provider: &'static str,
    result: Result<T, ProviderError>,
) -> Result<T, ProviderError> {
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => e.label(),
    };
    metrics::counter!(crate::telemetry::names::PROVIDER_CALLS, "provider" => provider, "result" => label)
        .increment(1);
    result
}

/// A request that got no answer: `Transient` when it never reached the vendor (safe to
/// send again), `Uncertain` when it may have taken effect.
pub fn transport_error(what: &str, e: &reqwest::Error) -> ProviderError {
    let what = format!("{what}: {}", without_url(e));
    if e.is_connect() {
        ProviderError::Transient(what)
    } else {
        ProviderError::Uncertain(what)
    }
}

/// Sends `req` (named `call` in messages) and reads the whole answer: its status,
/// `Retry-After` and body. A redirect is an error; so is an answer that breaks off
/// (`Uncertain`: the call may have taken effect).
pub async fn exchange(
    call: &str,
    req: reqwest::RequestBuilder,
) -> Result<(reqwest::StatusCode, Option<Duration>, bytes::Bytes), ProviderError> {
    let resp = req.send().await.map_err(|e| transport_error(call, &e))?;
    let status = resp.status();
    let retry_after = retry_after(resp.headers());
    if let Some(e) = redirected(call, status, resp.headers()) {
        return Err(e);
    }
    let body = resp.bytes().await.map_err(|e| {
        ProviderError::Uncertain(format!("{call}: reading the answer: {}", without_url(&e)))
    })?;
    Ok((status, retry_after, body))
}

/// The `Retry-After` of an answer, in seconds (the HTTP-date form is not used by these
/// vendors).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The error for a redirect (never followed), if the answer is one.
pub fn redirected(
    what: &str,
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> Option<ProviderError> {
    status.is_redirection().then(|| {
        let to = headers
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?");
        ProviderError::Redirected(format!("{what} with {} to {to}", status.as_u16()))
    })
}

/// reqwest's errors carry the URL (a query may hold a secret); ours name the path.
pub fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}

/// A reqwest client for a vendor API: one timeout per call, no redirects, our name.
pub fn client(call_timeout: Duration) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .timeout(call_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("surge/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ProviderError::Invalid(format!("cannot build HTTP client: {e}")))
}

/// Standard base64 with padding (RFC 4648), for the API's bytes fields.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
