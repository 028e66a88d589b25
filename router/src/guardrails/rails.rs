//! The configured rails: limits, PII (input and output), jailbreak, and the
//! topic policy the pipeline applies after routing.
//!
//! Input order: the limits rail runs first (cheap, and its rejections are
//! the caller's input errors); then the PII rail and the jailbreak rail run
//! concurrently (the jailbreak detector on the blocking pool, the PII rail
//! inline), both on the original text so redaction cannot hide an attack.
//! The query that continues, and the one logged, is the redacted one.
//!
//! Output: a PII filter per answer ([`PiiStreamFilter`], in `stream.rs`);
//! the rails' settings are in `settings.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::jailbreak::{Head, signals};
use super::pii::{self, PiiKind, PiiSpan, Redactor};
pub use super::settings::{JailbreakSpec, LimitsRailSpec, PiiPolicy, PiiSpec, RailsSpec, TopicPolicy, TopicSpec};
pub use super::stream::PiiStreamFilter;
use super::{Blocked, InputCheck, InputRails, OutputFilter, OutputRails, RailDecision, RailRejection, RailVerdict};
use crate::embed::Embedder;

/// Characters removed from queries: zero-width and bidirectional controls,
/// and Unicode tag characters (U+E0000 block: invisible "ASCII smuggling"
/// of instructions a model reads and a person does not), used to smuggle
/// instructions past readers and filters.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

fn is_forbidden_control(c: char) -> bool {
    c.is_control() && !matches!(c, '\t' | '\n' | '\r')
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Script {
    Latin,
    Cyrillic,
    Greek,
}

fn script(c: char) -> Option<Script> {
    match c {
        'a'..='z' | 'A'..='Z' | '\u{00C0}'..='\u{024F}' => Some(Script::Latin),
        '\u{0400}'..='\u{04FF}' => Some(Script::Cyrillic),
        '\u{0370}'..='\u{03FF}' => Some(Script::Greek),
        _ => None,
    }
}

/// The first word mixing Latin with Cyrillic or Greek letters, if any.
pub fn mixed_script_word(text: &str) -> Option<&str> {
    text.split(|c: char| !c.is_alphanumeric()).find(|w| {
        let mut seen: Option<Script> = None;
        w.chars().filter_map(script).any(|s| match seen {
            None => {
                seen = Some(s);
                false
            }
            Some(p) => p != s,
        })
    })
}

fn verdict(rail: &str, decision: RailDecision, score: Option<f32>, start: Instant) -> RailVerdict {
    RailVerdict {
        rail: rail.into(),
        decision,
        score,
        latency_ms: start.elapsed().as_secs_f64() * 1e3,
    }
}

/// The jailbreak detector: embedder + head + threshold.
pub struct JailbreakDetector {
    embedder: Arc<Embedder>,
    head: Head,
    threshold: f32,
}

impl JailbreakDetector {
    /// A detector with `head`; `threshold` overrides the head's.
    pub fn new(embedder: Arc<Embedder>, head: Head, threshold: Option<f32>) -> Self {
        let threshold = threshold.unwrap_or(head.threshold);
        Self {
            embedder,
            head,
            threshold,
        }
    }

    /// Attack probability of `text`.
    ///
    /// # Errors
    /// Embedder failures.
    pub fn score(&self, text: &str) -> Result<f32, crate::embed::EmbedError> {
        let e = self.embedder.embed(text)?;
        Ok(self.head.probability(&e, &signals(text)))
    }

    /// The decision threshold.
    pub fn threshold(&self) -> f32 {
        self.threshold
    }
}

/// Why rails could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RailsError {
    /// A setting is out of range or the TOML is malformed.
    #[error("invalid rails setting `{key}`: {reason}")]
    InvalidSpec {
        /// Dotted key (or `rails` for a parse error).
        key: String,
        /// What is expected.
        reason: String,
    },
    /// The jailbreak rail's embedder could not be loaded.
    #[error("the jailbreak rail cannot load its embedder from {dir}")]
    Embedder {
        /// The folder tried.
        dir: PathBuf,
        /// Why.
        #[source]
        source: crate::embed::EmbedError,
    },
    /// The shipped jailbreak head is malformed (a build defect).
    #[error("the built-in jailbreak head is malformed")]
    Head(#[source] serde_json::Error),
}

/// The configured rails, ready to run.
pub struct RailSet {
    spec: RailsSpec,
    jailbreak: Option<Arc<JailbreakDetector>>,
}

impl RailSet {
    /// Build the rails of `spec`, loading the embedder when the jailbreak
    /// rail is on and `embedder` is `None` (blocking: ~0.3 s).
    ///
    /// # Errors
    /// Invalid settings, or an embedder that cannot be loaded.
    pub fn load(spec: RailsSpec, embedder: Option<Arc<Embedder>>) -> Result<Self, RailsError> {
        spec.validate()
            .map_err(|(key, reason)| RailsError::InvalidSpec { key, reason })?;
        if !spec.jailbreak.enabled {
            return Ok(Self::new(spec, None));
        }
        let embedder = match embedder {
            Some(e) => e,
            None => Arc::new(
                Embedder::load(&spec.jailbreak.embedder_dir).map_err(|source| RailsError::Embedder {
                    dir: spec.jailbreak.embedder_dir.clone(),
                    source,
                })?,
            ),
        };
        let head = Head::builtin().map_err(RailsError::Head)?;
        let detector = JailbreakDetector::new(embedder, head, spec.jailbreak.threshold);
        Ok(Self::new(spec, Some(Arc::new(detector))))
    }

    /// Parse `[rails]` settings from TOML (the table's contents).
    ///
    /// # Errors
    /// Malformed TOML or unknown keys.
    pub fn parse_spec(toml_text: &str) -> Result<RailsSpec, RailsError> {
        toml::from_str(toml_text).map_err(|e| RailsError::InvalidSpec {
            key: "rails".into(),
            reason: e.to_string(),
        })
    }

    /// Whether `[rails]` TOML sets `jailbreak.embedder_dir` (left out, a
    /// reconfiguration keeps the directory in force rather than the default).
    pub fn names_embedder_dir(toml_text: &str) -> bool {
        toml::from_str::<toml::Table>(toml_text).is_ok_and(|t| {
            t.get("jailbreak")
                .and_then(toml::Value::as_table)
                .is_some_and(|j| j.contains_key("embedder_dir"))
        })
    }

    /// The fingerprint of the sentence encoder every query passes through
    /// (the jailbreak rail's, when it is on).
    pub fn encoder_fingerprint(&self) -> Option<&str> {
        self.jailbreak
            .as_ref()
            .filter(|_| self.spec.jailbreak.enabled)
            .map(|d| d.embedder.fingerprint())
    }

    /// The embedder in use, for reuse by a rebuilt rail set.
    pub fn embedder(&self) -> Option<Arc<Embedder>> {
        self.jailbreak.as_ref().map(|d| d.embedder.clone())
    }

    /// Rails for `spec`; `jailbreak` is required when the jailbreak rail is enabled.
    pub fn new(spec: RailsSpec, jailbreak: Option<Arc<JailbreakDetector>>) -> Self {
        Self { spec, jailbreak }
    }

    /// The settings.
    pub fn spec(&self) -> &RailsSpec {
        &self.spec
    }

    /// `text` as the request log may keep it when the query is refused
    /// before the PII rail ran: entities redacted as that rail would have
    /// (blocked and redacted kinds), or unchanged when the rail is off.
    pub fn redact_for_log(&self, text: &str) -> String {
        if !self.spec.pii.enabled {
            return text.to_string();
        }
        self.pii_input(text).0.unwrap_or_else(|| text.to_string())
    }

    /// An id (session, user, reviewer) as the request log may keep it:
    /// unchanged, or, when it holds PII the rail would not leave in a query
    /// (`jane@corp.com` as a user id), a pseudonym: `pii-` and 16 hex digits
    /// of its SHA-256, the same for the same id, so records still join by
    /// it. Placeholders (`<EMAIL_1>`) would merge every such user into one.
    pub fn redact_id(&self, id: &str) -> String {
        use sha2::Digest as _;
        let sensitive = self.spec.pii.enabled
            && pii::detect(id)
                .iter()
                .any(|s| self.spec.pii.policy(s.kind) != PiiPolicy::Allow);
        if !sensitive {
            return id.to_string();
        }
        let digest = sha2::Sha256::digest(id.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("pii-{hex}")
    }

    fn limits(&self, text: &str, verdicts: &mut Vec<RailVerdict>) -> Result<Option<String>, RailRejection> {
        let start = Instant::now();
        let spec = &self.spec.limits;
        if !spec.enabled {
            return Ok(None);
        }
        let reject = |reason: String, verdicts: &mut Vec<RailVerdict>| {
            verdicts.push(verdict("limits", RailDecision::Block, None, start));
            Err(RailRejection::Invalid {
                rail: "limits".into(),
                reason,
                verdicts: std::mem::take(verdicts),
            })
        };
        if spec.reject_control_chars
            && let Some((i, c)) = text.char_indices().find(|(_, c)| is_forbidden_control(*c))
        {
            return reject(
                format!(
                    "the query contains a control character (U+{:04X}) at byte {i}; remove it",
                    c as u32
                ),
                verdicts,
            );
        }
        if spec.reject_mixed_script
            && let Some(word) = mixed_script_word(text)
        {
            return reject(
                format!("the word `{word}` mixes Latin with Cyrillic or Greek letters; retype it in one script"),
                verdicts,
            );
        }
        let cleaned: Option<String> = text
            .contains(is_invisible)
            .then(|| text.chars().filter(|c| !is_invisible(*c)).collect());
        if cleaned.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return reject(
                "the query holds only invisible characters (zero-width, bidirectional or tag characters); send visible text".into(),
                verdicts,
            );
        }
        let decision = if cleaned.is_some() {
            RailDecision::Sanitize
        } else {
            RailDecision::Allow
        };
        verdicts.push(verdict("limits", decision, None, start));
        Ok(cleaned)
    }

    /// The query to continue with (or, when blocked, to log) and the verdict.
    fn pii_input(&self, text: &str) -> (Option<String>, Option<PiiKind>, RailVerdict) {
        let start = Instant::now();
        let policy = |s: &PiiSpan| self.spec.pii.policy(s.kind);
        let (out, spans) = Redactor::default().redact(text, |s| policy(s) != PiiPolicy::Allow);
        if let Some(s) = spans.iter().find(|s| policy(s) == PiiPolicy::Block) {
            // A blocked query is still logged: with every entity redacted.
            let (logged, all) = Redactor::default().redact(text, |_| true);
            return (
                Some(logged),
                Some(s.kind),
                verdict("pii", RailDecision::Block, Some(all.len() as f32), start),
            );
        }
        if spans.is_empty() {
            return (None, None, verdict("pii", RailDecision::Allow, Some(0.0), start));
        }
        let n = spans.len() as f32;
        (Some(out), None, verdict("pii", RailDecision::Redact, Some(n), start))
    }
}

#[async_trait]
impl InputRails for RailSet {
    async fn check(&self, query: &str) -> Result<InputCheck, RailRejection> {
        let mut verdicts = Vec::new();
        let cleaned = self.limits(query, &mut verdicts)?;
        let text = cleaned.as_deref().unwrap_or(query).to_string();
        let jailbreak = match (&self.jailbreak, self.spec.jailbreak.enabled) {
            (Some(detector), true) => {
                let detector = detector.clone();
                let input = text.clone();
                Some(tokio::task::spawn_blocking(move || {
                    let start = Instant::now();
                    (detector.score(&input), start.elapsed().as_secs_f64() * 1e3)
                }))
            }
            _ => None,
        };
        let (redacted, pii_block, pii_verdict) = if self.spec.pii.enabled {
            let (r, b, v) = self.pii_input(&text);
            (r, b, Some(v))
        } else {
            (None, None, None)
        };
        verdicts.extend(pii_verdict);
        // What may be logged (and, unless blocked, routed): never the raw PII.
        let safe = redacted.unwrap_or_else(|| text.clone());
        if let Some(task) = jailbreak {
            let (score, latency_ms) = task.await.unwrap_or_else(|_| {
                (
                    Err(crate::embed::EmbedError::Tokenize("jailbreak task panicked".into())),
                    0.0,
                )
            });
            let threshold = self.jailbreak.as_ref().map_or(1.0, |d| d.threshold());
            match score {
                Ok(p) if p >= threshold => {
                    verdicts.push(RailVerdict {
                        rail: "jailbreak".into(),
                        decision: RailDecision::Block,
                        score: Some(p),
                        latency_ms,
                    });
                    return Err(RailRejection::Blocked(Blocked {
                        rail: "jailbreak".into(),
                        message: self.spec.jailbreak.message.clone(),
                        verdicts,
                        logged_query: Some(safe),
                    }));
                }
                Ok(p) => verdicts.push(RailVerdict {
                    rail: "jailbreak".into(),
                    decision: RailDecision::Allow,
                    score: Some(p),
                    latency_ms,
                }),
                Err(error) => {
                    // Fail closed: an unchecked query does not reach the models.
                    tracing::error!(%error, "jailbreak rail failed");
                    verdicts.push(RailVerdict {
                        rail: "jailbreak".into(),
                        decision: RailDecision::Error,
                        score: None,
                        latency_ms,
                    });
                    return Err(RailRejection::Blocked(Blocked {
                        rail: "jailbreak".into(),
                        message: "the request could not be checked; retry later".into(),
                        verdicts,
                        logged_query: Some(safe),
                    }));
                }
            }
        }
        if let Some(kind) = pii_block {
            return Err(RailRejection::Blocked(Blocked {
                rail: "pii".into(),
                message: format!(
                    "the query contains personal data ({}) that this service does not accept; remove it",
                    kind.tag().to_lowercase().replace('_', " ")
                ),
                verdicts,
                logged_query: Some(safe),
            }));
        }
        let rewritten = (safe != query).then_some(safe);
        Ok(InputCheck { rewritten, verdicts })
    }
}

impl OutputRails for RailSet {
    fn filter(&self) -> Box<dyn OutputFilter> {
        if self.spec.pii.enabled && self.spec.pii.redact_output {
            Box::new(PiiStreamFilter::new(self.spec.pii.clone()))
        } else {
            Box::new(super::PassThrough)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rails(spec: RailsSpec) -> RailSet {
        RailSet::new(spec, None)
    }

    fn no_jailbreak() -> RailsSpec {
        let mut s = RailsSpec::default();
        s.jailbreak.enabled = false;
        s
    }

    #[tokio::test]
    async fn pii_is_redacted_by_default_and_blocked_by_policy() {
        let r = rails(no_jailbreak());
        let check = r.check("mail a@b.com my card 4111 1111 1111 1111").await.unwrap();
        assert_eq!(
            check.rewritten.as_deref(),
            Some("mail <EMAIL_1> my card <CREDIT_CARD_1>")
        );
        assert_eq!(
            check.verdicts.iter().find(|v| v.rail == "pii").unwrap().decision,
            RailDecision::Redact
        );
        let mut spec = no_jailbreak();
        spec.pii.policies.insert(PiiKind::Ssn, PiiPolicy::Block);
        spec.pii.policies.insert(PiiKind::Email, PiiPolicy::Allow);
        let r = rails(spec);
        assert!(r.check("reach me at a@b.com").await.unwrap().rewritten.is_none());
        let Err(RailRejection::Blocked(b)) = r.check("my ssn is 123-45-6789, mail a@b.com").await else {
            panic!("ssn must block")
        };
        assert_eq!(b.rail, "pii");
        assert!(b.message.contains("ssn"), "{}", b.message);
        assert!(!b.logged_query.unwrap().contains("123-45-6789"));
    }

    #[tokio::test]
    async fn limits_reject_controls_and_mixed_scripts_and_strip_invisibles() {
        let r = rails(no_jailbreak());
        let Err(RailRejection::Invalid { reason, .. }) = r.check("hello\u{0007}there").await else {
            panic!("control char must be rejected")
        };
        assert!(reason.contains("U+0007"), "{reason}");
        // "pаypal" with a Cyrillic "а".
        let Err(RailRejection::Invalid { reason, .. }) = r.check("log in to p\u{0430}ypal now").await else {
            panic!("mixed script must be rejected")
        };
        assert!(reason.contains("mixes Latin"), "{reason}");
        let ok = r.check("ig\u{200B}nore this\tand\nthat").await.unwrap();
        assert_eq!(ok.rewritten.as_deref(), Some("ignore this\tand\nthat"));
        // Tag characters spell an invisible instruction ("ignore all"): stripped.
        let smuggled: String = "ignore all"
            .chars()
            .map(|c| char::from_u32(0xE0000 + c as u32).unwrap())
            .collect();
        let ok = r.check(&format!("what is my leave balance?{smuggled}")).await.unwrap();
        assert_eq!(ok.rewritten.as_deref(), Some("what is my leave balance?"));
        // Nothing visible left: refused, not answered.
        let Err(RailRejection::Invalid { reason, .. }) = r.check("\u{200B}\u{202E} \u{E0041}").await else {
            panic!("an invisible-only query must be refused")
        };
        assert!(reason.contains("only invisible characters"), "{reason}");
        // Whole words in one script are fine.
        assert!(r.check("Привет, hello, γεια").await.is_ok());
    }

    fn stream(filter: &mut PiiStreamFilter, deltas: &[&str]) -> (String, Vec<String>) {
        let mut out = String::new();
        let mut released = Vec::new();
        for d in deltas {
            let r = filter.push(d);
            released.push(r.clone());
            out.push_str(&r);
        }
        out.push_str(&filter.finish());
        (out, released)
    }

    #[test]
    fn entities_split_across_deltas_are_still_redacted() {
        let mut f = PiiStreamFilter::new(PiiSpec::default());
        let (out, released) = stream(
            &mut f,
            &[
                "Write to jo",
                "hn.doe@exam",
                "ple.com or call",
                " +1 415",
                " 555",
                " 0134 today. Card 4111 ",
                "1111 1111",
                " 1111 ok",
            ],
        );
        assert_eq!(
            out,
            "Write to <EMAIL_1> or call <PHONE_1> today. Card <CREDIT_CARD_1> ok"
        );
        assert!(
            released.iter().all(|r| !r.contains("john") && !r.contains("415")),
            "{released:?}"
        );
        assert_eq!(f.verdicts()[0].decision, RailDecision::Redact);
    }

    #[test]
    fn text_is_held_back_only_while_an_entity_could_be_forming() {
        let mut f = PiiStreamFilter::new(PiiSpec::default());
        assert_eq!(f.push("Your leave "), "Your leave ");
        assert_eq!(f.push("balance is"), "balance ");
        assert_eq!(f.push(" 12 days."), "is 12 ");
        assert_eq!(f.push(" Call"), "days. ");
        // A number may be the start of a phone number: held until it cannot be.
        assert_eq!(f.push(" 415"), "Call ");
        assert_eq!(f.push(" 555"), "");
        assert_eq!(f.push(" 0134 now"), "<PHONE_1> ");
        assert_eq!(f.finish(), "now");
        assert_eq!(f.verdicts()[0].decision, RailDecision::Redact);
    }

    #[test]
    fn mixed_script_detection_is_per_word() {
        assert_eq!(mixed_script_word("p\u{0430}ypal login"), Some("p\u{0430}ypal"));
        assert_eq!(mixed_script_word("Москва and Paris"), None);
        assert_eq!(mixed_script_word("αβγ test"), None);
    }
}
