//! Who decides a query's expert, and when: a forced expert, or the router
//! model this request uses (a split's arm or the slot's). A classifier router
//! that does not read the input rails' encoding decides on the raw query
//! while the rails run, and its decision stands when the rails leave the
//! query unchanged (otherwise it decides again on the text they pass).

use std::sync::Arc;

use tracing::Instrument;

use super::admit::{self, Admitted, EarlyRoute};
use super::{Pipeline, Query};
use crate::agents::RouteDecision;
use crate::error::PipelineError;
use crate::guardrails::Rails;
use crate::models::slots::{ROUTER_SLOT, ServedModel};

/// Who decides a request's expert.
pub(super) enum Decider {
    /// The caller named the expert.
    Forced(String),
    /// This router model.
    Model(Arc<ServedModel>),
}

impl Pipeline {
    /// Admit `query` through its input rails and decide its expert, beside
    /// the rails when [`Pipeline::early_route`] allows. A refusal before the
    /// decision is returned (and logged); a failed decision comes back with
    /// the admitted request, whose ticket the caller finishes.
    pub(super) async fn admit_and_decide(
        &self,
        kind: &str,
        query: &Query,
        rails: &Arc<Rails>,
    ) -> Result<(Admitted, Result<RouteDecision, PipelineError>), PipelineError> {
        let request_id = admit::new_request_id();
        let decider = self.decider(query, &request_id);
        let span = route_span(&request_id);
        let early = self.early_route(&decider, rails, &query.text, &span);
        let mut admitted = self.admit(kind, request_id, query, rails, early).await?;
        let decided = match (admitted.early_route.take(), decider) {
            (Some(decided), _) => decided,
            (None, Ok(decider)) => self.decide(&decider, &admitted.text).instrument(span.clone()).await,
            (None, Err(e)) => Err(e),
        };
        record_route(&span, decided.as_ref().ok());
        Ok((admitted, decided))
    }

    /// The decider of `query`: its forced expert (which must be configured),
    /// or the router model of its split arm or of the router slot.
    fn decider(&self, query: &Query, request_id: &str) -> Result<Decider, PipelineError> {
        match &query.expert {
            Some(name) if !name.is_empty() => {
                if self.experts.contains_key(name) {
                    Ok(Decider::Forced(name.clone()))
                } else {
                    Err(PipelineError::UnknownExpert {
                        name: crate::text::quote(name),
                        known: self.expert_order.join(", "),
                    })
                }
            }
            _ => Ok(Decider::Model(
                self.split_model(
                    ROUTER_SLOT,
                    query.session_id.as_deref(),
                    query.user_id.as_deref(),
                    request_id,
                )
                .unwrap_or_else(|| self.router.model()),
            )),
        }
    }

    /// `decider`'s decision on `text`.
    async fn decide(&self, decider: &Decider, text: &str) -> Result<RouteDecision, PipelineError> {
        match decider {
            Decider::Forced(name) => Ok(RouteDecision::forced(name)),
            Decider::Model(model) => Ok(self.router.decide_with(model, text).await?),
        }
    }

    /// The decision on the raw `query`, to run while the input rails check
    /// it, when that saves time without risking work twice over: only a
    /// classifier router (cheap, batched) that does not read the encoding
    /// the rails compute (a router on the rails' own encoder waits for it
    /// instead of computing it a second time), and only while fewer
    /// requests are in flight than there are cores.
    fn early_route<'a>(
        &'a self,
        decider: &'a Result<Decider, PipelineError>,
        rails: &Rails,
        query: &'a str,
        span: &tracing::Span,
    ) -> Option<EarlyRoute<'a>> {
        let Ok(decider @ Decider::Model(model)) = decider else {
            return None;
        };
        // Only while a core is idle: with as many requests in flight as
        // cores, they keep every core busy, and an early decision would only
        // take cores from other requests' rails.
        if !self.router.decides_during_rails() || self.status().in_flight >= self.cores {
            return None;
        }
        let rails_encoder = rails.encoder_fingerprint();
        if !model.kind().is_classifier() || (rails_encoder.is_some() && model.engine.shared_encoder() == rails_encoder)
        {
            return None;
        }
        Some(Box::pin(self.decide(decider, query).instrument(span.clone())))
    }
}

/// The `route` stage's span; [`record_route`] fills in the decision.
fn route_span(request_id: &str) -> tracing::Span {
    tracing::info_span!(
        "route",
        request_id,
        expert = tracing::field::Empty,
        confidence = tracing::field::Empty,
        forced = tracing::field::Empty,
        fallback = tracing::field::Empty
    )
}

fn record_route(span: &tracing::Span, route: Option<&RouteDecision>) {
    if let Some(r) = route {
        span.record("expert", r.expert.as_str());
        span.record("confidence", r.confidence);
        span.record("forced", r.forced);
        span.record("fallback", r.fallback);
    }
}
