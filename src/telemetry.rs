//! Logging and metrics plumbing: the `tracing` subscriber (with the per-request access log
//! on target `surge::access`) and the names of the metrics surge records.
//!
//! Owns: where log lines go and how they look. Must not: decide anything.

use tracing_appender::non_blocking::WorkerGuard;

use crate::config::AccessLogFormat;
use tracing_subscriber::EnvFilter;

/// Metric names, in one place so the exporter, dashboards and tests agree.
pub mod names {
    /// Counter, labels `backend`, `code_class` (`2xx`...`5xx`).
    pub const REQUESTS_TOTAL: &str = "surge_requests_total";
    /// Histogram of seconds from request received to response head sent, label `backend`.
    pub const REQUEST_DURATION: &str = "surge_request_duration_seconds";
    /// Counter of shopper connections accepted.
    pub const CONNECTIONS_ACCEPTED: &str = "surge_connections_accepted_total";
    /// Counter of requests refused before reaching a backend, label `reason` (`rate`,
    /// `uri_too_long`, `too_many_headers`, `body_too_large`, `body_timeout`, `bad_body`).
    pub const REQUESTS_REFUSED: &str = "surge_requests_refused_total";
    /// Counter of response bodies cut for making no progress for
    /// `proxy.body_idle_timeout`, label `side` (`backend`: it stopped sending; `client`:
    /// the shopper stopped reading).
    pub const BODIES_STALLED: &str = "surge_bodies_stalled_total";
    /// Counter of connections refused at accept, label `reason` (`global`, `per_ip`,
    /// `connection_rate`, `untrusted_proxy`, `proxy_header`).
    pub const CONNECTIONS_REFUSED: &str = "surge_connections_refused_total";
    /// Counter of TLS handshakes that failed or timed out.
    pub const TLS_HANDSHAKE_FAILURES: &str = "surge_tls_handshake_failures_total";
    /// Counter of certificate reloads, label `result` (`ok`, `refused`).
    pub const TLS_RELOADS: &str = "surge_tls_reloads_total";
    /// Gauge of requests in flight, label `backend`.
    pub const BACKEND_IN_FLIGHT: &str = "surge_backend_in_flight";
    /// Counter of responses surge made itself, label `code` (502, 503, 504).
    pub const PROXY_ERRORS_TOTAL: &str = "surge_proxy_errors_total";
    /// Counter of requests shed with 503 under load, label `priority`.
    pub const SHED_TOTAL: &str = "surge_shed_total";
    /// Gauge of new visitors waiting in the waiting room.
    pub const WAITING_ROOM_QUEUED: &str = "surge_waiting_room_queued";
    /// Counter of visitors let in from the waiting room (or straight through it).
    pub const WAITING_ROOM_ADMITTED: &str = "surge_waiting_room_admitted_total";
    /// Gauge of pool members by `state`.
    pub const POOL_NODES: &str = "surge_pool_nodes";
    /// Gauge of the in-service nodes the autoscaler wants.
    pub const AUTOSCALER_DESIRED: &str = "surge_autoscaler_desired_nodes";
    /// Counter of autoscaler decisions, labels `direction` (`up`, `down`, `hold`) and
    /// `reason` (the policy's reason labels).
    pub const AUTOSCALER_DECISIONS: &str = "surge_autoscaler_decisions_total";
    /// Counter of rounds in which the budget held orders back.
    pub const AUTOSCALER_BUDGET_REACHED: &str = "surge_autoscaler_budget_reached_total";
    /// Counter of delivered servers not healthy by `autoscale.bootstrap_timeout`.
    pub const AUTOSCALER_BOOTSTRAP_FAILURES: &str = "surge_autoscaler_bootstrap_failures_total";
    /// Gauge: 1 while bootstraps keep failing and orders are stopped, else 0.
    pub const AUTOSCALER_BOOTSTRAP_ALARM: &str = "surge_autoscaler_bootstrap_alarm";
    /// Counter of failed server releases (retried with back-off).
    pub const AUTOSCALER_RELEASE_FAILURES: &str = "surge_autoscaler_release_failures_total";
    /// Gauge of servers provisioned (ordered and not released).
    pub const AUTOSCALER_SERVERS: &str = "surge_autoscaler_provisioned_servers";
    /// Gauge of what the provisioned servers cost per hour, in the offer's currency.
    pub const AUTOSCALER_COST_PER_HOUR: &str = "surge_autoscaler_cost_per_hour";
    /// Gauge of what the servers cost since midnight (budget time zone), started hours.
    pub const AUTOSCALER_SPENT_TODAY: &str = "surge_autoscaler_spent_today";
    /// Counter of new connections not counted for scaling: they sent no complete request,
    /// or their client address was over its share.
    pub const SCALING_CONNECTIONS_DISCOUNTED: &str = "surge_scaling_connections_discounted_total";
}

/// How often buffered histogram samples are folded into their buckets.
const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Installs the Prometheus recorder once per process and returns its handle. Call it
/// before building the pool: metric handles registered earlier stay no-ops.
pub fn prometheus() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use std::sync::OnceLock;
    static HANDLE: OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(names::REQUEST_DURATION.into()),
                    &buckets,
                )
                .ok()?;
            match builder.install_recorder() {
                Ok(h) => {
                    // Histograms buffer every sample until drained: without this, memory
                    // grows with traffic between scrapes.
                    let upkeep = h.clone();
                    let _ = std::thread::Builder::new()
                        .name("surge-metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(METRICS_UPKEEP_INTERVAL);
                            upkeep.run_upkeep();
                        });
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics exporter not installed");
                    None
                }
            }
        })
        .clone()
}

/// Installs the global subscriber. Log lines are written by a background thread so that a
/// slow terminal or disk never stalls the request path; keep the guard alive until exit so
/// the last lines are flushed. `RUST_LOG` overrides the default filter. With
/// [`AccessLogFormat::Json`] the access lines (target `surge::access`) are JSON objects,
/// one a line, on the same stream; everything else stays text.
pub fn init_logging(default_filter: &str, access: AccessLogFormat) -> WorkerGuard {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;

    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let is_access = |m: &tracing::Metadata<'_>| m.target() == ACCESS_TARGET;
    let json = access == AccessLogFormat::Json;
    let text = tracing_subscriber::fmt::layer()
        .with_writer(writer.clone())
        .with_target(true)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(tracing_subscriber::filter::filter_fn(move |m| {
            !(json && is_access(m))
        }));
    let access_json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(tracing_subscriber::filter::filter_fn(is_access))
    });
    // A second init (tests start several servers in one process) is harmless.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(access_json)
        .try_init();
    guard
}

/// The target of the per-request access log.
pub const ACCESS_TARGET: &str = "surge::access";

/// Milliseconds rounded to the microsecond, as logs and reports print them (`3.889`, not
/// `3.8892330000000004`).
pub fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_print_to_the_microsecond() {
        let d = std::time::Duration::from_nanos(3_889_233);
        assert_eq!(super::millis(d).to_string(), "3.889");
        assert_eq!(super::millis(std::time::Duration::ZERO).to_string(), "0");
    }
}
