//! Retrieval seam: passages an expert answers from.
//!
//! The pipeline asks the [`Retriever`] for passages for the chosen expert and
//! query, puts them into the expert's prompt with citation ids, and records
//! their ids and scores in the request log. [`NoRetrieval`] returns nothing.

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
