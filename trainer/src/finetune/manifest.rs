//! `manifest.json` of a label-scoring fine-tuning run: what was trained, on
//! what, how, and what came out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::TrainArgs;
use super::train::{CurvePoint, Hyper};
use crate::curate::export::sha256_file;

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

/// The backbone of a decoder classifier run (`manifest.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecoderInfo {
    /// Base GGUF.
    pub base: String,
    /// Its SHA-256.
    pub base_sha256: String,
    /// Blocks kept (of the base's).
    pub blocks: usize,
    /// Blocks tuned (the top ones).
    pub trained_blocks: usize,
    /// `lora` or `full`.
    pub method: String,
    /// LoRA rank (LoRA runs).
    pub rank: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Passes over the tuning queries.
    pub epochs: usize,
    /// Queries per step.
    pub batch_size: usize,
    /// Mean loss of each epoch.
    pub epoch_loss: Vec<f64>,
    /// Seconds tuning.
    pub tune_seconds: f64,
    /// What the backbone reads around a query.
    pub prompt: flywheel_router::engine::classifier::decoder::PromptTemplate,
    /// Feature size.
    pub dim: usize,
}

/// How a distilled classifier was taught (`manifest.json`, `flywheel-trainer distill`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distillation {
    /// The teacher model (file or folder).
    pub teacher: String,
    /// Its version.
    pub teacher_version: String,
    /// Its kind.
    pub teacher_kind: flywheel_router::engine::ModelKind,
    /// Temperature that softened the teacher's distributions.
    pub temperature: f32,
    /// Loss weight of each gold example.
    pub gold_weight: f32,
    /// Loss weight of each teacher-labelled example.
    pub teacher_weight: f32,
    /// Gold examples (the first rows of the training set).
    pub gold_examples: usize,
    /// Teacher-labelled examples (the rows after them).
    pub teacher_labelled: usize,
    /// Unlabelled rows read.
    pub unlabelled_rows: usize,
    /// Unlabelled rows left out as repeats of a gold example or of each other.
    pub dropped_repeats: usize,
    /// Rows (gold or unlabelled) left out as (near-)duplicates of an excluded (test) file.
    pub dropped_excluded: usize,
    /// Share of the gold examples whose gold label is the teacher's top label.
    pub teacher_gold_agreement: f64,
    /// Seconds the teacher spent scoring.
    pub teacher_seconds: f64,
    /// Teacher-labelled queries whose scores came from the request log (the
    /// teacher's version had decided them) instead of a new scoring.
    #[serde(default)]
    pub logged_scores: usize,
}
