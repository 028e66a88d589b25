//! `flywheel-server`: parse the configuration, load the models, serve gRPC
//! until SIGINT/SIGTERM, drain, flush the request log.

use anyhow::Context;
use clap::Parser;
use flywheel_server::{App, Config, Flags, shutdown_signal, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let config = Config::load(&Flags::parse()).context("invalid configuration")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let app = App::build(config).await.context("cannot start the server")?;
    app.serve(listener, shutdown_signal()).await.context("server failed")?;
    Ok(())
}
