//! The migrator: persisted, resumable slot migration tasks (DESIGN.md §6).
//! This version is a placeholder that serves health and reflection only;
//! its RPCs answer UNIMPLEMENTED with a clear message until live migration
//! lands.

use std::pin::Pin;

use futures::Stream;
use redmesh_api::v1::{
    self,
    migrator_server::{Migrator, MigratorServer},
};
use redmesh_runtime::{grpc, CancellationToken, TelemetryArgs};
use tonic::{service::RoutesBuilder, Request, Response, Status};

/// Migrator configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "redmesh-migrator",
    version,
    about = "redmesh migrator (placeholder)"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "REDMESH_MIGRATOR_LISTEN",
        default_value = "127.0.0.1:7420"
    )]
    pub listen: String,
    /// Logging and metrics.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

fn not_yet() -> Status {
    Status::unimplemented(
        "the migrator (live slot migration) is not implemented in this version of redmesh; \
         this process only answers health checks",
    )
}

#[derive(Debug, Clone, Copy)]
struct Placeholder;

type Res<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Migrator for Placeholder {
    type WatchMigrationStream =
        Pin<Box<dyn Stream<Item = Result<v1::WatchMigrationResponse, Status>> + Send>>;

    async fn start_migration(
        &self,
        _: Request<v1::StartMigrationRequest>,
    ) -> Res<v1::StartMigrationResponse> {
        Err(not_yet())
    }

    async fn get_migration(
        &self,
        _: Request<v1::GetMigrationRequest>,
    ) -> Res<v1::GetMigrationResponse> {
        Err(not_yet())
    }

    async fn list_migrations(
        &self,
        _: Request<v1::ListMigrationsRequest>,
    ) -> Res<v1::ListMigrationsResponse> {
        Err(not_yet())
    }

    async fn watch_migration(
        &self,
        _: Request<v1::WatchMigrationRequest>,
    ) -> Res<Self::WatchMigrationStream> {
        Err(not_yet())
    }

    async fn pause_migration(
        &self,
        _: Request<v1::PauseMigrationRequest>,
    ) -> Res<v1::PauseMigrationResponse> {
        Err(not_yet())
    }

    async fn resume_migration(
        &self,
        _: Request<v1::ResumeMigrationRequest>,
    ) -> Res<v1::ResumeMigrationResponse> {
        Err(not_yet())
    }

    async fn cancel_migration(
        &self,
        _: Request<v1::CancelMigrationRequest>,
    ) -> Res<v1::CancelMigrationResponse> {
        Err(not_yet())
    }

    async fn set_migration_rate(
        &self,
        _: Request<v1::SetMigrationRateRequest>,
    ) -> Res<v1::SetMigrationRateResponse> {
        Err(not_yet())
    }
}

/// Serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = grpc::bind(&config.listen).await?;
    let mut routes = RoutesBuilder::default();
    routes.add_service(MigratorServer::new(Placeholder));
    let health = grpc::with_health_and_reflection(&mut routes, &["redmesh.v1.Migrator"]).await?;
    tracing::info!(listen = %config.listen, "migrator placeholder serving health and reflection");
    grpc::serve(listener, routes, Some(health), shutdown).await?;
    Ok(())
}
