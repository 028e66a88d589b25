//! gRPC clients: a closed-loop load generator and a one-shot `ask`.
//!
//! Talks to the server only through the generated `flywheel.v1` clients.
//! Per request it records end-to-end latency and, for streaming chat, time to
//! first token and inter-token latencies (gaps between consecutive deltas,
//! excluding the first token, as vLLM defines ITL).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use flywheel_proto::v1::chat_client::ChatClient;
use flywheel_proto::v1::chat_stream_message::Event;
use flywheel_proto::v1::router_client::RouterClient;
use flywheel_proto::v1::{ChatRequest, GenerationOptions, RouteRequest};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::stats::{Summary, summarize};

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `Router.Route` only.
    Route,
    /// `Chat.Stream`.
    Chat,
}

/// Arguments of `flywheel-bench load`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Request kind.
    #[arg(long, value_enum, default_value_t = Mode::Route)]
    mode: Mode,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Measured duration in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up requests per client (not measured).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Chat answer length cap.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const QUERIES: &[&str] = &[
    "How many vacation days do I get per year?",
    "My laptop will not connect to the VPN from home.",
    "How do I submit an expense report for a client dinner?",
    "Does the Acme Widget Pro support wireless charging?",
    "What is the parental leave policy?",
    "I forgot my email password, how do I reset it?",
];

#[derive(Debug, Default)]
struct Sample {
    latency_ms: f64,
    ttft_ms: Option<f64>,
    itl_ms: Vec<f64>,
    tokens_out: u32,
    ok: bool,
    code: Option<tonic::Code>,
}

/// The load report.
#[derive(Debug, Serialize)]
pub struct Report {
    mode: Mode,
    concurrency: usize,
    duration_s: f64,
    requests: usize,
    errors: usize,
    errors_by_status: std::collections::BTreeMap<String, usize>,
    requests_per_second: f64,
    output_tokens_per_second: f64,
    latency_ms: Summary,
    ttft_ms: Option<Summary>,
    itl_ms: Option<Summary>,
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(addr.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

async fn one(channel: Channel, mode: Mode, query: &str, max_tokens: u32) -> Sample {
    let start = Instant::now();
    let ms = |t: Instant| t.duration_since(start).as_secs_f64() * 1e3;
    match mode {
        Mode::Route => {
            let r = RouterClient::new(channel)
                .route(RouteRequest {
                    query: query.into(),
                    ..Default::default()
                })
                .await;
            Sample {
                latency_ms: ms(Instant::now()),
                ok: r.is_ok(),
                code: r.err().map(|s| s.code()),
                ..Sample::default()
            }
        }
        Mode::Chat => {
            let request = ChatRequest {
                query: query.into(),
                options: Some(GenerationOptions {
                    max_tokens: Some(max_tokens),
                    temperature: None,
                }),
                ..Default::default()
            };
            let mut sample = Sample::default();
            let mut stream = match ChatClient::new(channel).stream(request).await {
                Ok(s) => s.into_inner(),
                Err(status) => {
                    sample.code = Some(status.code());
                    sample.latency_ms = ms(Instant::now());
                    return sample;
                }
            };
            let mut last = None;
            loop {
                match stream.message().await {
                    Ok(Some(msg)) => {
                        if let Some(Event::Delta(_)) = msg.event {
                            let now = Instant::now();
                            match last {
                                None => sample.ttft_ms = Some(ms(now)),
                                Some(prev) => sample.itl_ms.push(now.duration_since(prev).as_secs_f64() * 1e3),
                            }
                            last = Some(now);
                            sample.tokens_out += 1;
                        }
                        if let Some(Event::End(_)) = msg.event {
                            sample.ok = true;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        sample.code = Some(status.code());
                        break;
                    }
                }
            }
            sample.latency_ms = ms(Instant::now());
            sample
        }
    }
}

/// Run the load and print its report.
///
/// # Errors
/// Connection failures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let channel = connect(&args.addr).await?;
    let deadline = Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for c in 0..args.concurrency {
        let channel = channel.clone();
        let (mode, max_tokens, warmup) = (args.mode, args.max_tokens, args.warmup);
        tasks.push(tokio::spawn(async move {
            for i in 0..warmup {
                one(channel.clone(), mode, QUERIES[(c + i) % QUERIES.len()], max_tokens).await;
            }
            let start = Instant::now();
            let mut samples = Vec::new();
            let mut i = c;
            while start.elapsed() < deadline {
                samples.push(one(channel.clone(), mode, QUERIES[i % QUERIES.len()], max_tokens).await);
                i += 1;
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await?);
    }
    let elapsed = started
        .elapsed()
        .as_secs_f64()
        .min(args.duration + 60.0)
        .max(args.duration);
    let report = report(&args, &samples, elapsed);
    print_report(&report);
    if let Some(path) = &args.json {
        crate::write_json(path, &report)?;
    }
    Ok(())
}

fn report(args: &Args, samples: &[Sample], elapsed_s: f64) -> Report {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let mut errors_by_status = std::collections::BTreeMap::new();
    for s in samples.iter().filter(|s| !s.ok) {
        *errors_by_status
            .entry(format!("{:?}", s.code.unwrap_or(tonic::Code::Unknown)))
            .or_insert(0) += 1;
    }
    let lat: Vec<f64> = ok.iter().map(|s| s.latency_ms).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft_ms).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|s| s.itl_ms.iter().copied()).collect();
    let tokens: u32 = ok.iter().map(|s| s.tokens_out).sum();
    Report {
        mode: args.mode,
        concurrency: args.concurrency,
        duration_s: elapsed_s,
        requests: samples.len(),
        errors: samples.len() - ok.len(),
        errors_by_status,
        requests_per_second: ok.len() as f64 / elapsed_s,
        output_tokens_per_second: f64::from(tokens) / elapsed_s,
        latency_ms: summarize(&lat),
        ttft_ms: (!ttft.is_empty()).then(|| summarize(&ttft)),
        itl_ms: (!itl.is_empty()).then(|| summarize(&itl)),
    }
}

fn print_report(r: &Report) {
    println!(
        "{:?} x{}: {} requests in {:.1} s, {} errors, {:.1} req/s, {:.1} output tok/s",
        r.mode, r.concurrency, r.requests, r.duration_s, r.errors, r.requests_per_second, r.output_tokens_per_second
    );
    let row = |name: &str, s: &Summary| {
        println!(
            "  {name:<8} p50 {:>8.2}  p90 {:>8.2}  p99 {:>8.2}  mean {:>8.2}  (ms)",
            s.p50, s.p90, s.p99, s.mean
        );
    };
    row("latency", &r.latency_ms);
    if let Some(s) = &r.ttft_ms {
        row("ttft", s);
    }
    if let Some(s) = &r.itl_ms {
        row("itl", s);
    }
}

/// Ask one question and stream the answer to stdout.
///
/// # Errors
/// Connection failures and error statuses.
pub async fn ask(addr: &str, query: String, expert: Option<String>, max_tokens: Option<u32>) -> anyhow::Result<()> {
    let channel = connect(addr).await?;
    let request = ChatRequest {
        query: query.clone(),
        expert,
        options: Some(GenerationOptions {
            max_tokens,
            temperature: None,
        }),
        ..Default::default()
    };
    let mut stream = ChatClient::new(channel).stream(request).await?.into_inner();
    let mut out = std::io::stdout();
    writeln!(out, "Q: {query}")?;
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(Event::Start(s)) => {
                let r = s.route.unwrap_or_default();
                writeln!(
                    out,
                    "[request {} -> expert `{}` (confidence {:.2}, routed in {:.1} ms, model {})]",
                    s.request_id, r.expert, r.confidence, r.latency_ms, s.expert_model_version
                )?;
                write!(out, "A: ")?;
            }
            Some(Event::Delta(d)) => {
                write!(out, "{}", d.text)?;
                out.flush()?;
            }
            Some(Event::End(e)) => {
                let u = e.usage.unwrap_or_default();
                let t = e.timings.unwrap_or_default();
                writeln!(
                    out,
                    "\n[{} prompt + {} completion tokens, TTFT {:.0} ms, total {:.0} ms, finish: {}]",
                    u.prompt_tokens, u.completion_tokens, t.ttft_ms, t.total_ms, e.finish_reason
                )?;
            }
            None => {}
        }
    }
    Ok(())
}
