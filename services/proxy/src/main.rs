//! redmesh-proxy binary: parse configuration, run until SIGTERM.
use anyhow::Context;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = redmesh_proxy::Config::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.threads > 0 {
        runtime.worker_threads(config.threads);
    }
    runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(async {
            config.telemetry.init("proxy")?;
            config.api_token.install(true)?;
            config.tls.install()?;
            let result = redmesh_proxy::run(config, redmesh_runtime::shutdown_on_signals()).await;
            redmesh_telemetry::flush_traces().await;
            result
        })
}
