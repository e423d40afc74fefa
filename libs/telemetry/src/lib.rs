//! Logging and metrics setup shared by every redmesh binary: one call at
//! start-up gives structured logs (`RUST_LOG`, text or JSON) and a
//! Prometheus `/metrics` endpoint on the service's own port.
//!
//! Libraries only emit `tracing` events and `metrics` updates; binaries
//! decide where they go, here.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

/// Telemetry set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The metrics listener could not start.
    #[error("cannot start the metrics endpoint on {addr}: {reason}")]
    Metrics {
        /// Address asked for.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the
/// default filter (`info`). Safe to call twice (the second call is a no-op),
/// which in-process tests rely on.
pub fn init_logging(service: &'static str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_current_span(false))
            .try_init(),
    };
    if result.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    }
}

/// Histogram buckets for latencies in seconds: 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Starts the Prometheus exporter serving `GET /metrics` on `addr` and
/// installs it as the global metrics recorder. Must run inside a Tokio
/// runtime. Every exported series gets the `service` label.
pub fn init_metrics(service: &'static str, addr: SocketAddr) -> Result<(), TelemetryError> {
    let err = |reason: String| TelemetryError::Metrics { addr, reason };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .add_global_label("service", service)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| err(e.to_string()))?
        .install()
        .map_err(|e| err(e.to_string()))?;
    metrics::gauge!("redmesh_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}
