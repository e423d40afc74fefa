//! redmesh-proxy binary: parse configuration, run until SIGTERM.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = redmesh_proxy::Config::parse();
    config.telemetry.init("proxy")?;
    redmesh_proxy::run(config, redmesh_runtime::shutdown_on_signals()).await
}
