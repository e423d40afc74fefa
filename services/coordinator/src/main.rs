//! redmesh-coordinator binary: parse configuration, run until SIGTERM.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = redmesh_coordinator::Config::parse();
    config.telemetry.init("coordinator")?;
    config.api_token.install(true)?;
    config.tls.install()?;
    let result = redmesh_coordinator::run(config, redmesh_runtime::shutdown_on_signals()).await;
    redmesh_telemetry::flush_traces().await;
    result
}
