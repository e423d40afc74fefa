//! The migrator: persisted, resumable slot migration tasks that scale
//! clusters out and in (DESIGN.md §6). Several run; one leads through an
//! etcd election and drives the tasks, any of them answers the API.
//!
//! Pieces: `plan` decides what moves, `tasks` stores task records, `runner`
//! is the leader's step machine, `proxies` talks to `ProxyAdmin`, `api`
//! serves `Migrator`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redmesh_api::v1::migrator_server::MigratorServer;
use redmesh_runtime::leading::{self, campaign_forever, Lead};
use redmesh_runtime::{grpc, CancellationToken, EtcdArgs, TelemetryArgs};
use redmesh_store::{Election, Leadership, MetaRepo};
use tonic::service::RoutesBuilder;

mod api;
pub mod plan;
pub mod proxies;
pub mod runner;
pub mod tasks;

/// Migrator configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "redmesh-migrator",
    version,
    about = "redmesh migrator: live slot migration to scale clusters out and in"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "REDMESH_MIGRATOR_LISTEN",
        default_value = "127.0.0.1:7420"
    )]
    pub listen: String,
    /// Identity of this migrator; defaults to `migrator-<listen port>`.
    #[arg(long, env = "REDMESH_MIGRATOR_ID")]
    pub id: Option<String>,
    /// Address clients reach this migrator at; defaults to the listen address.
    #[arg(long, env = "REDMESH_MIGRATOR_ADVERTISE")]
    pub advertise: Option<String>,
    /// TTL of the leadership lease: how long a dead leader blocks its standby.
    #[arg(long, env = "REDMESH_MIGRATOR_LEASE_TTL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// Keys moved per `MigrateBatch` call when no rate limits it.
    #[arg(long, env = "REDMESH_MIGRATOR_BATCH_KEYS", default_value_t = runner::DEFAULT_BATCH_KEYS, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_keys: u32,
    /// Metadata store.
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

/// Exports the gauges and counters from the start, at zero.
fn zero_metrics() {
    metrics::gauge!("redmesh_migrator_leader").set(0.0);
    metrics::counter!("redmesh_migrator_keys_moved_total").increment(0);
    metrics::counter!("redmesh_migrator_bytes_moved_total").increment(0);
    runner::export_task_states(&[]);
}

/// Serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    leading::check_lease_ttl(config.lease_ttl).map_err(anyhow::Error::msg)?;
    zero_metrics();
    let store = config.etcd.connect().await.context("connecting to etcd")?;
    let keys = config.etcd.keys();
    let listener = grpc::bind(&config.listen).await?;
    let candidate = leading::candidate(
        "migrator",
        config.id.as_deref(),
        &config.listen,
        config.advertise.as_deref(),
        listener.local_addr()?,
    );
    let self_id = candidate.id.clone();
    let repo = MetaRepo::new(store.clone(), keys.clone());
    let tasks = tasks::Tasks::new(store.clone(), keys.clone());
    let proxies = Arc::new(proxies::ProxyClients::default());
    let runner = runner::Runner {
        repo: repo.clone(),
        tasks: tasks.clone(),
        proxies: proxies.clone(),
        batch_keys: config.batch_keys,
    };
    let election = Election::new(store.clone(), keys.election("migrator"));
    let campaign = tokio::spawn(campaign_forever(
        Leader(runner),
        store.clone(),
        election,
        candidate,
        config.lease_ttl,
        shutdown.clone(),
    ));
    let mut routes = RoutesBuilder::default();
    routes.add_service(MigratorServer::new(api::Api {
        repo,
        tasks,
        proxies,
        shutdown: shutdown.clone(),
    }));
    let health = grpc::with_health_and_reflection(&mut routes, &["redmesh.v1.Migrator"]).await?;
    tracing::info!(listen = %config.listen, id = %self_id, "migrator serving");
    grpc::serve(listener, routes, Some(health), shutdown).await?;
    let _ = campaign.await;
    Ok(())
}

/// The migrator's leadership: running the tasks.
struct Leader(runner::Runner);

impl Lead for Leader {
    fn role(&self) -> &'static str {
        "migrator"
    }

    async fn elected(&self, _: &Leadership) {
        metrics::gauge!("redmesh_migrator_leader").set(1.0);
    }

    async fn lead(&self, leadership: &Leadership, stop: CancellationToken) {
        self.0.supervise(leadership, stop).await;
    }

    fn deposed(&self) {
        metrics::gauge!("redmesh_migrator_leader").set(0.0);
        // Only the leader reports tasks; a former leader's numbers go stale.
        runner::export_task_states(&[]);
    }
}
