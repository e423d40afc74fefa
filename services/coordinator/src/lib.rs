//! The coordinator: failure decisions, failover and replacement from the
//! pool (DESIGN.md §5). This version is a placeholder that serves health and
//! reflection only; its RPCs answer UNIMPLEMENTED with a clear message
//! until automatic failover lands.

use std::pin::Pin;

use futures::Stream;
use redmesh_api::v1::{
    self,
    coordinator_server::{Coordinator, CoordinatorServer},
};
use redmesh_runtime::{grpc, CancellationToken, TelemetryArgs};
use tonic::{service::RoutesBuilder, Request, Response, Status};

/// Coordinator configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "redmesh-coordinator",
    version,
    about = "redmesh coordinator (placeholder)"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "REDMESH_COORDINATOR_LISTEN",
        default_value = "127.0.0.1:7401"
    )]
    pub listen: String,
    /// Logging and metrics.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

fn not_yet() -> Status {
    Status::unimplemented(
        "the coordinator (automatic failover) is not implemented in this version of redmesh; \
         this process only answers health checks",
    )
}

#[derive(Debug, Clone, Copy)]
struct Placeholder;

#[tonic::async_trait]
impl Coordinator for Placeholder {
    type WatchEventsStream =
        Pin<Box<dyn Stream<Item = Result<v1::WatchEventsResponse, Status>> + Send>>;

    async fn get_status(
        &self,
        _: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::GetStatusResponse>, Status> {
        Err(not_yet())
    }

    async fn failover(
        &self,
        _: Request<v1::FailoverRequest>,
    ) -> Result<Response<v1::FailoverResponse>, Status> {
        Err(not_yet())
    }

    async fn watch_events(
        &self,
        _: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(not_yet())
    }
}

/// Serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = grpc::bind(&config.listen).await?;
    let mut routes = RoutesBuilder::default();
    routes.add_service(CoordinatorServer::new(Placeholder));
    let health = grpc::with_health_and_reflection(&mut routes, &["redmesh.v1.Coordinator"]).await?;
    tracing::info!(listen = %config.listen, "coordinator placeholder serving health and reflection");
    grpc::serve(listener, routes, Some(health), shutdown).await?;
    Ok(())
}
