//! `flywheel-bench`: measure the engine and the server.
//!
//! - `engine`: in-process numbers for a model (load time, route decision
//!   latency with and without the prefix cache, TTFT for a ~60-token prompt,
//!   prefill and decode tokens/s).
//! - `load` (also the default without a subcommand): the gRPC load
//!   generator, closed loop (N clients) or open loop (Poisson arrivals),
//!   route-only or streaming chat, with a table, JSON and PNG figures.
//! - `rails`: latency of the input rails (jailbreak, PII, all together).
//! - `log`: the request log's cost per record (route and chat records).
//! - `shadow`: live latency without vs with a shadow, same run.
//! - `swap`: streaming load while a slot is promoted and rolled back.
//! - `ask`: send one query to a server and stream the answer.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod admin;
mod engine_bench;
mod http_client;
mod load;
mod log_bench;
mod plot;
mod rails_bench;
mod shadow_bench;
mod stats;
mod swap_bench;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "flywheel-bench",
    version,
    about = "Benchmarks and a tiny client for flywheel",
    long_about = "Benchmarks and a tiny client for flywheel. Without a subcommand, runs the gRPC \
                  load generator (`flywheel-bench --addr http://127.0.0.1:50051 --mode route \
                  --concurrency 8 --duration 10 --json out.json` is `flywheel-bench load ...`).",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    load: load::Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Engine numbers for a model, in process (no server).
    Engine(engine_bench::Args),
    /// Input-rail latency on ~200-character queries, in process.
    Rails(rails_bench::Args),
    /// The request log's write cost per record, in process.
    Log(log_bench::Args),
    /// gRPC load against a running server (closed or open loop; the default).
    Load(load::Args),
    /// Live latency without vs with a shadow of a slot, back to back.
    Shadow(shadow_bench::Args),
    /// Streaming load while a slot is promoted and rolled back (latency during swaps vs steady).
    Swap(swap_bench::Args),
    /// Ask a running server one question and stream the answer.
    Ask {
        /// Server address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Force an expert.
        #[arg(long)]
        expert: Option<String>,
        /// Answer length cap.
        #[arg(long)]
        max_tokens: Option<u32>,
        /// The question.
        query: String,
    },
}

// The load generator shares the machine with the server it measures: its
// per-request allocations (requests, h2 frames, samples) go through
// mimalloc, as the server's do, so that it takes less CPU from the server.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Write `value` as pretty JSON to `path`.
pub fn write_json(path: &PathBuf, value: &impl serde::Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with(tracing_subscriber::filter::filter_fn(|meta| {
            !flywheel_router::engine::mistral::is_false_alarm(meta)
        }))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        return load::run(cli.load).await;
    };
    match command {
        Command::Engine(args) => engine_bench::run(args).await,
        Command::Load(args) => load::run(args).await,
        Command::Rails(args) => rails_bench::run(args).await,
        Command::Log(args) => log_bench::run(args).await,
        Command::Swap(args) => swap_bench::run(args).await,
        Command::Shadow(args) => shadow_bench::run(args).await,
        Command::Ask {
            addr,
            expert,
            max_tokens,
            query,
        } => load::ask(&addr, query, expert, max_tokens).await,
    }
}
