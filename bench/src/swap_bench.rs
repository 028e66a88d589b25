//! `flywheel-bench swap`: streaming load while a slot is promoted and rolled
//! back on a running server.
//!
//! N clients stream answers in a closed loop. After a steady phase the bench
//! promotes each given version in turn (`Admin.Promote`), then rolls back
//! once (`Admin.Rollback`). Each request is classed as *during a swap* when
//! its lifetime overlaps a promotion or rollback call (which loads and warms
//! the new model beside the old one), else *steady*; the report compares
//! their latency percentiles and counts failures.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use flywheel_proto::v1 as pb;
use flywheel_proto::v1::admin_client::AdminClient;
use flywheel_proto::v1::chat_client::ChatClient;
use flywheel_proto::v1::chat_stream_message::Event;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::admin::{authorized, connect};
use crate::stats::{Summary, summarize};

/// Arguments of `flywheel-bench swap`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Admin token of the server.
    #[arg(long, env = "FLYWHEEL_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Slot to swap.
    #[arg(long, default_value = "router")]
    slot: String,
    /// Versions to promote, in order (comma-separated); one rollback follows.
    #[arg(long, value_delimiter = ',', required = true)]
    versions: Vec<String>,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds of steady load before the first swap.
    #[arg(long, default_value_t = 10.0)]
    steady: f64,
    /// Seconds between swaps.
    #[arg(long, default_value_t = 4.0)]
    interval: f64,
    /// Answer length cap.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// The query each client sends.
    #[arg(long, default_value = "How many vacation days do I get per year?")]
    query: String,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One swap call.
#[derive(Debug, Clone, Serialize)]
pub struct SwapCall {
    /// `promote <version>` or `rollback`.
    pub action: String,
    /// Wall time of the call (ms).
    pub call_ms: f64,
    /// Server-reported load time (ms).
    pub load_ms: f64,
    /// Server-reported warm-up time (ms).
    pub warm_ms: f64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Streams that completed.
    pub completed: usize,
    /// Streams that failed (any status, or no end message).
    pub failed: usize,
    /// Latency of streams that did not overlap a swap.
    pub steady_ms: Summary,
    /// Latency of streams that overlapped a swap.
    pub during_swap_ms: Summary,
    /// The swaps.
    pub swaps: Vec<SwapCall>,
}

struct Done {
    start: Instant,
    end: Instant,
    ok: bool,
}

async fn stream_once(client: &mut ChatClient<tonic::transport::Channel>, query: &str, max_tokens: u32) -> bool {
    let request = pb::ChatRequest {
        query: query.to_string(),
        options: Some(pb::GenerationOptions {
            max_tokens: Some(max_tokens),
            temperature: None,
        }),
        ..Default::default()
    };
    let Ok(response) = client.stream(request).await else {
        return false;
    };
    let mut stream = response.into_inner();
    let mut ended = false;
    loop {
        match stream.message().await {
            Ok(Some(m)) => ended |= matches!(m.event, Some(Event::End(_))),
            Ok(None) => return ended,
            Err(_) => return false,
        }
    }
}

/// Run the benchmark.
///
/// # Errors
/// The server cannot be reached or refuses a swap.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let channel = connect(&args.addr).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let done: Arc<Mutex<Vec<Done>>> = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for _ in 0..args.concurrency {
        let mut client = ChatClient::new(channel.clone());
        let (stop, done, query, max_tokens) = (stop.clone(), done.clone(), args.query.clone(), args.max_tokens);
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let ok = stream_once(&mut client, &query, max_tokens).await;
                done.lock().await.push(Done {
                    start,
                    end: Instant::now(),
                    ok,
                });
            }
        }));
    }
    let mut admin = AdminClient::new(channel);
    tokio::time::sleep(Duration::from_secs_f64(args.steady)).await;
    let mut windows = Vec::new();
    let mut swaps = Vec::new();
    let actions: Vec<Option<String>> = args.versions.iter().cloned().map(Some).chain([None]).collect();
    for action in actions {
        let t0 = Instant::now();
        let r = match &action {
            Some(v) => admin
                .promote(authorized(
                    pb::PromoteRequest {
                        slot: args.slot.clone(),
                        version: v.clone(),
                    },
                    &args.token,
                )?)
                .await
                .with_context(|| format!("promoting {v}"))?,
            None => admin
                .rollback(authorized(
                    pb::RollbackRequest {
                        slot: args.slot.clone(),
                    },
                    &args.token,
                )?)
                .await
                .context("rolling back")?,
        }
        .into_inner();
        let t1 = Instant::now();
        windows.push((t0, t1));
        swaps.push(SwapCall {
            action: action.map_or_else(|| "rollback".to_string(), |v| format!("promote {v}")),
            call_ms: (t1 - t0).as_secs_f64() * 1e3,
            load_ms: r.load_ms,
            warm_ms: r.warm_ms,
        });
        eprintln!(
            "{} -> {} ({:.0} ms)",
            r.previous_version,
            r.version,
            (t1 - t0).as_secs_f64() * 1e3
        );
        tokio::time::sleep(Duration::from_secs_f64(args.interval)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await?;
    }
    let done = done.lock().await;
    let overlaps = |d: &Done| windows.iter().any(|(a, b)| d.start <= *b && d.end >= *a);
    let ms = |d: &Done| (d.end - d.start).as_secs_f64() * 1e3;
    let steady: Vec<f64> = done.iter().filter(|d| d.ok && !overlaps(d)).map(ms).collect();
    let during: Vec<f64> = done.iter().filter(|d| d.ok && overlaps(d)).map(ms).collect();
    let report = Report {
        completed: done.iter().filter(|d| d.ok).count(),
        failed: done.iter().filter(|d| !d.ok).count(),
        steady_ms: summarize(&steady),
        during_swap_ms: summarize(&during),
        swaps,
    };
    println!(
        "{} streams, {} failed\nsteady:      n={:<5} p50 {:>8.1} ms  p99 {:>8.1} ms\nduring swap: n={:<5} p50 {:>8.1} ms  p99 {:>8.1} ms",
        report.completed,
        report.failed,
        report.steady_ms.n,
        report.steady_ms.p50,
        report.steady_ms.p99,
        report.during_swap_ms.n,
        report.during_swap_ms.p50,
        report.during_swap_ms.p99
    );
    if let Some(path) = &args.json {
        crate::write_json(path, &report)?;
    }
    Ok(())
}
