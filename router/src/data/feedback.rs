//! User feedback: explicit ratings and corrections, reviewer labels, and the
//! implicit signals the pipeline records on its own.
//!
//! Feedback rows join the request log by request id (table `feedback`, see
//! `log::schema`). Every submission is kept (history); readers take the
//! latest one of a kind ([`latest_explicit`]). Implicit signals:
//! - **rephrase**: the same session asks a near-duplicate query within a
//!   window after an answer, which says the answer did not help;
//! - **abandoned**: the client cancelled a streamed answer before its end.
//!
//! [`SessionTracker`] detects rephrasings in memory, bounded in size.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::data::similarity::text_similarity;

/// Rating scale of an explicit feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rating {
    /// Thumbs up (`true`) or down (`false`).
    Thumb(bool),
    /// One to five stars.
    Stars(u8),
}

impl Rating {
    /// The rating on one scale: -1 (worst) to 1 (best); 3 stars is 0.
    pub fn score(self) -> f64 {
        match self {
            Rating::Thumb(true) => 1.0,
            Rating::Thumb(false) => -1.0,
            Rating::Stars(s) => (f64::from(s) - 3.0) / 2.0,
        }
    }

    /// Whether the user was satisfied: thumbs up, or 4-5 stars.
    pub fn is_positive(self) -> bool {
        self.score() > 0.0
    }

    /// Whether the user was unsatisfied: thumbs down, or 1-2 stars.
    pub fn is_negative(self) -> bool {
        self.score() < 0.0
    }

    /// Scale name and value as stored: (`thumb`, 1 | -1) or (`stars`, 1..=5).
    pub fn stored(self) -> (&'static str, i64) {
        match self {
            Rating::Thumb(up) => ("thumb", if up { 1 } else { -1 }),
            Rating::Stars(s) => ("stars", i64::from(s)),
        }
    }

    /// Inverse of [`Rating::stored`]; `None` for unknown or out-of-range values.
    pub fn from_stored(scale: &str, value: i64) -> Option<Self> {
        match (scale, value) {
            ("thumb", 1) => Some(Rating::Thumb(true)),
            ("thumb", -1) => Some(Rating::Thumb(false)),
            ("stars", 1..=5) => Some(Rating::Stars(value as u8)),
            _ => None,
        }
    }
}

/// Where a feedback row came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackKind {
    /// Submitted by a user or subject-matter expert through `Feedback.Submit`.
    Explicit,
    /// A reviewed label imported from a curation review queue.
    Review,
    /// Implicit: the session rephrased the query soon after the answer.
    Rephrase,
    /// Implicit: the client cancelled the streamed answer.
    Abandoned,
}

impl FeedbackKind {
    /// Name stored in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackKind::Explicit => "explicit",
            FeedbackKind::Review => "review",
            FeedbackKind::Rephrase => "rephrase",
            FeedbackKind::Abandoned => "abandoned",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "explicit" => Some(FeedbackKind::Explicit),
            "review" => Some(FeedbackKind::Review),
            "rephrase" => Some(FeedbackKind::Rephrase),
            "abandoned" => Some(FeedbackKind::Abandoned),
            _ => None,
        }
    }

    /// Whether the pipeline recorded it on its own.
    pub fn is_implicit(self) -> bool {
        matches!(self, FeedbackKind::Rephrase | FeedbackKind::Abandoned)
    }
}

/// Feedback as submitted by a client.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeedbackInput {
    /// The request it is about.
    pub request_id: String,
    /// The rating, if any (required unless a corrected expert is given).
    pub rating: Option<Rating>,
    /// The expert that should have answered (a route label).
    pub corrected_expert: Option<String>,
    /// Free text.
    pub comment: Option<String>,
    /// Who gave it.
    pub reviewer_id: Option<String>,
}

/// One stored feedback row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackRecord {
    /// Feedback id (UUIDv7).
    pub feedback_id: String,
    /// The request it is about.
    pub request_id: String,
    /// Recorded at, Unix ms.
    pub created_at_ms: i64,
    /// Source of the row.
    pub kind: FeedbackKind,
    /// Rating, if any.
    pub rating: Option<Rating>,
    /// Corrected expert, if any.
    pub corrected_expert: Option<String>,
    /// Comment.
    pub comment: Option<String>,
    /// Reviewer or user id.
    pub reviewer_id: Option<String>,
    /// For implicit signals: the evidence (e.g. the rephrasing request id).
    pub detail: Option<String>,
}

impl FeedbackRecord {
    /// A new row for `request_id` recorded now.
    pub fn new(request_id: impl Into<String>, kind: FeedbackKind) -> Self {
        Self {
            feedback_id: uuid::Uuid::now_v7().to_string(),
            request_id: request_id.into(),
            created_at_ms: crate::clock::unix_ms(std::time::SystemTime::now()),
            kind,
            rating: None,
            corrected_expert: None,
            comment: None,
            reviewer_id: None,
            detail: None,
        }
    }
}

/// The newest row of `kind` among `rows` (later `created_at_ms` wins; ties
/// go to the later feedback id, which is time-ordered).
pub fn latest(rows: &[FeedbackRecord], kind: FeedbackKind) -> Option<&FeedbackRecord> {
    rows.iter().filter(|r| r.kind == kind).max_by(|a, b| {
        a.created_at_ms
            .cmp(&b.created_at_ms)
            .then(a.feedback_id.cmp(&b.feedback_id))
    })
}

/// The newest explicit feedback: repeated feedback keeps history, latest wins.
pub fn latest_explicit(rows: &[FeedbackRecord]) -> Option<&FeedbackRecord> {
    latest(rows, FeedbackKind::Explicit)
}

pub use crate::config::{
    DEFAULT_MAX_COMMENT_CHARS, DEFAULT_MAX_SESSIONS, DEFAULT_REPHRASE_SIMILARITY, DEFAULT_REPHRASE_WINDOW_S,
    FeedbackSpec,
};

/// Shingle size for rephrase detection: 3-grams, since rewordings of short
/// queries share few longer runs.
pub const REPHRASE_SHINGLE: usize = 3;

#[derive(Debug)]
struct LastAnswer {
    request_id: String,
    query: String,
    answered_at: Instant,
}

/// Remembers each session's last answered query to detect rephrasings.
#[derive(Debug)]
pub struct SessionTracker {
    window: Duration,
    similarity: f64,
    max_sessions: usize,
    sessions: Mutex<HashMap<String, LastAnswer>>,
}

/// A detected rephrase: the earlier request and how similar the texts are.
#[derive(Debug, Clone, PartialEq)]
pub struct Rephrase {
    /// The request that was rephrased (it gets the implicit feedback).
    pub previous_request_id: String,
    /// Jaccard similarity of the two queries.
    pub similarity: f64,
}

impl SessionTracker {
    /// A tracker with the settings of `spec`.
    pub fn new(spec: &FeedbackSpec) -> Self {
        Self {
            window: Duration::from_secs(spec.rephrase_window_s),
            similarity: spec.rephrase_similarity,
            max_sessions: spec.max_sessions.max(1),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LastAnswer>> {
        self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Is `query`, arriving `now` in `session`, a rephrase of the session's
    /// last answered query? A match is reported once.
    pub fn check(&self, session: &str, query: &str, now: Instant) -> Option<Rephrase> {
        let mut sessions = self.lock();
        let last = sessions.get(session)?;
        if now.saturating_duration_since(last.answered_at) > self.window {
            sessions.remove(session);
            return None;
        }
        let similarity = text_similarity(&last.query, query, REPHRASE_SHINGLE);
        if similarity < self.similarity {
            return None;
        }
        let last = sessions.remove(session)?;
        Some(Rephrase {
            previous_request_id: last.request_id,
            similarity,
        })
    }

    /// Remember that `session` got an answer to `query` at `at`.
    pub fn answered(&self, session: &str, request_id: &str, query: &str, at: Instant) {
        let mut sessions = self.lock();
        if sessions.len() >= self.max_sessions && !sessions.contains_key(session) {
            // Forget expired sessions first; if all are live, the oldest.
            let window = self.window;
            sessions.retain(|_, v| at.saturating_duration_since(v.answered_at) <= window);
            if sessions.len() >= self.max_sessions
                && let Some(oldest) = sessions
                    .iter()
                    .min_by_key(|(_, v)| v.answered_at)
                    .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            session.to_string(),
            LastAnswer {
                request_id: request_id.to_string(),
                query: query.to_string(),
                answered_at: at,
            },
        );
    }

    /// Sessions remembered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratings_normalise_to_one_scale() {
        assert!(Rating::Thumb(true).is_positive());
        assert!(Rating::Thumb(false).is_negative());
        assert!(!Rating::Stars(3).is_positive() && !Rating::Stars(3).is_negative());
        assert!(Rating::Stars(4).is_positive());
        assert!(Rating::Stars(2).is_negative());
        for r in [
            Rating::Thumb(true),
            Rating::Thumb(false),
            Rating::Stars(1),
            Rating::Stars(5),
        ] {
            let (scale, v) = r.stored();
            assert_eq!(Rating::from_stored(scale, v), Some(r));
        }
        assert_eq!(Rating::from_stored("stars", 6), None);
        assert_eq!(Rating::from_stored("thumb", 0), None);
    }

    #[test]
    fn latest_explicit_feedback_wins() {
        let mut a = FeedbackRecord::new("r", FeedbackKind::Explicit);
        a.rating = Some(Rating::Thumb(false));
        a.created_at_ms = 10;
        let mut b = FeedbackRecord::new("r", FeedbackKind::Explicit);
        b.rating = Some(Rating::Thumb(true));
        b.created_at_ms = 20;
        let mut c = FeedbackRecord::new("r", FeedbackKind::Rephrase);
        c.created_at_ms = 30;
        let rows = [b.clone(), a, c];
        assert_eq!(latest_explicit(&rows), Some(&b));
    }

    #[test]
    fn a_close_rewording_in_the_window_is_a_rephrase() {
        let t = SessionTracker::new(&FeedbackSpec::default());
        let t0 = Instant::now();
        t.answered("s", "r1", "How do I reset my VPN password?", t0);
        assert_eq!(t.check("other", "how can I reset my VPN password", t0), None);
        assert_eq!(t.check("s", "when is payday", t0 + Duration::from_secs(5)), None);
        let hit = t
            .check("s", "how can I reset my vpn password", t0 + Duration::from_secs(10))
            .unwrap();
        assert_eq!(hit.previous_request_id, "r1");
        // Reported once.
        assert_eq!(t.check("s", "how can I reset my vpn password", t0), None);
    }

    #[test]
    fn a_rewording_after_the_window_is_not_a_rephrase() {
        let spec = FeedbackSpec {
            rephrase_window_s: 60,
            ..FeedbackSpec::default()
        };
        let t = SessionTracker::new(&spec);
        let t0 = Instant::now();
        t.answered("s", "r1", "How do I reset my VPN password?", t0);
        assert_eq!(
            t.check("s", "How do I reset my VPN password", t0 + Duration::from_secs(61)),
            None
        );
    }

    #[test]
    fn the_tracker_stays_bounded() {
        let spec = FeedbackSpec {
            max_sessions: 3,
            ..FeedbackSpec::default()
        };
        let t = SessionTracker::new(&spec);
        let t0 = Instant::now();
        for i in 0..10u64 {
            t.answered(&format!("s{i}"), "r", "q", t0 + Duration::from_millis(i));
        }
        assert_eq!(t.len(), 3);
        assert!(t.check("s9", "q", t0 + Duration::from_millis(20)).is_some());
    }
}
