//! Classifier routers: a backbone that turns a query into a feature vector
//! and a linear head over the experts. Two backbones:
//!
//! - **encoder** (this module's artifact functions): a sentence encoder (BERT
//!   family, e.g. all-MiniLM-L6-v2), mean-pooled;
//! - **decoder** ([`decoder`]): a Llama-family GGUF model, its last prompt
//!   token's final hidden state.
//!
//! A decision is one backbone forward pass (shared with other decisions by
//! the [`batcher`]) and a product with the head, whatever the number of
//! experts or how their names tokenize. Queries unlike anything the head was
//! trained on are flagged out of scope by their similarity to the nearest
//! training examples ([`Neighbours`]), so the router's fallback expert
//! answers them.
//!
//! An encoder classifier is a folder a sentence-transformers user recognises:
//! the encoder's `config.json`, `tokenizer.json` and `model.safetensors`
//! (mean pooling, L2-normalised), plus [`CARD_FILE`] (kind, labels,
//! out-of-scope rule) and [`HEAD_FILE`] (`head.weight` `[labels, dim]`,
//! `head.bias` `[labels]`, `neighbours.embeddings` `[examples, dim]`).

pub mod batcher;
pub mod decoder;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{ChatMessage, Engine, EngineError, GenerateParams, LabelScores, LabelSet, ModelKind, Role, TokenStream};
use crate::embed::Embedder;
pub use batcher::{BatchSettings, Batcher};

/// The classifier's description, beside the encoder files.
pub const CARD_FILE: &str = "classifier.json";
/// The head's weights and the out-of-scope reference embeddings.
pub const HEAD_FILE: &str = "classifier.safetensors";
/// The encoder's files, as sentence-transformers and the rails read them.
pub const ENCODER_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];
/// Value of the card's `format` for an encoder classifier.
pub const FORMAT: &str = "flywheel-encoder-classifier/1";

/// Whether `path` is an encoder classifier folder.
pub fn is_classifier(path: &Path) -> bool {
    path.join(CARD_FILE).is_file()
}

/// How the backbone was trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Training {
    /// The backbone is the base model as fetched; only the head was trained.
    HeadOnly,
    /// The backbone was tuned on the labels too (an encoder's own
    /// `model.safetensors`; a decoder's adapters merged into its weights).
    EndToEnd,
}

/// A model that turns texts into feature vectors, many texts per forward pass.
pub trait Featurizer: Send + Sync + 'static {
    /// The token windows `text` is read as (one or more; each a forward-pass row).
    ///
    /// # Errors
    /// Tokenizer failures.
    fn windows(&self, text: &str) -> anyhow::Result<Vec<Vec<u32>>>;

    /// The feature vectors of texts cut into windows, in one padded pass.
    ///
    /// # Errors
    /// Model failures.
    fn features(&self, texts: &[Vec<Vec<u32>>]) -> anyhow::Result<Vec<Vec<f32>>>;

    /// The features of `text` if another caller computed them a moment ago.
    fn recall(&self, _text: &str) -> Option<(Arc<Vec<f32>>, u32)> {
        None
    }

    /// Keep `text`'s features for [`Featurizer::recall`].
    fn remember(&self, _text: &str, _features: &[f32], _tokens: u32) {}

    /// The fingerprint of the model files behind [`Featurizer::recall`]:
    /// callers on the same files share features (`None`: nothing shared).
    fn fingerprint(&self) -> Option<&str> {
        None
    }
}

impl Featurizer for Embedder {
    fn windows(&self, text: &str) -> anyhow::Result<Vec<Vec<u32>>> {
        Ok(Embedder::windows(self, text)?)
    }

    fn features(&self, texts: &[Vec<Vec<u32>>]) -> anyhow::Result<Vec<Vec<f32>>> {
        Ok(self.embed_windows(texts)?)
    }

    fn recall(&self, text: &str) -> Option<(Arc<Vec<f32>>, u32)> {
        Embedder::recall(self, text)
    }

    fn remember(&self, text: &str, features: &[f32], tokens: u32) {
        Embedder::remember(self, text, features, tokens);
    }

    fn fingerprint(&self) -> Option<&str> {
        Some(Embedder::fingerprint(self))
    }
}

/// The out-of-scope rule: a query whose mean cosine similarity to its `k`
/// nearest training examples is below `threshold` is out of scope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutOfScopeRule {
    /// Neighbours averaged.
    pub k: usize,
    /// Similarity below which a query is out of scope.
    pub threshold: f32,
    /// Share of held-out training queries the head answers right that the
    /// threshold may turn away (the calibration target; no out-of-scope data
    /// is used).
    pub accuracy_loss: f32,
    /// Share of held-out training queries it turns away (right or wrong).
    pub in_scope_rejection: f32,
    /// Share of each label's examples turned away when that label is held
    /// out of the reference set (an estimate of out-of-scope recall).
    pub held_out_label_recall: f32,
}

/// A classifier's description: `classifier.json` of an encoder classifier,
/// [`decoder::CARD_KEY`] of a decoder classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierCard {
    /// [`FORMAT`] or [`decoder::FORMAT`].
    pub format: String,
    /// How the backbone was trained.
    pub training: Training,
    /// Labels, in the head's row order.
    pub labels: Vec<String>,
    /// The out-of-scope rule (absent: every query is in scope).
    pub out_of_scope: Option<OutOfScopeRule>,
    /// What a decoder backbone reads around the query (encoders: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<decoder::PromptTemplate>,
}

/// A linear head over normalised embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// `[labels * dim]`, row-major.
    pub weight: Vec<f32>,
    /// `[labels]`.
    pub bias: Vec<f32>,
    /// Embedding size.
    pub dim: usize,
}

impl Head {
    /// Log-probabilities of every label for `embedding`.
    pub fn log_probs(&self, embedding: &[f32]) -> Vec<f32> {
        let logits: Vec<f32> = self
            .bias
            .iter()
            .enumerate()
            .map(|(j, b)| b + crate::embed::cosine(&self.weight[j * self.dim..(j + 1) * self.dim], embedding))
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
        logits.iter().map(|l| l - log_sum).collect()
    }
}

/// Normalised embeddings of the training queries, for the out-of-scope rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbours {
    /// `[examples * dim]`, row-major.
    pub embeddings: Vec<f32>,
    /// Embedding size.
    pub dim: usize,
}

impl Neighbours {
    /// Mean cosine similarity of `q` to its `k` most similar references,
    /// leaving out the reference rows `skip` says to.
    pub fn similarity(&self, q: &[f32], k: usize, skip: impl Fn(usize) -> bool) -> f32 {
        let mut top: Vec<f32> = Vec::with_capacity(k + 1);
        for (i, row) in self.embeddings.chunks_exact(self.dim).enumerate() {
            if skip(i) {
                continue;
            }
            let s = crate::embed::cosine(row, q);
            if top.len() < k {
                top.push(s);
                top.sort_by(|a, b| b.total_cmp(a));
            } else if top.last().is_some_and(|&m| s > m) {
                top.pop();
                let at = top.partition_point(|&t| t >= s);
                top.insert(at, s);
            }
        }
        if top.is_empty() {
            return f32::NEG_INFINITY;
        }
        top.iter().sum::<f32>() / top.len() as f32
    }

    /// Examples held.
    pub fn len(&self) -> usize {
        self.embeddings.len() / self.dim.max(1)
    }

    /// No examples.
    pub fn is_empty(&self) -> bool {
        self.embeddings.is_empty()
    }
}

/// One query's classification.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// Log-probability of each label, in the card's order.
    pub log_probs: Vec<f32>,
    /// Mean similarity to the nearest training examples (absent without a rule).
    pub similarity: Option<f32>,
    /// The query is unlike the training data.
    pub out_of_scope: bool,
    /// Encoder tokens read.
    pub tokens: u32,
}

/// The parts of a classifier folder, for writing one.
#[derive(Debug, Clone)]
pub struct ClassifierParts<'a> {
    /// The card.
    pub card: &'a ClassifierCard,
    /// The head.
    pub head: &'a Head,
    /// Reference embeddings (needed when the card has an out-of-scope rule).
    pub neighbours: Option<&'a Neighbours>,
    /// Folder of the encoder's files.
    pub encoder_dir: &'a Path,
}

pub(crate) fn load_err(path: &Path, e: impl Into<anyhow::Error>) -> EngineError {
    EngineError::Load {
        path: path.display().to_string(),
        source: e.into(),
    }
}

/// Write a classifier folder at `dir` (the encoder files hard-linked, or
/// copied where links are not possible).
///
/// # Errors
/// I/O failures, or parts that do not fit together.
pub fn write(dir: &Path, parts: &ClassifierParts<'_>) -> Result<(), EngineError> {
    let err = |e: anyhow::Error| load_err(dir, e);
    let labels = parts.card.labels.len();
    if parts.head.bias.len() != labels || parts.head.weight.len() != labels * parts.head.dim {
        return Err(err(anyhow::anyhow!(
            "the head does not match the card's {labels} labels"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| err(e.into()))?;
    for name in ENCODER_FILES {
        let (from, to) = (parts.encoder_dir.join(name), dir.join(name));
        let _ = std::fs::remove_file(&to);
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(|e| err(anyhow::Error::from(e).context(from.display().to_string())))?;
        }
    }
    let cpu = Device::Cpu;
    let mut tensors = HashMap::new();
    let t = |v: &[f32], shape: (usize, usize)| Tensor::from_slice(v, shape, &cpu);
    tensors.insert(
        "head.weight".to_string(),
        t(&parts.head.weight, (labels, parts.head.dim)).map_err(|e| err(e.into()))?,
    );
    tensors.insert(
        "head.bias".to_string(),
        Tensor::from_slice(&parts.head.bias, labels, &cpu).map_err(|e| err(e.into()))?,
    );
    if let Some(n) = parts.neighbours {
        tensors.insert(
            "neighbours.embeddings".to_string(),
            t(&n.embeddings, (n.len(), n.dim)).map_err(|e| err(e.into()))?,
        );
    }
    candle_core::safetensors::save(&tensors, dir.join(HEAD_FILE)).map_err(|e| err(e.into()))?;
    let text = serde_json::to_string_pretty(parts.card).map_err(|e| err(e.into()))?;
    std::fs::write(dir.join(CARD_FILE), text).map_err(|e| err(e.into()))?;
    Ok(())
}

/// Read the card of the classifier folder `dir`.
///
/// # Errors
/// A missing or invalid card, or one of another format.
pub fn read_card(dir: &Path) -> Result<ClassifierCard, EngineError> {
    let path = dir.join(CARD_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| load_err(&path, e))?;
    let card: ClassifierCard = serde_json::from_str(&text).map_err(|e| load_err(&path, e))?;
    if card.format != FORMAT {
        return Err(load_err(
            &path,
            anyhow::anyhow!("format `{}` is not `{FORMAT}`", card.format),
        ));
    }
    LabelSet::new(card.labels.clone()).map_err(|e| load_err(&path, e))?;
    Ok(card)
}

/// A loaded classifier router (either backbone).
pub struct Classifier {
    dir: PathBuf,
    card: ClassifierCard,
    head: Head,
    neighbours: Option<Neighbours>,
    batcher: Batcher,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("path", &self.dir)
            .field("kind", &self.kind())
            .field("labels", &self.card.labels)
            .finish()
    }
}

impl Classifier {
    /// Load the classifier at `path` (an encoder classifier folder, or a
    /// decoder classifier GGUF whose backbone runs on `device`) and start its
    /// batcher.
    ///
    /// # Errors
    /// Missing or inconsistent files.
    pub fn load(path: &Path, settings: BatchSettings, device: &Device) -> Result<Self, EngineError> {
        if path.is_dir() {
            return Self::load_encoder(path, settings);
        }
        let parts = decoder::load(path, device)?;
        let batcher = Batcher::start(Arc::new(parts.backbone), settings).map_err(|e| load_err(path, e))?;
        Ok(Self {
            dir: path.to_path_buf(),
            card: parts.card,
            head: parts.head,
            neighbours: parts.neighbours,
            batcher,
        })
    }

    /// Load the encoder classifier folder `dir` and start its batcher.
    ///
    /// # Errors
    /// Missing or inconsistent files.
    fn load_encoder(dir: &Path, settings: BatchSettings) -> Result<Self, EngineError> {
        let card = read_card(dir)?;
        let embedder = Arc::new(Embedder::load(dir).map_err(|e| load_err(dir, e))?);
        let path = dir.join(HEAD_FILE);
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| load_err(&path, e))?;
        let read = |name: &str| -> Result<(Vec<f32>, Vec<usize>), EngineError> {
            let t = tensors
                .get(name)
                .ok_or_else(|| load_err(&path, anyhow::anyhow!("no tensor `{name}`")))?;
            let v = t
                .flatten_all()
                .and_then(|f| f.to_dtype(candle_core::DType::F32))
                .and_then(|f| f.to_vec1::<f32>())
                .map_err(|e| load_err(&path, e))?;
            Ok((v, t.dims().to_vec()))
        };
        let dim = embedder.dim();
        let labels = card.labels.len();
        let (weight, wshape) = read("head.weight")?;
        let (bias, _) = read("head.bias")?;
        if wshape != [labels, dim] || bias.len() != labels {
            return Err(load_err(
                &path,
                anyhow::anyhow!(
                    "the head is {wshape:?} with {} biases; the card has {labels} labels and the encoder {dim} dimensions",
                    bias.len()
                ),
            ));
        }
        let neighbours = match &card.out_of_scope {
            Some(_) => {
                let (embeddings, shape) = read("neighbours.embeddings")?;
                if shape.len() != 2 || shape[1] != dim || shape[0] == 0 {
                    return Err(load_err(
                        &path,
                        anyhow::anyhow!("the reference embeddings are {shape:?}, not [examples, {dim}]"),
                    ));
                }
                Some(Neighbours { embeddings, dim })
            }
            None => None,
        };
        let batcher = Batcher::start(embedder, settings).map_err(|e| load_err(dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            card,
            head: Head { weight, bias, dim },
            neighbours,
            batcher,
        })
    }

    /// Which backbone decides (the card's format says).
    pub fn kind(&self) -> ModelKind {
        if self.card.format == decoder::FORMAT {
            ModelKind::DecoderClassifier
        } else {
            ModelKind::EncoderClassifier
        }
    }

    /// The card.
    pub fn card(&self) -> &ClassifierCard {
        &self.card
    }

    /// The batcher (its counters).
    pub fn batcher(&self) -> &Batcher {
        &self.batcher
    }

    /// Classify `text`.
    ///
    /// # Errors
    /// A full queue, tokenizer or model failures.
    pub async fn classify(&self, text: &str) -> Result<Classification, EngineError> {
        let (embedding, tokens) = self.batcher.features(text).await?;
        Ok(self.classify_embedding(&embedding, tokens))
    }

    /// Classify features computed elsewhere.
    pub fn classify_embedding(&self, embedding: &[f32], tokens: u32) -> Classification {
        let log_probs = self.head.log_probs(embedding);
        let (similarity, out_of_scope) = match (&self.card.out_of_scope, &self.neighbours) {
            (Some(rule), Some(n)) => {
                let s = n.similarity(embedding, rule.k, |_| false);
                (Some(s), s < rule.threshold)
            }
            _ => (None, false),
        };
        Classification {
            log_probs,
            similarity,
            out_of_scope,
            tokens,
        }
    }
}

#[async_trait]
impl Engine for Classifier {
    fn backend(&self) -> &'static str {
        match self.kind() {
            ModelKind::DecoderClassifier => "candle-decoder",
            _ => "candle-encoder",
        }
    }

    fn shared_encoder(&self) -> Option<&str> {
        self.batcher.fingerprint()
    }

    async fn generate(&self, _messages: Vec<ChatMessage>, _params: GenerateParams) -> Result<TokenStream, EngineError> {
        Err(EngineError::Rejected(format!(
            "{} is a classifier ({}): it routes but cannot write answers",
            self.dir.display(),
            self.kind()
        )))
    }

    async fn score_labels(&self, messages: &[ChatMessage], labels: &LabelSet) -> Result<LabelScores, EngineError> {
        let query = messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.as_str())
            .unwrap_or_default();
        let c = self.classify(query).await?;
        let logprobs = labels
            .names()
            .iter()
            .map(|name| {
                self.card
                    .labels
                    .iter()
                    .position(|l| l == name)
                    .map(|i| c.log_probs[i])
                    .ok_or_else(|| {
                        EngineError::InvalidLabels(format!("{} was not trained for label `{name}`", self.dir.display()))
                    })
            })
            .collect::<Result<Vec<f32>, EngineError>>()?;
        Ok(LabelScores {
            logprobs,
            prompt_tokens: c.tokens,
            forward_passes: 1,
            out_of_scope: c.out_of_scope,
        })
    }

    async fn warm_up(&self, _messages: &[ChatMessage]) -> Result<(), EngineError> {
        self.classify("hello").await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_log_probs_are_a_normalised_linear_score() {
        let head = Head {
            weight: vec![1.0, 0.0, 0.0, 1.0],
            bias: vec![0.0, 0.5],
            dim: 2,
        };
        let lp = head.log_probs(&[1.0, 0.0]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        // logits 1.0 and 0.5: label 0 wins by exactly 0.5 nats.
        assert!((lp[0] - lp[1] - 0.5).abs() < 1e-6, "{lp:?}");
    }

    #[test]
    fn neighbour_similarity_averages_the_k_most_similar_and_can_skip_rows() {
        let n = Neighbours {
            embeddings: vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8],
            dim: 2,
        };
        let q = [1.0, 0.0];
        assert!((n.similarity(&q, 1, |_| false) - 1.0).abs() < 1e-6);
        assert!((n.similarity(&q, 2, |_| false) - 0.8).abs() < 1e-6);
        assert!((n.similarity(&q, 1, |i| i == 0) - 0.6).abs() < 1e-6);
        assert_eq!(n.similarity(&q, 1, |_| true), f32::NEG_INFINITY);
    }
}
