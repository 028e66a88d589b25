//! Guardrail seam: input rails run before routing, output rails filter the
//! answer stream.
//!
//! The pipeline calls [`InputRails::check`] on every query-bearing request and
//! an [`OutputFilter`] on every answer delta. Each rail reports a
//! [`RailVerdict`] that goes into the request record. The default
//! [`PassThrough`] allows everything and reports nothing; [`rails::RailSet`]
//! is the configured set (limits, PII, jailbreak; the topic policy is applied
//! by the pipeline after routing).

pub mod jailbreak;
pub mod pii;
pub mod rails;
pub mod settings;
pub mod stream;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A rail's decision, logged (and labelled in metrics) by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RailDecision {
    /// The text passes as it is.
    Allow,
    /// The limits rail removed invisible characters.
    Sanitize,
    /// PII was redacted.
    Redact,
    /// The request is refused.
    Block,
    /// The rail could not decide; the request is refused (fail closed).
    Error,
    /// Topic rail: out of scope, answered by the fallback expert.
    Fallback,
    /// Topic rail: out of scope, answered with the refusal message.
    Refuse,
}

impl RailDecision {
    /// Its name in the log and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RailDecision::Allow => "allow",
            RailDecision::Sanitize => "sanitize",
            RailDecision::Redact => "redact",
            RailDecision::Block => "block",
            RailDecision::Error => "error",
            RailDecision::Fallback => "fallback",
            RailDecision::Refuse => "refuse",
        }
    }
}

/// What a rail decided about one text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RailVerdict {
    /// Rail name, e.g. `"jailbreak"`.
    pub rail: String,
    /// What it decided.
    pub decision: RailDecision,
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
    /// The query as it may be logged (PII redacted); `None` logs it as received.
    pub logged_query: Option<String>,
}

/// Why the input rails stopped a query.
#[derive(Debug, Clone, PartialEq)]
pub enum RailRejection {
    /// A policy rail refused it (`PermissionDenied`).
    Blocked(Blocked),
    /// The input itself is unacceptable (`InvalidArgument`): control
    /// characters, mixed scripts.
    Invalid {
        /// The rail.
        rail: String,
        /// What is wrong and how to fix it.
        reason: String,
        /// Verdicts so far.
        verdicts: Vec<RailVerdict>,
    },
}

impl RailRejection {
    /// The verdicts gathered.
    pub fn verdicts(&self) -> &[RailVerdict] {
        match self {
            RailRejection::Blocked(b) => &b.verdicts,
            RailRejection::Invalid { verdicts, .. } => verdicts,
        }
    }
}

/// The input rails of a pipeline.
#[async_trait]
pub trait InputRails: Send + Sync {
    /// Check a query.
    ///
    /// # Errors
    /// [`RailRejection`] when a rail refuses the query.
    async fn check(&self, query: &str) -> Result<InputCheck, RailRejection>;
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

/// The rails a pipeline runs, swapped as one snapshot on reconfiguration.
pub struct Rails {
    /// Input rails.
    pub input: std::sync::Arc<dyn InputRails>,
    /// Output rails.
    pub output: std::sync::Arc<dyn OutputRails>,
    /// What happens to out-of-scope queries.
    pub topic: rails::TopicSpec,
    /// The configured rail set these rails come from, if any.
    pub set: Option<std::sync::Arc<rails::RailSet>>,
}

impl Rails {
    /// Rails that allow everything; low-confidence queries go to the fallback expert.
    pub fn pass_through() -> Self {
        Self {
            input: std::sync::Arc::new(PassThrough),
            output: std::sync::Arc::new(PassThrough),
            topic: rails::TopicSpec {
                enabled: false,
                ..rails::TopicSpec::default()
            },
            set: None,
        }
    }

    /// The fingerprint of the sentence encoder the input rails run on every
    /// query, if any.
    pub fn encoder_fingerprint(&self) -> Option<&str> {
        self.set.as_deref().and_then(rails::RailSet::encoder_fingerprint)
    }

    /// `text` as the request log may keep it for a query refused before
    /// the rails ran (see [`rails::RailSet::redact_for_log`]).
    pub fn redact_for_log(&self, text: &str) -> String {
        self.set
            .as_ref()
            .map_or_else(|| text.to_string(), |set| set.redact_for_log(text))
    }

    /// An id (session, user, reviewer) as the request log may keep it (see
    /// [`rails::RailSet::redact_id`]).
    pub fn redact_id(&self, id: &str) -> String {
        self.set
            .as_ref()
            .map_or_else(|| id.to_string(), |set| set.redact_id(id))
    }

    /// The configured rail set.
    pub fn configured(set: std::sync::Arc<rails::RailSet>) -> Self {
        Self {
            topic: set.spec().topic.clone(),
            input: set.clone(),
            output: set.clone(),
            set: Some(set),
        }
    }
}

/// Rails that allow everything: the default until rails are configured.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough;

#[async_trait]
impl InputRails for PassThrough {
    async fn check(&self, _query: &str) -> Result<InputCheck, RailRejection> {
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

#[cfg(test)]
mod decision_tests {
    use super::RailDecision;

    #[test]
    fn a_decision_is_logged_by_the_name_metrics_use() {
        for d in [
            RailDecision::Allow,
            RailDecision::Sanitize,
            RailDecision::Redact,
            RailDecision::Block,
            RailDecision::Error,
            RailDecision::Fallback,
            RailDecision::Refuse,
        ] {
            let logged = serde_json::to_string(&d).unwrap();
            assert_eq!(logged, format!("\"{}\"", d.as_str()));
            assert_eq!(serde_json::from_str::<RailDecision>(&logged).unwrap(), d);
        }
    }
}
