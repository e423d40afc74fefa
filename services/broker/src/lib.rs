//! The broker: the proxy pool and cluster lifecycle API, and the topology
//! push that keeps every proxy's view current without polling.
//!
//! Stateless: every change is one etcd transaction (see `redmesh_store::meta`)
//! and the topology index is rebuilt from etcd at start, so any number of
//! brokers can run side by side.

use std::sync::Arc;

use anyhow::Context;
use redmesh_api::v1::{broker_server::BrokerServer, topology_server::TopologyServer};
use redmesh_runtime::{grpc, CancellationToken, EtcdArgs, TelemetryArgs};
use redmesh_store::{MetaRepo, MetaStore};
use tonic::service::RoutesBuilder;

mod grpc_api;
pub mod index;
pub mod ops;

pub use index::Index;
pub use ops::Ops;

/// Broker configuration (flags, with `REDMESH_*` environment overrides).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "redmesh-broker",
    version,
    about = "redmesh broker: proxy pool, clusters, topology push"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "REDMESH_BROKER_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: String,
    /// Migrator that runs scale tasks (`ScaleCluster` forwards to it).
    #[arg(
        long,
        env = "REDMESH_BROKER_MIGRATOR",
        default_value = "127.0.0.1:7420"
    )]
    pub migrator: String,
    /// Where the metadata lives.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// The API token calls must carry.
    #[command(flatten)]
    pub api_token: redmesh_runtime::ApiTokenArgs,
    /// TLS on the gRPC API.
    #[command(flatten)]
    pub tls: redmesh_runtime::TlsArgs,
    /// Logging and metrics.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Runs the broker until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = config
        .etcd
        .connect()
        .await
        .context("configuring the etcd client")?;
    let listener = grpc::bind(&config.listen).await?;
    tracing::info!(listen = %config.listen, etcd = ?config.etcd.endpoints, "broker serving");
    serve(
        store,
        config.etcd.keys(),
        listener,
        &config.migrator,
        shutdown,
    )
    .await
}

/// Serves the broker API on `listener` over `store`; used by `run` and by
/// in-process tests with a `MemStore`.
pub async fn serve(
    store: Arc<dyn MetaStore>,
    keys: redmesh_store::Keys,
    listener: tokio::net::TcpListener,
    migrator: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let migrator = redmesh_runtime::tls::endpoint(migrator)
        .with_context(|| format!("invalid --migrator address {migrator:?}"))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect_lazy();
    let repo = MetaRepo::new(store, keys);
    let index = Index::new(repo.clone());
    let index_task = tokio::spawn(index.clone().run(shutdown.clone()));
    let api = grpc_api::Api {
        ops: Ops::new(repo),
        index,
        migrator: redmesh_api::v1::migrator_client::MigratorClient::new(
            redmesh_runtime::trace_context::traced(migrator),
        ),
        shutdown: shutdown.clone(),
    };
    let mut routes = RoutesBuilder::default();
    routes
        .add_service(BrokerServer::new(api.clone()))
        .add_service(TopologyServer::new(api));
    let health = grpc::with_health_and_reflection(
        &mut routes,
        &["redmesh.v1.Broker", "redmesh.v1.Topology"],
    )
    .await?;
    grpc::serve(listener, routes, Some(health), shutdown).await?;
    index_task.abort();
    tracing::info!("broker stopped");
    Ok(())
}
