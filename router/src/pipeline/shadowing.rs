//! Shadow runs wired into the pipeline (see [`crate::trials::shadow`] for the rules).
//!
//! The router slot's candidate makes its own route decision for a mirrored
//! request; an expert slot's candidate generates the whole answer from the
//! same prompt (retrieved passages included). Both run in detached tasks
//! with a deadline and log a [`ShadowRecord`] under the live request's id.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::StreamExt;

use super::Pipeline;
use crate::agents::RouteDecision;
use crate::engine::{ChatMessage, GenerateParams, GenerationEvent};
use crate::error::PipelineError;
use crate::data::feedback::latest_explicit;
use crate::clock::unix_ms;
use crate::observe::{Observer, ShadowOutcome};
use crate::models::slots::ROUTER_SLOT;
use crate::trials::shadow::{Admission, SHADOW_DEADLINE, Shadow, ShadowRecord, ShadowReport, percentile};
use crate::models::store::Binding;

impl Pipeline {
    /// Mirror `fraction` of live requests to `version` (from the model
    /// registry) in `slot`, at most `max_concurrency` runs at once; replaces
    /// any shadow of that slot.
    ///
    /// # Errors
    /// A fraction outside (0, 1], an unknown slot or version, no registry, or
    /// a candidate that fails to load, validate or warm.
    pub async fn set_shadow(
        &self,
        slot: &str,
        version: &str,
        fraction: f64,
        max_concurrency: usize,
    ) -> Result<ShadowReport, PipelineError> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(PipelineError::InvalidShadow {
                reason: format!("fraction {fraction} must be in (0, 1]"),
            });
        }
        if max_concurrency == 0 {
            return Err(PipelineError::InvalidShadow {
                reason: "max_concurrency must be at least 1".into(),
            });
        }
        let (store, _) = self.store_and_loader()?;
        let target = self.slot_named(slot)?;
        let binding = Binding {
            version: version.to_string(),
            path: store.model_path(version)?,
        };
        let (model, _, _) = self.prepare(&target, &binding).await?;
        let shadow = Arc::new(Shadow::new(slot, Arc::new(model), fraction, max_concurrency));
        let mut map: BTreeMap<String, Arc<Shadow>> = (**self.shadows.load()).clone();
        map.insert(slot.to_string(), shadow);
        self.shadows.store(Arc::new(map));
        tracing::info!(slot, version, fraction, "shadow set");
        self.shadow_report(slot).await
    }

    /// Stop mirroring `slot`; returns the shadow's final report.
    ///
    /// # Errors
    /// [`PipelineError::NoShadow`].
    pub async fn clear_shadow(&self, slot: &str) -> Result<ShadowReport, PipelineError> {
        let report = self.shadow_report(slot).await?;
        let mut map: BTreeMap<String, Arc<Shadow>> = (**self.shadows.load()).clone();
        map.remove(slot);
        self.shadows.store(Arc::new(map));
        Ok(report)
    }

    /// What the shadow of `slot` has shown: counters since it was set, and
    /// from the log (this version's runs) agreement with live, accuracy of
    /// both against feedback labels, and latency of both.
    ///
    /// # Errors
    /// [`PipelineError::NoShadow`], log failures.
    pub async fn shadow_report(&self, slot: &str) -> Result<ShadowReport, PipelineError> {
        let shadow = self
            .shadows
            .load()
            .get(slot)
            .cloned()
            .ok_or_else(|| PipelineError::NoShadow { slot: slot.to_string() })?;
        self.log.flush().await?;
        let reader = self.log.reader()?;
        let slot_name = slot.to_string();
        let version = shadow.model.version.clone();
        let routing = slot == ROUTER_SLOT;
        let (records, labels, live_answers) = tokio::task::spawn_blocking(move || {
            let records: Vec<ShadowRecord> = reader
                .shadow_records(&slot_name)?
                .into_iter()
                .filter(|r| r.version == version)
                .collect();
            let mut labels = BTreeMap::new();
            let mut answers = BTreeMap::new();
            for r in &records {
                if routing {
                    // Label: the corrected expert, else the live route when rated positively.
                    let feedback = reader.feedback_for(&r.request_id)?;
                    if let Some(f) = latest_explicit(&feedback) {
                        let label = match (&f.corrected_expert, f.rating.map(|x| x.score())) {
                            (Some(e), _) => Some(e.clone()),
                            (None, Some(score)) if score > 0.0 => Some(r.live_output.clone()),
                            _ => None,
                        };
                        if let Some(l) = label {
                            labels.insert(r.request_id.clone(), l);
                        }
                    }
                } else if let Some(rec) = reader.get(&r.request_id)? {
                    answers.insert(r.request_id.clone(), rec.answer.unwrap_or_default());
                }
            }
            Ok::<_, crate::data::log::LogError>((records, labels, answers))
        })
        .await
        .map_err(|_| PipelineError::Log(crate::data::log::LogError::Closed))??;
        let live_of = |r: &ShadowRecord| -> String {
            if routing {
                r.live_output.clone()
            } else {
                live_answers.get(&r.request_id).cloned().unwrap_or_default()
            }
        };
        let done: Vec<&ShadowRecord> = records.iter().filter(|r| r.output.is_some()).collect();
        let agree = done
            .iter()
            .filter(|r| r.output.as_deref() == Some(live_of(r).as_str()))
            .count();
        let labelled: Vec<(&ShadowRecord, &String)> = done
            .iter()
            .filter_map(|r| labels.get(&r.request_id).map(|l| (*r, l)))
            .collect();
        let share = |n: usize, d: usize| (d > 0).then(|| n as f64 / d as f64);
        let live_lat: Vec<f64> = done.iter().filter_map(|r| r.live_latency_ms).collect();
        let shadow_lat: Vec<f64> = done.iter().filter_map(|r| r.latency_ms).collect();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        Ok(ShadowReport {
            slot: slot.to_string(),
            version: shadow.model.version.clone(),
            fraction: shadow.fraction,
            sampled: load(&shadow.stats.sampled),
            mirrored: load(&shadow.stats.mirrored),
            skipped: load(&shadow.stats.skipped),
            failed: load(&shadow.stats.failed),
            logged: records.len(),
            agreement: share(agree, done.len()),
            labelled: labelled.len(),
            live_accuracy: share(
                labelled.iter().filter(|(r, l)| &r.live_output == *l).count(),
                labelled.len(),
            ),
            shadow_accuracy: share(
                labelled
                    .iter()
                    .filter(|(r, l)| r.output.as_deref() == Some(l.as_str()))
                    .count(),
                labelled.len(),
            ),
            live_p50_ms: percentile(&live_lat, 0.5),
            live_p99_ms: percentile(&live_lat, 0.99),
            shadow_p50_ms: percentile(&shadow_lat, 0.5),
            shadow_p99_ms: percentile(&shadow_lat, 0.99),
        })
    }

    /// [`Shadow::admit`], telling the observer about skips.
    fn admit_shadow(&self, shadow: &Shadow, request_id: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let admission = shadow.admit(request_id);
        if let Admission::Skipped = admission {
            self.observer
                .shadow(&shadow.slot, &shadow.model.version, ShadowOutcome::Skipped, None);
        }
        admission.permit()
    }

    fn shadow_of(&self, slot: &str) -> Option<Arc<Shadow>> {
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
        let (router, log, observer) = (self.router.clone(), self.log.clone(), self.observer.clone());
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
        let (log, observer) = (self.log.clone(), self.observer.clone());
        let (request_id, live_version) = (request_id.to_string(), live_version.to_string());
        let (prompt, params) = (prompt.to_vec(), params.clone());
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
                Ok(Ok(a)) => (Some(a), None),
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
