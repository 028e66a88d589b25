//! Promotion and rollback: swap the model of a slot while serving.
//!
//! The new version is loaded and warmed beside the old one (a fine-tuned
//! router is also checked against the experts' label set); only then is the
//! slot's `ArcSwap` stored. Requests in flight keep the `Arc` they took and
//! finish on the old model, which is dropped when the last of them ends. A
//! model that fails to load, validate or warm is rejected and the slot keeps
//! serving what it served. Every swap is recorded in the serving state
//! (see [`super::state`]) before it is made, so a restarted server serves the
//! last promoted versions and replicas sharing a store follow it.

use std::sync::Arc;
use std::time::Instant;

use super::{ControlPlane, chain};
use crate::config::ModelSpec;
use crate::engine::EngineLoader;
use crate::error::ControlError;
use crate::models::slots::{ROUTER_SLOT, ServedModel, Slot};
use crate::models::store::{Binding, ModelStore};

/// Promotion state of a pipeline.
#[derive(Default)]
pub(super) struct Promotion {
    store: Option<ModelStore>,
    loader: Option<Arc<dyn EngineLoader>>,
}

/// What a promotion or rollback did.
#[derive(Debug, Clone, PartialEq)]
pub struct SwapReport {
    /// The slot.
    pub slot: String,
    /// Version served before.
    pub previous_version: String,
    /// Version served now.
    pub version: String,
    /// Time to load the new model.
    pub load_ms: f64,
    /// Time to check and warm it.
    pub warm_ms: f64,
}

impl ControlPlane {
    /// Promote versions from `store`, loading them with `loader`.
    pub fn with_model_store(mut self, store: ModelStore, loader: Arc<dyn EngineLoader>) -> Self {
        self.promotion.store = Some(store);
        self.promotion.loader = Some(loader);
        self
    }

    /// The model registry on disk, if any.
    pub fn model_store(&self) -> Option<&ModelStore> {
        self.promotion.store.as_ref()
    }

    /// The flywheel cycles recorded in the registry, newest first (`limit` 0 = all).
    ///
    /// # Errors
    /// No registry, or unreadable records.
    pub fn cycles(&self, limit: usize) -> Result<Vec<crate::data::journal::CycleRecord>, ControlError> {
        let store = self.model_store().ok_or(ControlError::NoModelStore)?;
        let Some(journal) = crate::data::journal::CycleJournal::existing(store.root()) else {
            return Ok(Vec::new());
        };
        let mut all = journal.list()?;
        if limit > 0 {
            all.truncate(limit);
        }
        Ok(all)
    }

    pub(super) fn slot_named(&self, slot: &str) -> Result<Arc<Slot>, ControlError> {
        self.serving
            .registry
            .slot(slot)
            .cloned()
            .ok_or_else(|| ControlError::UnknownSlot {
                slot: crate::text::quote(slot),
                known: self
                    .serving
                    .registry
                    .slots()
                    .map(|s| s.name().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub(super) fn store_and_loader(&self) -> Result<(&ModelStore, &Arc<dyn EngineLoader>), ControlError> {
        match (&self.promotion.store, &self.promotion.loader) {
            (Some(s), Some(l)) => Ok((s, l)),
            _ => Err(ControlError::NoModelStore),
        }
    }

    /// `version` of the model registry, bound to its file there.
    pub(super) fn registry_binding(&self, version: &str) -> Result<Binding, ControlError> {
        let (store, _) = self.store_and_loader()?;
        Ok(Binding {
            version: version.to_string(),
            path: store.model_path(version)?,
        })
    }

    /// Load `binding` for `slot`, check and warm it, without swapping.
    pub(super) async fn prepare(
        &self,
        slot: &Slot,
        binding: &Binding,
    ) -> Result<(ServedModel, f64, f64), ControlError> {
        let (_, loader) = self.store_and_loader()?;
        let serving = slot.current().version.clone();
        let rejected = |e: &dyn std::error::Error| ControlError::ModelRejected {
            version: binding.version.clone(),
            serving: serving.clone(),
            reason: chain(e),
        };
        let (template, router) = self
            .serving
            .registry
            .spec(slot.name())
            .cloned()
            .ok_or_else(|| ControlError::NoModelStore)?;
        let spec = ModelSpec {
            path: binding.path.clone(),
            version: Some(binding.version.clone()),
            ..template
        };
        let start = Instant::now();
        let model = ServedModel::load(&spec, loader.as_ref(), router)
            .await
            .map_err(|e| rejected(&e))?;
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        let start = Instant::now();
        if slot.name() == ROUTER_SLOT {
            self.serving.router.warm_up(&model).await.map_err(|e| rejected(&e))?;
        } else {
            if let Some(task) = &model.task {
                let reason = format!(
                    "it is a classifier fine-tuned for labels [{}]; promote it to the `{ROUTER_SLOT}` slot",
                    task.labels.join(", ")
                );
                return Err(ControlError::ModelRejected {
                    version: binding.version.clone(),
                    serving,
                    reason,
                });
            }
            let expert = self
                .serving
                .experts
                .values()
                .find(|e| crate::models::slots::expert_slot(e.name()) == slot.name());
            let prompt = match expert {
                Some(e) => e.prompt("hello", &[]),
                None => vec![crate::engine::ChatMessage::user("hello")],
            };
            model.engine.warm_up(&prompt).await.map_err(|e| rejected(&e))?;
        }
        Ok((model, load_ms, start.elapsed().as_secs_f64() * 1e3))
    }

    /// Serve `version` (from the model registry) in `slot`.
    ///
    /// # Errors
    /// Unknown slot or version, no registry, or a model that fails to load,
    /// validate or warm ([`ControlError::ModelRejected`]; the slot keeps its model).
    pub async fn promote(&self, slot_name: &str, version: &str) -> Result<SwapReport, ControlError> {
        self.store_and_loader()?;
        let slot = self.slot_named(slot_name)?;
        let binding = self.registry_binding(version)?;
        let _one_at_a_time = self.state.lock.lock().await;
        let (model, load_ms, warm_ms) = self.prepare(&slot, &binding).await?;
        let current = slot.current();
        let served = Binding {
            version: current.version.clone(),
            path: current.path.clone(),
        };
        self.update_slot(slot_name, |state| {
            let old = state.serving.clone().unwrap_or(served);
            state.promote(old, binding.clone());
            Ok(())
        })
        .await?;
        Ok(self.swap_in(&slot, model, load_ms, warm_ms, false))
    }

    /// Serve again the version `slot` served before its current one.
    ///
    /// # Errors
    /// Nothing to roll back to, or the previous model fails to load;
    /// [`ControlError::StateChanged`] when another replica changed the slot
    /// meanwhile.
    pub async fn rollback(&self, slot_name: &str) -> Result<SwapReport, ControlError> {
        self.store_and_loader()?;
        let slot = self.slot_named(slot_name)?;
        let _one_at_a_time = self.state.lock.lock().await;
        let state = self.slot_state(slot_name).await?;
        let previous = state.previous(slot_name)?.clone();
        let (model, load_ms, warm_ms) = self.prepare(&slot, &self.local_binding(&previous)).await?;
        self.update_slot(slot_name, |now| {
            if now.revision != state.revision {
                return Err(ControlError::StateChanged {
                    slot: slot_name.to_string(),
                });
            }
            now.roll_back(slot_name).map(drop).map_err(ControlError::from)
        })
        .await?;
        Ok(self.swap_in(&slot, model, load_ms, warm_ms, true))
    }

    /// Swap `model` into `slot` (its change already recorded).
    fn swap_in(&self, slot: &Slot, model: ServedModel, load_ms: f64, warm_ms: f64, rollback: bool) -> SwapReport {
        let new = Arc::new(model);
        let old = slot.swap(new.clone());
        tracing::info!(
            slot = slot.name(),
            from = %old.version,
            to = %new.version,
            rollback,
            load_ms,
            warm_ms,
            "model swapped"
        );
        SwapReport {
            slot: slot.name().to_string(),
            previous_version: old.version.clone(),
            version: new.version.clone(),
            load_ms,
            warm_ms,
        }
    }
}
