//! The rows the log stores: one per request, one per shadow run.

use serde::{Deserialize, Serialize};

use crate::agents::RouteDecision;
use crate::guardrails::RailVerdict;
use crate::retrieval::Passage;

/// A passage reference as logged (the text is not copied into the log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievedRef {
    /// Document id.
    pub doc_id: String,
    /// Chunk id.
    pub chunk_id: String,
    /// Score.
    pub score: f32,
}

impl From<&Passage> for RetrievedRef {
    fn from(p: &Passage) -> Self {
        Self {
            doc_id: p.doc_id.clone(),
            chunk_id: p.chunk_id.clone(),
            score: p.score,
        }
    }
}

/// One request's record.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Request id (UUIDv7).
    pub request_id: String,
    /// `route`, `complete` or `stream`.
    pub kind: String,
    /// Caller session id.
    pub session_id: Option<String>,
    /// Caller user id.
    pub user_id: Option<String>,
    /// Id of the client API key the request came with (never the key).
    pub api_key_id: Option<String>,
    /// The server replica that served it (its `replica_id`), when the log
    /// was opened by a named replica.
    pub replica: Option<String>,
    /// Arrival, Unix ms.
    pub received_at_ms: i64,
    /// Record closed, Unix ms.
    pub finished_at_ms: i64,
    /// The query (after input rails).
    pub query: String,
    /// Final status (see the schema).
    pub status: String,
    /// Error message, when not ok.
    pub error: Option<String>,
    /// Rail verdicts.
    pub guardrails: Vec<RailVerdict>,
    /// Route decision, when one was made.
    pub route: Option<RouteDecision>,
    /// Expert that answered.
    pub expert: Option<String>,
    /// Its model version.
    pub expert_model_version: Option<String>,
    /// Passages given to the expert.
    pub retrieved: Vec<RetrievedRef>,
    /// Answer text as sent.
    pub answer: Option<String>,
    /// Prompt tokens of the expert's generation.
    pub prompt_tokens: Option<u32>,
    /// Completion tokens.
    pub completion_tokens: Option<u32>,
    /// Time to first token (ms).
    pub ttft_ms: Option<f64>,
    /// Whole request (ms).
    pub total_ms: Option<f64>,
    /// Why generation stopped.
    pub finish_reason: Option<String>,
}

/// One shadow run, as logged (table `shadow`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowRecord {
    /// The live request.
    pub request_id: String,
    /// Slot shadowed.
    pub slot: String,
    /// Candidate version.
    pub version: String,
    /// Version that served the live request.
    pub live_version: String,
    /// Live output (expert name, or answer text).
    pub live_output: String,
    /// Candidate output (`None` when it failed).
    pub output: Option<String>,
    /// Whether the outputs are equal.
    pub agree: Option<bool>,
    /// Candidate latency (ms).
    pub latency_ms: Option<f64>,
    /// Live latency of the same step (ms).
    pub live_latency_ms: Option<f64>,
    /// Why the candidate failed.
    pub error: Option<String>,
    /// Unix ms.
    pub created_at_ms: i64,
}

#[cfg(test)]
impl ShadowRecord {
    /// A candidate's run on `slot` that disagreed with the live model.
    pub(crate) fn fixture(request_id: &str, slot: &str, created_at_ms: i64) -> Self {
        Self {
            request_id: request_id.into(),
            slot: slot.into(),
            version: "v2".into(),
            live_version: "v1".into(),
            live_output: "hr".into(),
            output: Some("it".into()),
            agree: Some(false),
            latency_ms: Some(1.0),
            live_latency_ms: Some(2.0),
            error: None,
            created_at_ms,
        }
    }
}
