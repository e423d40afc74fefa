//! The health-checker: probes proxies and their Redis nodes and publishes
//! leased verdicts (DESIGN.md §5). This version is a placeholder that
//! serves health and reflection only; its RPCs answer UNIMPLEMENTED with a
//! clear message until failure detection lands.

use std::pin::Pin;

use futures::Stream;
use redmesh_api::v1::{
    self,
    health_checker_server::{HealthChecker, HealthCheckerServer},
};
use redmesh_runtime::{grpc, CancellationToken, TelemetryArgs};
use tonic::{service::RoutesBuilder, Request, Response, Status};

/// Health-checker configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "redmesh-health-checker",
    version,
    about = "redmesh health-checker (placeholder)"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "REDMESH_HEALTH_CHECKER_LISTEN",
        default_value = "127.0.0.1:7410"
    )]
    pub listen: String,
    /// Logging and metrics.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

fn not_yet() -> Status {
    Status::unimplemented(
        "the health-checker (failure detection) is not implemented in this version of redmesh; \
         this process only answers health checks",
    )
}

#[derive(Debug, Clone, Copy)]
struct Placeholder;

#[tonic::async_trait]
impl HealthChecker for Placeholder {
    type WatchHealthStream =
        Pin<Box<dyn Stream<Item = Result<v1::WatchHealthResponse, Status>> + Send>>;

    async fn get_report(
        &self,
        _: Request<v1::GetReportRequest>,
    ) -> Result<Response<v1::GetReportResponse>, Status> {
        Err(not_yet())
    }

    async fn watch_health(
        &self,
        _: Request<v1::WatchHealthRequest>,
    ) -> Result<Response<Self::WatchHealthStream>, Status> {
        Err(not_yet())
    }
}

/// Serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = grpc::bind(&config.listen).await?;
    let mut routes = RoutesBuilder::default();
    routes.add_service(HealthCheckerServer::new(Placeholder));
    let health =
        grpc::with_health_and_reflection(&mut routes, &["redmesh.v1.HealthChecker"]).await?;
    tracing::info!(listen = %config.listen, "health-checker placeholder serving health and reflection");
    grpc::serve(listener, routes, Some(health), shutdown).await?;
    Ok(())
}
