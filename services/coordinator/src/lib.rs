//! The coordinator: failure decisions, failover and replacement of failed
//! proxies from the free pool (DESIGN.md §5). Several run; one leads
//! through an etcd election, and a standby takes over within the lease TTL.
//!
//! Pieces: `health` reads the checkers' votes, `leader` acts on them,
//! `switchover` moves masters gracefully on request, `events` records every
//! decision, `api` serves `Coordinator`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use redmesh_api::convert;
use redmesh_api::v1::{self, coordinator_server::CoordinatorServer, CoordinatorEventKind};
use redmesh_runtime::{
    backoff::reconnect_delays, grpc, CancellationToken, EtcdArgs, TelemetryArgs,
};
use redmesh_store::{Election, Leadership, LeaseKeeper, MetaRepo, MetaStore};
use tokio::sync::watch;
use tonic::service::RoutesBuilder;

mod api;
pub mod events;
pub mod health;
pub mod leader;
pub mod switchover;

/// Coordinator configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "redmesh-coordinator",
    version,
    about = "redmesh coordinator: failure decisions, failover and replacement from the pool"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "REDMESH_COORDINATOR_LISTEN",
        default_value = "127.0.0.1:7401"
    )]
    pub listen: String,
    /// Identity of this coordinator; defaults to `coordinator-<listen port>`.
    #[arg(long, env = "REDMESH_COORDINATOR_ID")]
    pub id: Option<String>,
    /// Address other coordinators and clients reach this one at (shown by
    /// standbys); defaults to the listen address.
    #[arg(long, env = "REDMESH_COORDINATOR_ADVERTISE")]
    pub advertise: Option<String>,
    /// TTL of the leadership lease: how long a dead leader blocks its
    /// standby.
    #[arg(long, env = "REDMESH_COORDINATOR_LEASE_TTL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// Fewest agreeing health-checkers a failover needs (a majority of the
    /// live checkers is needed as well).
    #[arg(long, env = "REDMESH_COORDINATOR_MIN_VOTES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub min_votes: u32,
    /// Test hook: exit right after committing a promotion, before the
    /// replacement, to exercise resumption by the next leader.
    #[arg(
        long,
        hide = true,
        env = "REDMESH_COORDINATOR_TEST_EXIT_AFTER_PROMOTION"
    )]
    pub test_exit_after_promotion: bool,
    /// Metadata store.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Logging and metrics.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Exports every event counter and the leader gauge from the start, at
/// zero: `increase()` and alert rules then see the first failover too, and
/// dashboards show 0 rather than "no data".
fn zero_metrics() {
    for kind in (1..).map_while(|k| v1::CoordinatorEventKind::try_from(k).ok()) {
        metrics::counter!("redmesh_coordinator_events_total", "kind" => kind.as_str_name())
            .increment(0);
    }
    metrics::gauge!("redmesh_coordinator_leader").set(0.0);
}

/// Serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let self_id = config.id.clone().unwrap_or_else(|| {
        format!(
            "coordinator-{}",
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
    let actor = leader::Actor {
        repo: MetaRepo::new(store.clone(), keys.clone()),
        store: store.clone(),
        keys: keys.clone(),
        events: events::EventLog::new(store.clone(), keys.clone()),
        min_votes: config.min_votes as usize,
        exit_after_promotion: config.test_exit_after_promotion,
    };
    let election = Election::new(store.clone(), keys.election("coordinator"));
    let (lead_tx, lead_rx) = watch::channel(None);
    let candidate = v1::Candidate {
        id: self_id.clone(),
        address: advertise,
    };
    let campaign = tokio::spawn(campaign_forever(
        actor.clone(),
        store.clone(),
        election.clone(),
        candidate,
        config.lease_ttl,
        lead_tx,
        shutdown.clone(),
    ));

    let mut routes = RoutesBuilder::default();
    routes.add_service(CoordinatorServer::new(api::Api {
        actor,
        self_id: self_id.clone(),
        election,
        leadership: lead_rx,
        shutdown: shutdown.clone(),
    }));
    let health = grpc::with_health_and_reflection(&mut routes, &["redmesh.v1.Coordinator"]).await?;
    tracing::info!(listen = %config.listen, id = %self_id, "coordinator serving");
    grpc::serve(listener, routes, Some(health), shutdown).await?;
    let _ = campaign.await;
    Ok(())
}

/// Campaigns, leads while the lease lives, and campaigns again after
/// losing it, until shutdown (when it resigns so a standby takes over at
/// once).
async fn campaign_forever(
    actor: leader::Actor,
    store: Arc<dyn MetaStore>,
    election: Election,
    candidate: v1::Candidate,
    ttl: Duration,
    lead_tx: watch::Sender<Option<Leadership>>,
    shutdown: CancellationToken,
) {
    let fresh = || reconnect_delays(Duration::from_millis(100), Duration::from_secs(2));
    let mut delays = fresh();
    while !shutdown.is_cancelled() {
        match lead_once(
            &actor, &store, &election, &candidate, ttl, &lead_tx, &shutdown,
        )
        .await
        {
            Ok(()) => delays = fresh(),
            Err(e) => {
                tracing::warn!(error = %e, "coordinator election failed; campaigning again");
            }
        }
        lead_tx.send_replace(None);
        metrics::gauge!("redmesh_coordinator_leader").set(0.0);
        let pause = delays.next().unwrap_or(Duration::from_secs(2));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

async fn lead_once(
    actor: &leader::Actor,
    store: &Arc<dyn MetaStore>,
    election: &Election,
    candidate: &v1::Candidate,
    ttl: Duration,
    lead_tx: &watch::Sender<Option<Leadership>>,
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
    tracing::info!(id = %candidate.id, "leading the coordinators");
    metrics::gauge!("redmesh_coordinator_leader").set(1.0);
    lead_tx.send_replace(Some(leadership.clone()));
    actor
        .events
        .record(events::event(
            CoordinatorEventKind::LeaderElected,
            "",
            "",
            format!(
                "coordinator {} at {} leads",
                candidate.id, candidate.address
            ),
        ))
        .await;
    let stop = CancellationToken::new();
    let supervise = actor.supervise(&leadership, stop.clone());
    tokio::pin!(supervise);
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => {
            stop.cancel();
            lead_tx.send_replace(None);
            let _ = election.resign(&leadership).await;
            let _ = lease.revoke().await;
            Ok(())
        }
        _ = lease.lost() => Err(anyhow::anyhow!("leadership lease lost")),
        _ = &mut supervise => Err(anyhow::anyhow!("lost leadership while acting")),
    };
    stop.cancel();
    outcome
}
