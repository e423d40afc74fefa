//! The gRPC server every service runs: its own services plus
//! `grpc.health.v1` and server reflection (v1 and v1alpha, since some
//! grpcurl builds only speak v1alpha), shut down gracefully on cancel.

use std::time::Duration;

use redmesh_store::{MetaError, StoreError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;
pub use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// gRPC server failures.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// Binding the listen address failed.
    #[error("cannot listen for gRPC on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Reflection could not load the descriptors (a build problem).
    #[error("gRPC reflection set-up failed: {0}")]
    Reflection(String),
    /// The server failed while running.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The gRPC status for a failed metadata operation: domain refusals keep
/// their code (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION…), an
/// unreachable store is UNAVAILABLE, lost races are ABORTED (retry).
pub fn meta_status(e: MetaError) -> tonic::Status {
    match e {
        MetaError::Model(m) => redmesh_api::convert::status_of(&m),
        MetaError::Store(StoreError::Unavailable(msg)) => tonic::Status::unavailable(msg),
        MetaError::Store(other) => tonic::Status::internal(other.to_string()),
        MetaError::Contention(_) | MetaError::GuardFailed(_) => {
            tonic::Status::aborted(e.to_string())
        }
    }
}

/// Binds a listener, naming the address on failure.
pub async fn bind(addr: &str) -> Result<TcpListener, GrpcError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GrpcError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

/// Adds health and reflection to `routes`, marks `services` (full names such
/// as `redmesh.v1.Broker`) SERVING, and returns the health reporter so the
/// caller can flip them when its dependencies fail.
pub async fn with_health_and_reflection(
    routes: &mut RoutesBuilder,
    services: &[&str],
) -> Result<HealthReporter, GrpcError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in services {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    // List only what this server serves; the descriptor set holds the whole
    // API, and listing services that answer UNIMPLEMENTED would mislead.
    let reflection = || {
        services.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(redmesh_api::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health"),
            |b, name| b.with_service_name(*name),
        )
    };
    let v1 = reflection()
        .build_v1()
        .map_err(|e| GrpcError::Reflection(e.to_string()))?;
    let v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| GrpcError::Reflection(e.to_string()))?;
    routes
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha);
    Ok(reporter)
}

/// Sets the server's overall health (service ""): SERVING, or NOT_SERVING
/// when it cannot do its job though it answers.
pub async fn set_serving(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
}

/// Serves `routes` on `listener` until `shutdown` is cancelled, then stops
/// accepting and waits for in-flight calls (streams end on the same token).
pub async fn serve(
    listener: TcpListener,
    routes: RoutesBuilder,
    reporter: Option<HealthReporter>,
    shutdown: CancellationToken,
) -> Result<(), GrpcError> {
    let stop = shutdown.clone();
    let drain = async move {
        stop.cancelled().await;
        if let Some(r) = reporter {
            // Probes should see NOT_SERVING while we drain.
            r.set_service_status("", ServingStatus::NotServing).await;
        }
    };
    // The builder's tcp_nodelay only applies to sockets tonic binds itself;
    // accepted sockets need it here, or Nagle delays every small response
    // by the peer's delayed-ACK timer (~40 ms).
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .layer(crate::grpc_metrics::GrpcMetricsLayer)
        // Inside the metrics layer, so refused calls count as Unauthenticated.
        .layer(crate::auth::RequireTokenLayer)
        .add_routes(routes.routes());
    // The TLS listener is ours, not tonic's, so that a renewed certificate
    // is used without a restart (crate::tls).
    match crate::tls::incoming(listener) {
        Ok(tls) => router.serve_with_incoming_shutdown(tls, drain).await?,
        Err(listener) => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, drain).await?
        }
    }
    Ok(())
}
