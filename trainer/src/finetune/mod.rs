//! `flywheel-trainer train`: LoRA (or full) supervised fine-tuning of a
//! Llama-architecture GGUF model on a labelled text task, in Rust with candle.
//!
//! - [`llama`]: the trainable model, read from GGUF (optionally pruned to
//!   its first k blocks).
//! - [`lora`]: adapters; [`adamw`]: the optimizer with checkpointable state.
//! - [`train`]: the loop (loss on the answer tokens only, frozen blocks
//!   computed once, deterministic from the seed, resumable).
//! - [`export`]: merged GGUF for the server, PEFT adapter for other tools.
//! - [`data`]: the examples (read, sampled, checked, tokenized); [`args`]: the
//!   flags; [`manifest`]: what a run wrote; `checkpoint`: resumable state.
//! - [`encoder`], [`decoder`]: the classifier router kinds (a head over a
//!   sentence encoder, or over a tuned Llama decoder's last-token state).
//!
//! The prompts are built and tokenized by the serving engine itself
//! (mistral.rs with the model's own chat template), and the answer tokens
//! are the label tokens the router scores, so the model is trained on exactly
//! the token sequences it will see when serving.

pub mod adamw;
pub mod args;
pub mod bert;
mod checkpoint;
pub mod data;
pub mod decoder;
pub mod encoder;
pub mod encoder_tune;
pub mod export;
pub mod manifest;
pub mod targets;
pub mod train;

pub use args::TrainArgs;
pub use data::{TrainingData, read_training_data, stratified_sample, tokenize};
pub use flywheel_router::llama::{self, lora, ops};
pub use manifest::{BaseInfo, DataInfo, TrainManifest, TrainingInfo};

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::gguf_file;
use flywheel_router::engine::EngineError;
use flywheel_router::engine::mistral::{MistralEngine, MistralOptions};

use crate::curate::CurateError;
use crate::curate::export::sha256_file;
use checkpoint::{Progress, load_checkpoint, save_checkpoint};
use export::TaskMeta;
use llama::Llama;
use train::{CurvePoint, Hyper, Trainer};

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

impl From<llama::LlamaError> for FinetuneError {
    fn from(e: llama::LlamaError) -> Self {
        match e {
            llama::LlamaError::Invalid(m) => FinetuneError::Invalid(m),
            llama::LlamaError::Unsupported(m) => FinetuneError::Unsupported(m),
            llama::LlamaError::Tensor(e) => FinetuneError::Tensor(e),
        }
    }
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

/// The training settings of `args`, checked.
///
/// # Errors
/// A setting out of its range, saying which.
pub fn hyper_of(args: &TrainArgs) -> Result<Hyper, FinetuneError> {
    let hyper = Hyper {
        rank: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        lr: args.lr,
        schedule: args.schedule,
        warmup_ratio: args.warmup_ratio,
        epochs: args.epochs(),
        batch_size: args.batch_size,
        max_seq_len: args.max_seq_len,
        seed: args.seed,
        targets: args.targets.clone(),
        trained_blocks: Some(args.trained_blocks.unwrap_or(8)),
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
    if args.epochs() == 0 || args.batch_size == 0 {
        return Err(FinetuneError::Invalid(
            "--epochs and --batch-size must be at least 1".into(),
        ));
    }
    Ok(hyper)
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
    let hyper = hyper_of(args)?;
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

#[cfg(test)]
pub(crate) mod tests;
