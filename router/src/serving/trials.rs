//! The request path's side of the trials (see [`crate::trials`] for the
//! rules): which model an A/B split picks for a request, and shadow runs.
//!
//! The router slot's candidate makes its own route decision for a mirrored
//! request; an expert slot's candidate generates the whole answer from the
//! same prompt (retrieved passages included). Both run in detached tasks
//! with a deadline and log a [`ShadowRecord`] under the live request's id.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::StreamExt;

use super::Pipeline;
use crate::agents::RouteDecision;
use crate::clock::unix_ms;
use crate::engine::{ChatMessage, GenerateParams, GenerationEvent};
use crate::models::slots::ROUTER_SLOT;
use crate::models::slots::ServedModel;
use crate::observe::{Observer, ShadowOutcome};
use crate::trials::shadow::{Admission, SHADOW_DEADLINE, Shadow, ShadowRecord};
use crate::trials::split::Split;

impl Pipeline {
    /// [`Shadow::admit`], telling the observer about skips.
    pub(crate) fn admit_shadow(&self, shadow: &Shadow, request_id: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let admission = shadow.admit(request_id);
        if let Admission::Skipped = admission {
            self.observer()
                .shadow(&shadow.slot, &shadow.model.version, ShadowOutcome::Skipped, None);
        }
        admission.permit()
    }

    pub(crate) fn shadow_of(&self, slot: &str) -> Option<Arc<Shadow>> {
        let map = self.shadows.load();
        if map.is_empty() {
            return None;
        }
        map.get(slot).cloned()
    }

    /// Mirror a live route decision, if the router slot has a shadow and
    /// this request is sampled. Never blocks, never fails the caller.
    pub(super) fn mirror_route(&self, request_id: &str, text: &str, live: &RouteDecision) {
        if live.forced {
            return; // no live decision to compare with
        }
        let Some(shadow) = self.shadow_of(ROUTER_SLOT) else {
            return;
        };
        let Some(permit) = self.admit_shadow(&shadow, request_id) else {
            return;
        };
        let (router, log, observer) = (self.router.clone(), self.log().clone(), self.observer().clone());
        let (request_id, text, live) = (request_id.to_string(), text.to_string(), live.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let run = tokio::time::timeout(SHADOW_DEADLINE, router.decide_with(&shadow.model, &text)).await;
            let latency_ms = start.elapsed().as_secs_f64() * 1e3;
            let (output, error) = match run {
                Ok(Ok(d)) => (Some(d.top_expert), None),
                Ok(Err(e)) => (None, Some(e.to_string())),
                Err(_) => (
                    None,
                    Some(format!("no decision within {} s", SHADOW_DEADLINE.as_secs())),
                ),
            };
            finish(
                &shadow,
                &log,
                observer.as_ref(),
                request_id,
                live.router_model_version,
                live.top_expert,
                output,
                error,
                latency_ms,
                Some(live.latency_ms),
            );
            drop(permit);
        });
    }

    /// Mirror a live answer of `expert`, if its slot has a shadow and this
    /// request is sampled: the candidate answers the same prompt.
    pub(super) fn mirror_answer(
        &self,
        request_id: &str,
        expert: &str,
        live_version: &str,
        prompt: &[ChatMessage],
        params: &GenerateParams,
    ) {
        let slot = crate::models::slots::expert_slot(expert);
        let Some(shadow) = self.shadow_of(&slot) else { return };
        let Some(permit) = self.admit_shadow(&shadow, request_id) else {
            return;
        };
        let (log, observer) = (self.log().clone(), self.observer().clone());
        let (request_id, live_version) = (request_id.to_string(), live_version.to_string());
        let (prompt, params) = (prompt.to_vec(), params.clone());
        // The shadow's answer is stored as a live one would be: through the output rail.
        let mut output_rail = self.rails.load().output.filter();
        tokio::spawn(async move {
            let start = Instant::now();
            let engine = shadow.model.engine.clone();
            let run = tokio::time::timeout(SHADOW_DEADLINE, async move {
                let mut stream = engine.generate(prompt, params).await?;
                let mut answer = String::new();
                while let Some(event) = stream.next().await {
                    match event? {
                        GenerationEvent::Delta(t) => answer.push_str(&t),
                        GenerationEvent::Done(_) => break,
                    }
                }
                Ok::<_, crate::engine::EngineError>(answer)
            })
            .await;
            let latency_ms = start.elapsed().as_secs_f64() * 1e3;
            let (output, error) = match run {
                Ok(Ok(a)) => {
                    let mut kept = output_rail.push(&a);
                    kept.push_str(&output_rail.finish());
                    (Some(kept), None)
                }
                Ok(Err(e)) => (None, Some(e.to_string())),
                Err(_) => (None, Some(format!("no answer within {} s", SHADOW_DEADLINE.as_secs()))),
            };
            finish(
                &shadow,
                &log,
                observer.as_ref(),
                request_id,
                live_version,
                String::new(),
                output,
                error,
                latency_ms,
                None,
            );
            drop(permit);
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    shadow: &Shadow,
    log: &crate::data::log::RequestLog,
    observer: &dyn Observer,
    request_id: String,
    live_version: String,
    live_output: String,
    output: Option<String>,
    error: Option<String>,
    latency_ms: f64,
    live_latency_ms: Option<f64>,
) {
    if error.is_some() {
        shadow.stats.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let agree = match (&output, live_output.is_empty()) {
        (Some(o), false) => Some(*o == live_output),
        _ => None,
    };
    let outcome = match (&error, agree) {
        (Some(_), _) => ShadowOutcome::Failed,
        (None, Some(true)) => ShadowOutcome::Agreed,
        (None, Some(false)) => ShadowOutcome::Disagreed,
        (None, None) => ShadowOutcome::Answered,
    };
    observer.shadow(&shadow.slot, &shadow.model.version, outcome, Some(latency_ms / 1e3));
    log.submit_shadow(ShadowRecord {
        request_id,
        slot: shadow.slot.clone(),
        version: shadow.model.version.clone(),
        live_version,
        live_output,
        output,
        agree,
        latency_ms: Some(latency_ms),
        live_latency_ms,
        error,
        created_at_ms: unix_ms(SystemTime::now()),
    });
}

impl Pipeline {
    /// The trials running on `slot`: the version its shadow mirrors to (if
    /// any) and the versions its split shares traffic between (empty if none).
    pub fn trial_versions(&self, slot: &str) -> (Option<String>, Vec<String>) {
        let shadow = self.shadows.load().get(slot).map(|s| s.model.version.clone());
        let split = self
            .split_of(slot)
            .map(|s| s.arms.iter().map(|a| a.version.clone()).collect())
            .unwrap_or_default();
        (shadow, split)
    }

    pub(crate) fn split_of(&self, slot: &str) -> Option<Arc<Split>> {
        let map = self.splits.load();
        if map.is_empty() {
            return None;
        }
        map.get(slot).cloned()
    }

    /// The model of `slot` for this request when the slot is split.
    pub(super) fn split_model(
        &self,
        slot: &str,
        session_id: Option<&str>,
        user_id: Option<&str>,
        request_id: &str,
    ) -> Option<Arc<ServedModel>> {
        let split = self.split_of(slot)?;
        Some(split.pick(session_id, user_id, request_id).model.clone())
    }
}
