//! `flywheel-trainer ingest` and `eval-retrieval`: the experts' corpora.
//!
//! `ingest` reads, chunks and embeds every corpus the server config names,
//! with a progress bar, and fills the embedding cache the server starts
//! from. `eval-retrieval` measures recall@k, MRR and latency of BM25, dense
//! and hybrid retrieval on a labelled query set, and the latency on a
//! corpus scaled up to a target chunk count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use flywheel_router::config::EngineSettings;
use flywheel_router::embed::Embedder;
use flywheel_router::retrieval::{HybridRetriever, Mode, hybrid};
use indicatif::{ProgressBar, ProgressStyle};

use crate::rails::eval::Latency;
use serde::{Deserialize, Serialize};

/// `flywheel-trainer ingest`.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// Server config whose experts name their corpora (default: the built-in config).
    #[arg(long)]
    pub server_config: Option<PathBuf>,
}

fn bar(what: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{what} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} chunks ({{per_sec}}, eta {{eta}})"
    )) {
        bar.set_style(style);
    }
    bar
}

fn build(settings: &EngineSettings, what: &str) -> anyhow::Result<HybridRetriever> {
    let progress = bar(what);
    let retriever = hybrid::from_settings(settings, None, &mut |done, total| {
        progress.set_length(total as u64);
        progress.set_position(done as u64);
    })?
    .context("no expert in the config has a `corpus`")?;
    progress.finish_and_clear();
    Ok(retriever)
}

/// Run `ingest`: build the index, print what it holds.
///
/// # Errors
/// An unreadable config or corpus, or a failed build.
pub fn ingest(args: &IngestArgs) -> anyhow::Result<()> {
    let settings = crate::cli::settings(args.server_config.as_deref())?;
    let t = Instant::now();
    let retriever = build(&settings, "embedding")?;
    println!("{:<12} {:>9} {:>7}", "expert", "documents", "chunks");
    for (expert, docs, chunks) in retriever.experts() {
        println!("{expert:<12} {docs:>9} {chunks:>7}");
    }
    let s = retriever.stats();
    println!(
        "{} documents, {} chunks ({} embedded now, {} from the cache {}) in {:.1} s",
        s.documents,
        s.chunks,
        s.embedded,
        s.chunks - s.embedded,
        settings.retrieval.cache_dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `flywheel-trainer eval-retrieval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Labelled queries: JSONL with `query`, `expert` and `doc_id` (the document that answers).
    #[arg(long, default_value = "server/kb/queries.jsonl")]
    pub queries: PathBuf,
    /// Server config whose experts name their corpora (default: the built-in config).
    #[arg(long)]
    pub server_config: Option<PathBuf>,
    /// Cut-offs of recall@k (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,3,5")]
    pub k: Vec<usize>,
    /// Passes over the queries for the latency percentiles.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Also time hybrid retrieval on the corpora copied until the largest expert has this many chunks (0: skip).
    #[arg(long, default_value_t = 1000)]
    pub scale_chunks: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct Labelled {
    query: String,
    expert: String,
    doc_id: String,
}

/// Quality and latency of one mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModeReport {
    /// `bm25`, `dense` or `hybrid`.
    pub mode: String,
    /// Recall@k: share of queries whose document is in the top k, per k.
    pub recall: BTreeMap<usize, f64>,
    /// Mean reciprocal rank of the document (0 when not retrieved in the candidates).
    pub mrr: f64,
    /// Latency of one retrieval (query embedding included), ms.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

/// The evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetrievalReport {
    /// Labelled queries.
    pub queries: usize,
    /// Chunks in the index.
    pub chunks: usize,
    /// Per mode.
    pub modes: Vec<ModeReport>,
    /// Hybrid latency on the scaled corpus: (chunks of the largest expert, p50 ms, p99 ms).
    pub scaled: Option<(usize, f64, f64)>,
}

fn read_queries(path: &Path) -> anyhow::Result<Vec<Labelled>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{} line {}: expected {{\"query\", \"expert\", \"doc_id\"}}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Recall@k and reciprocal rank of `relevant` in `ranked` document ids.
pub fn rank_metrics(ranked: &[String], relevant: &str, ks: &[usize]) -> (Vec<bool>, f64) {
    let pos = ranked.iter().position(|d| d == relevant);
    let hits = ks.iter().map(|&k| pos.is_some_and(|p| p < k)).collect();
    (hits, pos.map_or(0.0, |p| 1.0 / (p + 1) as f64))
}

/// Distinct documents of `passages`, in rank order.
fn doc_ranking(passages: &[flywheel_router::retrieval::Passage]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in passages {
        if !out.contains(&p.doc_id) {
            out.push(p.doc_id.clone());
        }
    }
    out
}

/// Run `eval-retrieval`.
///
/// # Errors
/// Unreadable inputs or a failed build.
pub fn evaluate(args: &EvalArgs) -> anyhow::Result<RetrievalReport> {
    let settings = crate::cli::settings(args.server_config.as_deref())?;
    let queries = read_queries(&args.queries)?;
    anyhow::ensure!(!queries.is_empty(), "{} has no queries", args.queries.display());
    let retriever = build(&settings, "indexing")?;
    let depth = settings
        .retrieval
        .candidates
        .max(args.k.iter().copied().max().unwrap_or(5));
    let mut modes = Vec::new();
    for mode in Mode::ALL {
        let mut hits = vec![0usize; args.k.len()];
        let mut rr = 0.0;
        let mut times = Vec::new();
        for pass in 0..args.repeat.max(1) {
            for q in &queries {
                // Each search embeds its query as a new one would be.
                Embedder::forget_recent();
                let t = Instant::now();
                let found = retriever.search(&q.expert, &q.query, mode, depth)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                if pass == 0 {
                    let (h, r) = rank_metrics(&doc_ranking(&found), &q.doc_id, &args.k);
                    for (acc, hit) in hits.iter_mut().zip(h) {
                        *acc += usize::from(hit);
                    }
                    rr += r;
                }
            }
        }
        let n = queries.len() as f64;
        let Latency { p50, p99, .. } = Latency::of(times);
        modes.push(ModeReport {
            mode: mode.as_str().into(),
            recall: args.k.iter().zip(&hits).map(|(k, h)| (*k, *h as f64 / n)).collect(),
            mrr: rr / n,
            p50_ms: p50,
            p99_ms: p99,
        });
    }
    let scaled = if args.scale_chunks > 0 {
        Some(scaled_latency(
            &settings,
            &retriever,
            &queries,
            args.scale_chunks,
            args.repeat,
        )?)
    } else {
        None
    };
    let report = RetrievalReport {
        queries: queries.len(),
        chunks: retriever.stats().chunks,
        modes,
        scaled,
    };
    print_report(&report, &args.k);
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Hybrid latency with every corpus copied until the largest expert holds
/// at least `target` chunks.
fn scaled_latency(
    settings: &EngineSettings,
    base: &HybridRetriever,
    queries: &[Labelled],
    target: usize,
    repeat: usize,
) -> anyhow::Result<(usize, f64, f64)> {
    let largest = base.experts().iter().map(|e| e.2).max().unwrap_or(1).max(1);
    let copies = target.div_ceil(largest);
    let dir = tempfile::tempdir()?;
    let mut scaled = settings.clone();
    for source in base.sources() {
        let out = dir.path().join(&source.expert);
        for c in 0..copies {
            copy_tree(&source.dir, &out.join(format!("copy{c}")))?;
        }
        if let Some(e) = scaled.experts.iter_mut().find(|e| e.name == source.expert) {
            e.corpus = Some(out);
        }
    }
    let retriever = build(&scaled, "scaling")?;
    let chunks = retriever.experts().iter().map(|e| e.2).max().unwrap_or(0);
    let mut times = Vec::new();
    for _ in 0..repeat.max(1) {
        for q in queries {
            Embedder::forget_recent();
            let t = Instant::now();
            retriever.search(&q.expert, &q.query, Mode::Hybrid, settings.retrieval.candidates)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let Latency { p50, p99, .. } = Latency::of(times);
    Ok((chunks, p50, p99))
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        let dest = to.join(path.file_name().context("a file without a name")?);
        if path.is_dir() {
            copy_tree(&path, &dest)?;
        } else {
            std::fs::copy(&path, &dest)?;
        }
    }
    Ok(())
}

fn print_report(r: &RetrievalReport, ks: &[usize]) {
    println!("{} queries, {} chunks", r.queries, r.chunks);
    let mut head = format!("{:<8}", "mode");
    for k in ks {
        head.push_str(&format!(" {:>10}", format!("recall@{k}")));
    }
    head.push_str(&format!(" {:>6} {:>8} {:>8}", "MRR", "p50 ms", "p99 ms"));
    println!("{head}");
    for m in &r.modes {
        let mut line = format!("{:<8}", m.mode);
        for k in ks {
            line.push_str(&format!(" {:>10.3}", m.recall.get(k).copied().unwrap_or(0.0)));
        }
        line.push_str(&format!(" {:>6.3} {:>8.2} {:>8.2}", m.mrr, m.p50_ms, m.p99_ms));
        println!("{line}");
    }
    if let Some((chunks, p50, p99)) = r.scaled {
        println!("hybrid on {chunks} chunks per expert: p50 {p50:.2} ms, p99 {p99:.2} ms");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_and_reciprocal_rank_of_the_relevant_document() {
        let ranked: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_eq!(rank_metrics(&ranked, "b", &[1, 3]), (vec![false, true], 0.5));
        assert_eq!(rank_metrics(&ranked, "z", &[1, 3]), (vec![false, false], 0.0));
    }

    #[test]
    fn a_document_counts_once_at_its_best_chunk() {
        let p = |doc: &str| flywheel_router::retrieval::Passage {
            doc_id: doc.into(),
            title: String::new(),
            chunk_id: String::new(),
            text: String::new(),
            score: 0.0,
        };
        assert_eq!(doc_ranking(&[p("a"), p("a"), p("b")]), ["a", "b"]);
    }
}
