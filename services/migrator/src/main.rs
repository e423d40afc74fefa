//! redmesh-migrator binary: parse configuration, run until SIGTERM.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = redmesh_migrator::Config::parse();
    config.telemetry.init("migrator")?;
    config.api_token.install(true)?;
    config.tls.install()?;
    let result = redmesh_migrator::run(config, redmesh_runtime::shutdown_on_signals()).await;
    redmesh_telemetry::flush_traces().await;
    result
}
