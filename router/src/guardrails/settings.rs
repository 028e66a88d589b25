//! The rails' settings (`[rails]` in the config; replaceable at run time).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::pii::PiiKind;

/// What to do with one kind of PII.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiPolicy {
    /// Replace by a typed placeholder (`<EMAIL_1>`).
    Redact,
    /// Refuse the request (input only; on output it redacts, since streamed
    /// text cannot be taken back).
    Block,
    /// Leave it.
    Allow,
}

/// The PII rail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PiiSpec {
    /// On or off.
    pub enabled: bool,
    /// Policy for entity kinds not listed in `policies`.
    pub default_policy: PiiPolicy,
    /// Policy per entity kind (`email`, `phone`, `credit_card`, `ssn`, `iban`, `ip_address`).
    pub policies: BTreeMap<PiiKind, PiiPolicy>,
    /// Redact PII in answers too.
    pub redact_output: bool,
    /// Entity kinds left as they are in answers (all others are redacted).
    pub output_allow: Vec<PiiKind>,
}

impl Default for PiiSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            default_policy: PiiPolicy::Redact,
            policies: BTreeMap::new(),
            redact_output: true,
            output_allow: Vec::new(),
        }
    }
}

impl PiiSpec {
    pub(super) fn policy(&self, kind: PiiKind) -> PiiPolicy {
        self.policies.get(&kind).copied().unwrap_or(self.default_policy)
    }
}

/// The jailbreak / prompt-injection rail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailbreakSpec {
    /// On or off.
    pub enabled: bool,
    /// Block from this probability (default: the trained head's threshold).
    pub threshold: Option<f32>,
    /// Folder of the sentence embedder (all-MiniLM-L6-v2).
    pub embedder_dir: PathBuf,
    /// Message returned to a blocked caller.
    pub message: String,
}

impl Default for JailbreakSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: None,
            embedder_dir: PathBuf::from("models/all-minilm-l6-v2"),
            message: "This request looks like an attempt to override the assistant's instructions.".into(),
        }
    }
}

/// What happens to queries no expert covers (router confidence below
/// `router.confidence_threshold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicPolicy {
    /// The fallback expert answers.
    Fallback,
    /// The configured refusal is the answer; no model generates.
    Refuse,
}

/// The topic rail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicSpec {
    /// On or off (off: low-confidence queries still go to the fallback expert).
    pub enabled: bool,
    /// Fallback or refuse.
    pub policy: TopicPolicy,
    /// The refusal text.
    pub refusal: String,
}

impl Default for TopicSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            policy: TopicPolicy::Fallback,
            refusal: "Sorry, that is outside what I can help with here.".into(),
        }
    }
}

/// The limits rail (the query length limit is `limits.max_query_chars`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsRailSpec {
    /// On or off.
    pub enabled: bool,
    /// Reject control characters (other than tab and newlines).
    pub reject_control_chars: bool,
    /// Reject words that mix Latin with Cyrillic or Greek letters (homoglyph smuggling).
    pub reject_mixed_script: bool,
}

impl Default for LimitsRailSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            reject_control_chars: true,
            reject_mixed_script: true,
        }
    }
}

/// All rails (`[rails]` in the config; replaceable at run time).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RailsSpec {
    /// Limits rail.
    pub limits: LimitsRailSpec,
    /// PII rail.
    pub pii: PiiSpec,
    /// Jailbreak rail.
    pub jailbreak: JailbreakSpec,
    /// Topic rail.
    pub topic: TopicSpec,
}

impl RailsSpec {
    /// Check ranges.
    ///
    /// # Errors
    /// The key and what is expected.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Some(t) = self.jailbreak.threshold
            && !(t > 0.0 && t < 1.0)
        {
            return Err(("rails.jailbreak.threshold".into(), "must be in (0, 1)".into()));
        }
        if self.topic.enabled && self.topic.policy == TopicPolicy::Refuse && self.topic.refusal.trim().is_empty() {
            return Err((
                "rails.topic.refusal".into(),
                "must not be empty with policy = \"refuse\"".into(),
            ));
        }
        Ok(())
    }
}
