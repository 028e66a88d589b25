//! `flywheel-server`: parse the configuration, load the models, serve gRPC
//! until SIGINT/SIGTERM, drain, flush the request log and the trace exporter.

use anyhow::Context;
use clap::Parser;
use flywheel_server::{App, Config, Flags, shutdown_signal, telemetry};

// Every request allocates dozens of small buffers (protobuf, h2 frames, the
// log record); mimalloc's thread-local free lists cost less than glibc's
// arenas for that pattern (glibc malloc/free were ~11% of the server's CPU
// profile under route-only load).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load(&Flags::parse()).context("invalid configuration")?;
    let telemetry = telemetry::init(config.otlp_endpoint.as_deref()).context("invalid configuration")?;
    let served = serve(config).await;
    // The exporter flush blocks; keep it off the runtime's worker threads.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    served
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let app = App::build(config).await.context("cannot start the server")?;
    app.serve(listener, shutdown_signal()).await.context("server failed")
}
