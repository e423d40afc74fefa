//! The coordinator: failure decisions, failover and replacement of failed
//! proxies from the free pool (DESIGN.md §5). Several run; one leads
//! through an etcd election, and a standby takes over within the lease TTL.
//!
//! Pieces: `health` reads the checkers' votes, `leader` acts on them,
//! `switchover` moves masters gracefully on request, `events` records every
//! decision, `api` serves `Coordinator`.

use std::time::Duration;

use anyhow::Context;
use redmesh_api::v1::{self, coordinator_server::CoordinatorServer, CoordinatorEventKind};
use redmesh_runtime::leading::{self, campaign_forever, Lead};
use redmesh_runtime::{grpc, CancellationToken, EtcdArgs, TelemetryArgs};
use redmesh_store::{Election, Leadership, MetaRepo};
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
    /// How long a proxy must have been seen failing before its shards are
    /// promoted elsewhere, so that a proxy cut off from the control plane
    /// but not from its clients has stopped taking writes first: at least
    /// the proxies' `--fence-after` less (checkers' `--failures` − 1) ×
    /// `--probe-interval` (750 ms − 2 × 100 ms by default).
    #[arg(long, env = "REDMESH_COORDINATOR_FENCE_WAIT", default_value = "550ms", value_parser = humantime::parse_duration)]
    pub fence_wait: Duration,
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
    leading::check_lease_ttl(config.lease_ttl).map_err(anyhow::Error::msg)?;
    zero_metrics();
    let store = config.etcd.connect().await.context("connecting to etcd")?;
    let keys = config.etcd.keys();
    let listener = grpc::bind(&config.listen).await?;
    let candidate = leading::candidate(
        "coordinator",
        config.id.as_deref(),
        &config.listen,
        config.advertise.as_deref(),
        listener.local_addr()?,
    );
    let self_id = candidate.id.clone();
    let actor = leader::Actor {
        repo: MetaRepo::new(store.clone(), keys.clone()),
        store: store.clone(),
        keys: keys.clone(),
        events: events::EventLog::new(store.clone(), keys.clone()),
        min_votes: config.min_votes as usize,
        fence_wait: config.fence_wait,
        exit_after_promotion: config.test_exit_after_promotion,
    };
    let election = Election::new(store.clone(), keys.election("coordinator"));
    let (lead_tx, lead_rx) = watch::channel(None);
    let campaign = tokio::spawn(campaign_forever(
        Leader {
            actor: actor.clone(),
            candidate: candidate.clone(),
            lead_tx,
        },
        store.clone(),
        election.clone(),
        candidate,
        config.lease_ttl,
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

/// The coordinator's leadership: deciding failures, published to the API
/// (which answers who leads and refuses actions when not leading).
struct Leader {
    actor: leader::Actor,
    candidate: v1::Candidate,
    lead_tx: watch::Sender<Option<Leadership>>,
}

impl Lead for Leader {
    fn role(&self) -> &'static str {
        "coordinator"
    }

    async fn elected(&self, leadership: &Leadership) {
        metrics::gauge!("redmesh_coordinator_leader").set(1.0);
        self.lead_tx.send_replace(Some(leadership.clone()));
        self.actor
            .events
            .record(events::event(
                CoordinatorEventKind::LeaderElected,
                "",
                "",
                format!(
                    "coordinator {} at {} leads",
                    self.candidate.id, self.candidate.address
                ),
            ))
            .await;
    }

    async fn lead(&self, leadership: &Leadership, stop: CancellationToken) {
        self.actor.supervise(leadership, stop).await;
    }

    fn deposed(&self) {
        self.lead_tx.send_replace(None);
        metrics::gauge!("redmesh_coordinator_leader").set(0.0);
    }
}
