//! The engine seam: what the pipeline needs from a model runtime.
//!
//! [`Engine`] is the only interface the router and expert agents use to run a
//! model: streaming generation for answers, and label scoring (one prefill,
//! no free text) for routing. [`mistral::MistralEngine`] implements it on
//! mistral.rs; another backend or a mistral.rs version bump is one adapter.
//! [`labels`] holds the backend-independent label-scoring math.

pub mod classifier;
pub mod labels;
pub mod mistral;
pub mod seeded;
pub mod stop;
pub mod stub;

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

pub use labels::{LabelScores, LabelSet};

/// Who speaks a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions to the model.
    System,
    /// The end user.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The role name chat templates expect.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a chat prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Speaker.
    pub role: Role,
    /// Text.
    pub content: String,
}

impl ChatMessage {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }
    /// An assistant (model) message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// Sampling settings for one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateParams {
    /// Maximum new tokens.
    pub max_tokens: usize,
    /// Temperature; `None` or 0 means greedy decoding.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    pub top_p: Option<f64>,
    /// Stop before any of these strings (they are not part of the answer).
    pub stop: Vec<String>,
    /// Seed of the sampler (sampling only; greedy decoding needs none).
    pub seed: Option<u64>,
}

/// Token counts of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the rendered prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// Anything else the backend reports.
    Other(String),
}

impl FinishReason {
    /// Short name used in the API and the request log.
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Other(s) => s,
        }
    }
}

/// Final report of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSummary {
    /// Token counts.
    pub usage: Usage,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Prefill speed the engine measured (tokens/s), 0 when unknown.
    pub prefill_tokens_per_second: f64,
    /// Decode speed the engine measured (tokens/s), 0 when unknown.
    pub decode_tokens_per_second: f64,
}

/// One item of a generation stream.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Newly generated text.
    Delta(String),
    /// Generation finished; always the last item of a successful stream.
    Done(GenerationSummary),
}

/// A stream of generation events. Dropping it cancels the generation.
pub type TokenStream = Pin<Box<dyn Stream<Item = Result<GenerationEvent, EngineError>> + Send>>;

/// Errors of a model runtime.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file is missing or unreadable.
    #[error("model file {path} not found or unreadable (`flywheel-trainer fetch-model` prepares the default model)")]
    ModelNotFound {
        /// The path that was tried.
        path: String,
    },
    /// The backend failed to load the model.
    #[error("failed to load model {path}")]
    Load {
        /// The model file.
        path: String,
        /// What the backend said.
        #[source]
        source: anyhow::Error,
    },
    /// The backend rejected the request (e.g. prompt longer than the context).
    #[error("the engine rejected the request: {0}")]
    Rejected(String),
    /// A label set the engine cannot score (e.g. empty, or duplicate labels).
    #[error("invalid label set: {0}")]
    InvalidLabels(String),
    /// The backend failed while running.
    #[error("engine failure")]
    Backend(#[source] anyhow::Error),
    /// The engine stopped before answering.
    #[error("the engine stopped before answering")]
    Disconnected,
    /// The engine's queue is full; retry later.
    #[error("the engine is overloaded: {0}")]
    Overloaded(String),
}

/// A loaded model that can generate and score labels.
///
/// Implementations are shared between requests (`Arc<dyn Engine>`) and must
/// batch or queue concurrent calls themselves.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Backend name, e.g. `"mistralrs"`.
    fn backend(&self) -> &'static str;

    /// The fingerprint of the sentence encoder whose features this model
    /// reads and reuses when another component (the input rails' jailbreak
    /// detector) computed them a moment ago (`None`: it computes its own).
    fn shared_encoder(&self) -> Option<&str> {
        None
    }

    /// Start generating an answer to `messages`.
    ///
    /// # Errors
    /// [`EngineError::Rejected`] when the request cannot run; errors while
    /// running arrive on the stream.
    ///
    /// # Cancel safety
    /// Dropping the returned stream stops generation at the next token.
    async fn generate(&self, messages: Vec<ChatMessage>, params: GenerateParams) -> Result<TokenStream, EngineError>;

    /// Score every label of `labels` as the model's answer to `messages`,
    /// without generating free text: label log-probabilities from the
    /// prompt's prefill (one forward pass when the labels' first tokens
    /// differ).
    ///
    /// # Errors
    /// Backend failures, or a label set the tokenizer cannot separate.
    async fn score_labels(&self, messages: &[ChatMessage], labels: &LabelSet) -> Result<LabelScores, EngineError>;

    /// Run a tiny request so that the first real request does not pay
    /// one-time costs; `messages` lets a caller prime a prompt prefix cache.
    ///
    /// # Errors
    /// Any failure means the model is not fit to serve.
    async fn warm_up(&self, messages: &[ChatMessage]) -> Result<(), EngineError>;
}

/// What kind of router model an artifact is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// A language model scoring each expert's name (zero-shot or fine-tuned).
    LabelScoring,
    /// A sentence encoder and a linear head ([`classifier`]).
    EncoderClassifier,
    /// A Llama-family decoder and a linear head ([`classifier::decoder`]).
    DecoderClassifier,
}

impl ModelKind {
    /// The name used in the API, the request log and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LabelScoring => "label-scoring",
            Self::EncoderClassifier => "encoder-classifier",
            Self::DecoderClassifier => "decoder-classifier",
        }
    }

    /// Every kind.
    pub const ALL: [ModelKind; 3] = [Self::LabelScoring, Self::EncoderClassifier, Self::DecoderClassifier];

    /// A classifier kind: a head over a backbone's features, not an LLM's answer.
    pub fn is_classifier(self) -> bool {
        self != Self::LabelScoring
    }

    /// The kind of the artifact at `path`.
    pub fn of(path: &std::path::Path) -> Self {
        if classifier::is_classifier(path) {
            Self::EncoderClassifier
        } else if classifier::decoder::is_decoder_classifier(path) {
            Self::DecoderClassifier
        } else {
            Self::LabelScoring
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            format!("`{s}` is not a router kind: use label-scoring, encoder-classifier or decoder-classifier")
        })
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The production loader: a classifier (encoder folder or decoder GGUF) runs
/// on candle ([`classifier::Classifier`]), any other model on mistral.rs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ModelLoader;

#[async_trait]
impl EngineLoader for ModelLoader {
    async fn load(
        &self,
        spec: &crate::config::ModelSpec,
        router: bool,
    ) -> Result<std::sync::Arc<dyn Engine>, EngineError> {
        match ModelKind::of(&spec.path) {
            kind @ (ModelKind::EncoderClassifier | ModelKind::DecoderClassifier) if !router => Err(EngineError::Load {
                path: spec.path.display().to_string(),
                source: anyhow::anyhow!(
                    "a classifier ({kind}) routes but cannot write answers: give experts a generative model"
                ),
            }),
            ModelKind::EncoderClassifier | ModelKind::DecoderClassifier => {
                let path = spec.path.clone();
                let device = spec.device.open().map_err(|e| EngineError::Load {
                    path: path.display().to_string(),
                    source: e.into(),
                })?;
                let engine = tokio::task::spawn_blocking(move || {
                    classifier::Classifier::load(&path, classifier::BatchSettings::default(), &device)
                })
                .await
                .map_err(|e| EngineError::Backend(e.into()))??;
                Ok(std::sync::Arc::new(engine))
            }
            ModelKind::LabelScoring => mistral::MistralLoader.load(spec, router).await,
        }
    }
}

/// Loads engines for model entries ([`ModelLoader`] in production; tests may
/// supply another implementation).
#[async_trait]
pub trait EngineLoader: Send + Sync {
    /// Load the model described by `spec`; `router` when it will make route
    /// decisions rather than generate answers.
    ///
    /// # Errors
    /// When the file is missing or the backend cannot load it.
    async fn load(
        &self,
        spec: &crate::config::ModelSpec,
        router: bool,
    ) -> Result<std::sync::Arc<dyn Engine>, EngineError>;

    /// Whether the model file must exist (false for engines that run without one).
    fn requires_file(&self) -> bool {
        true
    }
}
