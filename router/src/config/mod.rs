//! Typed settings of the domain: models, router, experts, limits, request log.
//!
//! These structs deserialize from the server's TOML file (see
//! `server/src/config.rs`, which adds the transport settings and the env/flag
//! overrides) and are validated once, before anything is loaded or bound.
//! Every default is a named constant with the reason for its value.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::guardrails::rails::RailsSpec;

/// The string forms of a settings enum of unit variants, one list of names for
/// the config, the command line and serde: `name()`, `Display`, `FromStr`
/// (trimmed, any case; `$hint` after "unknown $what `...`: " on a miss) and
/// serde through those.
macro_rules! named_setting {
    ($ty:ident, $what:literal, $hint:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The name used in the config and on the command line.
            fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let t = s.trim();
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name().eq_ignore_ascii_case(t))
                    .ok_or_else(|| format!(concat!("unknown ", $what, " `{}`: ", $hint), s))
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

pub mod model;
pub mod paged;
pub mod retrieval;

pub use model::{
    Activations, DEFAULT_MAX_NUM_SEQS, DEFAULT_MAX_NUM_SEQS_CPU, DEFAULT_PREFIX_CACHE_N, DeviceChoice,
    MIN_PAGED_KV_TOKENS, ModelSpec, Weights,
};
pub use paged::{DEFAULT_PAGED_KV_TOKENS, PagedAttention};
pub use retrieval::RetrievalSpec;

/// Default model: SmolLM2-135M-Instruct re-quantized to Q8_0 by `scripts/fetch-model.sh`.
pub const DEFAULT_MODEL_PATH: &str = "models/smollm2-135m-instruct-q8_0.gguf";
/// Name of the default model entry.
pub const DEFAULT_MODEL_NAME: &str = "smollm2";
/// Below this router confidence the fallback expert answers. With five
/// experts a uniform guess is 0.2; 0.35 asks for a clear preference.
pub const DEFAULT_CONFIDENCE_THRESHOLD: f32 = 0.35;
/// Longest accepted query, in characters (about 1,000 tokens: well inside
/// SmolLM2's 8k context with the expert prompt and answer).
pub const DEFAULT_MAX_QUERY_CHARS: usize = 4000;
/// Default limit on a conversation's earlier turns, in characters all together.
pub const DEFAULT_MAX_HISTORY_CHARS: usize = 16_000;
/// Requests admitted at once; more get `ResourceExhausted`. The answer
/// engine runs `max_num_seqs` answers at once; the rest queue inside this bound.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// How long a streamed answer waits for a client that reads none of it
/// before it is cut (ms): far above any live client's pause between reads.
pub const DEFAULT_STREAM_WRITE_TIMEOUT_MS: u64 = 15_000;
/// How long the request log's writes may fail before health says
/// `NOT_SERVING` (ms): a few flush intervals of a transient error pass.
pub const DEFAULT_LOG_UNHEALTHY_AFTER_MS: u64 = 5_000;
/// Rows a PostgreSQL log keeps in memory while its database is unreachable:
/// at the ~1 KB of a chat record, ~100 MB; at 1,000 requests a second,
/// 100 s of outage.
pub const DEFAULT_LOG_OUTAGE_BUFFER: usize = 100_000;
/// Default answer length cap (tokens).
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Passages per answer: three short chunks fit a 135M model's useful context.
pub const DEFAULT_TOP_K: usize = 3;
/// Candidates per retriever before fusion: deep enough for RRF to reorder.
pub const DEFAULT_RETRIEVAL_CANDIDATES: usize = 20;
/// Passage tokens per prompt: three default chunks (~200 tokens each) and headroom.
pub const DEFAULT_MAX_CONTEXT_TOKENS: usize = 640;
/// Request-log flush interval: the most recent records that a `kill -9` can lose.
pub const DEFAULT_LOG_FLUSH_MS: u64 = 50;
/// Records written per SQLite transaction at most. Small enough that one
/// transaction is a short burst of the writer thread's CPU (~1.5 ms): with 512,
/// at 10,000 req/s each 50 ms interval became one ~5 ms burst that held one of
/// two cores and showed in the request tail. 128 vs 512 on the overhead
/// server: open-loop p99 lower in 5 of 6 alternating pairs, closed-loop
/// requests/s the same.
pub const DEFAULT_LOG_BATCH: usize = 128;
/// Records queued for the log writer before submitters fall back to a
/// blocking hand-off on the blocking pool (never dropped).
pub const DEFAULT_LOG_QUEUE: usize = 16_384;
/// Errors in the settings, each saying what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A setting has an unusable value.
    #[error("invalid setting `{key}`: {reason}")]
    Invalid {
        /// Dotted key of the setting.
        key: String,
        /// What is wrong and what is expected.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The router agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterSpec {
    /// Model entry (key of `[models]`).
    pub model: String,
    /// Instructions placed before the expert list.
    pub instructions: String,
    /// Below this top probability the fallback expert answers.
    pub confidence_threshold: f32,
    /// Expert that answers low-confidence queries.
    pub fallback_expert: String,
    /// Remove the model's label prior (contextual calibration).
    pub calibrate: bool,
    /// Let a classifier router decide on the query while the input rails
    /// check it (kept when the rails leave the query unchanged). Off, the
    /// router reads only what the rails passed, e.g. never a query before
    /// PII redaction, at the cost of the rails' time in every decision.
    pub decide_during_rails: bool,
}

/// One expert agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertSpec {
    /// Name, also the router's label for it: lowercase, no spaces.
    pub name: String,
    /// What it covers; shown to the router.
    pub description: String,
    /// System prompt of its answers.
    pub system_prompt: String,
    /// Model entry (key of `[models]`).
    #[serde(default = "default_model_name")]
    pub model: String,
    /// Answer length cap in tokens.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Sampling temperature; 0 = greedy.
    #[serde(default)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Folder of its knowledge base (Markdown, text, HTML); answers cite it.
    #[serde(default)]
    pub corpus: Option<PathBuf>,
    /// Passages retrieved per answer.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

fn default_top_k() -> usize {
    DEFAULT_TOP_K
}

fn default_model_name() -> String {
    DEFAULT_MODEL_NAME.to_string()
}

fn default_max_tokens() -> u32 {
    DEFAULT_MAX_TOKENS
}

/// Admission and input limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSpec {
    /// Longest accepted query in characters.
    pub max_query_chars: usize,
    /// Longest accepted conversation history (the turns before the query,
    /// all together) in characters.
    pub max_history_chars: usize,
    /// Requests admitted at once.
    pub max_in_flight: usize,
    /// A streamed answer whose client takes none of its events for this
    /// long (its HTTP/2 window stays shut) is cut with `DEADLINE_EXCEEDED`
    /// and its admission slot freed (ms). Generation never waits for the
    /// client: the answer's text is kept until it is read or cut.
    pub stream_write_timeout_ms: u64,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_query_chars: DEFAULT_MAX_QUERY_CHARS,
            max_history_chars: DEFAULT_MAX_HISTORY_CHARS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            stream_write_timeout_ms: DEFAULT_STREAM_WRITE_TIMEOUT_MS,
        }
    }
}

/// The request log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSpec {
    /// SQLite database file (created with its folder if missing); unused
    /// when `store_url` is set.
    pub path: PathBuf,
    /// PostgreSQL URL (`postgres://user:password@host:5432/db`): the log,
    /// feedback and shadow runs live there instead of in `path`, so several
    /// server replicas share them. Unset: the SQLite file.
    pub store_url: Option<String>,
    /// Longest time a record waits before it is committed (ms).
    pub flush_interval_ms: u64,
    /// Records per transaction at most.
    pub batch_size: usize,
    /// Queue length before submitters hand off on the blocking pool.
    pub queue_capacity: usize,
    /// Write records to the database (default). `false` queues and counts
    /// them but drops them instead of writing: for measuring what logging
    /// costs, never for serving (no flywheel without the log).
    pub persist: bool,
    /// Largest size of the database in MiB (0: no limit but the disk's).
    /// A full log fails writes as a full disk does: visibly (see
    /// `unhealthy_after_ms`), refusing feedback with `UNAVAILABLE`.
    pub max_size_mb: u64,
    /// Writes failing this long turn the server's gRPC health to
    /// `NOT_SERVING` until a commit succeeds again (ms).
    pub unhealthy_after_ms: u64,
    /// PostgreSQL store: rows (records, shadow runs, implicit feedback)
    /// kept in memory while the database cannot be reached, written once it
    /// can; beyond this many the oldest are dropped (and counted failed).
    pub outage_buffer: usize,
}

impl Default for LogSpec {
    fn default() -> Self {
        Self {
            path: PathBuf::from("var/requests.db"),
            store_url: None,
            flush_interval_ms: DEFAULT_LOG_FLUSH_MS,
            batch_size: DEFAULT_LOG_BATCH,
            queue_capacity: DEFAULT_LOG_QUEUE,
            persist: true,
            max_size_mb: 0,
            unhealthy_after_ms: DEFAULT_LOG_UNHEALTHY_AFTER_MS,
            outage_buffer: DEFAULT_LOG_OUTAGE_BUFFER,
        }
    }
}

/// Whether `s` names a PostgreSQL database (`postgres://` or
/// `postgresql://`) rather than a file.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Settings of feedback handling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackSpec {
    /// A near-duplicate query from the same session within this many
    /// seconds after an answer counts as a rephrase of it.
    pub rephrase_window_s: u64,
    /// Jaccard similarity (character 3-grams) from which two queries count
    /// as near-duplicates for rephrase detection.
    pub rephrase_similarity: f64,
    /// Sessions remembered for rephrase detection; the oldest are forgotten.
    pub max_sessions: usize,
    /// Longest accepted comment, in characters.
    pub max_comment_chars: usize,
}

/// Rephrasings come quickly: two minutes covers reading a short answer and
/// retyping the question.
pub const DEFAULT_REPHRASE_WINDOW_S: u64 = 120;
/// Character 3-gram Jaccard of a light rewording ("how do I reset my
/// password" / "how can I reset my password?") is ~0.5-0.7; unrelated
/// queries sit below 0.2.
pub const DEFAULT_REPHRASE_SIMILARITY: f64 = 0.45;
/// Sessions tracked at once (each costs one query text in memory).
pub const DEFAULT_MAX_SESSIONS: usize = 100_000;
/// Comment length cap.
pub const DEFAULT_MAX_COMMENT_CHARS: usize = 4000;

impl Default for FeedbackSpec {
    fn default() -> Self {
        Self {
            rephrase_window_s: DEFAULT_REPHRASE_WINDOW_S,
            rephrase_similarity: DEFAULT_REPHRASE_SIMILARITY,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_comment_chars: DEFAULT_MAX_COMMENT_CHARS,
        }
    }
}

/// Everything the domain needs: models, router, experts, limits, log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    /// Named model files.
    pub models: BTreeMap<String, ModelSpec>,
    /// The router agent.
    pub router: RouterSpec,
    /// The expert agents, in display order.
    pub experts: Vec<ExpertSpec>,
    /// Admission and input limits.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// The request log.
    #[serde(default)]
    pub log: LogSpec,
    /// Feedback handling (implicit signals, limits).
    #[serde(default)]
    pub feedback: FeedbackSpec,
    /// Guardrails.
    #[serde(default)]
    pub rails: RailsSpec,
    /// Retrieval over the experts' corpora.
    #[serde(default)]
    pub retrieval: RetrievalSpec,
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL_NAME.into(),
            instructions: "You route employee questions to the right team. \
                Reply with the name of the one team that should answer."
                .into(),
            confidence_threshold: DEFAULT_CONFIDENCE_THRESHOLD,
            fallback_expert: "general".into(),
            calibrate: true,
            decide_during_rails: true,
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        let model = DEFAULT_MODEL_NAME.to_string();
        let expert = |name: &str, description: &str, prompt: &str| ExpertSpec {
            name: name.into(),
            description: description.into(),
            system_prompt: prompt.into(),
            model: model.clone(),
            max_tokens: DEFAULT_MAX_TOKENS,
            temperature: 0.0,
            top_p: None,
            corpus: (name != "general").then(|| PathBuf::from(format!("server/kb/{name}"))),
            top_k: DEFAULT_TOP_K,
        };
        let company = "You work for Acme Widgets Inc., a fictional company.";
        Self {
            models: BTreeMap::from([(
                model.clone(),
                ModelSpec {
                    path: PathBuf::from(DEFAULT_MODEL_PATH),
                    version: None,
                    max_num_seqs: None,
                    prefix_cache_n: DEFAULT_PREFIX_CACHE_N,
                    device: DeviceChoice::Cpu,
                    activations: Activations::F32,
                    weights: Weights::Auto,
                    paged_attention: PagedAttention::Auto,
                    paged_kv_tokens: DEFAULT_PAGED_KV_TOKENS,
                },
            )]),
            router: RouterSpec::default(),
            experts: vec![
                expert(
                    "hr",
                    "human resources: vacation, leave, benefits, payroll, hiring, workplace policies",
                    &format!(
                        "{company} You are the HR assistant. Answer questions about leave, benefits, payroll and workplace policies briefly and kindly."
                    ),
                ),
                expert(
                    "it",
                    "IT help desk: laptops, passwords, VPN, email, software, printers, accounts",
                    &format!("{company} You are the IT help desk. Give short, practical troubleshooting steps."),
                ),
                expert(
                    "finance",
                    "finance: expenses, reimbursements, invoices, budgets, earnings, travel costs",
                    &format!(
                        "{company} You are the finance assistant. Answer questions about expenses, invoices, budgets and earnings briefly."
                    ),
                ),
                expert(
                    "product",
                    "product documentation: Acme widgets, features, specifications, setup, pricing",
                    &format!(
                        "{company} You are the product documentation assistant. Explain Acme products and features briefly."
                    ),
                ),
                expert(
                    "general",
                    "anything else: small talk and general questions",
                    &format!("{company} You are a helpful general assistant. Answer briefly."),
                ),
            ],
            limits: LimitsSpec::default(),
            log: LogSpec::default(),
            feedback: FeedbackSpec::default(),
            rails: RailsSpec::default(),
            retrieval: RetrievalSpec::default(),
        }
    }
}

impl EngineSettings {
    /// Check cross-references and ranges.
    ///
    /// # Errors
    /// The first problem found, naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.models.is_empty() {
            return Err(invalid("models", "define at least one model"));
        }
        for (name, m) in &self.models {
            if m.path.as_os_str().is_empty() {
                return Err(invalid(format!("models.{name}.path"), "must not be empty"));
            }
            if m.max_num_seqs == Some(0) {
                return Err(invalid(format!("models.{name}.max_num_seqs"), "must be at least 1"));
            }
            m.device
                .check_supported()
                .map_err(|e| invalid(format!("models.{name}.device"), e.to_string()))?;
            m.paged_attention
                .check_device(m.device)
                .map_err(|e| invalid(format!("models.{name}.paged_attention"), e))?;
            if m.paged_kv_tokens < MIN_PAGED_KV_TOKENS {
                return Err(invalid(
                    format!("models.{name}.paged_kv_tokens"),
                    format!("must be at least {MIN_PAGED_KV_TOKENS} (one long prompt)"),
                ));
            }
        }
        if !self.models.contains_key(&self.router.model) {
            return Err(invalid(
                "router.model",
                format!("no model named `{}` in [models]", self.router.model),
            ));
        }
        let t = self.router.confidence_threshold;
        if !(0.0..=1.0).contains(&t) {
            return Err(invalid("router.confidence_threshold", "must be between 0 and 1"));
        }
        if self.experts.is_empty() {
            return Err(invalid("experts", "define at least one expert"));
        }
        for (i, e) in self.experts.iter().enumerate() {
            let key = format!("experts[{i}]");
            if e.name.is_empty() || e.name.chars().any(|c| c.is_whitespace() || c.is_uppercase()) {
                return Err(invalid(
                    format!("{key}.name"),
                    "must be non-empty lowercase without spaces",
                ));
            }
            if self.experts[..i].iter().any(|o| o.name == e.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("expert `{}` is defined twice", e.name),
                ));
            }
            if !self.models.contains_key(&e.model) {
                return Err(invalid(
                    format!("{key}.model"),
                    format!("no model named `{}` in [models]", e.model),
                ));
            }
            if e.max_tokens == 0 {
                return Err(invalid(format!("{key}.max_tokens"), "must be at least 1"));
            }
            if !(0.0..=2.0).contains(&e.temperature) {
                return Err(invalid(format!("{key}.temperature"), "must be between 0 and 2"));
            }
            if e.top_k == 0 || e.top_k > 50 {
                return Err(invalid(format!("{key}.top_k"), "must be between 1 and 50"));
            }
        }
        if !self.experts.iter().any(|e| e.name == self.router.fallback_expert) {
            return Err(invalid(
                "router.fallback_expert",
                format!("no expert named `{}`", self.router.fallback_expert),
            ));
        }
        let r = &self.retrieval;
        if r.candidates == 0 || r.max_context_tokens < 16 || r.rrf_k <= 0.0 {
            return Err(invalid(
                "retrieval",
                "candidates must be at least 1, max_context_tokens at least 16, rrf_k above 0",
            ));
        }
        if r.chunk_chars < 100 || r.overlap_chars * 2 > r.chunk_chars {
            return Err(invalid(
                "retrieval.chunk_chars",
                "must be at least 100, and overlap_chars at most half of it",
            ));
        }
        if self.limits.max_query_chars == 0 {
            return Err(invalid("limits.max_query_chars", "must be at least 1"));
        }
        if self.limits.max_in_flight == 0 {
            return Err(invalid("limits.max_in_flight", "must be at least 1"));
        }
        if self.limits.stream_write_timeout_ms == 0 {
            return Err(invalid("limits.stream_write_timeout_ms", "must be at least 1"));
        }
        if self.log.flush_interval_ms == 0 || self.log.flush_interval_ms > 100 {
            return Err(invalid("log.flush_interval_ms", "must be between 1 and 100"));
        }
        if let Some(url) = &self.log.store_url
            && !is_postgres_url(url)
        {
            return Err(invalid(
                "log.store_url",
                "must be a PostgreSQL URL (postgres://user:password@host:5432/database)",
            ));
        }
        if self.log.batch_size == 0 || self.log.queue_capacity == 0 {
            return Err(invalid("log", "batch_size and queue_capacity must be at least 1"));
        }
        let sim = self.feedback.rephrase_similarity;
        if !(sim > 0.0 && sim <= 1.0) {
            return Err(invalid("feedback.rephrase_similarity", "must be in (0, 1]"));
        }
        if let Err((key, reason)) = self.rails.validate() {
            return Err(invalid(key, reason));
        }
        if self.feedback.max_comment_chars == 0 || self.feedback.max_sessions == 0 {
            return Err(invalid(
                "feedback",
                "max_comment_chars and max_sessions must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The domain sections of a config file, each optional; the file's other
/// top-level keys are the server's (it checks them), so they are ignored
/// here, while every section still refuses unknown fields.
#[derive(Debug, Default, Deserialize)]
struct Sections {
    models: Option<BTreeMap<String, ModelSpec>>,
    router: Option<RouterSpec>,
    experts: Option<Vec<ExpertSpec>>,
    limits: Option<LimitsSpec>,
    log: Option<LogSpec>,
    feedback: Option<FeedbackSpec>,
    rails: Option<RailsSpec>,
    retrieval: Option<RetrievalSpec>,
}

impl EngineSettings {
    /// The domain settings of a server config file over the defaults, each
    /// section checked field by field; the server's own top-level keys are
    /// left to the server (which checks them when it loads the file).
    ///
    /// # Errors
    /// TOML syntax errors, and unknown or malformed fields in the sections.
    pub fn from_config_file(text: &str) -> Result<Self, toml::de::Error> {
        let file: Sections = toml::from_str(text)?;
        let mut s = Self::default();
        if let Some(v) = file.models {
            s.models = v;
        }
        if let Some(v) = file.router {
            s.router = v;
        }
        if let Some(v) = file.experts {
            s.experts = v;
        }
        if let Some(v) = file.limits {
            s.limits = v;
        }
        if let Some(v) = file.log {
            s.log = v;
        }
        if let Some(v) = file.feedback {
            s.feedback = v;
        }
        if let Some(v) = file.rails {
            s.rails = v;
        }
        if let Some(v) = file.retrieval {
            s.retrieval = v;
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_define_the_five_experts() {
        let s = EngineSettings::default();
        s.validate().unwrap();
        let names: Vec<_> = s.experts.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["hr", "it", "finance", "product", "general"]);
    }

    #[test]
    fn rejects_unknown_fallback_and_model_references() {
        let mut s = EngineSettings::default();
        s.router.fallback_expert = "legal".into();
        assert!(matches!(s.validate(), Err(ConfigError::Invalid { key, .. }) if key == "router.fallback_expert"));
        let mut s = EngineSettings::default();
        s.experts[1].model = "missing".into();
        assert!(matches!(s.validate(), Err(ConfigError::Invalid { key, .. }) if key == "experts[1].model"));
    }

    #[test]
    fn a_store_url_must_name_a_postgres_database() {
        let mut s = EngineSettings::default();
        s.log.store_url = Some("mysql://db/log".into());
        assert!(matches!(s.validate(), Err(ConfigError::Invalid { key, .. }) if key == "log.store_url"));
        s.log.store_url = Some("postgresql://flywheel@db/log".into());
        s.validate().unwrap();
    }

    #[test]
    fn rejects_duplicate_expert_and_bad_threshold() {
        let mut s = EngineSettings::default();
        s.experts[2].name = "hr".into();
        assert!(s.validate().is_err());
        let mut s = EngineSettings::default();
        s.router.confidence_threshold = 1.5;
        assert!(s.validate().is_err());
    }

    #[test]
    fn a_gpu_device_is_checked_against_this_build_at_validation() {
        let mut s = EngineSettings::default();
        let name = s.models.keys().next().unwrap().clone();
        s.models.get_mut(&name).unwrap().device = DeviceChoice::Cuda(0);
        let result = s.validate();
        if crate::device::CUDA_BUILT {
            result.unwrap();
        } else {
            match result {
                Err(ConfigError::Invalid { key, reason }) => {
                    assert_eq!(key, format!("models.{name}.device"));
                    assert!(reason.contains("CUDA support"), "{reason}");
                }
                other => panic!("expected models.{name}.device to be refused, got {other:?}"),
            }
        }
        s.models.get_mut(&name).unwrap().device = DeviceChoice::Auto;
        s.validate().unwrap();
    }
}
