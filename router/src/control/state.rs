//! Where the serving state is kept and how a replica follows it.
//!
//! Each slot's [`SlotState`] (the version it serves, its history, its
//! shadow and split) lives in the model registry's `slots.json` for a
//! server of its own, or in the PostgreSQL store
//! ([`SharedServingState`]) for replicas sharing one. A change is recorded
//! first and applied here after, so a change the store refused is never
//! served. A replica of a shared state also follows it ([`ControlPlane::follow`]):
//! woken by the store's notifications, and re-reading on a timer in case
//! one was missed, it loads and swaps in whatever another replica changed.
//! At start, every replica serves what the state says ([`ControlPlane::restore_promoted`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::ControlPlane;
use crate::clock::unix_ms;
use crate::data::log::SharedServingState;
use crate::error::ControlError;
use crate::models::slots::Slot;
use crate::models::store::{Binding, ShadowSetting, SlotState, SplitSetting};
use crate::trials::shadow::Shadow;
use crate::trials::split::{Arm, Split};

/// How often a replica re-reads the shared state without a notification
/// (the fallback when notifications are lost).
pub const STATE_POLL: Duration = Duration::from_secs(2);

/// How this replica keeps the serving state.
#[derive(Default)]
pub(super) struct Keeping {
    /// The serving state shared with other replicas, when there is one.
    shared: Option<Arc<SharedServingState>>,
    /// Per slot, how far this replica has followed its recorded state.
    followed: std::sync::Mutex<BTreeMap<String, Followed>>,
    /// One change at a time: two changes of the serving state must not
    /// interleave their load, record and swap steps.
    pub(super) lock: tokio::sync::Mutex<()>,
}

/// How far a replica has followed one slot's recorded state.
#[derive(Debug, Clone, Copy, Default)]
struct Followed {
    /// The revision it serves.
    served: u64,
    /// The newest revision it tried to apply (tried again only when a newer one comes).
    tried: u64,
}

impl Followed {
    fn all(revision: u64) -> Self {
        Self {
            served: revision,
            tried: revision,
        }
    }
}

impl ControlPlane {
    /// Keep the serving state in the shared store `state` instead of the
    /// registry's `slots.json` (the registry still holds the model files).
    pub fn with_shared_state(mut self, state: SharedServingState) -> Self {
        self.state.shared = Some(Arc::new(state));
        self
    }

    /// Every slot's recorded state, by slot.
    pub(super) async fn slot_states(&self) -> Result<BTreeMap<String, SlotState>, ControlError> {
        if let Some(shared) = &self.state.shared {
            return Ok(shared.slot_states().await?);
        }
        let (store, _) = self.store_and_loader()?;
        Ok(store.slot_states()?)
    }

    /// `slot`'s recorded state.
    pub(super) async fn slot_state(&self, slot: &str) -> Result<SlotState, ControlError> {
        Ok(self.slot_states().await?.remove(slot).unwrap_or_default())
    }

    /// Record a change of `slot`'s state; the caller holds the promotion
    /// lock and applies the change here once this returns.
    pub(super) async fn update_slot<T>(
        &self,
        slot: &str,
        change: impl FnOnce(&mut SlotState) -> Result<T, ControlError>,
    ) -> Result<(T, SlotState), ControlError> {
        let (out, state) = match &self.state.shared {
            Some(shared) => shared.update_slot(slot, change).await?,
            None => self.store_and_loader()?.0.update_slot(slot, change)?,
        };
        // Applied here once the caller installs it, unless this replica was
        // behind (another replica's change came in between, or one failed
        // here): then the follower applies the whole state.
        let mut followed = self.state.followed.lock().unwrap_or_else(|e| e.into_inner());
        let f = followed.entry(slot.to_string()).or_default();
        if f.tried == f.served && f.served + 1 == state.revision {
            *f = Followed::all(state.revision);
        }
        drop(followed);
        Ok((out, state))
    }

    fn followed(&self, slot: &str) -> Followed {
        let followed = self.state.followed.lock().unwrap_or_else(|e| e.into_inner());
        followed.get(slot).copied().unwrap_or_default()
    }

    fn set_followed(&self, slot: &str, f: Followed) {
        let mut followed = self.state.followed.lock().unwrap_or_else(|e| e.into_inner());
        followed.insert(slot.to_string(), f);
    }

    /// The revision of `slot`'s recorded state this replica serves (0 when
    /// none was recorded): behind the store's when a change failed to apply here.
    pub fn applied_revision(&self, slot: &str) -> u64 {
        self.followed(slot).served
    }

    /// `binding` as this replica finds it: its version's file in the local
    /// registry when it has it (registries mounted at different paths), else
    /// the recorded path.
    pub(super) fn local_binding(&self, binding: &Binding) -> Binding {
        let path = self
            .model_store()
            .and_then(|s| s.model_path(&binding.version).ok())
            .unwrap_or_else(|| binding.path.clone());
        Binding {
            version: binding.version.clone(),
            path,
        }
    }

    /// Install `setting`'s shadow on `slot` (its candidate already loaded).
    pub(super) fn install_shadow(
        &self,
        slot: &str,
        setting: Option<(&ShadowSetting, Arc<crate::models::slots::ServedModel>)>,
    ) {
        let mut map: BTreeMap<String, Arc<Shadow>> = (**self.serving.shadows.load()).clone();
        match setting {
            Some((s, model)) => {
                map.insert(
                    slot.to_string(),
                    Arc::new(Shadow::new(slot, model, s.fraction, s.max_concurrency)),
                );
            }
            None => {
                map.remove(slot);
            }
        }
        self.serving.shadows.store(Arc::new(map));
    }

    /// Install a split of `slot` with `arms` (or none).
    pub(super) fn install_split(&self, slot: &str, split: Option<(Vec<Arm>, i64)>) {
        let mut map: BTreeMap<String, Arc<Split>> = (**self.serving.splits.load()).clone();
        match split {
            Some((arms, since_ms)) => {
                map.insert(
                    slot.to_string(),
                    Arc::new(Split {
                        slot: slot.to_string(),
                        arms,
                        since_ms,
                    }),
                );
            }
            None => {
                map.remove(slot);
            }
        }
        self.serving.splits.store(Arc::new(map));
    }

    /// Load and warm the arms of `weights` for `slot`.
    pub(super) async fn prepare_arms(&self, slot: &Slot, weights: &[(String, f64)]) -> Result<Vec<Arm>, ControlError> {
        let mut arms = Vec::with_capacity(weights.len());
        for (version, weight) in weights {
            let (model, _, _) = self.prepare(slot, &self.registry_binding(version)?).await?;
            arms.push(Arm {
                version: version.clone(),
                weight: *weight,
                model: Arc::new(model),
            });
        }
        Ok(arms)
    }

    /// Bring `slot` in line with `state`: its model, shadow and split;
    /// returns what changed. The caller holds the promotion lock.
    async fn apply_state(&self, slot: &Arc<Slot>, state: &SlotState) -> Result<Vec<String>, ControlError> {
        let name = slot.name();
        let mut changed = Vec::new();
        if let Some(serving) = &state.serving {
            let binding = self.local_binding(serving);
            let current = slot.current();
            if binding.version != current.version || binding.path != current.path {
                let (model, _, _) = self.prepare(slot, &binding).await?;
                slot.swap(Arc::new(model));
                changed.push(format!("serving {}", binding.version));
            }
        }
        let shadow = self.serving.shadows.load().get(name).cloned();
        match (&state.shadow, shadow) {
            (None, Some(_)) => {
                self.install_shadow(name, None);
                changed.push("shadow cleared".into());
            }
            (Some(s), current)
                if current.as_ref().is_none_or(|c| {
                    c.model.version != s.version || c.fraction != s.fraction || c.max_concurrency != s.max_concurrency
                }) =>
            {
                let (model, _, _) = self.prepare(slot, &self.registry_binding(&s.version)?).await?;
                self.install_shadow(name, Some((s, Arc::new(model))));
                changed.push(format!("shadow {}", s.version));
            }
            _ => {}
        }
        let split = self.serving.split_of(name);
        match (&state.split, split) {
            (None, Some(_)) => {
                self.install_split(name, None);
                changed.push("split cleared".into());
            }
            (Some(s), current) if current.as_ref().is_none_or(|c| !same_split(c, s)) => {
                let arms = self.prepare_arms(slot, &s.weights).await?;
                self.install_split(name, Some((arms, s.since_ms)));
                changed.push("split set".into());
            }
            _ => {}
        }
        Ok(changed)
    }

    /// At startup: serve in each slot what its recorded state says (the last
    /// promoted version, and the shadow and split set on it) when it differs
    /// from the configuration. Returns `(slot, what changed)` pairs.
    ///
    /// # Errors
    /// A recorded version that no longer loads; the state unreadable.
    pub async fn restore_promoted(&self) -> Result<Vec<(String, String)>, ControlError> {
        if self.store_and_loader().is_err() {
            return Ok(Vec::new());
        }
        let _one_at_a_time = self.state.lock.lock().await;
        let states = self.slot_states().await?;
        let mut restored = Vec::new();
        for slot in self.serving.registry.slots() {
            let Some(state) = states.get(slot.name()) else {
                continue;
            };
            for change in self.apply_state(slot, state).await? {
                restored.push((slot.name().to_string(), change));
            }
            self.set_followed(slot.name(), Followed::all(state.revision));
        }
        Ok(restored)
    }

    /// Apply every change other replicas made to the shared state since
    /// this one last looked; returns `(slot, what changed)` pairs. A change
    /// that fails to apply here (a model that does not load on this
    /// replica) is logged and not retried until the slot changes again.
    ///
    /// # Errors
    /// The store unreachable.
    pub async fn catch_up(&self) -> Result<Vec<(String, String)>, ControlError> {
        let states = self.slot_states().await?;
        let mut done = Vec::new();
        for slot in self.serving.registry.slots() {
            let Some(state) = states.get(slot.name()) else {
                continue;
            };
            if state.revision <= self.followed(slot.name()).tried {
                continue;
            }
            let _one_at_a_time = self.state.lock.lock().await;
            // A change made here while waiting for the lock is applied already.
            let state = self.slot_state(slot.name()).await?;
            let mut followed = self.followed(slot.name());
            if state.revision <= followed.tried {
                continue;
            }
            followed.tried = state.revision;
            match self.apply_state(slot, &state).await {
                Ok(changes) => {
                    followed.served = state.revision;
                    for change in changes {
                        tracing::info!(slot = slot.name(), revision = state.revision, %change, "followed the shared serving state");
                        done.push((slot.name().to_string(), change));
                    }
                }
                Err(error) => tracing::error!(
                    slot = slot.name(),
                    revision = state.revision,
                    error = %super::chain(&error),
                    "cannot apply the shared serving state; this replica keeps what it serves"
                ),
            }
            self.set_followed(slot.name(), followed);
        }
        Ok(done)
    }

    /// Follow the shared serving state until the returned task is aborted:
    /// catch up at every notification and every [`STATE_POLL`]. Without a
    /// shared state there is nothing to follow and the task ends at once.
    pub fn follow(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let control = self.clone();
        tokio::spawn(async move {
            let Some(shared) = control.state.shared.clone() else {
                return;
            };
            let changes = shared.changes().await;
            loop {
                if let Err(error) = control.catch_up().await {
                    tracing::warn!(error = %super::chain(&error), "cannot read the shared serving state");
                }
                tokio::select! {
                    () = changes.next() => {}
                    () = tokio::time::sleep(STATE_POLL) => {}
                }
            }
        })
    }
}

fn same_split(current: &Split, setting: &SplitSetting) -> bool {
    current.since_ms == setting.since_ms
        && current.arms.len() == setting.weights.len()
        && current
            .arms
            .iter()
            .zip(&setting.weights)
            .all(|(a, (v, w))| a.version == *v && a.weight == *w)
}

/// The setting of a split starting now.
pub(super) fn split_setting(weights: &[(String, f64)]) -> SplitSetting {
    SplitSetting {
        weights: weights.to_vec(),
        since_ms: unix_ms(SystemTime::now()),
    }
}
