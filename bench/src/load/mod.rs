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

mod client;
mod drive;
mod report;

use client::*;
use drive::*;
pub use report::Ratio;
use report::*;

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
    /// Server address (its gRPC or its HTTP address, as `--protocol` says);
    /// several (comma-separated or repeated: replicas without a balancer in
    /// front) share the clients in turn, and the report counts each one's.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "http://127.0.0.1:50051")]
    addr: Vec<String>,
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
            let addrs = std::slice::from_ref(addr);
            let (samples, elapsed) = drive(&args, addrs, baseline_protocol, &queries).await?;
            let r = report(&args, addrs, baseline_protocol, &samples, elapsed, &slo);
            println!("baseline {addr} ({baseline_protocol:?}):");
            print_report(&r);
            Some(r)
        }
        None => None,
    };
    let (samples, elapsed) = drive(&args, &args.addr, args.protocol, &queries).await?;
    let mut report = report(&args, &args.addr, args.protocol, &samples, elapsed, &slo);
    if baseline.is_some() {
        println!("{} ({:?}):", args.addr.join(","), args.protocol);
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
            target: 0,
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
        let r = report(
            &cli.args,
            &cli.args.addr,
            Protocol::Grpc,
            &samples,
            1.0,
            &Slo::default(),
        );
        let (late, from) = (r.start_late_ms.unwrap(), r.latency_from_schedule_ms.unwrap());
        assert_eq!((late.p50, late.p99), (0.0, 10.0));
        // From send: 9.9 ms at p99; from schedule the five late ones are 19.6..20.0 ms.
        assert!((r.latency_ms.p99 - 9.9).abs() < 1e-9, "{}", r.latency_ms.p99);
        assert!((from.p99 - 19.9).abs() < 1e-9, "{}", from.p99);
        assert!((from.p50 - r.latency_ms.p50).abs() < 1e-9);
        // The closed loop has no schedule: neither figure is reported.
        let closed = Cli::try_parse_from(["load"]).unwrap();
        let r = report(
            &closed.args,
            &closed.args.addr,
            Protocol::Grpc,
            &samples,
            1.0,
            &Slo::default(),
        );
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
                drive(&cli.args, std::slice::from_ref(&addr), Protocol::Grpc, &queries),
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

    /// Counts the routes it answers.
    struct Counting(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    #[tonic::async_trait]
    impl flywheel_proto::v1::router_server::Router for Counting {
        async fn route(
            &self,
            request: tonic::Request<RouteRequest>,
        ) -> Result<tonic::Response<flywheel_proto::v1::RouteResponse>, tonic::Status> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Echo.route(request).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn load_on_several_addresses_reaches_each_and_is_counted_per_address() {
        use clap::Parser;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let mut addrs = Vec::new();
        let mut served = Vec::new();
        for _ in 0..3 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(format!("http://{}", listener.local_addr().unwrap()));
            let count = std::sync::Arc::new(AtomicUsize::new(0));
            served.push(count.clone());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(flywheel_proto::v1::router_server::RouterServer::new(Counting(count)))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
        }
        // Repeated and comma-separated flags name the same list.
        let repeated = Cli::try_parse_from(["load", "--addr", &addrs[0], "--addr", &addrs[1..].join(",")]).unwrap();
        assert_eq!(repeated.args.addr, addrs);
        let queries = std::sync::Arc::new(vec!["a".to_string()]);
        for flags in [
            ["--concurrency", "6", "--requests", "600"],
            ["--rate", "2000", "--duration", "0.3"],
        ] {
            let before: Vec<usize> = served.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            let joined = addrs.join(",");
            let cli = Cli::try_parse_from(["load", "--addr", joined.as_str()].into_iter().chain(flags)).unwrap();
            let (samples, elapsed) = tokio::time::timeout(
                Duration::from_secs(30),
                drive(&cli.args, &cli.args.addr, Protocol::Grpc, &queries),
            )
            .await
            .expect("the load run finishes")
            .unwrap();
            let r = report(
                &cli.args,
                &cli.args.addr,
                Protocol::Grpc,
                &samples,
                elapsed,
                &Slo::default(),
            );
            assert_eq!(r.errors, 0, "{flags:?}");
            let shares: Vec<(&str, usize)> = r.per_address.iter().map(|a| (a.addr.as_str(), a.requests)).collect();
            assert_eq!(shares.iter().map(|s| s.0).collect::<Vec<_>>(), addrs, "{flags:?}");
            assert_eq!(shares.iter().map(|s| s.1).sum::<usize>(), r.requests, "{flags:?}");
            for (i, (addr, n)) in shares.iter().enumerate() {
                // Each address gets its share of the clients or arrivals,
                // and the server there saw at least that many (plus warm-up).
                assert!(*n * 5 >= r.requests, "{flags:?}: {addr} served {n} of {}", r.requests);
                let seen = served[i].load(Ordering::Relaxed) - before[i];
                assert!(seen >= *n, "{flags:?}: {addr} counted {n} but saw {seen}");
            }
        }
        // One address: no per-address table.
        let one = Cli::try_parse_from(["load", "--addr", &addrs[0], "--requests", "10"]).unwrap();
        let (samples, elapsed) = drive(&one.args, &one.args.addr, Protocol::Grpc, &queries)
            .await
            .unwrap();
        let r = report(
            &one.args,
            &one.args.addr,
            Protocol::Grpc,
            &samples,
            elapsed,
            &Slo::default(),
        );
        assert!(r.per_address.is_empty());
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
            drive(&cli.args, std::slice::from_ref(&addr), Protocol::Grpc, &queries),
        )
        .await
        .expect("the hard stop ends the run")
        .unwrap();
        assert!(
            (0.55..3.0).contains(&elapsed),
            "the run took {elapsed} s, not duration + drain"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
        let r = report(
            &cli.args,
            &cli.args.addr,
            Protocol::Grpc,
            &samples,
            elapsed,
            &Slo::default(),
        );
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
        let (samples, elapsed) = tokio::time::timeout(
            Duration::from_secs(20),
            drive(&flags, std::slice::from_ref(&addr), Protocol::Grpc, &queries),
        )
        .await
        .expect("the hard stop ends the run")
        .unwrap();
        let r = report(&flags, &flags.addr, Protocol::Grpc, &samples, elapsed, &Slo::default());
        assert_eq!(
            (r.requests, r.unfinished, r.errors, r.latency_ms.n),
            (4, 4, 0, 0),
            "{samples:?}"
        );

        // The open loop: half the arrivals stall, warm-up ones included.
        flags.rate = Some(100.0);
        let (samples, elapsed) = tokio::time::timeout(
            Duration::from_secs(20),
            drive(&flags, std::slice::from_ref(&addr), Protocol::Grpc, &queries),
        )
        .await
        .expect("the hard stop ends the run")
        .unwrap();
        let r = report(&flags, &flags.addr, Protocol::Grpc, &samples, elapsed, &Slo::default());
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
