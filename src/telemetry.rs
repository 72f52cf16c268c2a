//! Logging and metrics plumbing: the `tracing` subscriber (with the per-request access log
//! on target `surge::access`) and the names of the metrics surge records.
//!
//! Owns: where log lines go and how they look. Must not: decide anything.

use std::sync::atomic::{AtomicU64, Ordering};
use tracing_appender::non_blocking::WorkerGuard;

use crate::config::AccessLogFormat;
use tracing_subscriber::EnvFilter;

/// Metric names, in one place so the exporter, dashboards and tests agree.
pub mod names {
    /// What kind of series a metric is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Counter,
        Gauge,
        Histogram,
    }

    /// One metric surge exports: its name, kind and the `# HELP` line.
    #[derive(Debug, Clone, Copy)]
    pub struct Metric {
        pub name: &'static str,
        pub kind: Kind,
        pub help: &'static str,
    }

    macro_rules! metrics_table {
        ($($(#[$doc:meta])* $konst:ident = $name:literal, $kind:ident, $help:literal;)*) => {
            $($(#[$doc])* pub const $konst: &str = $name;)*
            /// Every metric surge exports (dashboards and alert rules may use only these).
            pub const ALL: &[Metric] = &[$(Metric { name: $name, kind: Kind::$kind, help: $help }),*];
        };
    }

    metrics_table! {
        /// Labels `backend`, `code_class` (`2xx`...`5xx`).
        REQUESTS_TOTAL = "surge_requests_total", Counter,
            "Requests answered through a backend, by backend and status class.";
        /// Label `backend`.
        REQUEST_DURATION = "surge_request_duration_seconds", Histogram,
            "Seconds from request received to response head sent, by backend.";
        CONNECTIONS_ACCEPTED = "surge_connections_accepted_total", Counter,
            "Shopper connections accepted.";
        /// Label `reason` (`rate`, `uri_too_long`, `too_many_headers`, `body_too_large`,
        /// `body_timeout`, `bad_body`, ...).
        REQUESTS_REFUSED = "surge_requests_refused_total", Counter,
            "Requests refused before reaching a backend, by reason.";
        /// Label `side` (`backend`: it stopped sending; `client`: the shopper stopped
        /// reading).
        BODIES_STALLED = "surge_bodies_stalled_total", Counter,
            "Response bodies cut after proxy.body_idle_timeout without progress, by the side that stalled.";
        /// Label `reason` (`global`, `per_ip`, `connection_rate`, `untrusted_proxy`,
        /// `proxy_header`).
        CONNECTIONS_REFUSED = "surge_connections_refused_total", Counter,
            "Connections refused at accept, by reason.";
        TLS_HANDSHAKE_FAILURES = "surge_tls_handshake_failures_total", Counter,
            "TLS handshakes that failed or timed out.";
        TUNNELS_TOTAL = "surge_tunnels_total", Counter,
            "Upgraded connections (WebSocket and the like) tunnelled to a blade after a 101.";
        /// Label `result` (`ok`, `refused`).
        TLS_RELOADS = "surge_tls_reloads_total", Counter,
            "Certificate reloads, by result.";
        /// Label `certificate` (the file).
        TLS_CERTIFICATE_EXPIRY = "surge_tls_certificate_expiry_timestamp_seconds", Gauge,
            "When each serving certificate expires, in Unix seconds.";
        /// Label `backend`.
        BACKEND_IN_FLIGHT = "surge_backend_in_flight", Gauge,
            "Requests in flight, by backend.";
        /// Label `code` (502, 503, 504).
        PROXY_ERRORS_TOTAL = "surge_proxy_errors_total", Counter,
            "Responses surge made itself (502, 503, 504), by code.";
        /// Labels `priority`, `class`.
        SHED_TOTAL = "surge_shed_total", Counter,
            "Requests shed with 503 under load, by priority and session class.";
        WAITING_ROOM_QUEUED = "surge_waiting_room_queued", Gauge,
            "New visitors waiting in the waiting room.";
        WAITING_ROOM_ADMITTED = "surge_waiting_room_admitted_total", Counter,
            "Visitors let in from the waiting room.";
        /// Label `state`.
        POOL_NODES = "surge_pool_nodes", Gauge,
            "Pool members, by state.";
        AUTOSCALER_DESIRED = "surge_autoscaler_desired_nodes", Gauge,
            "In-service nodes the autoscaler wants.";
        AUTOSCALER_MIN = "surge_autoscaler_min_nodes", Gauge,
            "The autoscaler's floor now (autoscale.min, raised by a scheduled sale).";
        AUTOSCALER_MAX = "surge_autoscaler_max_nodes", Gauge,
            "The autoscaler's ceiling (autoscale.max).";
        /// Labels `direction` (`up`, `down`, `hold`) and `reason`.
        AUTOSCALER_DECISIONS = "surge_autoscaler_decisions_total", Counter,
            "Autoscaler decisions, by direction and reason.";
        AUTOSCALER_BUDGET_REACHED = "surge_autoscaler_budget_reached_total", Counter,
            "Autoscaler rounds in which the budget held orders back.";
        AUTOSCALER_BOOTSTRAP_FAILURES = "surge_autoscaler_bootstrap_failures_total", Counter,
            "Delivered servers not healthy by autoscale.bootstrap_timeout.";
        AUTOSCALER_BOOTSTRAP_ALARM = "surge_autoscaler_bootstrap_alarm", Gauge,
            "1 while bootstraps keep failing and orders are stopped, else 0.";
        AUTOSCALER_RELEASE_FAILURES = "surge_autoscaler_release_failures_total", Counter,
            "Failed server releases (retried with back-off).";
        AUTOSCALER_SERVERS = "surge_autoscaler_provisioned_servers", Gauge,
            "Servers provisioned (ordered and not released).";
        AUTOSCALER_COST_PER_HOUR = "surge_autoscaler_cost_per_hour", Gauge,
            "What the provisioned servers cost per hour, in the offer's currency.";
        AUTOSCALER_SPENT_TODAY = "surge_autoscaler_spent_today", Gauge,
            "What the servers cost since midnight (budget time zone), in started hours.";
        SCALING_CONNECTIONS_DISCOUNTED = "surge_scaling_connections_discounted_total", Counter,
            "New connections not counted for scaling (no complete request, or the client over its share).";
        /// Labels `provider` (`scaleway`, `maas`), `result` (`ok` or the error's kind).
        PROVIDER_CALLS = "surge_provider_calls_total", Counter,
            "Calls to the bare-metal provider's API, by provider and result.";
        CLUSTER_LEADER = "surge_cluster_leader", Gauge,
            "1 while this instance leads its cluster, else 0.";
    }
}

/// Gives every metric its `# HELP` line (Prometheus' conventions; `promtool check
/// metrics` asks for it).
fn describe() {
    use names::Kind;
    for m in names::ALL {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => {
                metrics::describe_histogram!(m.name, metrics::Unit::Seconds, m.help)
            }
        }
    }
}

/// Upper bounds (seconds) of `surge_request_duration_seconds`' buckets.
pub const REQUEST_DURATION_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// `surge_request_duration_seconds` of one backend, counted in atomics and written out
/// at scrape time ([`render_durations`]). The exporter's own histograms buffer every
/// sample in blocks allocated as they fill (one allocation per 32 requests, and the
/// upkeep thread's work); a request here costs two atomic additions and nothing else.
#[derive(Debug, Default)]
pub struct DurationHistogram {
    /// Per bucket (not cumulative), the last one past the largest bound.
    counts: [AtomicU64; REQUEST_DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    /// Counts one request of `seconds`.
    pub fn record(&self, seconds: f64) {
        let i = REQUEST_DURATION_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(REQUEST_DURATION_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }
}

/// Appends `surge_request_duration_seconds` for `series` (backend id, histogram) in the
/// Prometheus text format, cumulative buckets as the format wants.
pub fn render_durations<'a>(
    out: &mut String,
    series: impl IntoIterator<Item = (&'a str, &'a DurationHistogram)>,
) {
    use std::fmt::Write;
    let name = names::REQUEST_DURATION;
    let help = names::ALL
        .iter()
        .find(|m| m.name == name)
        .map_or("", |m| m.help);
    let mut header = false;
    for (backend, h) in series {
        if !header {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            header = true;
        }
        let backend = backend.replace('\\', "\\\\").replace('"', "\\\"");
        let mut total = 0u64;
        for (i, c) in h.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            match REQUEST_DURATION_BUCKETS.get(i) {
                Some(le) => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{backend=\"{backend}\",le=\"{le}\"}} {total}"
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{backend=\"{backend}\",le=\"+Inf\"}} {total}"
                    );
                }
            }
        }
        let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{backend=\"{backend}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{backend=\"{backend}\"}} {total}");
    }
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
            // `surge_request_duration_seconds` is surge's own ([`DurationHistogram`]).
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
            match builder.install_recorder() {
                Ok(h) => {
                    describe();
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
    fn request_durations_are_written_as_cumulative_buckets() {
        let h = super::DurationHistogram::default();
        for s in [0.0005, 0.002, 0.002, 0.3, 42.0] {
            h.record(s);
        }
        let mut out = String::new();
        super::render_durations(&mut out, [("blade-1", &h)]);
        let line = |le: &str| {
            out.lines()
                .find(|l| l.contains(&format!("le=\"{le}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(line("0.001").as_deref(), Some("1"));
        assert_eq!(line("0.0025").as_deref(), Some("3"));
        assert_eq!(line("0.25").as_deref(), Some("3"));
        assert_eq!(line("0.5").as_deref(), Some("4"));
        assert_eq!(line("10").as_deref(), Some("4"));
        assert_eq!(line("+Inf").as_deref(), Some("5"));
        assert!(out.contains("surge_request_duration_seconds_count{backend=\"blade-1\"} 5"));
        assert!(out.starts_with("# HELP surge_request_duration_seconds "));
        // No backend, no family at all.
        let mut empty = String::new();
        super::render_durations(&mut empty, []);
        assert!(empty.is_empty());
    }

    #[test]
    fn metric_names_follow_the_exposition_conventions() {
        use super::names::{Kind, ALL};
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("surge_"), "{}", m.name);
            assert!(
                m.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                m.name
            );
            if m.kind == Kind::Histogram {
                assert!(m.name.ends_with("_seconds"), "{}: base unit", m.name);
            }
            assert!(m.help.ends_with('.') && m.help.len() > 10, "{}", m.name);
        }
    }

    #[test]
    fn durations_print_to_the_microsecond() {
        let d = std::time::Duration::from_nanos(3_889_233);
        assert_eq!(super::millis(d).to_string(), "3.889");
        assert_eq!(super::millis(std::time::Duration::ZERO).to_string(), "0");
    }
}
