//! `flywheel-bench shadow`: what a shadow costs live traffic.
//!
//! The same closed-loop load (route decisions, or streamed answers) runs
//! twice on a running server, back to back: without a shadow, then with
//! `Admin.SetShadow(slot, version, fraction)`; the report compares live
//! latency percentiles (ratio with / without) and includes the shadow's own
//! report. The shadow is cleared at the end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flywheel_proto::v1 as pb;
use flywheel_proto::v1::admin_client::AdminClient;
use flywheel_proto::v1::chat_client::ChatClient;
use flywheel_proto::v1::router_client::RouterClient;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::admin::{authorized, connect};
use crate::stats::{Summary, summarize};

/// Arguments of `flywheel-bench shadow`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Admin token of the server.
    #[arg(long, env = "FLYWHEEL_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Slot to shadow (`router`: route requests; `expert/<name>`: answers forced to that expert).
    #[arg(long, default_value = "router")]
    slot: String,
    /// Candidate version (in the server's registry).
    #[arg(long)]
    version: String,
    /// Share of requests mirrored.
    #[arg(long, default_value_t = 1.0)]
    fraction: f64,
    /// Shadow runs at once.
    #[arg(long, default_value_t = 2)]
    max_concurrency: u32,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Answer length cap (expert slots).
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Live latency without a shadow (ms).
    pub without_ms: Summary,
    /// Live latency with the shadow (ms).
    pub with_ms: Summary,
    /// p50 with / without.
    pub p50_ratio: f64,
    /// p99 with / without.
    pub p99_ratio: f64,
    /// Failed live requests over both phases.
    pub failed: usize,
    /// The shadow's counters at the end of the second phase.
    pub shadow_mirrored: u64,
    /// Skipped at the shadow's concurrency limit.
    pub shadow_skipped: u64,
    /// Agreement with live.
    pub shadow_agreement: Option<f64>,
    /// Shadow p99 (ms).
    pub shadow_p99_ms: Option<f64>,
}

const QUERIES: &[&str] = &[
    "How many vacation days do I get per year?",
    "My laptop will not connect to the VPN from home.",
    "How do I submit an expense report for a client dinner?",
    "Does the Acme Widget Pro support wireless charging?",
];

async fn phase(channel: &tonic::transport::Channel, args: &Args) -> (Vec<f64>, usize) {
    let out: Arc<Mutex<(Vec<f64>, usize)>> = Arc::new(Mutex::new((Vec::new(), 0)));
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let expert = args.slot.strip_prefix("expert/").map(str::to_string);
    let mut tasks = Vec::new();
    for c in 0..args.concurrency {
        let (mut router, mut chat) = (RouterClient::new(channel.clone()), ChatClient::new(channel.clone()));
        let (out, expert, max_tokens) = (out.clone(), expert.clone(), args.max_tokens);
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while Instant::now() < deadline {
                let query = QUERIES[i % QUERIES.len()].to_string();
                i += 1;
                let t = Instant::now();
                let ok = match &expert {
                    None => router
                        .route(pb::RouteRequest {
                            query,
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                    Some(e) => chat
                        .complete(pb::ChatRequest {
                            query,
                            expert: Some(e.clone()),
                            options: Some(pb::GenerationOptions {
                                max_tokens: Some(max_tokens),
                                temperature: None,
                            }),
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                };
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let mut o = out.lock().await;
                if ok {
                    o.0.push(ms);
                } else {
                    o.1 += 1;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let o = out.lock().await;
    (o.0.clone(), o.1)
}

/// Run the benchmark.
///
/// # Errors
/// The server cannot be reached or refuses the shadow.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let channel = connect(&args.addr).await?;
    let mut admin = AdminClient::new(channel.clone());
    let (without, failed_a) = phase(&channel, &args).await;
    admin
        .set_shadow(authorized(
            pb::SetShadowRequest {
                slot: args.slot.clone(),
                version: args.version.clone(),
                fraction: args.fraction,
                max_concurrency: args.max_concurrency,
            },
            &args.token,
        )?)
        .await
        .context("setting the shadow")?;
    let (with, failed_b) = phase(&channel, &args).await;
    let shadow = admin
        .clear_shadow(authorized(
            pb::ShadowSlotRequest {
                slot: args.slot.clone(),
            },
            &args.token,
        )?)
        .await
        .context("clearing the shadow")?
        .into_inner();
    let (a, b) = (summarize(&without), summarize(&with));
    let report = Report {
        p50_ratio: b.p50 / a.p50,
        p99_ratio: b.p99 / a.p99,
        without_ms: a,
        with_ms: b,
        failed: failed_a + failed_b,
        shadow_mirrored: shadow.mirrored,
        shadow_skipped: shadow.skipped,
        shadow_agreement: shadow.agreement,
        shadow_p99_ms: shadow.shadow_p99_ms,
    };
    println!(
        "without shadow: n={} p50 {:.2} ms p99 {:.2} ms\nwith shadow:    n={} p50 {:.2} ms p99 {:.2} ms\n\
         ratio p50 {:.2}x p99 {:.2}x; failed {}; shadow mirrored {} skipped {} agreement {:?}",
        report.without_ms.n,
        report.without_ms.p50,
        report.without_ms.p99,
        report.with_ms.n,
        report.with_ms.p50,
        report.with_ms.p99,
        report.p50_ratio,
        report.p99_ratio,
        report.failed,
        report.shadow_mirrored,
        report.shadow_skipped,
        report.shadow_agreement
    );
    if let Some(path) = &args.json {
        crate::write_json(path, &report)?;
    }
    Ok(())
}
