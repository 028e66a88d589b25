//! A/B splits set, cleared and reported through the control plane (the
//! per-request pick: [`crate::serving`]; the rules: [`crate::trials::split`]).

use super::ControlPlane;
use super::state::split_setting;
use crate::data::feedback::latest_explicit;
use crate::error::ControlError;
use crate::models::slots::ROUTER_SLOT;
use crate::trials::shadow::percentile;
use crate::trials::split::{ArmReport, SplitReport, recommend, validate, wilson};

impl ControlPlane {
    /// Split `slot`'s live traffic between versions (from the model registry)
    /// by weight; replaces any split of that slot.
    ///
    /// # Errors
    /// Invalid weights, an unknown slot or version, no registry, or a version
    /// that fails to load, validate or warm.
    pub async fn set_split(&self, slot: &str, weights: &[(String, f64)]) -> Result<SplitReport, ControlError> {
        validate(weights).map_err(|reason| ControlError::InvalidSplit { reason })?;
        self.store_and_loader()?;
        let target = self.slot_named(slot)?;
        {
            let _one_at_a_time = self.state.lock.lock().await;
            let arms = self.prepare_arms(&target, weights).await?;
            let setting = split_setting(weights);
            let since_ms = setting.since_ms;
            self.update_slot(slot, |state| {
                state.split = Some(setting);
                Ok(())
            })
            .await?;
            self.install_split(slot, Some((arms, since_ms)));
        }
        tracing::info!(slot, arms = weights.len(), "split set");
        self.split_report(slot).await
    }

    /// End `slot`'s split (the slot's own model serves everything again, on
    /// every replica sharing the serving state); returns the final report.
    ///
    /// # Errors
    /// [`ControlError::NoSplit`] when the slot has no split.
    pub async fn clear_split(&self, slot: &str) -> Result<SplitReport, ControlError> {
        let report = self.split_report(slot).await?;
        let _one_at_a_time = self.state.lock.lock().await;
        self.update_slot(slot, |state| {
            state.split = None;
            Ok(())
        })
        .await?;
        self.install_split(slot, None);
        Ok(report)
    }

    /// Per arm since the split started: requests, positive-feedback rate with
    /// its interval, latency of the slot's step, tokens; a recommendation only
    /// when significant.
    ///
    /// # Errors
    /// No split on the slot, log failures.
    pub async fn split_report(&self, slot: &str) -> Result<SplitReport, ControlError> {
        let split = self.serving.split_of(slot).ok_or_else(|| ControlError::NoSplit {
            slot: crate::text::quote(slot),
        })?;
        self.serving.log().flush().await?;
        let reader = self.serving.log().reader()?;
        let routing = slot == ROUTER_SLOT;
        let expert = slot.strip_prefix("expert/").map(str::to_string);
        let s = split.clone();
        let arms = tokio::task::spawn_blocking(move || {
            let records = reader.records_between(s.since_ms, i64::MAX)?;
            let mut out = Vec::new();
            for arm in &s.arms {
                let mine: Vec<_> = records
                    .iter()
                    .filter(|r| r.status == "ok")
                    .filter(|r| {
                        if routing {
                            r.route
                                .as_ref()
                                .is_some_and(|d| !d.forced && d.router_model_version == arm.version)
                        } else {
                            r.expert == expert && r.expert_model_version.as_deref() == Some(arm.version.as_str())
                        }
                    })
                    .collect();
                let (mut rated, mut positive) = (0, 0);
                for r in &mine {
                    let feedback = reader.feedback_for(&r.request_id)?;
                    if let Some(score) = latest_explicit(&feedback).and_then(|f| f.rating).map(|x| x.score()) {
                        rated += 1;
                        positive += usize::from(score > 0.0);
                    }
                }
                let latency: Vec<f64> = mine
                    .iter()
                    .filter_map(|r| {
                        if routing {
                            r.route.as_ref().map(|d| d.latency_ms)
                        } else {
                            r.total_ms
                        }
                    })
                    .collect();
                let tokens: Vec<f64> = mine.iter().filter_map(|r| r.completion_tokens.map(f64::from)).collect();
                let ci = wilson(positive, rated);
                out.push(ArmReport {
                    version: arm.version.clone(),
                    weight: arm.weight,
                    requests: mine.len(),
                    rated,
                    positive,
                    positive_rate: (rated > 0).then(|| positive as f64 / rated as f64),
                    ci_low: ci.map(|c| c.0),
                    ci_high: ci.map(|c| c.1),
                    p50_ms: percentile(&latency, 0.5),
                    p99_ms: percentile(&latency, 0.99),
                    mean_completion_tokens: (!tokens.is_empty())
                        .then(|| tokens.iter().sum::<f64>() / tokens.len() as f64),
                });
            }
            Ok::<_, crate::data::log::LogError>(out)
        })
        .await
        .map_err(|_| ControlError::Log(crate::data::log::LogError::Closed))??;
        let mut report = SplitReport {
            slot: slot.to_string(),
            arms,
            ..Default::default()
        };
        recommend(&mut report);
        Ok(report)
    }
}
