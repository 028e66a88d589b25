//! The control plane: everything that changes what the request path
//! serves or reads its history. Promotions and rollbacks ([`promotion`]),
//! shadows ([`shadows`]) and A/B splits ([`splits`]), rails and retrieval
//! index replacements, feedback and the training cycles' journal. Admin and
//! feedback handlers call this; the request path ([`crate::serving`]) only
//! reads the snapshots it replaces.

use std::sync::Arc;

use crate::data::feedback::{FeedbackInput, FeedbackKind, FeedbackRecord, Rating};
use crate::data::log::{LogError, LogLocation, RequestRecord};
use crate::engine::EngineError;
use crate::error::ControlError;
use crate::guardrails::Rails;
use crate::guardrails::rails::{RailSet, RailsSpec};
use crate::retrieval::IndexStats;
use crate::serving::Pipeline;
use crate::text;

/// How long a feedback history read waits for a request still being
/// answered: a cancelled or finished answer is logged within milliseconds,
/// and a history call should not hold for a whole answer.
pub const IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a replica looks for a request it did not serve in a shared
/// (PostgreSQL) log before calling it unknown: the replica that served it
/// commits its record within its flush interval (at most 100 ms) plus one
/// commit; this leaves room for a slow commit.
pub const PEER_RECORD_WAIT: std::time::Duration = std::time::Duration::from_millis(1_000);

/// How often that look is repeated.
const PEER_RECORD_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// `e` with its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

mod promotion;
mod shadows;
mod splits;
mod state;

pub use promotion::SwapReport;
pub use state::STATE_POLL;

/// Changes what a [`Pipeline`] serves, one change at a time per kind.
pub struct ControlPlane {
    serving: Arc<Pipeline>,
    promotion: promotion::Promotion,
    state: state::Keeping,
}

impl ControlPlane {
    /// The control plane of `serving` (no model registry: promotions are refused).
    pub fn new(serving: Arc<Pipeline>) -> Self {
        Self {
            serving,
            promotion: promotion::Promotion::default(),
            state: state::Keeping::default(),
        }
    }

    /// The request path it controls.
    pub fn serving(&self) -> &Arc<Pipeline> {
        &self.serving
    }

    /// Replace the rails while serving: requests already past their rails
    /// keep the snapshot they took; new requests get these.
    pub fn set_rails(&self, rails: Rails) {
        self.serving.rails.store(Arc::new(rails));
    }

    /// Replace the rails with the settings of a `[rails]` TOML table;
    /// returns the settings now in force. The jailbreak rail's embedder is
    /// reused while `jailbreak.embedder_dir` stays what it is (or is left
    /// out: it keeps the directory in force); a new directory is loaded, and
    /// one that does not load leaves the old rails in force.
    ///
    /// # Errors
    /// [`ControlError::Rails`]: malformed settings, or an embedder that
    /// cannot be loaded. The old rails stay in force.
    pub async fn reconfigure_rails(&self, toml_text: &str) -> Result<RailsSpec, ControlError> {
        let mut spec = RailSet::parse_spec(toml_text)?;
        let current = self.serving.rails().set.clone();
        let current_dir = current.as_ref().map(|s| s.spec().jailbreak.embedder_dir.clone());
        if let Some(dir) = &current_dir
            && !RailSet::names_embedder_dir(toml_text)
        {
            spec.jailbreak.embedder_dir = dir.clone();
        }
        let embedder = current
            .as_ref()
            .filter(|_| current_dir.as_ref() == Some(&spec.jailbreak.embedder_dir))
            .and_then(|s| s.embedder());
        let load = spec.clone();
        let set = tokio::task::spawn_blocking(move || RailSet::load(load, embedder))
            .await
            .map_err(|_| ControlError::Engine(EngineError::Disconnected))??;
        self.serving.rails.store(Arc::new(Rails::configured(Arc::new(set))));
        tracing::info!("rails reconfigured");
        Ok(spec)
    }

    /// Rebuild the retrieval index from the corpora aside and swap it in.
    ///
    /// # Errors
    /// [`ControlError::NoCorpus`] without corpora; build failures (the old
    /// index stays in use).
    pub async fn reindex(&self) -> Result<IndexStats, ControlError> {
        if self.serving.retriever.stats().is_none() {
            return Err(ControlError::NoCorpus);
        }
        Ok(self.serving.retriever.reindex().await?)
    }

    /// Record feedback on a request and return the stored row once it is
    /// committed to the log. A request still being answered (a client rating
    /// a stream, or stopping it and rating at once) takes feedback too: the
    /// row joins the request's record, logged when the answer ends.
    ///
    /// # Errors
    /// [`ControlError::InvalidFeedback`] for a missing rating, a rating out
    /// of range, an unknown corrected expert or an oversized comment;
    /// [`ControlError::UnknownRequest`] for an id that is neither being
    /// answered nor in the log.
    pub async fn submit_feedback(&self, input: FeedbackInput) -> Result<FeedbackRecord, ControlError> {
        let invalid = |reason: String| ControlError::InvalidFeedback { reason };
        if input.request_id.trim().is_empty() {
            return Err(invalid("request_id is required".into()));
        }
        let ids = [
            ("request_id", Some(&input.request_id)),
            ("reviewer_id", input.reviewer_id.as_ref()),
        ];
        for (field, id) in ids {
            if let Some(reason) = id.and_then(|v| text::check_id(v).err()) {
                return Err(invalid(format!("{field} {reason}")));
            }
        }
        match input.rating {
            Some(Rating::Stars(s)) if !(1..=5).contains(&s) => {
                return Err(invalid(format!("stars must be between 1 and 5, got {s}")));
            }
            None if input.corrected_expert.is_none() => {
                return Err(invalid(
                    "give a rating (thumb up/down or 1-5 stars), a corrected expert, or both".into(),
                ));
            }
            _ => {}
        }
        if let Some(expert) = &input.corrected_expert
            && !self.serving.experts.contains_key(expert)
        {
            return Err(invalid(format!(
                "corrected_expert `{}` is not a configured expert; configured experts: {}",
                text::quote(expert),
                self.serving.expert_order.join(", ")
            )));
        }
        if let Some(comment) = &input.comment {
            let len = comment.chars().count();
            if len > self.serving.feedback.max_comment_chars {
                return Err(invalid(format!(
                    "comment is {len} characters long; the limit is {}",
                    self.serving.feedback.max_comment_chars
                )));
            }
            if let Err(reason) = text::check_free_text(comment) {
                return Err(invalid(format!("comment {reason}")));
            }
        }
        let log = self.serving.log();
        if !self.serving.live.contains(&input.request_id) && !self.find_record(&input.request_id).await? {
            // While writes fail, the record may be one of those lost:
            // "unknown" would be a guess, and a wrong one.
            if let Some(failure) = log.stats().write_failure() {
                return Err(ControlError::LogUnavailable { reason: failure.reason });
            }
            return Err(ControlError::UnknownRequest {
                request_id: text::quote(&input.request_id),
            });
        }
        let mut row = FeedbackRecord::new(input.request_id, FeedbackKind::Explicit);
        row.rating = input.rating;
        row.corrected_expert = input.corrected_expert;
        // At rest, what the PII rail redacts is redacted here too.
        let rails = self.serving.rails();
        row.comment = input.comment.map(|c| rails.redact_for_log(&c));
        row.reviewer_id = input.reviewer_id.map(|r| rails.redact_id(&r));
        // Acknowledged only once committed.
        log.store_feedback(row.clone()).await.map_err(|e| match e {
            LogError::WriteFailed { reason } => ControlError::LogUnavailable { reason },
            other => ControlError::Log(other),
        })?;
        Ok(row)
    }

    /// A logged request and its feedback rows, oldest first. For a request
    /// still being answered, waits up to [`IN_FLIGHT_WAIT`] for its record.
    ///
    /// # Errors
    /// [`ControlError::RequestInFlight`] when the request is still being
    /// answered after that wait; [`ControlError::UnknownRequest`] when the
    /// log holds no such request.
    pub async fn feedback_history(
        &self,
        request_id: &str,
    ) -> Result<(RequestRecord, Vec<FeedbackRecord>), ControlError> {
        if request_id.trim().is_empty() {
            return Err(ControlError::InvalidRequest {
                field: "request_id",
                reason: "is required".into(),
            });
        }
        if let Err(reason) = text::check_id(request_id) {
            return Err(ControlError::InvalidRequest {
                field: "request_id",
                reason,
            });
        }
        if !self.serving.live.ended_within(request_id, IN_FLIGHT_WAIT).await {
            return Err(ControlError::RequestInFlight {
                request_id: request_id.to_string(),
            });
        }
        // Feedback rows still queued belong in the history too.
        self.serving.log().flush().await?;
        self.find_record(request_id).await?;
        let log = self.serving.log().clone();
        let id = request_id.to_string();
        let read = tokio::task::spawn_blocking(move || -> Result<_, crate::data::log::LogError> {
            let reader = log.reader()?;
            Ok(match reader.get(&id)? {
                Some(record) => Some((record, reader.feedback_for(&id)?)),
                None => None,
            })
        })
        .await
        .map_err(|_| crate::data::log::LogError::Closed)??;
        read.ok_or_else(|| ControlError::UnknownRequest {
            request_id: text::quote(request_id),
        })
    }

    /// Whether the log holds `request_id`'s record, once this replica's
    /// queue is committed (its request may just have ended) and, in a
    /// shared log, once another replica serving it had time to commit.
    async fn find_record(&self, request_id: &str) -> Result<bool, ControlError> {
        if self.request_logged(request_id).await? {
            return Ok(true);
        }
        self.serving.log().flush().await?;
        if self.request_logged(request_id).await? {
            return Ok(true);
        }
        if !matches!(self.serving.log().location(), LogLocation::Postgres(_)) {
            return Ok(false);
        }
        let deadline = tokio::time::Instant::now() + PEER_RECORD_WAIT;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(PEER_RECORD_POLL).await;
            if self.request_logged(request_id).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn request_logged(&self, request_id: &str) -> Result<bool, ControlError> {
        let log = self.serving.log().clone();
        let id = request_id.to_string();
        let found = tokio::task::spawn_blocking(move || -> Result<bool, crate::data::log::LogError> {
            Ok(log.reader()?.get(&id)?.is_some())
        })
        .await
        .map_err(|_| crate::data::log::LogError::Closed)??;
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::EngineSettings;
    use crate::data::feedback::FeedbackKind;
    use crate::engine::stub::StubEngine;
    use std::time::Instant;

    use crate::serving::{ChatEvent, ChatStream};
    use crate::testing::{query, session_query, stub_pipeline};
    use futures::StreamExt;

    fn control(p: Pipeline) -> ControlPlane {
        ControlPlane::new(Arc::new(p))
    }

    #[tokio::test]
    async fn feedback_is_validated_and_kept_with_history() {
        let dir = tempfile::tempdir().unwrap();
        let p = control(stub_pipeline(
            &mut EngineSettings::default(),
            dir.path(),
            StubEngine::default(),
        ));
        let out = p.serving().complete(query("an hr question")).await.unwrap();
        let id = out.request_id.clone();
        let fb = |rating, corrected: Option<&str>| FeedbackInput {
            request_id: id.clone(),
            rating,
            corrected_expert: corrected.map(str::to_string),
            ..FeedbackInput::default()
        };
        let err = p.submit_feedback(fb(None, None)).await.unwrap_err();
        assert!(matches!(err, ControlError::InvalidFeedback { .. }), "{err}");
        let err = p.submit_feedback(fb(Some(Rating::Stars(6)), None)).await.unwrap_err();
        assert!(err.to_string().contains("between 1 and 5"), "{err}");
        let err = p.submit_feedback(fb(None, Some("legal"))).await.unwrap_err();
        assert!(err.to_string().contains("configured experts: hr"), "{err}");
        let unknown = FeedbackInput {
            request_id: "nope".into(),
            rating: Some(Rating::Thumb(true)),
            ..FeedbackInput::default()
        };
        assert!(matches!(
            p.submit_feedback(unknown).await,
            Err(ControlError::UnknownRequest { .. })
        ));
        p.submit_feedback(fb(Some(Rating::Thumb(false)), None)).await.unwrap();
        let last = p.submit_feedback(fb(Some(Rating::Stars(1)), Some("it"))).await.unwrap();
        let (record, rows) = p.feedback_history(&id).await.unwrap();
        assert_eq!(record.request_id, id);
        assert_eq!(rows.len(), 2);
        assert!(matches!(
            p.feedback_history(" ").await,
            Err(ControlError::InvalidRequest {
                field: "request_id",
                ..
            })
        ));
        assert_eq!(crate::data::feedback::latest_explicit(&rows), Some(&last));
    }

    #[tokio::test]
    async fn feedback_on_a_just_finished_request_is_accepted() {
        // The record may still sit in the writer's queue: no false NotFound.
        let dir = tempfile::tempdir().unwrap();
        let mut settings = EngineSettings::default();
        settings.log.flush_interval_ms = 100;
        let p = control(stub_pipeline(&mut settings, dir.path(), StubEngine::default()));
        let out = p.serving().route(query("a finance question")).await.unwrap();
        let input = FeedbackInput {
            request_id: out.request_id,
            rating: Some(Rating::Thumb(true)),
            ..FeedbackInput::default()
        };
        p.submit_feedback(input).await.unwrap();
    }

    #[tokio::test]
    async fn a_rephrased_query_marks_the_previous_answer() {
        let dir = tempfile::tempdir().unwrap();
        let p = control(stub_pipeline(
            &mut EngineSettings::default(),
            dir.path(),
            StubEngine::default(),
        ));
        let first = p
            .serving()
            .complete(session_query("How do I reset my VPN password?", "s1"))
            .await
            .unwrap();
        // Another session asking the same thing is not a rephrase.
        p.serving()
            .complete(session_query("How can I reset my VPN password", "s2"))
            .await
            .unwrap();
        let second = p
            .serving()
            .complete(session_query("how can i reset my vpn password", "s1"))
            .await
            .unwrap();
        let (_, rows) = p.feedback_history(&first.request_id).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].kind, FeedbackKind::Rephrase);
        assert!(rows[0].detail.as_deref().unwrap().contains(&second.request_id));
        let (_, rows) = p.feedback_history(&second.request_id).await.unwrap();
        assert!(rows.is_empty());
    }

    /// A pipeline on a stub streaming a word per `per_token`, and a stream
    /// past its `Start` event, with the request id that event gave.
    async fn started_stream(dir: &std::path::Path, per_token: Duration) -> (ControlPlane, ChatStream, String) {
        let p = control(stub_pipeline(
            &mut EngineSettings::default(),
            dir,
            StubEngine::new(per_token),
        ));
        let mut s = p.serving().stream(query("an hr question")).await.unwrap();
        let Some(Ok(ChatEvent::Start { request_id, .. })) = s.next().await else {
            panic!("no start event")
        };
        (p, s, request_id)
    }

    #[tokio::test]
    async fn a_cancelled_stream_is_recorded_as_abandoned_and_readable_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (p, s, request_id) = started_stream(dir.path(), Duration::from_millis(50)).await;
        drop(s);
        // Read at once: the history waits for the producer to log the
        // cancelled record and its signal (no "unknown request").
        let (record, rows) = p.feedback_history(&request_id).await.unwrap();
        assert_eq!(record.status, "cancelled");
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].kind, FeedbackKind::Abandoned);
    }

    fn thumb(request_id: &str, up: bool) -> FeedbackInput {
        FeedbackInput {
            request_id: request_id.into(),
            rating: Some(Rating::Thumb(up)),
            ..FeedbackInput::default()
        }
    }

    #[tokio::test]
    async fn feedback_during_an_answer_is_kept_and_joins_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let (p, mut s, request_id) = started_stream(dir.path(), Duration::from_millis(20)).await;
        // Rated while the answer streams: the record is not in the log yet.
        p.submit_feedback(thumb(&request_id, false)).await.unwrap();
        let mut ended = false;
        while let Some(event) = s.next().await {
            ended |= matches!(event.unwrap(), ChatEvent::End { .. });
        }
        assert!(ended);
        let (record, rows) = p.feedback_history(&request_id).await.unwrap();
        assert_eq!(record.status, "ok");
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].kind, FeedbackKind::Explicit);
        assert_eq!(rows[0].rating, Some(Rating::Thumb(false)));
        // Ids the server never issued are still unknown.
        assert!(matches!(
            p.submit_feedback(thumb("not-an-issued-id", true)).await,
            Err(ControlError::UnknownRequest { .. })
        ));
    }

    #[tokio::test]
    async fn history_of_an_answer_still_streaming_is_in_flight_not_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let (p, s, request_id) = started_stream(dir.path(), Duration::from_secs(60)).await;
        let asked = Instant::now();
        let err = p.feedback_history(&request_id).await.unwrap_err();
        assert!(
            matches!(&err, ControlError::RequestInFlight { request_id: id } if *id == request_id),
            "{err:?}"
        );
        assert!(asked.elapsed() >= IN_FLIGHT_WAIT, "answered before waiting");
        drop(s);
        let (record, _) = p.feedback_history(&request_id).await.unwrap();
        assert_eq!(record.status, "cancelled");
    }
}
