//! Retrieval seam: passages an expert answers from.
//!
//! The pipeline asks the [`Retriever`] for passages for the chosen expert and
//! query, puts them into the expert's prompt with citation ids, and records
//! their ids and scores in the request log. [`NoRetrieval`] returns nothing;
//! [`HybridRetriever`] searches each expert's corpus ([`chunk`]: documents
//! and chunks; [`index`]: BM25, dense search and their fusion).

pub mod chunk;
pub mod hybrid;
pub mod index;

pub use hybrid::{HybridRetriever, IndexStats};
pub use index::Mode;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// One retrieved passage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Passage {
    /// Document id.
    pub doc_id: String,
    /// Document title.
    pub title: String,
    /// Chunk id within the corpus.
    pub chunk_id: String,
    /// Text placed in the prompt.
    pub text: String,
    /// Retrieval score.
    pub score: f32,
}

/// Errors of a retriever.
#[derive(Debug, thiserror::Error)]
#[error("retrieval failed")]
pub struct RetrievalError(#[source] pub anyhow::Error);

/// Finds passages for an expert's answer.
#[async_trait]
pub trait Retriever: Send + Sync {
    /// Passages for `query` from `expert`'s corpus, best first.
    ///
    /// # Errors
    /// Index failures.
    async fn retrieve(&self, expert: &str, query: &str) -> Result<Vec<Passage>, RetrievalError>;

    /// What the index in use holds (`None`: no corpora).
    fn stats(&self) -> Option<IndexStats> {
        None
    }

    /// Rebuild the index from the corpora and swap it in.
    ///
    /// # Errors
    /// No corpora, or the build failed (the old index stays in use).
    async fn reindex(&self) -> Result<IndexStats, RetrievalError> {
        Err(RetrievalError(anyhow::anyhow!("this server has no corpora to index")))
    }
}

/// A retriever with no corpus.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRetrieval;

#[async_trait]
impl Retriever for NoRetrieval {
    async fn retrieve(&self, _expert: &str, _query: &str) -> Result<Vec<Passage>, RetrievalError> {
        Ok(Vec::new())
    }
}
