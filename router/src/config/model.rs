//! A model entry's settings (`[models.*]`): the file and how to run it,
//! with the engine defaults they fall back to.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::paged::{DEFAULT_PAGED_KV_TOKENS, PagedAttention};
pub use crate::device::DeviceChoice;

/// Answers a generation engine with paged attention (GPU) runs at once, and
/// the fewest sequences mistral.rs's default scheduler takes (label scoring
/// passes run beside the answers).
pub const DEFAULT_MAX_NUM_SEQS: usize = 32;
/// Answers a generation engine on mistral.rs's default scheduler (the CPU)
/// runs at once. That scheduler decodes together only sequences of equal
/// length and lets a shorter one catch up alone; on 2 cores, three streams
/// on 32 answers at once finished 4 answers in 40 s where one at a time
/// finished 12 (1.8 vs 4.9 output tok/s; eight streams: 4 vs 11 answers).
pub const DEFAULT_MAX_NUM_SEQS_CPU: usize = 1;
/// Finished sequences kept in mistral.rs's prefix cache by generation
/// engines. Off: in mistral.rs 0.8.1 that cache never evicts on CPU, so it
/// grows with every answer. The router engine caches its prompt prefix
/// regardless (see `engine::mistral`).
pub const DEFAULT_PREFIX_CACHE_N: usize = 0;

/// Number type of the activations and the KV cache around the quantized
/// weights (`[models.*] activations`).
///
/// `f32` (the default) adds no conversions: candle's quantized matrix
/// products take and return f32, so with bf16 or f16 every attention block
/// converts q, k, v and its output (four extra operations per block, each a
/// kernel launch on a GPU). On two CPU cores f32 routes and prefills ~10%
/// faster than bf16 (`flywheel-bench engine`). `auto` is mistral.rs's
/// choice: bf16 where the device multiplies it, else f16, else f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activations {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
    /// mistral.rs decides per device.
    Auto,
}

named_setting!(Activations, "activation type", "use f32, bf16, f16 or auto", {
    F32 => "f32",
    Bf16 => "bf16",
    F16 => "f16",
    Auto => "auto",
});

/// What the engine multiplies with (`[models.*] weights`).
///
/// mistral.rs runs a GGUF file's quantized tensors with candle's quantized
/// products: on the CPU, a dot product per output element over 8-bit
/// activations, which decodes fast (batch 1 reads the fewest bytes) but
/// prefills slowly; f32 tensors go through a blocked matrix product instead.
/// Measured on two CPU cores with SmolLM2-135M (`flywheel-bench engine
/// --weights stored|f32`): prefill 84 -> 193 tok/s, decode 38.6 -> 10-13
/// tok/s. A router engine only runs prompt steps, so `auto` gives routers an
/// exact f32 copy of the file (written to the temporary folder for the load
/// and deleted after it; ~4x the Q8_0 size in memory) and answer engines the
/// file as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Weights {
    /// f32 for router engines, as stored for the others.
    #[default]
    Auto,
    /// The file's tensors as they are.
    Stored,
    /// Every tensor dequantized to f32 at load.
    F32,
}

impl Weights {
    /// Whether an engine (a router one when `router`) loads an f32 copy.
    pub fn dequantize(self, router: bool) -> bool {
        match self {
            Self::Auto => router,
            Self::Stored => false,
            Self::F32 => true,
        }
    }
}

named_setting!(Weights, "weights setting", "use auto, stored or f32", {
    Auto => "auto",
    Stored => "stored",
    F32 => "f32",
});

/// A model file and how to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// GGUF file.
    pub path: PathBuf,
    /// Version label recorded in the log; defaults to the file name without extension.
    #[serde(default)]
    pub version: Option<String>,
    /// Answers a generation engine runs at once, batched together; more wait
    /// in the engine until one ends (a waiting request costs nothing when its
    /// client goes away). Unset: [`DEFAULT_MAX_NUM_SEQS`] with paged
    /// attention (GPU), [`DEFAULT_MAX_NUM_SEQS_CPU`] without (the CPU).
    #[serde(default)]
    pub max_num_seqs: Option<usize>,
    /// Prefix-cache entries of generation engines (0 = off; see
    /// [`DEFAULT_PREFIX_CACHE_N`]).
    #[serde(default = "default_prefix_cache_n")]
    pub prefix_cache_n: usize,
    /// Device: `cpu` (default), `auto`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: DeviceChoice,
    /// Activation and KV-cache type: `f32` (default), `bf16`, `f16` or `auto`.
    #[serde(default)]
    pub activations: Activations,
    /// Weights: `auto` (default: an f32 copy for the router engine, whose
    /// decisions are prompt steps only; as stored for answer engines),
    /// `stored` or `f32` (see [`Weights`]).
    #[serde(default)]
    pub weights: Weights,
    /// Paged attention for the entry's generation engine: `auto` (default:
    /// on where the model runs on a GPU), `on` or `off` (see
    /// [`crate::config::paged`]).
    #[serde(default)]
    pub paged_attention: PagedAttention,
    /// Tokens the paged KV cache holds, all running sequences together
    /// (GPU memory: tokens x layers x 2 x KV width x activation size).
    #[serde(default = "default_paged_kv_tokens")]
    pub paged_kv_tokens: usize,
}

/// Smallest `paged_kv_tokens`: one long prompt.
pub const MIN_PAGED_KV_TOKENS: usize = 2048;

impl ModelSpec {
    /// The version label of this model.
    pub fn version_label(&self) -> String {
        self.version.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
        })
    }
}

fn default_prefix_cache_n() -> usize {
    DEFAULT_PREFIX_CACHE_N
}
fn default_paged_kv_tokens() -> usize {
    DEFAULT_PAGED_KV_TOKENS
}
fn default_device() -> DeviceChoice {
    DeviceChoice::Cpu
}
