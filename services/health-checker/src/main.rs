//! redmesh-health-checker binary: parse configuration, run until SIGTERM.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = redmesh_health_checker::Config::parse();
    config.telemetry.init("health-checker")?;
    config.api_token.install(true)?;
    config.tls.install()?;
    let result = redmesh_health_checker::run(config, redmesh_runtime::shutdown_on_signals()).await;
    redmesh_telemetry::flush_traces().await;
    result
}
