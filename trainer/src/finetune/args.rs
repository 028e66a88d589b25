//! The flags of `flywheel-trainer train`, for every router kind.

use std::path::PathBuf;

use flywheel_router::engine::ModelKind;
use flywheel_router::engine::mistral::DeviceChoice;

use super::DEFAULT_SYSTEM_PROMPT;
use super::export::OutDType;
use super::llama::Target;
use super::train::Schedule;

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
    /// answer with a label name), `encoder-classifier` (a linear head over
    /// the `--encoder`'s sentence embeddings) or `decoder-classifier` (the
    /// base GGUF, `--keep-layers` pruned, tuned with LoRA or `--full`, and a
    /// linear head over its last prompt token's state); classifiers come with
    /// an out-of-scope rule.
    #[arg(long, default_value = "label-scoring")]
    pub kind: ModelKind,
    /// Base model (Llama-architecture GGUF) of a label-scoring router or decoder classifier.
    #[arg(long, default_value = flywheel_router::config::DEFAULT_MODEL_PATH)]
    pub base: PathBuf,
    /// Sentence encoder of an encoder classifier (config.json,
    /// tokenizer.json, model.safetensors; the rails' embedder by default).
    #[arg(long, default_value = "models/all-minilm-l6-v2")]
    pub encoder: PathBuf,
    /// Encoder classifiers: `head-only` (the encoder as it is, the head fitted
    /// on its embeddings) or `end-to-end` (the encoder's layers tuned on the
    /// labels first, then the head; a few minutes on 2 cores).
    #[arg(long, default_value = "head-only", value_parser = parse_training)]
    pub encoder_training: flywheel_router::engine::classifier::Training,
    /// Classifiers: in-scope accuracy the out-of-scope rule may give
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
    /// Train only the top N blocks (of the kept ones); the rest stay frozen
    /// [default: 8; for `decoder-classifier` 16, or all the kept blocks if fewer].
    #[arg(long)]
    pub trained_blocks: Option<usize>,
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
    /// Passes over the data [default: 3; 6 for `decoder-classifier`; 4 for
    /// the tuning of an `encoder-classifier` end to end (a head-only one has
    /// no passes)].
    #[arg(long)]
    pub epochs: Option<usize>,
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

impl TrainArgs {
    /// Passes over the data: `--epochs`, or the kind's default.
    pub fn epochs(&self) -> usize {
        self.epochs.unwrap_or(match self.kind {
            ModelKind::DecoderClassifier => 6,
            ModelKind::EncoderClassifier => super::encoder_tune::TuneSpec::default().epochs,
            ModelKind::LabelScoring => 3,
        })
    }

    /// Blocks to train of a model keeping `blocks`: `--trained-blocks`, or
    /// the kind's default (a decoder classifier's never more than it has).
    pub fn trained_blocks(&self, blocks: usize) -> usize {
        self.trained_blocks.unwrap_or(match self.kind {
            ModelKind::DecoderClassifier => 16.min(blocks),
            _ => 8,
        })
    }
}

/// `head-only` or `end-to-end`.
fn parse_training(s: &str) -> Result<flywheel_router::engine::classifier::Training, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("`{s}`: expected head-only or end-to-end"))
}
