//! `flywheel-server`: parse the configuration, load the models, serve gRPC
//! until SIGINT/SIGTERM, drain, flush the request log and the trace exporter.

use anyhow::Context;
use clap::Parser;
use flywheel_server::config::{ApiKeySpec, Command, check_api_keys};
use flywheel_server::{App, Config, Flags, auth, shutdown_signal, telemetry};

// Every request allocates dozens of small buffers (protobuf, h2 frames, the
// log record); mimalloc's thread-local free lists cost less than glibc's
// arenas for that pattern (glibc malloc/free were ~11% of the server's CPU
// profile under route-only load).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    if let Some(Command::HashKey { id, new }) = &flags.command {
        return hash_key(id, *new);
    }
    let config = Config::load(&flags).context("invalid configuration")?;
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

/// `hash-key`: the `[[api_keys]]` entry of a key read from standard input,
/// or of a new random key (printed once, on standard error).
fn hash_key(id: &str, new: bool) -> anyhow::Result<()> {
    let mut entry = ApiKeySpec {
        id: id.to_string(),
        sha256: "0".repeat(64),
    };
    check_api_keys(std::slice::from_ref(&entry)).context("invalid --id")?;
    let key = if new {
        let key = auth::new_key();
        eprintln!("new client API key (give it to the client; it is not stored): {key}");
        key
    } else {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the key from standard input")?;
        anyhow::ensure!(!line.trim().is_empty(), "no key on standard input");
        line
    };
    entry.sha256 = auth::digest_hex(&key);
    println!("[[api_keys]]\nid = \"{}\"\nsha256 = \"{}\"", entry.id, entry.sha256);
    Ok(())
}
