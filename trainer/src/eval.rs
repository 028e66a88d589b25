//! `flywheel-trainer eval`: measure a model file as the server would serve it.
//!
//! The model is loaded with the server's loader into a router slot and every
//! test query goes through the router agent's own decision code (prompt,
//! label scoring, calibration for base models), so the artifact measured is
//! the artifact served. The report has accuracy, per-class precision, recall
//! and F1, macro-F1, the confusion matrix, decision latency percentiles and
//! the model size; two models compared on the same frozen test set also get
//! McNemar's exact test, so a promotion is not decided by noise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use flywheel_router::agents::RouterAgent;
use flywheel_router::clock::process_cpu_seconds;
use flywheel_router::config::{EngineSettings, ExpertSpec, ModelSpec, RouterSpec};
use flywheel_router::device::DeviceChoice;
use flywheel_router::engine::{ModelKind, ModelLoader};
use flywheel_router::models::slots::{ServedModel, Slot};
use serde::{Deserialize, Serialize};

use crate::curate::dataset::{Columns, Example, LabelSource, read_examples_with, read_texts};
use crate::rails::eval::percentile;

/// `flywheel-trainer eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Model file (GGUF) to evaluate.
    #[arg(long)]
    pub model: PathBuf,
    /// Compare with this model on the same test set (e.g. the incumbent).
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// The test set.
    #[command(flatten)]
    pub test: TestArgs,
    /// Server config whose router instructions and expert descriptions
    /// prompt base (not fine-tuned) models (without it they see the bare
    /// labels), and whose router model entry says how models are loaded
    /// (device, activations, weights).
    #[arg(long)]
    pub server_config: Option<PathBuf>,
    /// Device.
    #[command(flatten)]
    pub device: DeviceArg,
    /// Queries outside the label set (JSONL or CSV; e.g. another dataset's
    /// test file): the report gives the share the router turns away to the
    /// fallback expert (out-of-scope recall).
    #[arg(long)]
    pub out_of_scope: Option<PathBuf>,
    /// Text column of `--out-of-scope`.
    #[arg(long, default_value = "text")]
    pub out_of_scope_text_column: String,
    /// Use N evenly spaced rows of `--out-of-scope` (the same rows every run).
    #[arg(long)]
    pub out_of_scope_limit: Option<usize>,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write the confusion matrix of `--model` as a PNG here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// The labelled test set of the commands that measure models (`eval`, `compare`).
#[derive(Debug, Clone, clap::Args)]
pub struct TestArgs {
    /// Labelled test data: JSONL or CSV with `text` and `label`.
    #[arg(long)]
    pub data: PathBuf,
    /// Text column.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Label column.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Evaluate only N rows, drawn stratified by label with a fixed seed (the
    /// same rows every run). The candidate labels are still all of the file's.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl TestArgs {
    /// The examples and the file's label set ([`read_test`]).
    ///
    /// # Errors
    /// As [`read_test`].
    pub fn read(&self) -> anyhow::Result<(Vec<Example>, Vec<String>)> {
        read_test(&self.data, &self.text_column, &self.label_column, self.limit)
    }
}

/// `--device` of the commands that evaluate models (`eval`, `promote`, `cycle`).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct DeviceArg {
    /// Device the evaluated models run on: `cpu`, `auto`, `cuda` or `cuda:N`
    /// (default: the router model's `device` in `--server-config`, else the
    /// CPU). Decision latencies, and so a latency gate, are that device's.
    #[arg(long = "device", env = "FLYWHEEL_DEVICE")]
    pub choice: Option<DeviceChoice>,
}

/// How models are evaluated: the router's model entry they are loaded with
/// and the server config that prompts base models.
#[derive(Debug, Clone)]
pub struct EvalSetup {
    configured: Option<EngineSettings>,
    model: ModelSpec,
}

impl EvalSetup {
    /// The router's model entry of `server_config` (device, activations,
    /// weights, ...; the default entry without one), on `device` when given.
    ///
    /// # Errors
    /// An unreadable config, one without the router's model entry, or a
    /// device this binary cannot use.
    pub fn new(server_config: Option<&Path>, device: DeviceArg) -> anyhow::Result<Self> {
        let configured = server_config.map(|p| crate::cli::settings(Some(p))).transpose()?;
        let mut model = match (&configured, server_config) {
            (Some(s), Some(path)) => s.models.get(&s.router.model).cloned().with_context(|| {
                let name = &s.router.model;
                format!(
                    "{}: the router's model `{name}` has no [models.{name}] entry",
                    path.display()
                )
            })?,
            _ => EngineSettings::default()
                .models
                .into_values()
                .next()
                .context("default model entry")?,
        };
        let source = match (device.choice, server_config) {
            (Some(d), _) => {
                model.device = d;
                "--device".to_string()
            }
            (None, Some(p)) => format!("the router model's device in {}", p.display()),
            (None, None) => "the default device".to_string(),
        };
        model.device.check_supported().with_context(|| source)?;
        Ok(Self { configured, model })
    }

    /// The device models are evaluated on.
    pub fn device(&self) -> DeviceChoice {
        self.model.device
    }
}

/// Precision, recall and F1 of one label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Label.
    pub label: String,
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// F1.
    pub f1: f64,
    /// Test examples with this label.
    pub support: usize,
}

/// Evaluation of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    /// Model file.
    pub model: String,
    /// Version label.
    pub version: String,
    /// File size in bytes.
    pub size_bytes: u64,
    /// Weights in the model's files (out-of-scope reference embeddings not
    /// counted; 0 when they could not be read).
    #[serde(default)]
    pub parameters: u64,
    /// Fine-tuned (prompted as trained) or base (zero-shot prompt).
    pub fine_tuned: bool,
    /// How it routes.
    #[serde(default = "label_scoring")]
    pub kind: ModelKind,
    /// Device it ran on, as asked (`auto` may have fallen back to the CPU,
    /// with a warning in the log).
    #[serde(default)]
    pub device: String,
    /// Test examples.
    pub n: usize,
    /// Share predicted right.
    pub accuracy: f64,
    /// Mean F1 over labels.
    pub macro_f1: f64,
    /// Per label.
    pub per_class: Vec<ClassMetrics>,
    /// Label order of the confusion matrix.
    pub labels: Vec<String>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
    /// Decision latency median (ms).
    pub latency_p50_ms: f64,
    /// Decision latency 99th percentile (ms).
    pub latency_p99_ms: f64,
    /// CPU seconds this process spent per 1,000 test decisions (the cost of
    /// routing, whatever the number of cores).
    #[serde(default)]
    pub cpu_seconds_per_1k: f64,
    /// Whether each example was predicted right, in test-file order.
    pub correct: Vec<bool>,
    /// The expert chosen for each example, in test-file order.
    #[serde(default)]
    pub predicted: Vec<String>,
    /// Test examples the router turned away to the fallback expert (below the
    /// confidence threshold, or out of scope).
    #[serde(default)]
    pub rejected: usize,
    /// Share predicted right and not turned away.
    #[serde(default)]
    pub in_scope_accuracy: f64,
    /// Queries from outside the label set, when given.
    #[serde(default)]
    pub out_of_scope: Option<OutOfScopeReport>,
}

#[cfg(test)]
impl ModelReport {
    /// A report with the given numbers and nothing else (for tests of what
    /// reads reports).
    pub(crate) fn fixture(version: &str, accuracy: f64, p50_ms: f64, p99_ms: f64) -> Self {
        Self {
            model: format!("{version}.gguf"),
            version: version.into(),
            size_bytes: 1,
            parameters: 1,
            fine_tuned: version != "base",
            kind: ModelKind::LabelScoring,
            device: "cpu".into(),
            n: 100,
            accuracy,
            macro_f1: accuracy,
            per_class: Vec::new(),
            labels: Vec::new(),
            confusion: Vec::new(),
            latency_p50_ms: p50_ms,
            latency_p99_ms: p99_ms,
            cpu_seconds_per_1k: p50_ms,
            correct: Vec::new(),
            predicted: Vec::new(),
            rejected: 0,
            in_scope_accuracy: accuracy,
            out_of_scope: None,
        }
    }
}

fn label_scoring() -> ModelKind {
    ModelKind::LabelScoring
}

/// How a router treats queries from outside its label set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutOfScopeReport {
    /// The file.
    pub data: String,
    /// Queries.
    pub n: usize,
    /// Share turned away to the fallback expert.
    pub recall: f64,
    /// Decision latency median (ms).
    pub latency_p50_ms: f64,
}

/// Queries from outside the label set.
#[derive(Debug, Clone, Default)]
pub struct OutOfScope {
    /// The file.
    pub data: String,
    /// Its queries.
    pub queries: Vec<String>,
}

impl OutOfScope {
    /// Read the `text_column` of `path`, `limit` evenly spaced rows when given.
    ///
    /// # Errors
    /// An unreadable file or a limit of 0.
    pub fn read(path: &Path, text_column: &str, limit: Option<usize>) -> anyhow::Result<Self> {
        anyhow::ensure!(limit != Some(0), "--out-of-scope-limit must be at least 1");
        let rows = read_texts(path, text_column)?;
        let step = limit.map_or(1, |n| rows.len().div_ceil(n).max(1));
        Ok(Self {
            data: path.display().to_string(),
            queries: rows.into_iter().step_by(step).collect(),
        })
    }
}

/// McNemar's exact test between two models on the same examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Accuracy of the model minus that of the other.
    pub accuracy_delta: f64,
    /// Examples only the model gets right.
    pub only_model_right: usize,
    /// Examples only the other gets right.
    pub only_other_right: usize,
    /// Two-sided exact p-value (binomial on the discordant pairs).
    pub p_value: f64,
}

/// The JSON report: `accuracy` at the top level is the evaluated model's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Accuracy of `--model`.
    pub accuracy: f64,
    /// Test file.
    pub data: String,
    /// `--model`.
    pub model: ModelReport,
    /// `--against`, when given.
    pub against: Option<ModelReport>,
    /// Model vs against.
    pub comparison: Option<Comparison>,
}

/// Two-sided exact McNemar p-value for `b` and `c` discordant pairs.
pub fn mcnemar_p(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // log C(n, i) accumulated in log space: n can be in the thousands.
    let mut log_c = 0.0f64;
    let mut tail = 0.0f64;
    let ln_half_n = n as f64 * 0.5f64.ln();
    for i in 0..=k {
        if i > 0 {
            log_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (log_c + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

/// Compare two per-example correctness vectors.
pub fn compare(model: &ModelReport, other: &ModelReport) -> Comparison {
    let b = model
        .correct
        .iter()
        .zip(&other.correct)
        .filter(|(m, o)| **m && !**o)
        .count();
    let c = model
        .correct
        .iter()
        .zip(&other.correct)
        .filter(|(m, o)| !**m && **o)
        .count();
    Comparison {
        accuracy_delta: model.accuracy - other.accuracy,
        only_model_right: b,
        only_other_right: c,
        p_value: mcnemar_p(b, c),
    }
}

/// Metrics of predictions against truths over `labels`.
pub fn score(labels: &[String], truth: &[String], pred: &[String]) -> (f64, f64, Vec<ClassMetrics>, Vec<Vec<usize>>) {
    let index: BTreeMap<&str, usize> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
    let mut confusion = vec![vec![0usize; labels.len()]; labels.len()];
    let mut right = 0;
    for (t, p) in truth.iter().zip(pred) {
        if let (Some(&ti), Some(&pi)) = (index.get(t.as_str()), index.get(p.as_str())) {
            confusion[ti][pi] += 1;
        }
        right += usize::from(t == p);
    }
    let per_class: Vec<ClassMetrics> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let tp = confusion[i][i] as f64;
            let predicted: usize = confusion.iter().map(|row| row[i]).sum();
            let support: usize = confusion[i].iter().sum();
            let precision = if predicted == 0 { 0.0 } else { tp / predicted as f64 };
            let recall = if support == 0 { 0.0 } else { tp / support as f64 };
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            ClassMetrics {
                label: l.clone(),
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect();
    let macro_f1 = per_class.iter().map(|c| c.f1).sum::<f64>() / labels.len().max(1) as f64;
    (right as f64 / truth.len().max(1) as f64, macro_f1, per_class, confusion)
}

/// Router settings for evaluation: the server config's instructions and
/// expert descriptions where it has them, the bare label otherwise.
fn router_settings(labels: &[String], configured: Option<&EngineSettings>) -> (RouterSpec, Vec<ExpertSpec>) {
    let mut router = configured
        .as_ref()
        .map(|s| s.router.clone())
        .unwrap_or_else(|| RouterSpec {
            instructions: "You classify messages. Reply with the name of the one category that fits.".into(),
            ..RouterSpec::default()
        });
    if configured.is_none() {
        router.confidence_threshold = 0.0;
    }
    let experts = labels
        .iter()
        .map(|l| {
            let description = configured
                .as_ref()
                .and_then(|s| s.experts.iter().find(|e| &e.name == l))
                .map(|e| e.description.clone())
                .unwrap_or_else(|| l.clone());
            ExpertSpec {
                name: l.clone(),
                description,
                corpus: None,
                ..EngineSettings::default().experts[0].clone()
            }
        })
        .collect();
    router.fallback_expert = labels.first().cloned().unwrap_or_default();
    (router, experts)
}

/// The version a training run gave the model (its `manifest.json` beside the
/// file, or in the folder of an encoder classifier).
pub fn manifest_version(model: &Path) -> Option<String> {
    let inside = model.join("manifest.json");
    let manifest = if model.is_dir() && inside.is_file() {
        inside
    } else {
        model.parent()?.join("manifest.json")
    };
    let text = std::fs::read_to_string(manifest).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v["version"].as_str()?.to_string())
}

/// The label set to evaluate on: the test labels plus every label a
/// fine-tuned model among `models` was trained for (it may answer any of them).
///
/// # Errors
/// A model whose header cannot be read.
pub fn label_space(test_labels: &[String], models: &[&Path]) -> anyhow::Result<Vec<String>> {
    let mut labels = test_labels.to_vec();
    for m in models {
        if let Some(task) = flywheel_router::models::task::read_task(m)? {
            labels.extend(task.labels);
        }
    }
    labels.sort();
    labels.dedup();
    Ok(labels)
}

/// The model at `path` loaded as `setup` says into a router agent whose
/// experts are `labels`, warmed up.
///
/// # Errors
/// The model fails to load, or was trained for other labels.
pub async fn load_router(
    path: &Path,
    labels: &[String],
    setup: &EvalSetup,
) -> anyhow::Result<(RouterAgent, Arc<ServedModel>)> {
    let spec = ModelSpec {
        path: path.to_path_buf(),
        version: manifest_version(path),
        ..setup.model.clone()
    };
    let served = Arc::new(
        ServedModel::load(&spec, &ModelLoader, true)
            .await
            .with_context(|| format!("loading {}", path.display()))?,
    );
    let (router_spec, experts) = router_settings(labels, setup.configured.as_ref());
    let agent = RouterAgent::new(&router_spec, &experts, Arc::new(Slot::new("router", served.clone())))
        .with_context(|| format!("{} as a router for the labels {labels:?}", path.display()))?;
    agent.warm_up(&served).await?;
    Ok((agent, served))
}

/// Evaluate the model at `path` on `examples` through the router agent.
///
/// # Errors
/// The model fails to load or to score.
pub async fn evaluate_model(
    path: &Path,
    examples: &[Example],
    labels: &[String],
    setup: &EvalSetup,
    out_of_scope: Option<&OutOfScope>,
) -> anyhow::Result<ModelReport> {
    let (agent, served) = load_router(path, labels, setup).await?;
    // Decisions are timed from scratch, not on encodings an earlier model left.
    flywheel_router::embed::forget_recent();
    let mut preds = Vec::with_capacity(examples.len());
    let mut latencies = Vec::with_capacity(examples.len());
    let bar = indicatif::ProgressBar::new(examples.len() as u64);
    let mut turned_away = Vec::with_capacity(examples.len());
    let cpu = process_cpu_seconds();
    for e in examples {
        let d = agent.decide(&e.text).await?;
        latencies.push(d.latency_ms);
        preds.push(d.top_expert);
        turned_away.push(d.fallback);
        bar.inc(1);
    }
    let cpu = process_cpu_seconds() - cpu;
    bar.finish_and_clear();
    let oos = match out_of_scope {
        Some(o) => {
            let mut away = 0usize;
            let mut lat = Vec::with_capacity(o.queries.len());
            for q in &o.queries {
                let d = agent.decide(q).await?;
                away += usize::from(d.fallback);
                lat.push(d.latency_ms);
            }
            lat.sort_by(f64::total_cmp);
            Some(OutOfScopeReport {
                data: o.data.clone(),
                n: o.queries.len(),
                recall: away as f64 / o.queries.len().max(1) as f64,
                latency_p50_ms: percentile(&lat, 0.5),
            })
        }
        None => None,
    };
    let truth: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
    let (accuracy, macro_f1, per_class, confusion) = score(labels, &truth, &preds);
    latencies.sort_by(f64::total_cmp);
    Ok(ModelReport {
        model: path.display().to_string(),
        version: served.version.clone(),
        size_bytes: served.size_bytes,
        parameters: parameters(path).unwrap_or_else(|e| {
            tracing::warn!(model = %path.display(), error = %format!("{e:#}"), "cannot count the parameters");
            0
        }),
        fine_tuned: served.task.is_some(),
        kind: served.kind(),
        device: setup.model.device.to_string(),
        n: examples.len(),
        accuracy,
        macro_f1,
        per_class,
        labels: labels.to_vec(),
        confusion,
        latency_p50_ms: percentile(&latencies, 0.5),
        latency_p99_ms: percentile(&latencies, 0.99),
        cpu_seconds_per_1k: cpu / examples.len().max(1) as f64 * 1000.0,
        correct: truth.iter().zip(&preds).map(|(t, p)| t == p).collect(),
        predicted: preds.clone(),
        rejected: turned_away.iter().filter(|&&a| a).count(),
        in_scope_accuracy: truth
            .iter()
            .zip(&preds)
            .zip(&turned_away)
            .filter(|((t, p), a)| t == p && !**a)
            .count() as f64
            / truth.len().max(1) as f64,
        out_of_scope: oos,
    })
}

/// The model of a training output folder (its `model.gguf`), or `path`
/// itself (a GGUF file, or an encoder classifier folder).
pub fn model_file(path: &Path) -> PathBuf {
    let inside = path.join("model.gguf");
    if path.is_dir() && inside.is_file() {
        inside
    } else {
        path.to_path_buf()
    }
}

/// The weights of a router model: every tensor of a GGUF file, or of an
/// encoder classifier folder's safetensors files, less the out-of-scope
/// rule's reference embeddings (data, not weights).
///
/// # Errors
/// Unreadable or malformed files.
pub fn parameters(path: &Path) -> anyhow::Result<u64> {
    use flywheel_router::engine::classifier::{self, decoder};
    let counted = |name: &str| !name.starts_with("neighbours.") && name != decoder::NEIGHBOURS;
    if classifier::is_classifier(path) {
        let mut n = 0u64;
        for file in ["model.safetensors", classifier::HEAD_FILE] {
            let file = path.join(file);
            let tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
                .with_context(|| format!("reading {}", file.display()))?;
            n += tensors
                .iter()
                .filter(|(name, _)| counted(name))
                .map(|(_, t)| t.elem_count() as u64)
                .sum::<u64>();
        }
        return Ok(n);
    }
    let mut file =
        std::io::BufReader::new(std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?);
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .with_context(|| format!("reading the GGUF header of {}", path.display()))?;
    Ok(content
        .tensor_infos
        .iter()
        .filter(|(name, _)| counted(name))
        .map(|(_, t)| t.shape.elem_count() as u64)
        .sum())
}

/// Write `value` as pretty JSON to `path` (a command's `--report`).
///
/// # Errors
/// The file cannot be written.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?).with_context(|| format!("writing {}", path.display()))
}

/// Seed of `--limit`'s sample: fixed, so runs compare on the same rows.
const LIMIT_SEED: u64 = 0;

/// Read the test examples (all, or `limit` of them drawn stratified by
/// label) and the sorted label set of the whole file.
///
/// # Errors
/// Unreadable data, a limit of 0, fewer than two labels.
pub fn read_test(
    path: &Path,
    text_column: &str,
    label_column: &str,
    limit: Option<usize>,
) -> anyhow::Result<(Vec<Example>, Vec<String>)> {
    let columns = Columns {
        text: text_column.into(),
        label: label_column.into(),
    };
    anyhow::ensure!(
        limit != Some(0),
        "--limit must be at least 1 (leave it out to use every row)"
    );
    let examples = read_examples_with(path, LabelSource::Import, &columns)?;
    // The label set is the whole file's: a sample (or a file sorted by
    // label) must not make the choice easier than the full test.
    let mut labels: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
    labels.sort();
    labels.dedup();
    anyhow::ensure!(
        labels.len() >= 2,
        "{} has {} distinct label(s); a router needs at least 2",
        path.display(),
        labels.len()
    );
    let examples = match limit {
        Some(n) => crate::finetune::stratified_sample(examples, n, LIMIT_SEED),
        None => examples,
    };
    Ok((examples, labels))
}

/// Run `flywheel-trainer eval`.
///
/// # Errors
/// Unreadable data, models that fail to load.
pub async fn run(args: &EvalArgs) -> anyhow::Result<EvalReport> {
    let setup = EvalSetup::new(args.server_config.as_deref(), args.device)?;
    let (examples, labels) = args.test.read()?;
    let mut models = vec![args.model.as_path()];
    models.extend(args.against.as_deref());
    let labels = label_space(&labels, &models)?;
    let oos = args
        .out_of_scope
        .as_deref()
        .map(|p| OutOfScope::read(p, &args.out_of_scope_text_column, args.out_of_scope_limit))
        .transpose()?;
    let model = evaluate_model(&args.model, &examples, &labels, &setup, oos.as_ref()).await?;
    let against = match &args.against {
        Some(p) => Some(evaluate_model(p, &examples, &labels, &setup, oos.as_ref()).await?),
        None => None,
    };
    let comparison = against.as_ref().map(|a| compare(&model, a));
    let report = EvalReport {
        accuracy: model.accuracy,
        data: args.test.data.display().to_string(),
        model,
        against,
        comparison,
    };
    if let Some(path) = &args.report {
        write_json(path, &report)?;
    }
    if let Some(path) = &args.plot {
        let m = &report.model;
        let title = format!("{}: accuracy {:.1}% on {} examples", m.version, m.accuracy * 100.0, m.n);
        crate::plot::confusion_png(&m.labels, &m.confusion, &title, path)?;
    }
    Ok(report)
}

/// A readable summary of a report.
pub fn render(report: &EvalReport) -> String {
    let mut s = String::new();
    let mut models = vec![&report.model];
    models.extend(report.against.as_ref());
    s.push_str(&format!(
        "{} examples, decisions on device `{}`\n",
        report.model.n, report.model.device
    ));
    s.push_str(&format!(
        "{:<28} {:<18} {:>9} {:>9} {:>10} {:>10} {:>9}\n",
        "model", "kind", "accuracy", "macro-F1", "p50 ms", "p99 ms", "MB"
    ));
    for m in &models {
        s.push_str(&format!(
            "{:<28} {:<18} {:>8.1}% {:>9.3} {:>10.1} {:>10.1} {:>9.1}\n",
            m.version,
            m.kind.as_str(),
            m.accuracy * 100.0,
            m.macro_f1,
            m.latency_p50_ms,
            m.latency_p99_ms,
            m.size_bytes as f64 / 1e6
        ));
    }
    for m in &models {
        s.push_str(&format!(
            "{}: {} of {} in-scope queries turned away to the fallback; accuracy counting them wrong {:.1}%\n",
            m.version,
            m.rejected,
            m.n,
            m.in_scope_accuracy * 100.0
        ));
        if let Some(o) = &m.out_of_scope {
            s.push_str(&format!(
                "{}: out-of-scope recall {:.1}% of {} queries from {} (p50 {:.1} ms)\n",
                m.version,
                o.recall * 100.0,
                o.n,
                o.data,
                o.latency_p50_ms
            ));
        }
    }
    s.push_str(&format!("\nper class ({}):\n", report.model.version));
    let width = report
        .model
        .per_class
        .iter()
        .map(|c| c.label.chars().count())
        .fold(20, usize::max);
    s.push_str(&format!(
        "{:<width$} {:>9} {:>9} {:>9} {:>8}\n",
        "label", "precision", "recall", "F1", "support"
    ));
    for c in &report.model.per_class {
        s.push_str(&format!(
            "{:<width$} {:>9.3} {:>9.3} {:>9.3} {:>8}\n",
            c.label, c.precision, c.recall, c.f1, c.support
        ));
    }
    if let Some(c) = &report.comparison {
        s.push_str(&format!(
            "\nMcNemar: {} right only with the model, {} only with the other; p = {:.4} ({})\n",
            c.only_model_right,
            c.only_other_right,
            c.p_value,
            if c.p_value < 0.05 {
                "significant at 5%"
            } else {
                "not significant at 5%"
            }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_matches_the_exact_binomial() {
        // b = 0, c = 5: p = 2 * 0.5^5 = 0.0625.
        assert!((mcnemar_p(0, 5) - 0.0625).abs() < 1e-12);
        // b = 1, c = 9: p = 2 * (1 + 10) / 1024.
        assert!((mcnemar_p(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_p(4, 4), 1.0);
        assert_eq!(mcnemar_p(0, 0), 1.0);
        // Large counts stay finite and symmetric.
        let p = mcnemar_p(400, 480);
        assert!(p > 0.0 && p < 0.01, "{p}");
        assert_eq!(mcnemar_p(480, 400), p);
    }

    #[test]
    fn score_counts_per_class_metrics() {
        let labels: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let truth: Vec<String> = ["a", "a", "b", "b"].map(String::from).to_vec();
        let pred: Vec<String> = ["a", "b", "b", "b"].map(String::from).to_vec();
        let (acc, macro_f1, per, conf) = score(&labels, &truth, &pred);
        assert_eq!(acc, 0.75);
        assert_eq!(conf, vec![vec![1, 1], vec![0, 2]]);
        assert_eq!(per[0].precision, 1.0);
        assert_eq!(per[0].recall, 0.5);
        assert!((per[1].precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((macro_f1 - (2.0 / 3.0 + 0.8) / 2.0).abs() < 1e-12);
    }

    /// Models are evaluated as the server config's router entry loads them,
    /// on `--device` when given; a device this binary cannot use is refused
    /// before anything loads, naming where it came from.
    #[test]
    fn models_load_as_the_router_entry_says_on_the_asked_device() {
        use flywheel_router::engine::mistral::{Activations, Weights};
        let dir = tempfile::tempdir().unwrap();
        let config = |body: &str| {
            let path = dir.path().join("server.toml");
            std::fs::write(&path, body).unwrap();
            path
        };
        let device = |d: Option<&str>| DeviceArg {
            choice: d.map(|d| d.parse().unwrap()),
        };

        let default = EvalSetup::new(None, device(None)).unwrap();
        assert_eq!(
            default.model,
            EngineSettings::default().models.into_values().next().unwrap()
        );
        assert_eq!(default.device(), DeviceChoice::Cpu);

        let served = config(
            "[models.small]\npath = \"s.gguf\"\nweights = \"stored\"\nactivations = \"bf16\"\n\
             [models.big]\npath = \"b.gguf\"\n[router]\nmodel = \"small\"\n",
        );
        let setup = EvalSetup::new(Some(&served), device(None)).unwrap();
        assert_eq!(
            (setup.model.weights, setup.model.activations, setup.device()),
            (Weights::Stored, Activations::Bf16, DeviceChoice::Cpu)
        );
        let setup = EvalSetup::new(Some(&served), device(Some("auto"))).unwrap();
        assert_eq!(
            (setup.device(), setup.model.weights),
            (DeviceChoice::Auto, Weights::Stored)
        );

        let gpu = config("[models.m]\npath = \"m.gguf\"\ndevice = \"cuda:1\"\n[router]\nmodel = \"m\"\n");
        let on_cpu = EvalSetup::new(Some(&gpu), device(Some("cpu"))).unwrap();
        assert_eq!(on_cpu.device(), DeviceChoice::Cpu);
        if !flywheel_router::device::CUDA_BUILT {
            let err = format!("{:#}", EvalSetup::new(Some(&gpu), device(None)).unwrap_err());
            assert!(
                err.contains("the router model's device in") && err.contains("CUDA support"),
                "{err}"
            );
            let err = format!("{:#}", EvalSetup::new(None, device(Some("cuda"))).unwrap_err());
            assert!(err.starts_with("--device: ") && err.contains("CUDA support"), "{err}");
        }

        let orphan = config("[models.m]\npath = \"m.gguf\"\n[router]\nmodel = \"other\"\n");
        let err = format!("{:#}", EvalSetup::new(Some(&orphan), device(None)).unwrap_err());
        assert!(
            err.contains("router's model `other` has no [models.other] entry"),
            "{err}"
        );
    }

    #[test]
    fn test_sets_say_why_they_cannot_be_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.csv");
        std::fs::write(
            &path,
            "text,label\nwake me,alarm\nset an alarm,alarm\nrain today?,weather\n",
        )
        .unwrap();
        let err = read_test(&path, "text", "label", Some(0)).unwrap_err().to_string();
        assert!(err.contains("--limit must be at least 1"), "{err}");
        let one = dir.path().join("one.csv");
        std::fs::write(&one, "text,label\nwake me,alarm\nset an alarm,alarm\n").unwrap();
        let err = read_test(&one, "text", "label", None).unwrap_err().to_string();
        assert!(err.contains("has 1 distinct label(s)"), "{err}");
    }

    #[test]
    fn a_limit_samples_every_label_and_keeps_the_whole_label_set() {
        // Sorted by label, as test files often are: the first rows would
        // hold one label only.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.csv");
        let mut text = String::from("text,label\n");
        for label in ["alarm", "music", "weather"] {
            for i in 0..10 {
                text.push_str(&format!("{label} query {i},{label}\n"));
            }
        }
        std::fs::write(&path, text).unwrap();
        let (rows, labels) = read_test(&path, "text", "label", Some(6)).unwrap();
        assert_eq!(labels, ["alarm", "music", "weather"]);
        let count = |l: &str| rows.iter().filter(|e| e.label == l).count();
        assert_eq!((count("alarm"), count("music"), count("weather")), (2, 2, 2));
        let (again, _) = read_test(&path, "text", "label", Some(6)).unwrap();
        assert_eq!(again, rows, "the same rows every run");
        // Only one label's rows drawn: the candidates are still all three.
        let (rows, labels) = read_test(&path, "text", "label", Some(1)).unwrap();
        assert_eq!((rows.len(), labels.len()), (1, 3));
    }
}
