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
use bytes::Bytes;
use redmesh_api::convert;
use redmesh_api::v1::{self, migrator_server::MigratorServer};
use redmesh_runtime::{
    backoff::reconnect_delays, grpc, CancellationToken, EtcdArgs, TelemetryArgs,
};
use redmesh_store::{Election, LeaseKeeper, MetaRepo, MetaStore};
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
    let self_id = config.id.clone().unwrap_or_else(|| {
        format!(
            "migrator-{}",
            config.listen.rsplit(':').next().unwrap_or("0")
        )
    });
    anyhow::ensure!(
        config.lease_ttl >= Duration::from_secs(1),
        "--lease-ttl must be at least 1s (etcd leases count whole seconds)"
    );
    zero_metrics();
    let store = config.etcd.connect().await.context("connecting to etcd")?;
    let keys = config.etcd.keys();
    let listener = grpc::bind(&config.listen).await?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or(listener.local_addr()?.to_string());
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
    let candidate = v1::Candidate {
        id: self_id.clone(),
        address: advertise,
    };
    let campaign = tokio::spawn(campaign_forever(
        runner,
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

/// Campaigns, leads while the lease lives, and campaigns again after
/// losing it, until shutdown (when it resigns so a standby takes over).
async fn campaign_forever(
    runner: runner::Runner,
    store: Arc<dyn MetaStore>,
    election: Election,
    candidate: v1::Candidate,
    ttl: Duration,
    shutdown: CancellationToken,
) {
    let fresh = || reconnect_delays(Duration::from_millis(100), Duration::from_secs(2));
    let mut delays = fresh();
    while !shutdown.is_cancelled() {
        match lead_once(&runner, &store, &election, &candidate, ttl, &shutdown).await {
            Ok(()) => delays = fresh(),
            Err(e) => tracing::warn!(error = %e, "migrator election failed; campaigning again"),
        }
        metrics::gauge!("redmesh_migrator_leader").set(0.0);
        let pause = delays.next().unwrap_or(Duration::from_secs(2));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

async fn lead_once(
    runner: &runner::Runner,
    store: &Arc<dyn MetaStore>,
    election: &Election,
    candidate: &v1::Candidate,
    ttl: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let lease = LeaseKeeper::start(store.clone(), ttl).await?;
    let value = Bytes::from(convert::encode(candidate));
    let leadership = tokio::select! {
        _ = shutdown.cancelled() => {
            let _ = lease.revoke().await;
            return Ok(());
        }
        _ = lease.lost() => anyhow::bail!("lease lost while campaigning"),
        l = election.campaign(lease.id(), value) => l?,
    };
    tracing::info!(id = %candidate.id, "leading the migrators");
    metrics::gauge!("redmesh_migrator_leader").set(1.0);
    let stop = CancellationToken::new();
    let supervise = runner.supervise(&leadership, stop.clone());
    tokio::pin!(supervise);
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => {
            stop.cancel();
            let _ = election.resign(&leadership).await;
            let _ = lease.revoke().await;
            Ok(())
        }
        _ = lease.lost() => Err(anyhow::anyhow!("leadership lease lost")),
        _ = &mut supervise => Err(anyhow::anyhow!("stopped leading")),
    };
    stop.cancel();
    // Only the leader reports tasks; a former leader's numbers go stale.
    runner::export_task_states(&[]);
    outcome
}
