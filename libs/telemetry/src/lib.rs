//! Logging, tracing and metrics setup shared by every redmesh binary: one
//! call at start-up gives structured logs (`RUST_LOG`, text or JSON), a
//! Prometheus `/metrics` endpoint on the service's own port and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, OpenTelemetry spans over OTLP/gRPC.
//!
//! Libraries only emit `tracing` events and `metrics` updates; binaries
//! decide where they go, here.

use std::net::SocketAddr;
use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;

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
    /// The OTLP exporter could not be built from the environment.
    #[error("cannot set up OpenTelemetry export ({OTLP_ENDPOINT}): {0}")]
    Tracing(String),
}

/// The variable that switches span export on (OpenTelemetry's standard
/// name; the SDK also reads `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
/// `OTEL_BSP_SCHEDULE_DELAY` and the other `OTEL_*` settings).
pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Dependencies whose spans and events would only be noise in traces, or
/// would loop (the exporter's own gRPC calls).
const TRACE_FILTER: &str = "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

/// An OTLP export layer for `service` when the endpoint variable is set.
/// Must run inside a Tokio runtime (the exporter's gRPC channel lives there).
fn otlp_layer<S>(
    service: &'static str,
) -> Result<Option<impl tracing_subscriber::Layer<S>>, TelemetryError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let configured = [OTLP_ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    if !configured {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| TelemetryError::Tracing(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(format!("redmesh-{service}"))
                .build(),
        )
        .build();
    let tracer = provider.tracer("redmesh");
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    opentelemetry::global::set_tracer_provider(provider.clone());
    let _ = PROVIDER.set(provider);
    Ok(Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(EnvFilter::new(TRACE_FILTER)),
    ))
}

/// Exports the spans still buffered and stops the exporter; call once at
/// exit (a no-op when export is off).
pub async fn flush_traces() {
    if let Some(p) = PROVIDER.get() {
        // Shutting down blocks until the last batch is sent.
        let p = p.clone();
        let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
    }
}

/// For command-line tools: no log output (stdout belongs to the tool),
/// only span export when the endpoint variable is set. Call inside a Tokio
/// runtime; [`flush_traces`] before exit.
pub fn init_tracing_only(service: &'static str) -> Result<(), TelemetryError> {
    if let Some(layer) = otlp_layer(service)? {
        let _ = tracing_subscriber::registry().with(layer).try_init();
    }
    Ok(())
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
/// default filter (`info`). With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans
/// are exported too (call [`flush_traces`] before exit). Safe to call twice
/// (the second call is a no-op), which in-process tests rely on.
pub fn init_logging(service: &'static str, format: LogFormat) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Text => fmt::layer().with_target(false).with_filter(filter).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_current_span(false)
            .with_filter(filter)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(logs);
    let result = registry.with(otlp_layer(service)?).try_init();
    if result.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    }
    Ok(())
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
