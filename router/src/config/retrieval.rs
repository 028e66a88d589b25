//! `[retrieval]`: how the experts' corpora are chunked, searched and fused.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// RRF's rank constant (Cormack et al. 2009): ranks past ~60 add little.
pub const DEFAULT_RRF_K: f32 = 60.0;

/// Default largest chunk, in characters (~200 tokens).
pub const DEFAULT_CHUNK_CHARS: usize = 800;
/// Default overlap between consecutive chunks of one long section.
pub const DEFAULT_OVERLAP_CHARS: usize = 160;

/// Which retriever answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Lexical only.
    Bm25,
    /// Embeddings only.
    Dense,
    /// Both, fused by reciprocal rank.
    #[default]
    Hybrid,
}

impl Mode {
    /// All modes, for evaluations.
    pub const ALL: [Mode; 3] = [Mode::Bm25, Mode::Dense, Mode::Hybrid];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Bm25 => "bm25",
            Mode::Dense => "dense",
            Mode::Hybrid => "hybrid",
        }
    }
}

/// `[retrieval]`: how the experts' corpora are chunked, searched and fused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrievalSpec {
    /// `bm25`, `dense` or `hybrid` (reciprocal rank fusion of both).
    pub mode: Mode,
    /// Candidates each retriever ranks before fusion.
    pub candidates: usize,
    /// RRF rank constant.
    pub rrf_k: f32,
    /// Token budget of the passages put into an expert's prompt.
    pub max_context_tokens: usize,
    /// Largest chunk in characters.
    pub chunk_chars: usize,
    /// Overlap between consecutive chunks of a long section, in characters.
    pub overlap_chars: usize,
    /// Sentence embedder (default: the jailbreak rail's, `rails.jailbreak.embedder_dir`).
    pub embedder_dir: Option<PathBuf>,
    /// Cache of chunk embeddings, keyed by content.
    pub cache_dir: PathBuf,
}

impl Default for RetrievalSpec {
    fn default() -> Self {
        Self {
            mode: Mode::Hybrid,
            candidates: super::DEFAULT_RETRIEVAL_CANDIDATES,
            rrf_k: DEFAULT_RRF_K,
            max_context_tokens: super::DEFAULT_MAX_CONTEXT_TOKENS,
            chunk_chars: DEFAULT_CHUNK_CHARS,
            overlap_chars: DEFAULT_OVERLAP_CHARS,
            embedder_dir: None,
            cache_dir: PathBuf::from("var/index"),
        }
    }
}
