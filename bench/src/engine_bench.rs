//! In-process engine benchmark: the numbers a model costs on this machine.
//!
//! Route decisions run through the same [`RouterAgent`] the server uses, once
//! on an engine with the prefix cache (as served) and once on an engine
//! without it (the baseline), in the same run. TTFT prompts start with a
//! unique request number so that no prompt is served from the cache. A
//! fine-tuned router (a model file with a trained task) is prompted as the
//! server prompts it: its own system prompt, its labels as the experts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use flywheel_router::agents::RouterAgent;
use flywheel_router::config::{DEFAULT_MODEL_NAME, EngineSettings, ExpertSpec, RouterSpec};
use flywheel_router::engine::mistral::{
    Activations, DeviceChoice, MistralEngine, MistralOptions, PagedAttention, Weights,
};
use flywheel_router::engine::{ChatMessage, Engine, GenerateParams, GenerationEvent};
use flywheel_router::models::slots::{ServedModel, Slot};
use flywheel_router::models::task::{TrainedTask, read_task};
use futures::StreamExt;
use serde::Serialize;

use crate::stats::{Summary, summarize};

/// Queries of the kind the default experts serve, cycled through.
const QUERIES: &[&str] = &[
    "How many vacation days do I get per year?",
    "My laptop will not connect to the VPN from home.",
    "How do I submit an expense report for a client dinner?",
    "Does the Acme Widget Pro support wireless charging?",
    "What is the parental leave policy?",
    "I forgot my email password, how do I reset it?",
    "When is the quarterly budget review due?",
    "What are the dimensions of the Widget Mini?",
    "Can I carry over unused sick days?",
    "The printer on the third floor is jammed again.",
];

/// Arguments of `flywheel-bench engine`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// GGUF model (default: the default config's model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Route decisions measured per engine.
    #[arg(long, default_value_t = 100)]
    route_requests: usize,
    /// Also measure decisions spaced this far apart (ms; 0 skips it): the
    /// latency of a router that is idle when a query arrives, as opposed to
    /// back to back, where each decision also waits for the engine to finish
    /// with the previous one.
    #[arg(long, default_value_t = 50)]
    route_gap_ms: u64,
    /// TTFT samples.
    #[arg(long, default_value_t = 30)]
    ttft_requests: usize,
    /// Decode runs (128 tokens each).
    #[arg(long, default_value_t = 3)]
    decode_runs: usize,
    /// Also measure decode after a ~500-token prompt (the length of an
    /// expert's prompt with its retrieved passages).
    #[arg(long)]
    decode_long_prompt: bool,
    /// Device: `cpu`, `auto`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Activation and KV-cache type: `f32`, `bf16`, `f16` or `auto`.
    #[arg(long, default_value = "f32")]
    activations: Activations,
    /// Weights: `auto` (an f32 copy for the router engine, as stored for the
    /// generation engine), `stored` or `f32` (both engines).
    #[arg(long, default_value = "auto")]
    weights: Weights,
    /// Paged attention of the generation engine: `auto` (on a GPU), `on` or `off`.
    #[arg(long, default_value = "auto")]
    paged_attention: PagedAttention,
    /// Tokens the paged KV cache holds.
    #[arg(long, default_value_t = flywheel_router::config::paged::DEFAULT_PAGED_KV_TOKENS)]
    paged_kv_tokens: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    model_bytes: u64,
    load_ms: f64,
    route_ms: Summary,
    /// Decisions `route_gap_ms` apart (absent when not measured).
    route_ms_idle: Option<Summary>,
    route_gap_ms: u64,
    /// The same decisions on a generation engine: no prefix cache, or with
    /// paged attention its block-level one.
    route_ms_no_prefix_cache: Summary,
    route_prompt_tokens: u32,
    /// The model file carries a trained task: decisions used its prompt and labels.
    fine_tuned: bool,
    ttft_ms: Summary,
    ttft_prompt_tokens: u32,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
    /// Decode after a ~500-token prompt (absent unless asked for).
    decode_long_prompt: Option<LongDecode>,
    threads: usize,
    device: String,
    activations: Activations,
    weights: Weights,
    /// Whether the router engine multiplied with f32 weights.
    router_f32_weights: bool,
    /// Whether the generation engine (route baseline, TTFT, prefill, decode)
    /// multiplied with f32 weights.
    generation_f32_weights: bool,
    /// Whether the generation engine (TTFT, prefill, decode) ran paged attention.
    paged_attention: bool,
}

#[derive(Debug, Serialize)]
struct LongDecode {
    prompt_tokens: u32,
    tokens_per_second: f64,
}

/// Repetitions of the ~30-token passage in the long decode prompt (~500 tokens).
const LONG_PROMPT_PASSAGES: usize = 15;

/// Decode tokens/s (first token excluded) of `runs` 128-token answers to
/// `prompt(i)`, and the prompt's length in tokens.
async fn decode_rates(
    engine: &dyn Engine,
    runs: usize,
    prompt: impl Fn(usize) -> Vec<ChatMessage>,
) -> anyhow::Result<(Vec<f64>, u32)> {
    let mut rates = Vec::new();
    let mut prompt_tokens = 0;
    for i in 0..runs {
        let params = GenerateParams {
            max_tokens: 128,
            ..GenerateParams::default()
        };
        let mut stream = engine.generate(prompt(i), params).await?;
        let (mut first, mut last, mut deltas) = (None, None, 0u32);
        while let Some(ev) = stream.next().await {
            match ev? {
                GenerationEvent::Delta(_) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = Some(now);
                    deltas += 1;
                }
                GenerationEvent::Done(s) => prompt_tokens = s.usage.prompt_tokens,
            }
        }
        if let (Some(f), Some(l)) = (first, last)
            && deltas > 1
        {
            rates.push(f64::from(deltas - 1) / l.duration_since(f).as_secs_f64());
        }
    }
    Ok((rates, prompt_tokens))
}

fn options(path: &std::path::Path, router: bool, args: &Args) -> MistralOptions {
    MistralOptions {
        device: args.device,
        activations: args.activations,
        weights: args.weights,
        paged_attention: args.paged_attention,
        paged_kv_tokens: args.paged_kv_tokens,
        ..MistralOptions::new(path, router)
    }
}

/// The router's settings: the configured ones for a base model; for a
/// fine-tuned one its labels as the experts (the first as the fallback), as
/// a server configured for it would route.
fn router_settings(settings: &EngineSettings, task: Option<&TrainedTask>) -> (RouterSpec, Vec<ExpertSpec>) {
    let Some(task) = task else {
        return (settings.router.clone(), settings.experts.clone());
    };
    let experts = task
        .labels
        .iter()
        .map(|l| ExpertSpec {
            name: l.clone(),
            description: l.clone(),
            corpus: None,
            ..settings.experts[0].clone()
        })
        .collect();
    let router = RouterSpec {
        fallback_expert: task.labels.first().cloned().unwrap_or_default(),
        ..settings.router.clone()
    };
    (router, experts)
}

async fn route_latencies(
    engine: Arc<dyn Engine>,
    settings: &EngineSettings,
    task: Option<&TrainedTask>,
    n: usize,
    gaps: &[Duration],
) -> anyhow::Result<(Vec<Vec<f64>>, u32)> {
    let served = Arc::new(ServedModel {
        version: "bench".into(),
        path: PathBuf::new(),
        size_bytes: 0,
        loaded_at: SystemTime::now(),
        engine,
        task: task.cloned(),
    });
    let (router_spec, experts) = router_settings(settings, task);
    let router = RouterAgent::new(&router_spec, &experts, Arc::new(Slot::new("router", served.clone())))?;
    router.warm_up(&served).await?;
    let mut runs = Vec::with_capacity(gaps.len());
    let mut prompt_tokens = 0;
    for gap in gaps {
        let mut samples = Vec::with_capacity(n);
        for i in 0..n {
            if !gap.is_zero() {
                tokio::time::sleep(*gap).await;
            }
            let d = router.decide(QUERIES[i % QUERIES.len()]).await?;
            samples.push(d.latency_ms);
            prompt_tokens = d.prompt_tokens;
        }
        runs.push(samples);
    }
    Ok((runs, prompt_tokens))
}

/// A prompt of about 60 tokens, unique per `i`.
fn ttft_prompt(i: usize) -> Vec<ChatMessage> {
    vec![
        ChatMessage::system(format!(
            "Request {i}. You are the IT help desk of Acme Widgets Inc. Give short, practical troubleshooting steps."
        )),
        ChatMessage::user(
            "My laptop will not connect to the VPN from home since this morning. What should I check first?",
        ),
    ]
}

/// Run the engine benchmark and print its table.
///
/// # Errors
/// Model loading or engine failures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let settings = EngineSettings::default();
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| settings.models[DEFAULT_MODEL_NAME].path.clone());
    let model_bytes = std::fs::metadata(&path)
        .with_context(|| format!("model {}", path.display()))?
        .len();
    let task = read_task(&path).with_context(|| format!("model {}", path.display()))?;

    let started = Instant::now();
    let router = MistralEngine::load(&options(&path, true, &args)).await?;
    let router_f32_weights = router.f32_weights();
    let router: Arc<dyn Engine> = Arc::new(router);
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    eprintln!("loaded {} in {load_ms:.0} ms", path.display());
    // As served: a router engine, its prompt prefix primed in the cache.
    let gap = Duration::from_millis(args.route_gap_ms);
    let gaps: &[Duration] = if gap.is_zero() {
        &[Duration::ZERO]
    } else {
        &[Duration::ZERO, gap]
    };
    let (route, route_prompt_tokens) =
        route_latencies(router, &settings, task.as_ref(), args.route_requests, gaps).await?;
    // Baseline: the same decisions on a generation engine (no prefix cache).
    let engine = MistralEngine::load(&options(&path, false, &args)).await?;
    let paged_attention = engine.paged_attention();
    let generation_f32_weights = engine.f32_weights();
    let engine: Arc<dyn Engine> = Arc::new(engine);
    let (route_nocache, _) = route_latencies(
        engine.clone(),
        &settings,
        task.as_ref(),
        args.route_requests,
        &[Duration::ZERO],
    )
    .await?;

    let mut ttft = Vec::new();
    let mut ttft_prompt_tokens = 0;
    let mut prefill_tps = Vec::new();
    for i in 0..args.ttft_requests {
        let t = Instant::now();
        let params = GenerateParams {
            max_tokens: 2,
            ..GenerateParams::default()
        };
        let mut stream = engine.generate(ttft_prompt(i), params).await?;
        let mut first = None;
        while let Some(ev) = stream.next().await {
            match ev? {
                GenerationEvent::Delta(_) => {
                    first.get_or_insert(t.elapsed().as_secs_f64() * 1e3);
                }
                GenerationEvent::Done(s) => {
                    ttft_prompt_tokens = s.usage.prompt_tokens;
                    prefill_tps.push(s.prefill_tokens_per_second);
                }
            }
        }
        ttft.push(first.context("no token generated")?);
    }

    let short = |i: usize| {
        vec![ChatMessage::user(format!(
            "Run {i}: write a long story about a robot who learns to paint."
        ))]
    };
    let decode_tps = decode_rates(engine.as_ref(), args.decode_runs, short).await?;
    // The same, after a prompt as long as an expert's RAG prompt (retrieved
    // passages + question): the per-token cost at a realistic context length.
    let long = |i: usize| {
        let passage = "Employees accrue vacation monthly; unused days carry over up to five days \
                       into the next year, and requests go through the HR portal two weeks ahead. ";
        vec![
            ChatMessage::system(format!(
                "Run {i}. Answer from these passages.\n{}",
                passage.repeat(LONG_PROMPT_PASSAGES)
            )),
            ChatMessage::user("Write a long, detailed explanation of the vacation policy."),
        ]
    };
    let decode_tps_long = if args.decode_long_prompt {
        Some(decode_rates(engine.as_ref(), args.decode_runs, long).await?)
    } else {
        None
    };

    let report = Report {
        model: path.display().to_string(),
        model_bytes,
        load_ms,
        route_ms: summarize(&route[0]),
        route_ms_idle: route.get(1).map(|r| summarize(r)),
        route_gap_ms: args.route_gap_ms,
        route_ms_no_prefix_cache: summarize(&route_nocache[0]),
        route_prompt_tokens,
        fine_tuned: task.is_some(),
        ttft_ms: summarize(&ttft),
        ttft_prompt_tokens,
        prefill_tokens_per_second: summarize(&prefill_tps).p50,
        decode_tokens_per_second: summarize(&decode_tps.0).p50,
        decode_long_prompt: decode_tps_long.map(|(tps, prompt_tokens)| LongDecode {
            prompt_tokens,
            tokens_per_second: summarize(&tps).p50,
        }),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        device: args.device.to_string(),
        activations: args.activations,
        weights: args.weights,
        router_f32_weights,
        generation_f32_weights,
        paged_attention,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        crate::write_json(path, &report)?;
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "model            {} ({:.1} MB), {} threads, device {}",
        r.model,
        r.model_bytes as f64 / 1e6,
        r.threads,
        r.device
    );
    let kind = |f32: bool| if f32 { "f32" } else { "as stored" };
    println!(
        "load             {:.0} ms  (weights: router {}, generation {})",
        r.load_ms,
        kind(r.router_f32_weights),
        kind(r.generation_f32_weights)
    );
    println!(
        "route decision   p50 {:.1} ms  p99 {:.1} ms  ({} prompt tokens, prefix cache on{})",
        r.route_ms.p50,
        r.route_ms.p99,
        r.route_prompt_tokens,
        if r.fine_tuned {
            "; fine-tuned: its own prompt"
        } else {
            ""
        }
    );
    if let Some(idle) = &r.route_ms_idle {
        println!(
            "route when idle  p50 {:.1} ms  p99 {:.1} ms  (decisions {} ms apart)",
            idle.p50, idle.p99, r.route_gap_ms
        );
    }
    // A paged generation engine keeps its block-level prefix cache.
    let baseline = if r.paged_attention {
        "route (gen. eng.)"
    } else {
        "route (no cache)"
    };
    println!(
        "{baseline} p50 {:.1} ms  p99 {:.1} ms  -> router engine speed-up {:.2}x at p50",
        r.route_ms_no_prefix_cache.p50,
        r.route_ms_no_prefix_cache.p99,
        r.route_ms_no_prefix_cache.p50 / r.route_ms.p50
    );
    if r.paged_attention {
        println!("                 TTFT, prefill and decode below: generation engine with paged attention");
    }
    println!(
        "TTFT             p50 {:.1} ms  p99 {:.1} ms  ({} prompt tokens)",
        r.ttft_ms.p50, r.ttft_ms.p99, r.ttft_prompt_tokens
    );
    println!("prefill          {:.0} tok/s", r.prefill_tokens_per_second);
    println!("decode           {:.1} tok/s", r.decode_tokens_per_second);
    if let Some(long) = &r.decode_long_prompt {
        println!(
            "decode, long     {:.1} tok/s  (after a {}-token prompt)",
            long.tokens_per_second, long.prompt_tokens
        );
    }
}

#[cfg(test)]
mod tests {
    use flywheel_router::engine::stub::StubEngine;

    use super::*;

    fn served(task: Option<TrainedTask>) -> ServedModel {
        ServedModel {
            version: "m".into(),
            path: PathBuf::new(),
            size_bytes: 0,
            loaded_at: SystemTime::now(),
            engine: Arc::new(StubEngine::new(Duration::ZERO)),
            task,
        }
    }

    /// A fine-tuned router routes to its own labels (the server refuses a
    /// model trained for other labels than its experts); a base model to the
    /// configured experts.
    #[test]
    fn a_fine_tuned_router_gets_its_labels_as_the_experts() {
        let settings = EngineSettings::default();
        let task = TrainedTask {
            system_prompt: "Route.".into(),
            labels: vec!["alarm".into(), "music".into(), "weather".into()],
            kind: flywheel_router::engine::ModelKind::LabelScoring,
        };
        let (spec, experts) = router_settings(&settings, Some(&task));
        let names: Vec<&str> = experts.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["alarm", "music", "weather"]);
        assert_eq!(spec.fallback_expert, "alarm");
        let model = Arc::new(served(Some(task.clone())));
        let router = RouterAgent::new(&spec, &experts, Arc::new(Slot::new("router", model.clone()))).unwrap();
        router.check_model(&model).unwrap();
        // The configured experts would refuse it.
        let base = RouterAgent::new(
            &settings.router,
            &settings.experts,
            Arc::new(Slot::new("router", model.clone())),
        )
        .unwrap();
        assert!(base.check_model(&model).is_err());

        let (spec, experts) = router_settings(&settings, None);
        assert_eq!((spec, experts), (settings.router.clone(), settings.experts.clone()));
    }
}
