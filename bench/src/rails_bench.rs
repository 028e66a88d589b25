//! `flywheel-bench rails`: latency of each input rail and of all of them
//! together, in process, as the server runs them: on ~200-character queries,
//! or on distinct queries of `--chars` characters (long inputs). Remembered
//! embeddings are forgotten before every timed call, so each one runs the
//! encoder as a query the server has not seen would.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use flywheel_router::embed::Embedder;
use flywheel_router::guardrails::InputRails;
use flywheel_router::guardrails::jailbreak::Head;
use flywheel_router::guardrails::pii;
use flywheel_router::guardrails::rails::{JailbreakDetector, RailSet, RailsSpec};
use serde::Serialize;

use crate::stats::{Summary, summarize};

/// Options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Embedder folder.
    #[arg(long, default_value = "models/all-minilm-l6-v2")]
    pub embedder: PathBuf,
    /// Timed repetitions per measurement.
    #[arg(long, default_value_t = 200)]
    pub iterations: usize,
    /// Benchmark this query instead of the built-in ~200-character ones.
    #[arg(long, conflicts_with = "chars")]
    pub query: Option<String>,
    /// Benchmark distinct queries of this many characters (the built-in
    /// ones, joined in turn and cut at a word), e.g. near `max_query_chars`.
    #[arg(long)]
    pub chars: Option<usize>,
    /// Write the report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Queries of about 200 characters, benign, with and without PII.
const QUERIES: &[&str] = &[
    "I moved to a new apartment last month and I need to update my home address for payroll and benefits. Can you tell me which form to use and who approves it?",
    "My laptop keeps disconnecting from the office VPN every few minutes since yesterday's update. I already restarted it twice. What should I try next, and whom do I call?",
    "Please reimburse the client dinner from last Thursday; the receipt total is 184 dollars and my corporate card ending 4111 was declined, so I paid with my own card instead.",
    "Can you send the product specification sheet for the Acme Widget Pro to jane.doe@example.com before Friday? The customer wants to compare power draw and mounting options.",
];

/// Distinct queries of about `chars` characters: the built-in ones joined,
/// each starting at another one, cut at the last word that fits.
fn long_queries(chars: usize) -> Vec<String> {
    (0..QUERIES.len())
        .map(|start| {
            let mut q = String::new();
            for i in 0.. {
                let next = QUERIES[(start + i) % QUERIES.len()];
                if q.len() + 1 + next.len() > chars {
                    let room = chars.saturating_sub(q.len() + 1);
                    let cut = next[..room.min(next.len())].rfind(' ').unwrap_or(0);
                    if cut > 0 {
                        q.push(' ');
                        q.push_str(&next[..cut]);
                    }
                    break;
                }
                if !q.is_empty() {
                    q.push(' ');
                }
                q.push_str(next);
            }
            q
        })
        .collect()
}

#[derive(Debug, Serialize)]
struct Report {
    query_chars_mean: f64,
    /// Encoder tokens of each query (special tokens excluded).
    query_tokens: Vec<usize>,
    embed_ms: Summary,
    jailbreak_ms: Summary,
    pii_ms: Summary,
    all_input_rails_ms: Summary,
    /// One MiniLM feed-forward product at 50 tokens (50x384 by 384x1536, f32,
    /// candle on CPU): the unit cost that bounds the encoder's latency.
    ffn_matmul_50_tokens_ms: Summary,
    /// Its throughput (GFLOP/s).
    ffn_matmul_gflops: f64,
    iterations: usize,
    /// Jailbreak probability of each query.
    jailbreak_probability: Vec<f32>,
}

/// Run the benchmark.
///
/// # Errors
/// Embedder loading or failures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let embedder = Arc::new(Embedder::load(&args.embedder)?);
    let head = Head::builtin()?;
    let detector = JailbreakDetector::new(embedder.clone(), head.clone(), None);
    let rails = RailSet::new(
        RailsSpec::default(),
        Some(Arc::new(JailbreakDetector::new(embedder.clone(), head, None))),
    );
    // Warm-up: first calls allocate and fill caches.
    for q in QUERIES {
        detector.score(q)?;
        let _ = rails.check(q).await;
    }
    let (mut embed, mut jb, mut pii_ms, mut all) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let owned: Vec<String> = match (&args.query, args.chars) {
        (Some(q), _) => vec![q.clone()],
        (None, Some(chars)) => long_queries(chars),
        (None, None) => QUERIES.iter().map(|q| (*q).to_string()).collect(),
    };
    let queries: Vec<&str> = owned.iter().map(String::as_str).collect();
    for i in 0..args.iterations {
        let q = queries[i % queries.len()];
        Embedder::forget_recent();
        let t = Instant::now();
        embedder.embed(q)?;
        embed.push(t.elapsed().as_secs_f64() * 1e3);
        Embedder::forget_recent();
        let t = Instant::now();
        detector.score(q)?;
        jb.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let _ = pii::detect(q);
        pii_ms.push(t.elapsed().as_secs_f64() * 1e3);
        Embedder::forget_recent();
        let t = Instant::now();
        let _ = rails.check(q).await;
        all.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut matmul = Vec::new();
    {
        use candle_core::{Device, Tensor};
        let d = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (1536, 384), &d)?;
        let x = Tensor::randn(0f32, 1.0, (50, 384), &d)?;
        for _ in 0..10 {
            x.matmul(&w.t()?)?;
        }
        for _ in 0..args.iterations {
            let t = Instant::now();
            x.matmul(&w.t()?)?;
            matmul.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let matmul = summarize(&matmul);
    let report = Report {
        query_chars_mean: queries.iter().map(|q| q.chars().count() as f64).sum::<f64>() / queries.len() as f64,
        query_tokens: queries
            .iter()
            .map(|q| embedder.count_tokens(q))
            .collect::<Result<_, _>>()?,
        embed_ms: summarize(&embed),
        jailbreak_ms: summarize(&jb),
        pii_ms: summarize(&pii_ms),
        all_input_rails_ms: summarize(&all),
        ffn_matmul_gflops: 2.0 * 50.0 * 384.0 * 1536.0 / (matmul.p50 / 1e3) / 1e9,
        ffn_matmul_50_tokens_ms: matmul,
        iterations: args.iterations,
        jailbreak_probability: queries.iter().map(|q| detector.score(q)).collect::<Result<_, _>>()?,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(p) = &args.json {
        crate::write_json(p, &report)?;
    }
    Ok(())
}
