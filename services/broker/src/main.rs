//! redmesh-broker binary: parse configuration, run until SIGTERM.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = redmesh_broker::Config::parse();
    config.telemetry.init("broker")?;
    config.api_token.install(true)?;
    config.tls.install()?;
    let result = redmesh_broker::run(config, redmesh_runtime::shutdown_on_signals()).await;
    redmesh_telemetry::flush_traces().await;
    result
}
