//! `flywheel-trainer train`: LoRA (or full) supervised fine-tuning of a
//! Llama-architecture GGUF model on a labelled text task, in Rust with candle.
//!
//! - [`llama`]: the trainable model, read from GGUF (optionally pruned to
//!   its first k blocks).
//! - [`lora`]: adapters; [`adamw`]: the optimizer with checkpointable state.
//! - [`train`]: the loop (loss on the answer tokens only, frozen blocks
//!   computed once, deterministic from the seed, resumable).
//! - [`export`]: merged GGUF for the server, PEFT adapter for other tools.
//!
//! The prompts are built and tokenized by the serving engine itself
//! (mistral.rs with the model's own chat template), and the answer tokens
//! are the label tokens the router scores, so the model is trained on exactly
//! the token sequences it will see when serving.

pub mod adamw;
pub mod encoder;
pub mod export;
pub mod llama;
pub mod lora;
pub mod ops;
pub mod train;

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::gguf_file;
use flywheel_router::engine::mistral::{DeviceChoice, MistralEngine, MistralOptions};
use flywheel_router::engine::{ChatMessage, EngineError, LabelSet, ModelKind};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::curate::CurateError;
use crate::curate::dataset::{Columns, Example, LabelSource, read_examples_with};
use crate::curate::export::sha256_file;
use export::{OutDType, TaskMeta};
use llama::{Llama, Target};
use train::{CurvePoint, Hyper, Schedule, Sequence, Trainer};

/// System prompt of the training prompts (and so of the served model's
/// prompts). Short on purpose: a fine-tuned classifier learns the labels and
/// needs no list of them, and every prompt token costs prefill time.
pub const DEFAULT_SYSTEM_PROMPT: &str = "Reply with the one label that fits the user's message.";

/// Errors of fine-tuning.
#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    /// Settings or data that cannot be used, with what to fix.
    #[error("{0}")]
    Invalid(String),
    /// A model this trainer cannot fine-tune.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A tensor operation failed.
    #[error("tensor operation failed")]
    Tensor(#[source] candle_core::Error),
    /// Writing an output failed.
    #[error("cannot write the training outputs")]
    Write(#[source] anyhow::Error),
    /// A file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The data file is unusable.
    #[error(transparent)]
    Data(#[from] CurateError),
    /// The engine used for tokenization failed.
    #[error("tokenizing with the serving engine failed")]
    Engine(#[from] EngineError),
    /// The loss stopped being a number; no model was written.
    #[error(
        "training diverged: the loss is {loss} at step {step} (learning rate {lr:.2e}); no model was written. \
         Train again with a lower --lr (into another --out if this one holds a checkpoint of this run)"
    )]
    Diverged {
        /// The step whose loss was not finite (1-based).
        step: usize,
        /// That loss.
        loss: f32,
        /// The learning rate of that step.
        lr: f64,
    },
}

pub(crate) fn gguf_err(e: candle_core::Error) -> FinetuneError {
    FinetuneError::Tensor(e)
}

fn parse_targets(s: &str) -> Result<Vec<Target>, String> {
    if s.trim() == "all" {
        return Ok(Target::ALL.to_vec());
    }
    s.split(',')
        .map(|t| Target::parse(t).ok_or_else(|| format!("unknown module `{t}`: use q,k,v,o,gate,up,down or all")))
        .collect()
}

/// `flywheel-trainer train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Labelled data: JSONL or CSV with `text` and `label` columns.
    #[arg(long)]
    pub data: PathBuf,
    /// Kind of router model: `label-scoring` (the base GGUF fine-tuned to
    /// answer with a label name) or `encoder-classifier` (a linear head over
    /// the `--encoder`'s sentence embeddings, with an out-of-scope rule).
    #[arg(long, default_value = "label-scoring")]
    pub kind: ModelKind,
    /// Base model (Llama-architecture GGUF) of a label-scoring router.
    #[arg(long, default_value = flywheel_router::config::DEFAULT_MODEL_PATH)]
    pub base: PathBuf,
    /// Sentence encoder of an encoder classifier (config.json,
    /// tokenizer.json, model.safetensors; the rails' embedder by default).
    #[arg(long, default_value = "models/all-minilm-l6-v2")]
    pub encoder: PathBuf,
    /// Encoder classifiers: in-scope accuracy the out-of-scope rule may give
    /// up, measured on held-out training queries (0.02: two points; 0: no rule).
    #[arg(long, default_value_t = 0.02)]
    pub oos_accuracy_loss: f32,
    /// Output folder: model.gguf, adapter/, manifest.json (and a checkpoint while training).
    #[arg(long)]
    pub out: PathBuf,
    /// Text column.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Label column.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// The model's label set, comma-separated (default: the labels in the
    /// data). A server only accepts a model trained for exactly its experts,
    /// so name them all, including any the data lacks. Examples labelled
    /// `out_of_scope` train that label too; the router sends queries whose
    /// top label it is to the fallback expert.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Use at most this many examples, sampled stratified by label with the seed.
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// System prompt of the training prompts (stored in the model; the router uses it).
    #[arg(long, default_value = DEFAULT_SYSTEM_PROMPT)]
    pub system_prompt: String,
    /// Keep only the first k transformer blocks of the base (a smaller, faster model).
    #[arg(long)]
    pub keep_layers: Option<usize>,
    /// Where the training runs: `cpu`, `auto`, `cuda` or `cuda:N` (a GPU needs a
    /// binary built with the `cuda` feature). Outputs are the same on any device.
    #[arg(long, env = "FLYWHEEL_DEVICE", default_value = "cpu")]
    pub device: DeviceChoice,
    /// On a GPU, run f32 matrix products on TF32 tensor cores (10-bit
    /// mantissa inputs, f32 accumulation); `--tf32 false` keeps full f32.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub tf32: bool,
    /// Train only the top N blocks (of the kept ones); the rest stay frozen.
    #[arg(long, default_value_t = 8)]
    pub trained_blocks: usize,
    /// Modules that get LoRA adapters (comma-separated q,k,v,o,gate,up,down, or `all`).
    #[arg(long, default_value = "all", value_parser = parse_targets)]
    pub targets: std::vec::Vec<Target>,
    /// Train the trained blocks' weights themselves instead of LoRA adapters.
    #[arg(long)]
    pub full: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA alpha (updates are scaled by alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Dropout on the adapters' inputs.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Schedule after warm-up.
    #[arg(long, value_enum, default_value_t = Schedule::Cosine)]
    pub schedule: Schedule,
    /// Share of steps spent warming up.
    #[arg(long, default_value_t = 0.06)]
    pub warmup_ratio: f64,
    /// Passes over the data.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Longest sequence (prompt + answer) in tokens; longer examples are left out and counted.
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Seed of sampling, initialisation, order and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage type of trained weights in the merged model.
    #[arg(long, value_enum, default_value_t = OutDType::Q8_0)]
    pub out_dtype: OutDType,
    /// Save a checkpoint every N steps (and at the end of each epoch).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Stop after this many steps, keeping the checkpoint (to test resuming).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
    /// Version label of the output (default: `ft-` + the first hex digits of the model's SHA-256).
    #[arg(long)]
    pub version: Option<String>,
    /// No progress bar (logs a line per epoch instead).
    #[arg(long)]
    pub quiet: bool,
}

/// What a training run produced (`manifest.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainManifest {
    /// Version label of the merged model.
    pub version: String,
    /// Unix ms when the run finished.
    pub created_unix_ms: i64,
    /// Base model.
    pub base: BaseInfo,
    /// Training data.
    pub data: DataInfo,
    /// System prompt of the training prompts.
    pub system_prompt: String,
    /// Hyperparameters.
    pub hyper: Hyper,
    /// The run.
    pub training: TrainingInfo,
    /// Merged model file.
    pub model_file: String,
    /// Its size.
    pub model_bytes: u64,
    /// Its SHA-256.
    pub model_sha256: String,
    /// PEFT adapter folder (absent for full fine-tuning).
    pub adapter_dir: Option<String>,
}

/// The base model of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseInfo {
    /// File.
    pub path: String,
    /// SHA-256.
    pub sha256: String,
    /// Blocks in the base.
    pub blocks: usize,
    /// Blocks kept in the output.
    pub kept_blocks: usize,
}

/// The data of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataInfo {
    /// File.
    pub path: String,
    /// SHA-256 of the file.
    pub sha256: String,
    /// SHA-256 of the curation `manifest.json` beside the file, when the
    /// data came from `flywheel-trainer curate` (links the model to its curation run).
    pub curation_manifest_sha256: Option<String>,
    /// Rows read.
    pub rows: usize,
    /// Examples trained on.
    pub examples: usize,
    /// Examples left out for being longer than `max_seq_len`.
    pub skipped_too_long: usize,
    /// Examples per label.
    pub label_counts: BTreeMap<String, usize>,
}

impl DataInfo {
    /// The data of a run on `args.data` (hashed as `sha256`), linked to the
    /// curation run beside it, if any.
    pub fn of(
        args: &TrainArgs,
        sha256: String,
        rows: usize,
        examples: usize,
        skipped_too_long: usize,
        label_counts: BTreeMap<String, usize>,
    ) -> Self {
        Self {
            path: args.data.display().to_string(),
            sha256,
            curation_manifest_sha256: args
                .data
                .parent()
                .map(|d| d.join("manifest.json"))
                .filter(|m| m.is_file())
                .and_then(|m| sha256_file(&m).ok()),
            rows,
            examples,
            skipped_too_long,
            label_counts,
        }
    }
}

/// The training run itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingInfo {
    /// Optimizer steps.
    pub steps: usize,
    /// Seconds spent in training steps (excluding data preparation and export).
    pub seconds: f64,
    /// Sequence tokens through the trained blocks per second.
    pub tokens_per_second: f64,
    /// Where it ran (`cpu`, `cuda:0`).
    #[serde(default)]
    pub device: String,
    /// Matrix products on TF32 tensor cores (GPU only).
    #[serde(default)]
    pub tf32: bool,
    /// Seconds spent computing the frozen blocks once.
    pub frozen_seconds: f64,
    /// Mean loss of the last epoch.
    pub final_loss: f32,
    /// First-answer-token accuracy over the last epoch (training data).
    pub final_train_accuracy: f32,
    /// Every step.
    pub curve: Vec<CurvePoint>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    fingerprint: String,
    step: usize,
    seconds: f64,
    tokens: usize,
    curve: Vec<CurvePoint>,
}

/// Sample at most `n` examples, keeping each label's share (largest
/// remainders), in a seeded order.
pub fn stratified_sample(examples: Vec<Example>, n: usize, seed: u64) -> Vec<Example> {
    if examples.len() <= n {
        return examples;
    }
    let mut by_label: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for e in examples {
        by_label.entry(e.label.clone()).or_default().push(e);
    }
    let total: usize = by_label.values().map(Vec::len).sum();
    let mut quotas: Vec<(String, usize, f64)> = by_label
        .iter()
        .map(|(l, v)| {
            let exact = v.len() as f64 * n as f64 / total as f64;
            (l.clone(), exact.floor() as usize, exact - exact.floor())
        })
        .collect();
    let mut left = n - quotas.iter().map(|q| q.1).sum::<usize>();
    let mut order: Vec<usize> = (0..quotas.len()).collect();
    order.sort_by(|&a, &b| quotas[b].2.total_cmp(&quotas[a].2).then(a.cmp(&b)));
    for i in order {
        if left == 0 {
            break;
        }
        quotas[i].1 += 1;
        left -= 1;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    for (label, quota, _) in quotas {
        let mut v = by_label.remove(&label).unwrap_or_default();
        v.shuffle(&mut rng);
        out.extend(v.into_iter().take(quota));
    }
    out.shuffle(&mut rng);
    out
}

/// Build the training sequences of `examples` with the serving engine's
/// tokenizer and chat template: `[system, user(text)]` + label tokens + end of
/// turn; and the lengths of those left out for being over `max_seq_len`.
///
/// # Errors
/// Engine failures.
pub async fn tokenize(
    engine: &MistralEngine,
    examples: &[Example],
    labels: &LabelSet,
    system_prompt: &str,
    max_seq_len: usize,
) -> Result<(Vec<Sequence>, Vec<usize>), FinetuneError> {
    let (label_tokens, end) = engine.label_tokens(labels).await?;
    let answers: BTreeMap<&str, Vec<u32>> = labels
        .names()
        .iter()
        .zip(label_tokens)
        .map(|(l, mut t)| {
            t.extend(end);
            (l.as_str(), t)
        })
        .collect();
    let mut out = Vec::with_capacity(examples.len());
    let mut too_long = Vec::new();
    for e in examples {
        let mut tokens = engine
            .chat_tokens(&[ChatMessage::system(system_prompt), ChatMessage::user(&e.text)])
            .await?;
        let prompt_len = tokens.len();
        tokens.extend(&answers[e.label.as_str()]);
        if tokens.len() > max_seq_len {
            too_long.push(tokens.len());
            continue;
        }
        out.push(Sequence { tokens, prompt_len });
    }
    Ok((out, too_long))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FinetuneError + '_ {
    move |source| FinetuneError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The examples a training run uses, whatever the kind of model.
#[derive(Debug, Clone)]
pub struct TrainingData {
    /// Examples (sampled when `--max-examples` is set).
    pub examples: Vec<Example>,
    /// Rows in the file.
    pub rows: usize,
    /// Examples per label.
    pub label_counts: BTreeMap<String, usize>,
    /// The model's label set.
    pub labels: LabelSet,
}

/// Read, sample and check the training data `args` names.
///
/// # Errors
/// An unreadable file, fewer than two labels, labels outside `--labels`.
pub fn read_training_data(args: &TrainArgs) -> Result<TrainingData, FinetuneError> {
    let columns = Columns {
        text: args.text_column.clone(),
        label: args.label_column.clone(),
    };
    let rows = read_examples_with(&args.data, LabelSource::Import, &columns)?;
    let n_rows = rows.len();
    let examples = match args.max_examples {
        Some(n) => stratified_sample(rows, n, args.seed),
        None => rows,
    };
    let mut label_counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &examples {
        *label_counts.entry(e.label.clone()).or_default() += 1;
    }
    if label_counts.len() < 2 {
        return Err(FinetuneError::Invalid(format!(
            "{} has {} distinct label(s) in column `{}`; a classifier needs at least 2",
            args.data.display(),
            label_counts.len(),
            args.label_column
        )));
    }
    let labels = if args.labels.is_empty() {
        LabelSet::new(label_counts.keys().cloned().collect())?
    } else {
        let oos = flywheel_router::engine::labels::OUT_OF_SCOPE_LABEL;
        let outside: Vec<&String> = label_counts
            .keys()
            .filter(|l| !args.labels.contains(l) && l.as_str() != oos)
            .collect();
        if !outside.is_empty() {
            return Err(FinetuneError::Invalid(format!(
                "{} has labels {outside:?} that are not in --labels {:?}",
                args.data.display(),
                args.labels
            )));
        }
        // Out-of-scope examples name no expert: the model learns the label
        // beside the experts, and the router sends its queries to the fallback.
        let mut names = args.labels.clone();
        if label_counts.contains_key(oos) && !names.iter().any(|l| l == oos) {
            names.push(oos.to_string());
        }
        LabelSet::new(names)?
    };
    Ok(TrainingData {
        examples,
        rows: n_rows,
        label_counts,
        labels,
    })
}

/// Run `flywheel-trainer train`.
///
/// # Errors
/// Unusable data or settings, an unsupported base, I/O failures.
pub async fn run(args: &TrainArgs) -> Result<TrainManifest, FinetuneError> {
    let TrainingData {
        examples,
        rows: n_rows,
        label_counts,
        labels,
    } = read_training_data(args)?;
    let hyper = Hyper {
        rank: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        lr: args.lr,
        schedule: args.schedule,
        warmup_ratio: args.warmup_ratio,
        epochs: args.epochs,
        batch_size: args.batch_size,
        max_seq_len: args.max_seq_len,
        seed: args.seed,
        targets: args.targets.clone(),
        trained_blocks: Some(args.trained_blocks),
        full: args.full,
        adamw: adamw::AdamWParams {
            weight_decay: args.weight_decay,
            ..Default::default()
        },
    };
    if !(0.0..1.0).contains(&args.dropout) {
        return Err(FinetuneError::Invalid("--dropout must be in [0, 1)".into()));
    }
    for (flag, value) in [("--lr", args.lr), ("--alpha", args.alpha)] {
        if !(value.is_finite() && value > 0.0) {
            return Err(FinetuneError::Invalid(format!(
                "{flag} must be a positive number, not {value}"
            )));
        }
    }
    if !(args.weight_decay.is_finite() && args.weight_decay >= 0.0) {
        return Err(FinetuneError::Invalid(format!(
            "--weight-decay must be a number >= 0, not {}",
            args.weight_decay
        )));
    }
    if !(0.0..=1.0).contains(&args.warmup_ratio) {
        return Err(FinetuneError::Invalid(format!(
            "--warmup-ratio must be in [0, 1], not {}",
            args.warmup_ratio
        )));
    }
    if args.epochs == 0 || args.batch_size == 0 {
        return Err(FinetuneError::Invalid(
            "--epochs and --batch-size must be at least 1".into(),
        ));
    }
    args.device
        .check_supported()
        .map_err(|e| FinetuneError::Invalid(format!("--device: {e}")))?;
    // The base's shape, from its header: block counts it cannot take are
    // refused before the examples are tokenized.
    let file = std::fs::File::open(&args.base).map_err(io_err(&args.base))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(gguf_err)?;
    let base = llama::LlamaConfig::from_gguf(&content)?;
    let base_blocks = base.n_layer;
    train::first_trained_block(base.kept_blocks(args.keep_layers)?, hyper.trained_blocks)?;

    tracing::info!(
        examples = examples.len(),
        labels = labels.len(),
        "tokenizing with the serving engine"
    );
    let engine = MistralEngine::load(&MistralOptions {
        max_num_seqs: Some(1),
        ..MistralOptions::new(args.base.clone(), false)
    })
    .await?;
    let (seqs, too_long) = tokenize(&engine, &examples, &labels, &args.system_prompt, args.max_seq_len).await?;
    drop(engine);
    let skipped = too_long.len();
    if seqs.is_empty() {
        return Err(FinetuneError::Invalid(format!(
            "all {skipped} examples are longer than --max-seq-len {} tokens (system prompt, query and \
             label; the shortest takes {}): raise --max-seq-len",
            args.max_seq_len,
            too_long.iter().min().copied().unwrap_or_default()
        )));
    }

    let device = args
        .device
        .open()
        .map_err(|e| FinetuneError::Invalid(format!("--device: {e}")))?;
    let tf32 = args.tf32 && device.is_cuda();
    candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
    let (mut model, originals) = Llama::from_gguf(&content, &mut reader, args.keep_layers, &device)?;
    let first = train::attach(&mut model, &hyper)?;

    let data_sha = sha256_file(&args.data)?;
    let base_sha = sha256_file(&args.base)?;
    let fingerprint = sha256_hex(
        format!(
            "{}|{data_sha}|{base_sha}|{}|{:?}|{:?}",
            serde_json::to_string(&hyper).unwrap_or_default(),
            args.system_prompt,
            args.max_examples,
            args.keep_layers
        )
        .as_bytes(),
    );
    std::fs::create_dir_all(&args.out).map_err(io_err(&args.out))?;
    let ckpt_dir = args.out.join("checkpoint");

    let saved = load_checkpoint(&ckpt_dir, &fingerprint)?;
    tracing::info!(
        sequences = seqs.len(),
        first_trained_block = first,
        "computing the frozen blocks once"
    );
    let t_frozen = Instant::now();
    let mut trainer = Trainer::new(&model, first, hyper.clone(), seqs)?;
    let frozen_seconds = t_frozen.elapsed().as_secs_f64();
    let mut progress = Progress {
        fingerprint: fingerprint.clone(),
        step: 0,
        seconds: 0.0,
        tokens: 0,
        curve: Vec::new(),
    };
    if let Some((p, state)) = saved {
        trainer.opt.restore(&state, p.step).map_err(gguf_err)?;
        tracing::info!(step = p.step, "resuming from checkpoint");
        progress = p;
    }

    let total = trainer.total_steps();
    let per_epoch = trainer.steps_per_epoch();
    let bar = progress_bar(total, progress.step, args.quiet);
    let started = Instant::now();
    let seconds_before = progress.seconds;
    while trainer.opt.step < total {
        if args.stop_after.is_some_and(|s| trainer.opt.step >= s) {
            break;
        }
        let tokens = trainer.step_tokens(trainer.opt.step);
        let point = trainer.step()?;
        if !point.loss.is_finite() {
            // Nothing of this step is saved: the checkpoint on disk predates it.
            bar.abandon();
            return Err(FinetuneError::Diverged {
                step: point.step,
                loss: point.loss,
                lr: point.lr,
            });
        }
        progress.tokens += tokens;
        progress.seconds = seconds_before + started.elapsed().as_secs_f64();
        let tps = progress.tokens as f64 / progress.seconds.max(1e-9);
        bar.set_message(format!(
            "loss {:.4} | {:.0} tok/s | epoch {}",
            point.loss, tps, point.epoch
        ));
        bar.set_position(point.step as u64);
        let epoch_end = point.step.is_multiple_of(per_epoch);
        if args.quiet && epoch_end {
            tracing::info!(
                epoch = point.epoch,
                loss = point.loss,
                tokens_per_second = tps,
                "epoch done"
            );
        }
        progress.curve.push(point);
        progress.step = trainer.opt.step;
        if epoch_end || progress.step.is_multiple_of(args.checkpoint_every.max(1)) {
            save_checkpoint(&ckpt_dir, &progress, &trainer.opt)?;
        }
    }
    bar.finish_and_clear();
    if trainer.opt.step < total {
        save_checkpoint(&ckpt_dir, &progress, &trainer.opt)?;
        return Err(FinetuneError::Invalid(format!(
            "stopped after step {} of {total}; run the same command again to resume",
            trainer.opt.step
        )));
    }

    let model_path = args.out.join("model.gguf");
    let task = TaskMeta {
        system_prompt: args.system_prompt.clone(),
        labels: labels.names().to_vec(),
    };
    export::write_merged_gguf(&model_path, &content, &model, &originals, Some(&task), args.out_dtype)?;
    let adapter_dir = if args.full {
        None
    } else {
        let dir = args.out.join("adapter");
        let base_name = args
            .base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        export::write_peft(&dir, &model, &hyper, &base_name)?;
        Some(dir.display().to_string())
    };
    let model_sha256 = sha256_file(&model_path)?;
    let last_epoch: Vec<&CurvePoint> = progress.curve.iter().rev().take(per_epoch).collect();
    let mean =
        |f: &dyn Fn(&CurvePoint) -> f32| last_epoch.iter().map(|p| f(p)).sum::<f32>() / last_epoch.len().max(1) as f32;
    let manifest = TrainManifest {
        version: args
            .version
            .clone()
            .unwrap_or_else(|| format!("ft-{}", &model_sha256[..12])),
        created_unix_ms: flywheel_router::data::log::unix_ms(std::time::SystemTime::now()),
        base: BaseInfo {
            path: args.base.display().to_string(),
            sha256: base_sha,
            blocks: base_blocks,
            kept_blocks: model.blocks.len(),
        },
        data: DataInfo::of(args, data_sha, n_rows, examples.len() - skipped, skipped, label_counts),
        system_prompt: args.system_prompt.clone(),
        hyper,
        training: TrainingInfo {
            steps: progress.step,
            seconds: progress.seconds,
            tokens_per_second: progress.tokens as f64 / progress.seconds.max(1e-9),
            device: match device.location() {
                candle_core::DeviceLocation::Cpu => "cpu".into(),
                candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                other => format!("{other:?}").to_lowercase(),
            },
            tf32,
            frozen_seconds,
            final_loss: mean(&|p| p.loss),
            final_train_accuracy: mean(&|p| p.first_token_accuracy),
            curve: progress.curve,
        },
        model_file: model_path.display().to_string(),
        model_bytes: std::fs::metadata(&model_path).map(|m| m.len()).unwrap_or(0),
        model_sha256,
        adapter_dir,
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| FinetuneError::Write(e.into()))?;
    std::fs::write(args.out.join("manifest.json"), text).map_err(io_err(&args.out))?;
    // The run is complete: its outputs supersede the checkpoint.
    let _ = std::fs::remove_dir_all(&ckpt_dir);
    Ok(manifest)
}

fn progress_bar(total: usize, done: usize, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done as u64);
    bar
}

fn save_checkpoint(dir: &Path, progress: &Progress, opt: &adamw::AdamW) -> Result<(), FinetuneError> {
    // Written beside the old checkpoint and renamed over it, so an
    // interruption leaves either the old or the new one, never a mix.
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::TempDir::new_in(parent).map_err(io_err(parent))?;
    candle_core::safetensors::save(&opt.state(), tmp.path().join("state.safetensors")).map_err(gguf_err)?;
    let text = serde_json::to_string(progress).map_err(|e| FinetuneError::Write(e.into()))?;
    std::fs::write(tmp.path().join("progress.json"), text).map_err(io_err(tmp.path()))?;
    let old = parent.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
    }
    std::fs::rename(tmp.keep(), dir).map_err(io_err(dir))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

type Saved = (Progress, std::collections::HashMap<String, candle_core::Tensor>);

/// The checkpoint in `dir`, if any; refused when it belongs to another run.
fn load_checkpoint(dir: &Path, fingerprint: &str) -> Result<Option<Saved>, FinetuneError> {
    let progress_path = dir.join("progress.json");
    let Ok(text) = std::fs::read_to_string(&progress_path) else {
        return Ok(None);
    };
    let progress: Progress = serde_json::from_str(&text)
        .map_err(|e| FinetuneError::Invalid(format!("{} is corrupt: {e}", progress_path.display())))?;
    if progress.fingerprint != fingerprint {
        return Err(FinetuneError::Invalid(format!(
            "{} holds a checkpoint of a different run (other data, base or settings); \
             use another --out or delete that folder",
            dir.display()
        )));
    }
    let state =
        candle_core::safetensors::load(dir.join("state.safetensors"), &candle_core::Device::Cpu).map_err(gguf_err)?;
    Ok(Some((progress, state)))
}

/// Largest absolute difference between two tensors (tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("same-shape f32 tensors")
}

#[cfg(test)]
mod tests;
