//! The health-checker: probes every proxy of the pool and its two Redis
//! nodes about every 100 ms and publishes leased verdicts in etcd for the
//! coordinator to act on (DESIGN.md §5). Several run; the coordinator acts
//! only on what a majority of the live ones agree on.
//!
//! Pieces: `probe` asks one target, `monitor` keeps the verdicts, follows
//! the pool and publishes changes, `grpc` serves `HealthChecker`.

use std::time::Duration;

use anyhow::Context;
use redmesh_api::v1::{self, health_checker_server::HealthCheckerServer};
use redmesh_runtime::{grpc, CancellationToken, EtcdArgs, TelemetryArgs};
use tonic::service::RoutesBuilder;

mod api;
pub mod monitor;
pub mod probe;

/// Health-checker configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "redmesh-health-checker",
    version,
    about = "redmesh health-checker: probes proxies and their Redis nodes, publishes verdicts"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "REDMESH_HEALTH_CHECKER_LISTEN",
        default_value = "127.0.0.1:7410"
    )]
    pub listen: String,
    /// Identity of this checker (unique among checkers); defaults to
    /// `checker-<listen port>`.
    #[arg(long, env = "REDMESH_HEALTH_CHECKER_ID")]
    pub id: Option<String>,
    /// Time between two probes of one target.
    #[arg(long, env = "REDMESH_PROBE_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,
    /// Deadline of one probe.
    #[arg(long, env = "REDMESH_PROBE_TIMEOUT", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub probe_timeout: Duration,
    /// Consecutive failed probes after which a target is DOWN.
    #[arg(long, env = "REDMESH_PROBE_FAILURES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub failures: u32,
    /// TTL of the lease the verdicts live under: how long a dead checker's
    /// votes outlive it.
    #[arg(long, env = "REDMESH_HEALTH_LEASE_TTL", default_value = "3s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
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

impl Config {
    /// The checker's identity.
    pub fn checker_id(&self) -> String {
        redmesh_runtime::args::service_id("checker", self.id.as_deref(), &self.listen)
    }
}

/// Serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let checker_id = config.checker_id();
    anyhow::ensure!(
        !checker_id.is_empty()
            && checker_id.len() <= 63
            && checker_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "--id {checker_id:?}: use 1-63 characters of [A-Za-z0-9_-]"
    );
    anyhow::ensure!(
        config.probe_interval >= Duration::from_millis(10)
            && config.probe_timeout >= Duration::from_millis(10),
        "--probe-interval and --probe-timeout must be at least 10ms"
    );
    anyhow::ensure!(
        config.lease_ttl >= Duration::from_secs(1),
        "--lease-ttl must be at least 1s (etcd leases count whole seconds)"
    );
    let store = config.etcd.connect().await.context("connecting to etcd")?;
    let keys = config.etcd.keys();
    let listener = grpc::bind(&config.listen).await?;
    let timing = monitor::Timing {
        interval: config.probe_interval,
        timeout: config.probe_timeout,
        failures: config.failures,
    };
    let monitor = monitor::Monitor::new(checker_id.clone(), timing);
    let presence = v1::CheckerRecord {
        checker_id: checker_id.clone(),
        address: listener.local_addr()?.to_string(),
        probe_interval_ms: config.probe_interval.as_millis() as u32,
        failure_threshold: config.failures,
    };
    tokio::spawn(monitor::follow_pool(
        monitor.clone(),
        store.clone(),
        keys.clone(),
        shutdown.clone(),
    ));
    let publisher = tokio::spawn(monitor::publish(
        monitor.clone(),
        store.clone(),
        keys.clone(),
        presence,
        config.lease_ttl,
        shutdown.clone(),
    ));

    let mut routes = RoutesBuilder::default();
    routes.add_service(HealthCheckerServer::new(api::Api::new(
        monitor.clone(),
        shutdown.clone(),
    )));
    let health =
        grpc::with_health_and_reflection(&mut routes, &["redmesh.v1.HealthChecker"]).await?;
    tracing::info!(listen = %config.listen, checker = %checker_id, interval = ?config.probe_interval,
        timeout = ?config.probe_timeout, failures = config.failures, "health-checker serving");
    grpc::serve(listener, routes, Some(health), shutdown).await?;
    // Withdraw this checker's votes at once rather than after the lease TTL.
    let _ = publisher.await;
    let _ = store.delete(&keys.checker(&checker_id)).await;
    if let Ok(listing) = store.list(&format!("{}{checker_id}/", keys.health())).await {
        for kv in listing.kvs {
            let _ = store.delete(&kv.key).await;
        }
    }
    Ok(())
}
