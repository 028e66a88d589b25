//! Selection and labelling: which logged requests become ground truth, and
//! with which label.
//!
//! Label precedence for one request (strongest first):
//! 1. a reviewer's label (`review` feedback, latest);
//! 2. the corrected expert of the latest explicit feedback;
//! 3. the logged route, when the latest explicit rating is positive.
//!
//! A negative latest rating, or only implicit signals (rephrase, abandoned),
//! make the request *unsatisfactory*: it goes to the judge and the review
//! queue, not into the ground truth. Neutral ratings and requests without
//! feedback are excluded.

use std::collections::BTreeMap;
use std::path::Path;

use flywheel_router::data::feedback::{FeedbackKind, FeedbackRecord, latest, latest_explicit};
use flywheel_router::data::log::{LogLocation, LogReader, RequestRecord};
use serde::{Deserialize, Serialize};

use super::CurateError;
use super::dataset::{Example, LabelSource};

/// Which requests to consider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Filters {
    /// Received at or after (Unix ms).
    pub since_ms: Option<i64>,
    /// Received before (Unix ms).
    pub until_ms: Option<i64>,
    /// Only requests routed to these experts (all when empty).
    pub experts: Vec<String>,
    /// Only decisions of this router model version.
    pub model_version: Option<String>,
    /// Only requests with feedback of these kinds (all when empty).
    pub feedback_kinds: Vec<FeedbackKind>,
}

/// A logged request with its feedback rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The request record.
    pub record: RequestRecord,
    /// Its feedback, oldest first.
    pub feedback: Vec<FeedbackRecord>,
}

impl Candidate {
    /// The expert the request was routed to, if routed.
    pub fn routed_expert(&self) -> Option<&str> {
        self.record.route.as_ref().map(|r| r.expert.as_str())
    }
}

/// What the feedback says about a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Ground truth.
    Labelled(Example),
    /// The user was not satisfied; the cause is unknown.
    Unsatisfactory,
    /// A neutral rating (3 stars).
    Neutral,
    /// No feedback at all.
    NoFeedback,
}

/// Load the requests matching `filters` with their feedback.
///
/// # Errors
/// The log cannot be opened or read.
pub fn load(log: &Path, filters: &Filters) -> Result<Vec<Candidate>, CurateError> {
    let location = LogLocation::from(log);
    if matches!(location, LogLocation::Sqlite(_)) && !log.exists() {
        return Err(CurateError::Io {
            path: log.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "request log not found"),
        });
    }
    let reader = LogReader::open(location)?;
    let since = filters.since_ms.unwrap_or(i64::MIN);
    let until = filters.until_ms.unwrap_or(i64::MAX);
    let mut feedback: BTreeMap<String, Vec<FeedbackRecord>> = BTreeMap::new();
    for row in reader.feedback_between(since, until)? {
        feedback.entry(row.request_id.clone()).or_default().push(row);
    }
    let mut out = Vec::new();
    for record in reader.records_between(since, until)? {
        let rows = feedback.remove(&record.request_id).unwrap_or_default();
        let candidate = Candidate { record, feedback: rows };
        if keep(&candidate, filters) {
            out.push(candidate);
        }
    }
    Ok(out)
}

fn keep(c: &Candidate, f: &Filters) -> bool {
    if !f.experts.is_empty() && !c.routed_expert().is_some_and(|e| f.experts.iter().any(|x| x == e)) {
        return false;
    }
    if let Some(v) = &f.model_version
        && c.record.route.as_ref().is_none_or(|r| &r.router_model_version != v)
    {
        return false;
    }
    if !f.feedback_kinds.is_empty() && !c.feedback.iter().any(|r| f.feedback_kinds.contains(&r.kind)) {
        return false;
    }
    true
}

/// Apply the label precedence to one request.
pub fn decide(c: &Candidate) -> Decision {
    let example = |label: &str, source| {
        Decision::Labelled(Example {
            text: c.record.query.clone(),
            label: label.to_string(),
            source,
            request_id: Some(c.record.request_id.clone()),
        })
    };
    if let Some(label) = latest(&c.feedback, FeedbackKind::Review).and_then(|r| r.corrected_expert.as_deref()) {
        return example(label, LabelSource::Review);
    }
    if let Some(last) = latest_explicit(&c.feedback) {
        if let Some(label) = last.corrected_expert.as_deref() {
            return example(label, LabelSource::Correction);
        }
        return match last.rating {
            Some(r) if r.is_positive() => match c.routed_expert() {
                Some(expert) => example(expert, LabelSource::PositiveFeedback),
                // Praise for a request that was never routed says nothing about routing.
                None => Decision::Neutral,
            },
            Some(r) if r.is_negative() => Decision::Unsatisfactory,
            _ => Decision::Neutral,
        };
    }
    if c.feedback.iter().any(|r| r.kind.is_implicit()) {
        return Decision::Unsatisfactory;
    }
    Decision::NoFeedback
}

#[cfg(test)]
mod tests {
    use flywheel_router::agents::RouteDecision;
    use flywheel_router::data::feedback::Rating;

    use super::*;

    fn candidate(rows: Vec<FeedbackRecord>) -> Candidate {
        Candidate {
            record: RequestRecord {
                request_id: "r".into(),
                query: "reset my password".into(),
                route: Some(RouteDecision::forced("finance")),
                ..RequestRecord::default()
            },
            feedback: rows,
        }
    }

    fn row(kind: FeedbackKind, at: i64, rating: Option<Rating>, corrected: Option<&str>) -> FeedbackRecord {
        let mut r = FeedbackRecord::new("r", kind);
        r.created_at_ms = at;
        r.rating = rating;
        r.corrected_expert = corrected.map(str::to_string);
        r
    }

    fn label(d: Decision) -> Option<(String, LabelSource)> {
        match d {
            Decision::Labelled(e) => Some((e.label, e.source)),
            _ => None,
        }
    }

    #[test]
    fn reviewed_labels_outrank_corrections_and_ratings() {
        let c = candidate(vec![
            row(FeedbackKind::Explicit, 1, Some(Rating::Thumb(false)), Some("hr")),
            row(FeedbackKind::Review, 2, None, Some("it")),
            row(FeedbackKind::Explicit, 3, Some(Rating::Thumb(true)), None),
        ]);
        assert_eq!(label(decide(&c)), Some(("it".into(), LabelSource::Review)));
    }

    #[test]
    fn the_latest_explicit_feedback_decides() {
        let corrected = candidate(vec![
            row(FeedbackKind::Explicit, 1, Some(Rating::Thumb(true)), None),
            row(FeedbackKind::Explicit, 2, Some(Rating::Thumb(false)), Some("it")),
        ]);
        assert_eq!(label(decide(&corrected)), Some(("it".into(), LabelSource::Correction)));
        let praised = candidate(vec![
            row(FeedbackKind::Explicit, 1, Some(Rating::Thumb(false)), Some("it")),
            row(FeedbackKind::Explicit, 2, Some(Rating::Stars(5)), None),
        ]);
        assert_eq!(
            label(decide(&praised)),
            Some(("finance".into(), LabelSource::PositiveFeedback))
        );
    }

    #[test]
    fn negative_or_implicit_only_feedback_is_unsatisfactory() {
        let down = candidate(vec![row(FeedbackKind::Explicit, 1, Some(Rating::Stars(1)), None)]);
        assert_eq!(decide(&down), Decision::Unsatisfactory);
        let rephrased = candidate(vec![row(FeedbackKind::Rephrase, 1, None, None)]);
        assert_eq!(decide(&rephrased), Decision::Unsatisfactory);
        let neutral = candidate(vec![row(FeedbackKind::Explicit, 1, Some(Rating::Stars(3)), None)]);
        assert_eq!(decide(&neutral), Decision::Neutral);
        assert_eq!(decide(&candidate(vec![])), Decision::NoFeedback);
    }
}
