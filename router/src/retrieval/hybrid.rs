//! The experts' retriever: an index per expert corpus (BM25 + embeddings),
//! queried in the configured mode, fused by reciprocal rank, trimmed to a
//! token budget, and rebuilt aside then swapped in atomically (`ArcSwap`:
//! a request searches the index it started with, never a half-built one).
//!
//! Chunk embeddings are cached in `cache_dir` under a hash of the embedder
//! and the chunks' texts, so a restart or a re-index re-embeds only what
//! changed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::chunk::{self, Chunk, ChunkSpec};
use super::index::{ExpertIndex, Mode, rrf};
use super::{Passage, RetrievalError, Retriever};
use crate::config::{EngineSettings, RetrievalSpec};
use crate::embed::Embedder;

/// Chunks embedded per forward pass while indexing.
const EMBED_BATCH: usize = 16;

/// One expert's corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Expert name.
    pub expert: String,
    /// Corpus folder.
    pub dir: PathBuf,
    /// Passages per answer.
    pub top_k: usize,
}

/// What an index holds and how long it took.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IndexStats {
    /// Experts with a corpus.
    pub experts: usize,
    /// Documents read.
    pub documents: usize,
    /// Chunks indexed.
    pub chunks: usize,
    /// Chunks embedded by this build (the rest came from the cache).
    pub embedded: usize,
    /// Build time, ms.
    pub build_ms: f64,
    /// When it was built, Unix ms.
    pub built_at_unix_ms: i64,
}

/// The indexes of every expert, as one swappable unit.
#[derive(Debug, Default)]
pub struct IndexSet {
    experts: HashMap<String, (ExpertIndex, usize)>,
    stats: IndexStats,
}

fn err(e: impl Into<anyhow::Error>) -> RetrievalError {
    RetrievalError(e.into())
}

/// Resolve `path` against the working directory, else against its nearest
/// ancestor where it exists (so the default config's `server/kb/...` works
/// from any folder of a checkout).
pub fn resolve(path: &Path) -> Option<PathBuf> {
    if path.is_absolute() {
        return path.exists().then(|| path.to_path_buf());
    }
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors().map(|a| a.join(path)).find(|p| p.exists())
}

/// The corpora `settings` configures, resolved.
///
/// # Errors
/// A configured corpus folder that does not exist.
pub fn sources(settings: &EngineSettings) -> Result<Vec<Source>, RetrievalError> {
    let mut out = Vec::new();
    for e in &settings.experts {
        let Some(corpus) = &e.corpus else { continue };
        let dir = resolve(corpus).filter(|d| d.is_dir()).ok_or_else(|| {
            err(anyhow::anyhow!(
                "expert `{}`: corpus folder {} does not exist (relative paths resolve from the working directory \
                 or its parents); fix experts.corpus or remove it",
                e.name,
                corpus.display()
            ))
        })?;
        out.push(Source {
            expert: e.name.clone(),
            dir,
            top_k: e.top_k,
        });
    }
    Ok(out)
}

/// The sentence embedder the retrieval settings name (`retrieval.embedder_dir`,
/// else the jailbreak rail's).
pub fn embedder_dir(settings: &EngineSettings) -> PathBuf {
    settings
        .retrieval
        .embedder_dir
        .clone()
        .unwrap_or_else(|| settings.rails.jailbreak.embedder_dir.clone())
}

/// The retriever `settings` describes (`None` when no expert has a corpus),
/// built (blocking). `embedder` is used when given, else loaded from
/// [`embedder_dir`] if the mode needs one.
///
/// # Errors
/// Missing corpora or embedder, build failures.
pub fn from_settings(
    settings: &EngineSettings,
    embedder: Option<Arc<Embedder>>,
    progress: Progress<'_>,
) -> Result<Option<HybridRetriever>, RetrievalError> {
    let sources = sources(settings)?;
    if sources.is_empty() {
        return Ok(None);
    }
    let spec = settings.retrieval.clone();
    let embedder = match embedder {
        Some(e) => Some(e),
        None if spec.mode != Mode::Bm25 => {
            let dir = embedder_dir(settings);
            Some(Arc::new(Embedder::load(&dir).map_err(|e| {
                err(anyhow::Error::new(e).context(format!("loading the retrieval embedder from {}", dir.display())))
            })?))
        }
        None => None,
    };
    let cache = spec.cache_dir.clone();
    HybridRetriever::build(sources, spec, embedder, cache, progress).map(Some)
}

struct Inner {
    current: ArcSwap<IndexSet>,
    sources: Vec<Source>,
    spec: RetrievalSpec,
    embedder: Option<Arc<Embedder>>,
    cache_dir: PathBuf,
}

/// The hybrid retriever (cheap to clone).
#[derive(Clone)]
pub struct HybridRetriever {
    inner: Arc<Inner>,
    rebuilding: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for HybridRetriever {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridRetriever")
            .field("sources", &self.inner.sources)
            .field("stats", &self.inner.current.load().stats)
            .finish_non_exhaustive()
    }
}

/// Progress of a build: (chunks embedded so far, chunks to embed).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

impl HybridRetriever {
    /// Build the indexes of `sources` (blocking: reads, chunks, embeds).
    /// `embedder` is needed for the dense and hybrid modes.
    ///
    /// # Errors
    /// Unreadable corpora, a missing embedder for a mode that needs one,
    /// embedding or index failures.
    pub fn build(
        sources: Vec<Source>,
        spec: RetrievalSpec,
        embedder: Option<Arc<Embedder>>,
        cache_dir: PathBuf,
        progress: Progress<'_>,
    ) -> Result<Self, RetrievalError> {
        if spec.mode != Mode::Bm25 && embedder.is_none() {
            return Err(err(anyhow::anyhow!(
                "retrieval mode `{}` needs the sentence embedder; set retrieval.embedder_dir or mode = \"bm25\"",
                spec.mode.as_str()
            )));
        }
        let inner = Inner {
            current: ArcSwap::from_pointee(IndexSet::default()),
            sources,
            spec,
            embedder,
            cache_dir,
        };
        let set = inner.build_set(progress)?;
        inner.current.store(Arc::new(set));
        Ok(Self {
            inner: Arc::new(inner),
            rebuilding: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The corpora.
    pub fn sources(&self) -> &[Source] {
        &self.inner.sources
    }

    /// Per expert of the index in use: (expert, documents, chunks), by name.
    pub fn experts(&self) -> Vec<(String, usize, usize)> {
        let set = self.inner.current.load();
        let mut out: Vec<(String, usize, usize)> = set
            .experts
            .iter()
            .map(|(name, (index, _))| {
                let docs: std::collections::HashSet<&str> = index.chunks().iter().map(|c| c.doc_id.as_str()).collect();
                (name.clone(), docs.len(), index.chunks().len())
            })
            .collect();
        out.sort();
        out
    }

    /// Statistics of the index in use.
    pub fn stats(&self) -> IndexStats {
        self.inner.current.load().stats.clone()
    }

    /// Re-read the corpora, build a new index aside, and swap it in. One
    /// rebuild at a time; searches keep using the old index until the swap.
    ///
    /// # Errors
    /// As [`HybridRetriever::build`]; the old index stays in use.
    pub async fn rebuild(&self) -> Result<IndexStats, RetrievalError> {
        let _one = self.rebuilding.lock().await;
        let inner = self.inner.clone();
        let set = tokio::task::spawn_blocking(move || inner.build_set(&mut |_, _| {}))
            .await
            .map_err(err)??;
        let stats = set.stats.clone();
        self.inner.current.store(Arc::new(set));
        tracing::info!(
            chunks = stats.chunks,
            build_ms = stats.build_ms,
            "retrieval index swapped"
        );
        Ok(stats)
    }

    /// The best passages of `expert`'s corpus for `query` in `mode`, at most
    /// `k` (blocking: embeds the query). No corpus: none.
    ///
    /// # Errors
    /// Embedding or index failures.
    pub fn search(&self, expert: &str, query: &str, mode: Mode, k: usize) -> Result<Vec<Passage>, RetrievalError> {
        self.inner.search(expert, query, mode, k)
    }
}

impl Inner {
    fn embed_all(
        &self,
        expert: &str,
        chunks: &[Chunk],
        progress: Progress<'_>,
    ) -> Result<(Vec<f32>, usize, usize), RetrievalError> {
        let Some(embedder) = &self.embedder else {
            return Ok((Vec::new(), 0, 0));
        };
        let dim = embedder.dim();
        let mut h = Sha256::new();
        h.update(embedder.fingerprint().as_bytes());
        for c in chunks {
            h.update(c.text.as_bytes());
            h.update([0u8]);
        }
        let key = format!("{expert}-{:x}", h.finalize());
        let path = self.cache_dir.join(format!("{}.safetensors", key.replace('/', "_")));
        if let Ok(tensors) = candle_core::safetensors::load(&path, &Device::Cpu)
            && let Some(t) = tensors.get("vectors")
            && let Ok(v) = t.flatten_all().and_then(|t| t.to_vec1::<f32>())
            && v.len() == chunks.len() * dim
        {
            progress(chunks.len(), chunks.len());
            return Ok((v, dim, 0));
        }
        let mut vectors = Vec::with_capacity(chunks.len() * dim);
        for (n, batch) in chunks.chunks(EMBED_BATCH).enumerate() {
            let texts: Vec<&str> = batch.iter().map(|c| c.text.as_str()).collect();
            for v in embedder.embed_batch(&texts, EMBED_BATCH).map_err(err)? {
                vectors.extend(v);
            }
            progress(((n + 1) * EMBED_BATCH).min(chunks.len()), chunks.len());
        }
        // Best effort: a cache that cannot be written only costs time later.
        if let Err(e) = write_cache(&path, &vectors, chunks.len(), dim) {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache chunk embeddings");
        }
        Ok((vectors, dim, chunks.len()))
    }

    fn build_set(&self, progress: Progress<'_>) -> Result<IndexSet, RetrievalError> {
        let started = Instant::now();
        let spec = ChunkSpec {
            max_chars: self.spec.chunk_chars,
            overlap_chars: self.spec.overlap_chars,
        };
        let mut set = IndexSet::default();
        let mut per_source = Vec::new();
        for s in &self.sources {
            let docs = chunk::load_corpus(&s.dir, &s.expert).map_err(err)?;
            set.stats.documents += docs.len();
            let chunks: Vec<Chunk> = docs.iter().flat_map(|d| chunk::chunk(d, spec)).collect();
            per_source.push((s, chunks));
        }
        let total: usize = per_source.iter().map(|(_, c)| c.len()).sum();
        let mut done = 0usize;
        for (s, chunks) in per_source {
            let n = chunks.len();
            let (vectors, dim, embedded) = self.embed_all(&s.expert, &chunks, &mut |d, _| progress(done + d, total))?;
            done += n;
            set.stats.chunks += n;
            set.stats.embedded += embedded;
            set.stats.experts += 1;
            let index = ExpertIndex::build(chunks, vectors, dim).map_err(err)?;
            set.experts.insert(s.expert.clone(), (index, s.top_k));
        }
        set.stats.build_ms = started.elapsed().as_secs_f64() * 1e3;
        set.stats.built_at_unix_ms = crate::clock::unix_ms(std::time::SystemTime::now());
        Ok(set)
    }

    fn search(&self, expert: &str, query: &str, mode: Mode, k: usize) -> Result<Vec<Passage>, RetrievalError> {
        let set = self.current.load();
        let Some((index, _)) = set.experts.get(expert) else {
            return Ok(Vec::new());
        };
        let wide = self.spec.candidates.max(k);
        let lexical = if mode == Mode::Dense {
            Vec::new()
        } else {
            index.bm25(query, wide).map_err(err)?
        };
        let semantic = match (&self.embedder, mode) {
            (Some(e), Mode::Dense | Mode::Hybrid) => index.dense(&e.embed(query).map_err(err)?, wide),
            _ => Vec::new(),
        };
        let ranked = match mode {
            Mode::Bm25 => lexical,
            Mode::Dense => semantic,
            Mode::Hybrid => rrf(&[&lexical, &semantic], self.spec.rrf_k),
        };
        Ok(ranked
            .into_iter()
            .take(k)
            .filter_map(|(i, score)| {
                index.chunks().get(i).map(|c| Passage {
                    doc_id: c.doc_id.clone(),
                    title: c.title.clone(),
                    chunk_id: c.chunk_id.clone(),
                    text: c.text.clone(),
                    score,
                })
            })
            .collect())
    }

    /// Tokens of `text` as the embedder's tokenizer counts them (~4 characters each without one).
    fn tokens(&self, text: &str) -> usize {
        self.embedder
            .as_ref()
            .and_then(|e| e.count_tokens(text).ok())
            .unwrap_or_else(|| text.chars().count().div_ceil(4))
    }

    /// Keep passages, best first, while they fit `budget` tokens; the first
    /// one is cut to fit when it alone is too long.
    fn within_budget(&self, passages: Vec<Passage>, budget: usize) -> Vec<Passage> {
        let mut used = 0usize;
        let mut out = Vec::new();
        for mut p in passages {
            let t = self.tokens(&p.text);
            if used + t > budget {
                if out.is_empty() && budget > 0 {
                    let keep = p.text.len() * budget / t.max(1);
                    let cut = p
                        .text
                        .char_indices()
                        .map(|(i, _)| i)
                        .take_while(|&i| i <= keep)
                        .last()
                        .unwrap_or(0);
                    p.text.truncate(cut);
                    out.push(p);
                }
                break;
            }
            used += t;
            out.push(p);
        }
        out
    }
}

fn write_cache(path: &Path, vectors: &[f32], n: usize, dim: usize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let t = Tensor::from_slice(vectors, (n, dim), &Device::Cpu)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    candle_core::safetensors::save(&HashMap::from([("vectors".to_string(), t)]), &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[async_trait]
impl Retriever for HybridRetriever {
    async fn retrieve(&self, expert: &str, query: &str) -> Result<Vec<Passage>, RetrievalError> {
        let Some(top_k) = self.inner.current.load().experts.get(expert).map(|(_, k)| *k) else {
            return Ok(Vec::new());
        };
        let inner = self.inner.clone();
        let (expert, query) = (expert.to_string(), query.to_string());
        tokio::task::spawn_blocking(move || {
            let found = inner.search(&expert, &query, inner.spec.mode, top_k)?;
            Ok(inner.within_budget(found, inner.spec.max_context_tokens))
        })
        .await
        .map_err(err)?
    }

    fn stats(&self) -> Option<IndexStats> {
        Some(HybridRetriever::stats(self))
    }

    async fn reindex(&self) -> Result<IndexStats, RetrievalError> {
        self.rebuild().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retriever(dir: &Path, budget: usize) -> HybridRetriever {
        let spec = RetrievalSpec {
            mode: Mode::Bm25,
            max_context_tokens: budget,
            ..RetrievalSpec::default()
        };
        let sources = vec![Source {
            expert: "it".into(),
            dir: dir.to_path_buf(),
            top_k: 2,
        }];
        HybridRetriever::build(sources, spec, None, dir.join("cache"), &mut |_, _| {}).unwrap()
    }

    #[tokio::test]
    async fn answers_from_the_experts_own_corpus_within_the_budget_and_swaps_on_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("vpn.md"),
            "# VPN\n\nUse SecureLink to connect the VPN.\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("printer.md"),
            "# Printers\n\nRelease print jobs with your badge.\n",
        )
        .unwrap();
        let r = retriever(dir.path(), 1000);
        assert_eq!(r.stats().documents, 2);
        let p = r.retrieve("it", "how do I connect the vpn").await.unwrap();
        assert_eq!(p[0].doc_id, "it/vpn");
        assert!(p.len() <= 2);
        // Another expert has no corpus: no passages, no error.
        assert!(r.retrieve("hr", "vpn").await.unwrap().is_empty());

        // A new document is invisible until the rebuild swaps it in.
        std::fs::write(
            dir.path().join("wifi.md"),
            "# Wifi\n\nJoin ACME-CORP for wireless access.\n",
        )
        .unwrap();
        assert!(
            r.retrieve("it", "wireless ACME-CORP")
                .await
                .unwrap()
                .iter()
                .all(|p| p.doc_id != "it/wifi")
        );
        let stats = r.rebuild().await.unwrap();
        assert_eq!(stats.documents, 3);
        assert_eq!(
            r.retrieve("it", "wireless ACME-CORP").await.unwrap()[0].doc_id,
            "it/wifi"
        );

        // A tight budget keeps the best passage, cut to fit.
        let tight = retriever(dir.path(), 3);
        let p = tight.retrieve("it", "how do I connect the vpn").await.unwrap();
        assert_eq!(p.len(), 1);
        assert!(p[0].text.chars().count() <= 12, "{:?}", p[0].text);
    }

    #[test]
    fn dense_modes_need_an_embedder_and_missing_corpora_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = HybridRetriever::build(
            Vec::new(),
            RetrievalSpec::default(),
            None,
            dir.path().into(),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(format!("{:#}", e.0).contains("embedder"), "{e:?}");
        let mut settings = EngineSettings::default();
        settings.experts[0].corpus = Some(dir.path().join("nope"));
        let e = sources(&settings).unwrap_err();
        assert!(format!("{:#}", e.0).contains("does not exist"), "{e:?}");
    }
}
