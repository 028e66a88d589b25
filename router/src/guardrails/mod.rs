//! Guardrail seam: input rails run before routing, output rails filter the
//! answer stream.
//!
//! The pipeline calls [`InputRails::check`] on every query-bearing request and
//! an [`OutputFilter`] on every answer delta. Each rail reports a
//! [`RailVerdict`] that goes into the request record. The default
//! [`PassThrough`] allows everything and reports nothing; concrete rails
//! (jailbreak, PII, topic, limits) plug in here.

pub mod pii;

use serde::{Deserialize, Serialize};

/// What a rail decided about one text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RailVerdict {
    /// Rail name, e.g. `"jailbreak"`.
    pub rail: String,
    /// `"allow"`, `"redact"` or `"block"`.
    pub decision: String,
    /// Detector score, when the rail has one.
    pub score: Option<f32>,
    /// Time the rail took, in milliseconds.
    pub latency_ms: f64,
}

/// Result of the input rails for a request that may proceed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InputCheck {
    /// The query to route and answer (possibly redacted by a rail); `None`
    /// keeps the original.
    pub rewritten: Option<String>,
    /// Every rail's verdict.
    pub verdicts: Vec<RailVerdict>,
}

/// A request stopped by a rail.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("blocked by the {rail} rail: {message}")]
pub struct Blocked {
    /// The rail that blocked.
    pub rail: String,
    /// A message safe to show the caller.
    pub message: String,
    /// Every rail's verdict, including the blocking one.
    pub verdicts: Vec<RailVerdict>,
}

/// The input rails of a pipeline.
pub trait InputRails: Send + Sync {
    /// Check a query.
    ///
    /// # Errors
    /// [`Blocked`] when a rail refuses the query.
    fn check(&self, query: &str) -> Result<InputCheck, Blocked>;
}

/// Filters one answer stream; created per request.
pub trait OutputFilter: Send {
    /// Take a delta, return the text that may be released now (a filter may
    /// hold back a tail that could be the start of something to redact).
    fn push(&mut self, delta: &str) -> String;
    /// End of stream: release whatever is held back.
    fn finish(&mut self) -> String;
    /// Verdicts gathered over the stream.
    fn verdicts(&self) -> Vec<RailVerdict>;
}

/// The output rails of a pipeline.
pub trait OutputRails: Send + Sync {
    /// A filter for one answer.
    fn filter(&self) -> Box<dyn OutputFilter>;
}

/// Rails that allow everything: the default until rails are configured.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough;

impl InputRails for PassThrough {
    fn check(&self, _query: &str) -> Result<InputCheck, Blocked> {
        Ok(InputCheck::default())
    }
}

impl OutputRails for PassThrough {
    fn filter(&self) -> Box<dyn OutputFilter> {
        Box::new(PassThrough)
    }
}

impl OutputFilter for PassThrough {
    fn push(&mut self, delta: &str) -> String {
        delta.to_string()
    }
    fn finish(&mut self) -> String {
        String::new()
    }
    fn verdicts(&self) -> Vec<RailVerdict> {
        Vec::new()
    }
}
