//! Shadows set, cleared and reported through the control plane (the runs
//! themselves: [`crate::serving`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::ControlPlane;
use crate::data::feedback::latest_explicit;
use crate::error::ControlError;
use crate::models::slots::ROUTER_SLOT;
use crate::models::store::ShadowSetting;
use crate::trials::shadow::{ShadowRecord, ShadowReport, percentile};

impl ControlPlane {
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
    ) -> Result<ShadowReport, ControlError> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(ControlError::InvalidShadow {
                reason: format!("fraction {fraction} must be in (0, 1]"),
            });
        }
        if max_concurrency == 0 {
            return Err(ControlError::InvalidShadow {
                reason: "max_concurrency must be at least 1".into(),
            });
        }
        self.store_and_loader()?;
        let target = self.slot_named(slot)?;
        let binding = self.registry_binding(version)?;
        let setting = ShadowSetting {
            version: version.to_string(),
            fraction,
            max_concurrency,
        };
        {
            let _one_at_a_time = self.state.lock.lock().await;
            let (model, _, _) = self.prepare(&target, &binding).await?;
            self.update_slot(slot, |state| {
                state.shadow = Some(setting.clone());
                Ok(())
            })
            .await?;
            self.install_shadow(slot, Some((&setting, Arc::new(model))));
        }
        tracing::info!(slot, version, fraction, "shadow set");
        self.shadow_report(slot).await
    }

    /// Stop mirroring `slot` (on every replica sharing the serving state);
    /// returns the shadow's final report.
    ///
    /// # Errors
    /// [`ControlError::NoShadow`].
    pub async fn clear_shadow(&self, slot: &str) -> Result<ShadowReport, ControlError> {
        let report = self.shadow_report(slot).await?;
        let _one_at_a_time = self.state.lock.lock().await;
        self.update_slot(slot, |state| {
            state.shadow = None;
            Ok(())
        })
        .await?;
        self.install_shadow(slot, None);
        Ok(report)
    }

    /// What the shadow of `slot` has shown: counters since it was set, and
    /// from the log (this version's runs) agreement with live, accuracy of
    /// both against feedback labels, and latency of both.
    ///
    /// # Errors
    /// [`ControlError::NoShadow`], log failures.
    pub async fn shadow_report(&self, slot: &str) -> Result<ShadowReport, ControlError> {
        let shadow = self
            .serving
            .shadows
            .load()
            .get(slot)
            .cloned()
            .ok_or_else(|| ControlError::NoShadow {
                slot: crate::text::quote(slot),
            })?;
        self.serving.log().flush().await?;
        let reader = self.serving.log().reader()?;
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
        .map_err(|_| ControlError::Log(crate::data::log::LogError::Closed))??;
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
}
