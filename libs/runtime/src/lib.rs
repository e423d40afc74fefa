//! Service bootstrap shared by every redmesh binary: common command-line
//! arguments (etcd, telemetry, API token), shutdown on SIGTERM/SIGINT, the
//! gRPC server with health, reflection and token checks, reconnect backoff,
//! and the leader-election loop.
//!
//! Keeping this in one place is what makes every service answer grpcurl,
//! health probes and Prometheus the same way.

pub mod args;
pub mod auth;
pub mod backoff;
pub mod grpc;
pub mod grpc_metrics;
pub mod leading;
pub mod shutdown;
pub mod tls;
pub mod trace_context;

pub use args::{EtcdArgs, TelemetryArgs};
pub use auth::ApiTokenArgs;
pub use shutdown::shutdown_on_signals;
pub use tls::TlsArgs;
pub use tokio_util::sync::CancellationToken;
