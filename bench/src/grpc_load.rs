//! The load generator (closed loop: N concurrent clients; open loop: Poisson
//! arrivals at a rate) and a one-shot `ask`.
//!
//! Talks to the server only as clients do: through the generated
//! `flywheel.v1` gRPC clients, or (`--protocol http`) the OpenAI-compatible
//! HTTP API ([`crate::http_client`]).
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

use crate::admin::{LoadChannel, connect, connect_for_load};
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

/// Which API the load goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// gRPC (`Router.Route`, `Chat.Stream`) over HTTP/2 connections.
    Grpc,
    /// The OpenAI-compatible HTTP API (`POST /v1/chat/completions`, streamed),
    /// over HTTP/1.1 keep-alive connections; chat only.
    Http,
}

/// Arguments of `flywheel-bench load` (also `flywheel-bench` without a subcommand).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server address (its gRPC or its HTTP address, as `--protocol` says).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// API the load goes through.
    #[arg(long, value_enum, default_value_t = Protocol::Grpc)]
    protocol: Protocol,
    /// Run the same load against this server first (e.g. one with request
    /// logging off, or the same server's gRPC address) and report the
    /// ratios of the two runs.
    #[arg(long)]
    baseline_addr: Option<String>,
    /// API of the baseline run (default: `--protocol`).
    #[arg(long, value_enum)]
    baseline_protocol: Option<Protocol>,
    /// gRPC: HTTP/2 connections the clients share (round robin). HTTP opens
    /// one keep-alive connection per request in flight instead.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Request kind.
    #[arg(long, value_enum, default_value_t = Mode::Route)]
    mode: Mode,
    /// Concurrent clients (closed loop).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Open loop instead: Poisson arrivals at this many requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Seed of the open loop's arrival times.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Measured duration in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many measured requests instead (whichever comes first).
    #[arg(long)]
    requests: Option<usize>,
    /// Seconds that requests still running at the end of the measured
    /// duration may take to finish. Those still running then are cancelled
    /// and reported as `unfinished` (those started in the `--warmup-s` load
    /// too), so an overloaded server still gets a report. Each `--warmup`
    /// request gets as long to finish.
    #[arg(long, default_value_t = 30.0)]
    drain_s: f64,
    /// Queries to send, one per line (plain text, or JSONL with `query` or `text`).
    #[arg(long)]
    queries: Option<PathBuf>,
    /// SLO on time to first token (ms) for goodput.
    #[arg(long)]
    slo_ttft_ms: Option<f64>,
    /// SLO on a request's mean inter-token latency (ms) for goodput.
    #[arg(long)]
    slo_itl_ms: Option<f64>,
    /// SLO on end-to-end latency (ms) for goodput.
    #[arg(long)]
    slo_latency_ms: Option<f64>,
    /// Requests sent one after another on each connection before the load
    /// starts, to open it (not measured).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Seconds of the same load (rate or clients) run before the measured
    /// duration and left out of the report: connection windows, allocator
    /// pools, caches and the server's threads reach their steady state first.
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    /// Chat answer length cap.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write PNG figures with this path prefix: `<prefix>-cdf.png` (latency,
    /// TTFT and ITL CDFs) and `<prefix>-timeline.png` (requests/s, p50/p99 per second).
    #[arg(long)]
    plot: Option<PathBuf>,
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
    /// Start, in seconds from the start of the measurement.
    at_s: f64,
    /// Open loop: how long after its scheduled arrival the request started
    /// (the generator's own delay; 0 in the closed loop).
    late_ms: f64,
    latency_ms: f64,
    ttft_ms: Option<f64>,
    itl_ms: Vec<f64>,
    tokens_out: u32,
    ok: bool,
    code: Option<tonic::Code>,
    /// Still running at the hard stop (end of the duration plus `--drain-s`)
    /// and cancelled there.
    unfinished: bool,
}

impl Sample {
    /// An answer delta arrived now (the request started at `start`; `last`
    /// holds the previous delta's time): TTFT for the first, ITL after.
    fn delta(&mut self, start: Instant, last: &mut Option<Instant>) {
        let now = Instant::now();
        match last {
            None => self.ttft_ms = Some(now.duration_since(start).as_secs_f64() * 1e3),
            Some(prev) => self.itl_ms.push(now.duration_since(*prev).as_secs_f64() * 1e3),
        }
        *last = Some(now);
        self.tokens_out += 1;
    }
}

/// The load report.
#[derive(Debug, Serialize)]
pub struct Report {
    protocol: Protocol,
    mode: Mode,
    /// `closed` (N clients) or `open` (Poisson arrivals).
    arrival: &'static str,
    concurrency: usize,
    rate: Option<f64>,
    duration_s: f64,
    requests: usize,
    /// Requests answered with an error status (or a stream that ended
    /// without its summary).
    errors: usize,
    /// Requests still running at the hard stop, cancelled there (warm-up
    /// ones included); neither successes nor errors, and left out of every
    /// latency figure.
    unfinished: usize,
    errors_by_status: std::collections::BTreeMap<String, usize>,
    requests_per_second: f64,
    output_tokens_per_second: f64,
    latency_ms: Summary,
    /// Open loop: how late requests started against their schedule, and the
    /// latency counted from the scheduled arrival (start lateness plus
    /// latency), which a stalled generator cannot hide.
    #[serde(skip_serializing_if = "Option::is_none")]
    start_late_ms: Option<Summary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_from_schedule_ms: Option<Summary>,
    ttft_ms: Option<Summary>,
    itl_ms: Option<Summary>,
    /// Successful requests per second that met every SLO given.
    goodput_requests_per_second: f64,
    /// Share of successful requests that met every SLO given.
    slo_attainment: f64,
    /// Successful requests and latency per second of the run.
    timeline: Vec<crate::plot::Second>,
    /// The same load against `--baseline-addr`, run first.
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<Box<Report>>,
    /// This run over the baseline: requests/s, p50 and p99 latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<Ratio>,
}

/// One run over its baseline, measured back to back.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratio {
    requests_per_second: f64,
    latency_p50: f64,
    latency_p99: f64,
}

/// The SLOs a request must meet to count toward goodput.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Slo {
    ttft_ms: Option<f64>,
    itl_ms: Option<f64>,
    latency_ms: Option<f64>,
}

impl Slo {
    fn met(&self, s: &Sample) -> bool {
        let mean_itl = (!s.itl_ms.is_empty()).then(|| s.itl_ms.iter().sum::<f64>() / s.itl_ms.len() as f64);
        s.ok && self.ttft_ms.is_none_or(|max| s.ttft_ms.is_none_or(|t| t <= max))
            && self.itl_ms.is_none_or(|max| mean_itl.is_none_or(|t| t <= max))
            && self.latency_ms.is_none_or(|max| s.latency_ms <= max)
    }
}

/// Block the calling thread until about `due`. A sleep overshoots by up to
/// the kernel's timer slack (50 µs by default), so it ends 60 µs short of
/// `due`: arrivals go out up to 60 µs early rather than tens of µs late.
fn pace_until(due: Instant) {
    const SLACK: Duration = Duration::from_micros(60);
    let now = Instant::now();
    if due > now + SLACK {
        std::thread::sleep(due - now - SLACK);
    }
}

/// Exponential inter-arrival gaps (seconds) of a Poisson process at `rate`/s.
fn arrivals(rate: f64, seed: u64) -> impl Iterator<Item = f64> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let exp = (rate > 0.0 && rate.is_finite())
        .then(|| rand_distr::Exp::new(rate).ok())
        .flatten();
    std::iter::from_fn(move || exp.as_ref().map(|e| e.sample(&mut rng)))
}

fn load_queries(path: Option<&PathBuf>) -> anyhow::Result<Vec<String>> {
    let Some(path) = path else {
        return Ok(QUERIES.iter().map(|q| (*q).to_string()).collect());
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        if line.trim_start().starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
            let q = v
                .get("query")
                .or_else(|| v.get("text"))
                .and_then(|q| q.as_str())
                .with_context(|| format!("{}:{}: no `query` or `text` field", path.display(), i + 1))?;
            out.push(q.to_string());
        } else {
            out.push(line.to_string());
        }
    }
    anyhow::ensure!(!out.is_empty(), "{} holds no queries", path.display());
    Ok(out)
}

/// One request. `due` is its scheduled arrival in the open loop; at
/// `deadline` a request still running is cancelled and marked unfinished.
/// A connection to the server through either API.
#[derive(Clone)]
enum Client {
    Grpc(LoadChannel),
    Http(std::sync::Arc<crate::http_client::HttpPool>),
}

/// The status code an HTTP error answer stands for in the report.
fn http_code(status: u16) -> tonic::Code {
    match status {
        400 => tonic::Code::InvalidArgument,
        401 => tonic::Code::Unauthenticated,
        404 => tonic::Code::NotFound,
        429 => tonic::Code::ResourceExhausted,
        499 => tonic::Code::Cancelled,
        500 => tonic::Code::Internal,
        503 => tonic::Code::Unavailable,
        _ => tonic::Code::Unknown,
    }
}

/// One streamed chat answer over HTTP.
async fn one_http(
    pool: &crate::http_client::HttpPool,
    query: &str,
    max_tokens: u32,
    mut sample: Sample,
    start: Instant,
    deadline: tokio::time::Instant,
) -> Sample {
    use crate::http_client::SseEvent;
    let ms = |t: Instant| t.duration_since(start).as_secs_f64() * 1e3;
    let mut last = None;
    let mut done = false;
    let mut failed = false;
    let call = pool.stream_chat(query, max_tokens, |event| match event {
        SseEvent::Delta => sample.delta(start, &mut last),
        SseEvent::Done => done = true,
        SseEvent::Error => failed = true,
        SseEvent::Other => {}
    });
    // Dropping the call at the deadline closes its connection, which
    // cancels the answer on the server.
    let result = tokio::time::timeout_at(deadline, call).await;
    match result {
        Ok(Ok(200)) => {
            sample.ok = done && !failed;
            if failed {
                sample.code = Some(tonic::Code::Internal);
            }
        }
        Ok(Ok(status)) => sample.code = Some(http_code(status)),
        Ok(Err(_)) => sample.code = Some(tonic::Code::Unavailable),
        Err(_) => sample.unfinished = true,
    }
    sample.latency_ms = ms(Instant::now());
    sample
}

async fn one(
    client: Client,
    mode: Mode,
    query: &str,
    max_tokens: u32,
    epoch: Instant,
    due: Option<Instant>,
    deadline: Instant,
) -> Sample {
    let deadline = tokio::time::Instant::from_std(deadline);
    let start = Instant::now();
    let at_s = start.saturating_duration_since(epoch).as_secs_f64();
    let late_ms = due.map_or(0.0, |d| start.saturating_duration_since(d).as_secs_f64() * 1e3);
    let ms = |t: Instant| t.duration_since(start).as_secs_f64() * 1e3;
    let channel = match client {
        Client::Grpc(channel) => channel,
        Client::Http(pool) => {
            let sample = Sample {
                at_s,
                late_ms,
                ..Sample::default()
            };
            return one_http(&pool, query, max_tokens, sample, start, deadline).await;
        }
    };
    match mode {
        Mode::Route => {
            let mut client = RouterClient::new(channel);
            let call = client.route(RouteRequest {
                query: query.into(),
                ..Default::default()
            });
            let r = tokio::time::timeout_at(deadline, call).await;
            Sample {
                at_s,
                late_ms,
                latency_ms: ms(Instant::now()),
                ok: matches!(r, Ok(Ok(_))),
                code: r.as_ref().ok().and_then(|r| r.as_ref().err()).map(tonic::Status::code),
                unfinished: r.is_err(),
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
            let mut sample = Sample {
                at_s,
                late_ms,
                ..Sample::default()
            };
            let mut client = ChatClient::new(channel);
            let mut stream = match tokio::time::timeout_at(deadline, client.stream(request)).await {
                Ok(Ok(s)) => s.into_inner(),
                Ok(Err(status)) => {
                    sample.code = Some(status.code());
                    sample.latency_ms = ms(Instant::now());
                    return sample;
                }
                Err(_) => {
                    sample.unfinished = true;
                    sample.latency_ms = ms(Instant::now());
                    return sample;
                }
            };
            let mut last = None;
            loop {
                let Ok(message) = tokio::time::timeout_at(deadline, stream.message()).await else {
                    // Dropping the stream cancels the call on the server.
                    sample.unfinished = !sample.ok;
                    break;
                };
                match message {
                    Ok(Some(msg)) => {
                        if let Some(Event::Delta(_)) = msg.event {
                            sample.delta(start, &mut last);
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

/// Run the load (against the baseline first, when one is given) and
/// print the report.
///
/// # Errors
/// Connection failures, unreadable query files, bad flags.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate > 0.0 && rate.is_finite(),
            "--rate must be a positive number of requests per second"
        );
    }
    anyhow::ensure!(args.connections >= 1, "--connections must be at least 1");
    anyhow::ensure!(
        args.duration > 0.0 && args.duration.is_finite(),
        "--duration must be a positive number of seconds"
    );
    anyhow::ensure!(
        args.warmup_s >= 0.0 && args.warmup_s.is_finite(),
        "--warmup-s must be zero or a positive number of seconds"
    );
    anyhow::ensure!(
        args.drain_s >= 0.0 && args.drain_s.is_finite(),
        "--drain-s must be zero or a positive number of seconds"
    );
    let queries = std::sync::Arc::new(load_queries(args.queries.as_ref())?);
    let slo = Slo {
        ttft_ms: args.slo_ttft_ms,
        itl_ms: args.slo_itl_ms,
        latency_ms: args.slo_latency_ms,
    };
    let baseline_protocol = args.baseline_protocol.unwrap_or(args.protocol);
    for protocol in [args.protocol, baseline_protocol] {
        anyhow::ensure!(
            protocol == Protocol::Grpc || args.mode == Mode::Chat,
            "--mode route runs over gRPC only: the HTTP API has no route-only endpoint"
        );
    }
    let baseline = match &args.baseline_addr {
        Some(addr) => {
            let (samples, elapsed) = drive(&args, addr, baseline_protocol, &queries).await?;
            let r = report(&args, baseline_protocol, &samples, elapsed, &slo);
            println!("baseline {addr} ({baseline_protocol:?}):");
            print_report(&r);
            Some(r)
        }
        None => None,
    };
    let (samples, elapsed) = drive(&args, &args.addr, args.protocol, &queries).await?;
    let mut report = report(&args, args.protocol, &samples, elapsed, &slo);
    if baseline.is_some() {
        println!("{} ({:?}):", args.addr, args.protocol);
    }
    print_report(&report);
    if let Some(base) = baseline {
        let ratio = Ratio {
            requests_per_second: report.requests_per_second / base.requests_per_second,
            latency_p50: report.latency_ms.p50 / base.latency_ms.p50,
            latency_p99: report.latency_ms.p99 / base.latency_ms.p99,
        };
        println!(
            "vs baseline: {:.3}x requests/s, {:.3}x p50, {:.3}x p99",
            ratio.requests_per_second, ratio.latency_p50, ratio.latency_p99
        );
        report.ratio = Some(ratio);
        report.baseline = Some(Box::new(base));
    }
    if let Some(path) = &args.json {
        crate::write_json(path, &report)?;
    }
    if let Some(prefix) = &args.plot {
        plot(prefix, &report, &samples)?;
    }
    Ok(())
}

/// The two figures of a run.
fn plot(prefix: &std::path::Path, report: &Report, samples: &[Sample]) -> anyhow::Result<()> {
    let with = |suffix: &str| {
        let mut name = prefix.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        prefix.with_file_name(name)
    };
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let latency: Vec<f64> = ok.iter().map(|s| s.latency_ms).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft_ms).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|s| s.itl_ms.iter().copied()).collect();
    let mut series = vec![crate::plot::Series {
        name: format!("latency (p99 {:.1} ms)", report.latency_ms.p99),
        values: &latency,
    }];
    if let Some(t) = &report.ttft_ms {
        series.push(crate::plot::Series {
            name: format!("TTFT (p99 {:.1} ms)", t.p99),
            values: &ttft,
        });
    }
    if let Some(t) = &report.itl_ms {
        series.push(crate::plot::Series {
            name: format!("ITL (p99 {:.1} ms)", t.p99),
            values: &itl,
        });
    }
    let load = match report.rate {
        Some(r) => format!("open loop {r} req/s"),
        None => format!("{} clients", report.concurrency),
    };
    let title = format!("{:?}, {load}: {:.0} req/s", report.mode, report.requests_per_second);
    let cdf = with("-cdf.png");
    crate::plot::latency_cdf(&cdf, &title, &series)?;
    let timeline = with("-timeline.png");
    crate::plot::timeline(&timeline, &title, &report.timeline)?;
    println!("figures: {} {}", cdf.display(), timeline.display());
    Ok(())
}

/// One measured run against `addr`: connections opened, `--warmup-s` of
/// unmeasured load, then the measured closed or open loop.
async fn drive(
    args: &Args,
    addr: &str,
    protocol: Protocol,
    queries: &std::sync::Arc<Vec<String>>,
) -> anyhow::Result<(Vec<Sample>, f64)> {
    let mut channels = Vec::with_capacity(args.connections);
    match protocol {
        Protocol::Grpc => {
            for _ in 0..args.connections {
                channels.push(Client::Grpc(connect_for_load(addr).await?));
            }
        }
        Protocol::Http => {
            // One pool; open as many connections as clients up front.
            let pool = crate::http_client::HttpPool::new(addr)?;
            for _ in 0..args.concurrency {
                pool.open().await?;
            }
            channels.push(Client::Http(pool));
        }
    }
    let channel_for = |i: usize| channels[i % channels.len()].clone();
    let budget = args.requests.unwrap_or(usize::MAX);
    let (mode, max_tokens) = (args.mode, args.max_tokens);
    let drain = Duration::from_secs_f64(args.drain_s);
    for i in 0..args.warmup.max(1) * args.connections {
        let now = Instant::now();
        one(
            channel_for(i),
            mode,
            &queries[i % queries.len()],
            max_tokens,
            now,
            None,
            now + drain,
        )
        .await;
    }
    // The load runs from `begin`; what starts before `started` is warm-up.
    // Requests start until `end`; at `stop` the ones still running are cut.
    let begin = Instant::now();
    let started = begin + Duration::from_secs_f64(args.warmup_s);
    let end = started + Duration::from_secs_f64(args.duration);
    let stop = end + drain;
    let mut samples = Vec::new();
    match args.rate {
        Some(rate) => {
            // Open loop: requests start on schedule whether or not earlier
            // ones finished, so queueing shows up in the latencies. The
            // schedule is kept by a plain thread: tokio's timers have 1 ms
            // ticks, which would release the arrivals of each millisecond
            // together (10 at once at 10,000 req/s) instead of spread out.
            // Each request hands its sample back as it finishes, so its task
            // is freed then: holding every task to the end grew the
            // generator by ~4 KB a request, and the page faults of that
            // growth stalled it for milliseconds at a time.
            let runtime = tokio::runtime::Handle::current();
            let channels = channels.clone();
            let (queries, seed) = (queries.clone(), args.seed);
            let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
            let pacer = tokio::task::spawn_blocking(move || {
                let (mut at, mut measured) = (Duration::ZERO, 0usize);
                for (i, gap) in arrivals(rate, seed).enumerate() {
                    at += Duration::from_secs_f64(gap);
                    let due = begin + at;
                    if due > end || measured >= budget {
                        break;
                    }
                    let in_warmup = due < started;
                    measured += usize::from(!in_warmup);
                    pace_until(due);
                    let (channel, queries, done) =
                        (channels[i % channels.len()].clone(), queries.clone(), done.clone());
                    runtime.spawn(async move {
                        let sample = one(
                            channel,
                            mode,
                            &queries[i % queries.len()],
                            max_tokens,
                            started,
                            Some(due),
                            stop,
                        )
                        .await;
                        // The receiver lives until every sender is gone.
                        let _ = done.send((in_warmup, sample));
                    });
                }
                measured
            });
            // Senders are dropped as requests finish: the loop ends after the last.
            let mut cut_in_warmup = 0;
            while let Some((in_warmup, sample)) = finished.recv().await {
                cut_in_warmup += usize::from(in_warmup && sample.unfinished);
                if kept(in_warmup, &sample) {
                    samples.push(sample);
                }
            }
            let measured = pacer.await?;
            anyhow::ensure!(
                samples.len() == measured + cut_in_warmup,
                "{measured} measured requests were sent but {} results came back (a request task panicked)",
                samples.len() - cut_in_warmup
            );
        }
        None => {
            let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for c in 0..args.concurrency {
                let (channel, queries, sent) = (channel_for(c), queries.clone(), sent.clone());
                tasks.push(tokio::spawn(async move {
                    let mut samples = Vec::new();
                    let mut i = c;
                    loop {
                        let now = Instant::now();
                        let in_warmup = now < started;
                        if now >= end
                            || (!in_warmup && sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= budget)
                        {
                            break;
                        }
                        let sample = one(
                            channel.clone(),
                            mode,
                            &queries[i % queries.len()],
                            max_tokens,
                            started,
                            None,
                            stop,
                        )
                        .await;
                        if kept(in_warmup, &sample) {
                            samples.push(sample);
                        }
                        i += 1;
                    }
                    samples
                }));
            }
            for t in tasks {
                samples.extend(t.await?);
            }
        }
    }
    Ok((samples, started.elapsed().as_secs_f64()))
}

/// Whether a sample counts: everything started in the measured duration,
/// and a warm-up request still running at the hard stop (it ran through the
/// measurement without an answer; under overload it may be all there is).
fn kept(in_warmup: bool, sample: &Sample) -> bool {
    !in_warmup || sample.unfinished
}

fn report(args: &Args, protocol: Protocol, samples: &[Sample], elapsed_s: f64, slo: &Slo) -> Report {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let mut errors_by_status = std::collections::BTreeMap::new();
    let unfinished = samples.iter().filter(|s| s.unfinished).count();
    for s in samples.iter().filter(|s| !s.ok && !s.unfinished) {
        *errors_by_status
            .entry(format!("{:?}", s.code.unwrap_or(tonic::Code::Unknown)))
            .or_insert(0) += 1;
    }
    let lat: Vec<f64> = ok.iter().map(|s| s.latency_ms).collect();
    let open = args.rate.is_some();
    let ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft_ms).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|s| s.itl_ms.iter().copied()).collect();
    let tokens: u32 = ok.iter().map(|s| s.tokens_out).sum();
    let good = ok.iter().filter(|s| slo.met(s)).count();
    Report {
        protocol,
        mode: args.mode,
        arrival: if args.rate.is_some() { "open" } else { "closed" },
        concurrency: args.concurrency,
        rate: args.rate,
        duration_s: elapsed_s,
        requests: samples.len(),
        errors: samples.len() - ok.len() - unfinished,
        unfinished,
        errors_by_status,
        requests_per_second: ok.len() as f64 / elapsed_s,
        output_tokens_per_second: f64::from(tokens) / elapsed_s,
        latency_ms: summarize(&lat),
        start_late_ms: open.then(|| summarize(&ok.iter().map(|s| s.late_ms).collect::<Vec<_>>())),
        latency_from_schedule_ms: open
            .then(|| summarize(&ok.iter().map(|s| s.late_ms + s.latency_ms).collect::<Vec<_>>())),
        ttft_ms: (!ttft.is_empty()).then(|| summarize(&ttft)),
        itl_ms: (!itl.is_empty()).then(|| summarize(&itl)),
        goodput_requests_per_second: good as f64 / elapsed_s,
        slo_attainment: if ok.is_empty() {
            0.0
        } else {
            good as f64 / ok.len() as f64
        },
        timeline: crate::plot::per_second(
            &ok.iter().map(|s| (s.at_s, s.latency_ms)).collect::<Vec<_>>(),
            // Requests start within the configured duration; the run ends
            // later, when the last one finishes or at the hard stop.
            args.duration.min(elapsed_s),
        ),
        baseline: None,
        ratio: None,
    }
}

fn print_report(r: &Report) {
    let load = match r.rate {
        Some(rate) => format!("open loop {rate} req/s"),
        None => format!("x{}", r.concurrency),
    };
    println!(
        "{:?} {load}: {} requests in {:.1} s, {} errors {:?}, {} unfinished, {:.1} req/s, {:.1} output tok/s, goodput {:.1} req/s ({:.1}% within SLO)",
        r.mode,
        r.requests,
        r.duration_s,
        r.errors,
        r.errors_by_status,
        r.unfinished,
        r.requests_per_second,
        r.output_tokens_per_second,
        r.goodput_requests_per_second,
        100.0 * r.slo_attainment
    );
    let row = |name: &str, s: &Summary| {
        println!(
            "  {name:<13} p50 {:>8.2}  p90 {:>8.2}  p99 {:>8.2}  mean {:>8.2}  (ms)",
            s.p50, s.p90, s.p99, s.mean
        );
    };
    row("latency", &r.latency_ms);
    if let Some(s) = &r.start_late_ms {
        row("start late", s);
    }
    if let Some(s) = &r.latency_from_schedule_ms {
        row("from schedule", s);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ok: bool, ttft: f64, itl: &[f64], latency: f64) -> Sample {
        Sample {
            at_s: 0.0,
            late_ms: 0.0,
            latency_ms: latency,
            ttft_ms: Some(ttft),
            itl_ms: itl.to_vec(),
            tokens_out: itl.len() as u32 + 1,
            ok,
            code: None,
            unfinished: false,
        }
    }

    #[test]
    fn goodput_counts_successes_within_every_slo() {
        let slo = Slo {
            ttft_ms: Some(500.0),
            itl_ms: Some(30.0),
            latency_ms: None,
        };
        assert!(slo.met(&sample(true, 400.0, &[20.0, 40.0], 900.0))); // mean ITL 30
        assert!(!slo.met(&sample(true, 600.0, &[20.0], 900.0)));
        assert!(!slo.met(&sample(true, 400.0, &[50.0, 40.0], 900.0)));
        assert!(!slo.met(&sample(false, 1.0, &[1.0], 1.0)));
        assert!(Slo::default().met(&sample(true, 1e9, &[1e9], 1e9)));
    }

    #[test]
    fn latency_from_schedule_adds_the_start_lateness() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["load", "--rate", "100"]).unwrap();
        let samples: Vec<Sample> = (1..=100)
            .map(|k| Sample {
                late_ms: if k > 95 { 10.0 } else { 0.0 },
                ..sample(true, 0.0, &[], f64::from(k) / 10.0)
            })
            .collect();
        let r = report(&cli.args, Protocol::Grpc, &samples, 1.0, &Slo::default());
        let (late, from) = (r.start_late_ms.unwrap(), r.latency_from_schedule_ms.unwrap());
        assert_eq!((late.p50, late.p99), (0.0, 10.0));
        // From send: 9.9 ms at p99; from schedule the five late ones are 19.6..20.0 ms.
        assert!((r.latency_ms.p99 - 9.9).abs() < 1e-9, "{}", r.latency_ms.p99);
        assert!((from.p99 - 19.9).abs() < 1e-9, "{}", from.p99);
        assert!((from.p50 - r.latency_ms.p50).abs() < 1e-9);
        // The closed loop has no schedule: neither figure is reported.
        let closed = Cli::try_parse_from(["load"]).unwrap();
        let r = report(&closed.args, Protocol::Grpc, &samples, 1.0, &Slo::default());
        assert!(r.start_late_ms.is_none() && r.latency_from_schedule_ms.is_none());
    }

    #[test]
    fn open_loop_arrivals_have_the_requested_rate_and_are_seeded() {
        let gaps: Vec<f64> = arrivals(50.0, 7).take(20_000).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.02).abs() < 0.001, "mean gap {mean}");
        let again: Vec<f64> = arrivals(50.0, 7).take(5).collect();
        assert_eq!(&gaps[..5], &again[..]);
        assert_eq!(arrivals(0.0, 1).next(), None);
    }

    #[test]
    fn the_pacer_never_releases_an_arrival_more_than_60_us_early() {
        let start = Instant::now();
        // 400 arrivals 50 µs apart: most gaps are below the sleep threshold.
        for k in 1..=400u64 {
            let due = start + Duration::from_micros(50 * k);
            pace_until(due);
            let early = due.saturating_duration_since(Instant::now());
            assert!(
                early <= Duration::from_micros(60),
                "arrival {k} released {early:?} early"
            );
        }
        assert!(
            start.elapsed() >= Duration::from_micros(20_000 - 60),
            "the schedule was not kept"
        );
    }

    /// Answers every route with the query as its request id and expert.
    struct Echo;

    #[tonic::async_trait]
    impl flywheel_proto::v1::router_server::Router for Echo {
        async fn route(
            &self,
            request: tonic::Request<RouteRequest>,
        ) -> Result<tonic::Response<flywheel_proto::v1::RouteResponse>, tonic::Status> {
            let query = request.into_inner().query;
            Ok(tonic::Response::new(flywheel_proto::v1::RouteResponse {
                request_id: query.clone(),
                route: Some(flywheel_proto::v1::RouteDecision {
                    expert: query,
                    ..Default::default()
                }),
            }))
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalesced_connections_deliver_every_answer_to_its_own_request() {
        use clap::Parser;
        use futures::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
            .map(|c| c.map(flywheel_proto::coalesce::CoalescedIo::new));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(flywheel_proto::v1::router_server::RouterServer::new(Echo))
                .serve_with_incoming(incoming),
        );
        // Coalescing on both ends, 300 requests in flight on one connection.
        let channel = connect_for_load(&addr).await.unwrap();
        let calls = (0..300).map(|i| {
            let mut client = RouterClient::new(channel.clone());
            async move {
                let query = format!("query {i}");
                let r = client
                    .route(RouteRequest {
                        query: query.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(
                    (r.request_id.as_str(), r.route.unwrap().expert.as_str()),
                    (query.as_str(), query.as_str())
                );
            }
        });
        tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(calls))
            .await
            .expect("every call is answered");
        // The load generator's two loops over the same sockets: nothing fails or hangs.
        let queries = std::sync::Arc::new(vec!["a".to_string(), "b".to_string()]);
        // Half a second of warm-up load first, left out of the samples.
        for flags in [
            ["--concurrency", "32", "--requests", "2000", "--warmup-s", "0.5"],
            ["--rate", "4000", "--duration", "0.5", "--warmup-s", "0.5"],
        ] {
            let cli = Cli::try_parse_from(["load", "--addr", &addr].into_iter().chain(flags)).unwrap();
            let (samples, _) = tokio::time::timeout(
                Duration::from_secs(30),
                drive(&cli.args, &addr, Protocol::Grpc, &queries),
            )
            .await
            .expect("the load run finishes")
            .unwrap();
            assert!(samples.iter().all(|s| s.ok), "{flags:?}: failed requests");
            assert!(
                samples.iter().all(|s| (0.0..0.6).contains(&s.at_s)),
                "{flags:?}: a sample started before the measurement or after its end"
            );
            match flags[0] {
                "--concurrency" => assert_eq!(samples.len(), 2000),
                // 4,000/s over the measured 0.5 s, not the 2,000 of the warm-up too.
                _ => assert!(
                    (1_500..=2_500).contains(&samples.len()),
                    "open loop measured {}",
                    samples.len()
                ),
            }
        }
    }

    /// Streams one token for every query; then ends the answer, or for a
    /// query starting with `stall` holds the stream open forever and counts
    /// it in `cancelled` when the server drops it.
    struct Stalling {
        cancelled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    /// Counts the drop of a stalled stream.
    struct CancelGuard(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl Drop for CancelGuard {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tonic::async_trait]
    impl flywheel_proto::v1::chat_server::Chat for Stalling {
        type StreamStream = std::pin::Pin<
            Box<dyn futures::Stream<Item = Result<flywheel_proto::v1::ChatStreamMessage, tonic::Status>> + Send>,
        >;

        async fn complete(
            &self,
            _: tonic::Request<ChatRequest>,
        ) -> Result<tonic::Response<flywheel_proto::v1::ChatResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("stream only"))
        }

        async fn stream(
            &self,
            request: tonic::Request<ChatRequest>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            use flywheel_proto::v1::{ChatStreamMessage, StreamEnd, TokenDelta};
            use futures::StreamExt;
            let message = |event| Ok(ChatStreamMessage { event: Some(event) });
            let first = futures::stream::iter([message(Event::Delta(TokenDelta { text: "a".into() }))]);
            if request.into_inner().query.starts_with("stall") {
                let guard = CancelGuard(self.cancelled.clone());
                let stalled = futures::stream::pending().map(move |m| {
                    let _held = &guard;
                    m
                });
                Ok(tonic::Response::new(Box::pin(first.chain(stalled))))
            } else {
                let end = futures::stream::iter([message(Event::End(StreamEnd::default()))]);
                Ok(tonic::Response::new(Box::pin(first.chain(end))))
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_still_running_at_the_hard_stop_are_cut_and_counted_unfinished() {
        use clap::Parser;
        use futures::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let cancelled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
            .map(|c| c.map(flywheel_proto::coalesce::CoalescedIo::new));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(flywheel_proto::v1::chat_server::ChatServer::new(Stalling {
                    cancelled: cancelled.clone(),
                }))
                .serve_with_incoming(incoming),
        );
        // Each client answers "ok", then stalls on the next query until the
        // hard stop, 0.3 s after the 0.3 s of load; the one warm-up request
        // answers. Without the stop the run never ends.
        let queries = std::sync::Arc::new(vec!["ok".to_string(), "stall".to_string()]);
        let cli = Cli::try_parse_from([
            "load",
            "--addr",
            &addr,
            "--mode",
            "chat",
            "--concurrency",
            "4",
            "--connections",
            "1",
            "--warmup",
            "1",
            "--warmup-s",
            "0",
            "--duration",
            "0.3",
            "--drain-s",
            "0.3",
        ])
        .unwrap();
        let t0 = Instant::now();
        let (samples, elapsed) = tokio::time::timeout(
            Duration::from_secs(20),
            drive(&cli.args, &addr, Protocol::Grpc, &queries),
        )
        .await
        .expect("the hard stop ends the run")
        .unwrap();
        assert!(
            (0.55..3.0).contains(&elapsed),
            "the run took {elapsed} s, not duration + drain"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
        let r = report(&cli.args, Protocol::Grpc, &samples, elapsed, &Slo::default());
        // Clients 1 and 3 stall at once, 0 and 2 after one answer.
        assert_eq!((r.requests, r.unfinished, r.errors), (6, 4, 0), "{samples:?}");
        assert!(r.errors_by_status.is_empty());
        assert!(samples.iter().all(|s| s.ok != s.unfinished));
        // The stalled streams' one token arrived, but they count as neither
        // successes nor in any latency figure.
        assert!(samples.iter().filter(|s| s.unfinished).all(|s| s.tokens_out == 1));
        assert_eq!(r.latency_ms.n, 2);
        // Cutting a request cancels it on the server too.
        let waited = Instant::now();
        while cancelled.load(std::sync::atomic::Ordering::SeqCst) < 4 && waited.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(cancelled.load(std::sync::atomic::Ordering::SeqCst), 4);

        // Under overload every request may start in the warm-up load and
        // never finish: those are reported unfinished, not dropped as warm-up.
        let mut flags = cli.args;
        flags.warmup_s = 0.5;
        let (samples, elapsed) =
            tokio::time::timeout(Duration::from_secs(20), drive(&flags, &addr, Protocol::Grpc, &queries))
                .await
                .expect("the hard stop ends the run")
                .unwrap();
        let r = report(&flags, Protocol::Grpc, &samples, elapsed, &Slo::default());
        assert_eq!(
            (r.requests, r.unfinished, r.errors, r.latency_ms.n),
            (4, 4, 0, 0),
            "{samples:?}"
        );

        // The open loop: half the arrivals stall, warm-up ones included.
        flags.rate = Some(100.0);
        let (samples, elapsed) =
            tokio::time::timeout(Duration::from_secs(20), drive(&flags, &addr, Protocol::Grpc, &queries))
                .await
                .expect("the hard stop ends the run")
                .unwrap();
        let r = report(&flags, Protocol::Grpc, &samples, elapsed, &Slo::default());
        assert!((0.55..3.0).contains(&elapsed), "{elapsed} s");
        assert_eq!(r.errors, 0);
        assert!(
            r.unfinished > r.latency_ms.n,
            "{} unfinished, {} answered",
            r.unfinished,
            r.latency_ms.n
        );
        assert!(samples.iter().all(|s| s.ok != s.unfinished));
    }

    #[test]
    fn query_files_take_plain_lines_or_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.jsonl");
        std::fs::write(&p, "{\"query\":\"a\"}\n\n{\"text\":\"b\",\"label\":\"x\"}\nplain c\n").unwrap();
        assert_eq!(load_queries(Some(&p)).unwrap(), ["a", "b", "plain c"]);
        std::fs::write(&p, "{\"label\":\"x\"}\n").unwrap();
        assert!(load_queries(Some(&p)).unwrap_err().to_string().contains("no `query`"));
    }
}
