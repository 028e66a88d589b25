//! The control plane: everything that changes what the request path
//! serves or reads its history. Promotions and rollbacks ([`promotion`]),
//! shadows ([`shadows`]) and A/B splits ([`splits`]), rails and retrieval
//! index replacements, feedback and the training cycles' journal. Admin and
//! feedback handlers call this; the request path ([`crate::serving`]) only
//! reads the snapshots it replaces.

use std::sync::Arc;

use crate::data::feedback::{FeedbackInput, FeedbackKind, FeedbackRecord, Rating};
use crate::data::log::RequestRecord;
use crate::engine::EngineError;
use crate::error::ControlError;
use crate::guardrails::Rails;
use crate::guardrails::rails::{RailSet, RailsSpec};
use crate::retrieval::IndexStats;
use crate::serving::{IN_FLIGHT_WAIT, Pipeline};
use crate::text;

mod promotion;
mod shadows;
mod splits;

pub use promotion::SwapReport;

/// Changes what a [`Pipeline`] serves, one change at a time per kind.
pub struct ControlPlane {
    serving: Arc<Pipeline>,
    promotion: promotion::Promotion,
}

impl ControlPlane {
    /// The control plane of `serving` (no model registry: promotions are refused).
    pub fn new(serving: Arc<Pipeline>) -> Self {
        Self {
            serving,
            promotion: promotion::Promotion::default(),
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

    /// Replace the rails with the settings of a `[rails]` TOML table,
    /// reusing the loaded embedder; returns the settings now in force.
    ///
    /// # Errors
    /// [`ControlError::Rails`]: malformed settings, or an embedder that
    /// cannot be loaded. The old rails stay in force.
    pub async fn reconfigure_rails(&self, toml_text: &str) -> Result<RailsSpec, ControlError> {
        let spec = RailSet::parse_spec(toml_text)?;
        let embedder = self.serving.rails().set.as_ref().and_then(|s| s.embedder());
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
        if !self.serving.live.contains(&input.request_id) && !self.request_logged(&input.request_id).await? {
            // The record may still be queued (its request just ended).
            self.serving.log().flush().await?;
            if !self.request_logged(&input.request_id).await? {
                return Err(ControlError::UnknownRequest {
                    request_id: text::quote(&input.request_id),
                });
            }
        }
        let mut row = FeedbackRecord::new(input.request_id, FeedbackKind::Explicit);
        row.rating = input.rating;
        row.corrected_expert = input.corrected_expert;
        row.comment = input.comment;
        row.reviewer_id = input.reviewer_id;
        self.serving.log().submit_feedback(row.clone());
        self.serving.log().flush().await?;
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
        self.serving.log().flush().await?;
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
