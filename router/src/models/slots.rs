//! Model slots: which loaded model serves each step, swappable atomically.
//!
//! A [`Slot`] ("router", "expert/hr", ...) holds an `ArcSwap` snapshot of a
//! [`ServedModel`]. A request calls [`Slot::current`] once and keeps that `Arc`
//! until its stream ends, so a later [`Slot::swap`] never changes a request
//! mid-flight and the old model is freed when its last request finishes.
//! Expert slots bound to the same model entry share one loaded engine; the
//! router slot always gets an engine of its own, set up for route decisions
//! (see [`crate::engine::mistral`]), even when it uses the same file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::{EngineSettings, ModelSpec};
use crate::engine::{Engine, EngineError, EngineLoader};
use crate::models::task::{TrainedTask, read_task};

/// Name of the router's slot.
pub const ROUTER_SLOT: &str = "router";

/// Name of an expert's slot.
pub fn expert_slot(expert: &str) -> String {
    format!("expert/{expert}")
}

/// A model version ready to serve.
pub struct ServedModel {
    /// Version label, recorded in every request record it serves.
    pub version: String,
    /// Model file.
    pub path: PathBuf,
    /// Size of the model file in bytes.
    pub size_bytes: u64,
    /// When it started serving.
    pub loaded_at: SystemTime,
    /// The runtime.
    pub engine: Arc<dyn Engine>,
    /// The task it was fine-tuned for (`None`: a base model, prompted zero-shot).
    pub task: Option<TrainedTask>,
}

impl ServedModel {
    /// Load the model `spec` describes; `router` when it will make route decisions.
    ///
    /// # Errors
    /// A missing or unreadable file, or a backend that cannot load it.
    pub async fn load(spec: &ModelSpec, loader: &dyn EngineLoader, router: bool) -> Result<Self, EngineError> {
        let (size_bytes, task) = match std::fs::metadata(&spec.path) {
            Ok(meta) => {
                let task = read_task(&spec.path).map_err(|e| EngineError::Load {
                    path: spec.path.display().to_string(),
                    source: e.into(),
                })?;
                let size = if meta.is_dir() {
                    folder_size(&spec.path)
                } else {
                    meta.len()
                };
                (size, task)
            }
            // The stub engine runs without a model file.
            Err(_) if !loader.requires_file() => (0, None),
            Err(_) => {
                return Err(EngineError::ModelNotFound {
                    path: spec.path.display().to_string(),
                });
            }
        };
        Ok(Self {
            version: spec.version_label(),
            path: spec.path.clone(),
            size_bytes,
            loaded_at: SystemTime::now(),
            engine: loader.load(spec, router).await?,
            task,
        })
    }
}

/// Bytes of the files directly in `dir` (a classifier folder).
fn folder_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(std::fs::Metadata::is_file)
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl ServedModel {
    /// How this model routes.
    pub fn kind(&self) -> crate::engine::ModelKind {
        self.task
            .as_ref()
            .map_or(crate::engine::ModelKind::LabelScoring, |t| t.kind)
    }
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("version", &self.version)
            .field("path", &self.path)
            .field("backend", &self.engine.backend())
            .finish()
    }
}

/// A named, atomically swappable model binding.
#[derive(Debug)]
pub struct Slot {
    name: String,
    current: ArcSwap<ServedModel>,
}

impl Slot {
    /// A slot serving `model`.
    pub fn new(name: impl Into<String>, model: Arc<ServedModel>) -> Self {
        Self {
            name: name.into(),
            current: ArcSwap::new(model),
        }
    }

    /// Slot name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model serving now; hold the `Arc` for the whole request.
    pub fn current(&self) -> Arc<ServedModel> {
        self.current.load_full()
    }

    /// Serve `model` from now on; returns the previous one.
    pub fn swap(&self, model: Arc<ServedModel>) -> Arc<ServedModel> {
        self.current.swap(model)
    }
}

/// All slots of a server.
#[derive(Debug)]
pub struct ModelRegistry {
    slots: BTreeMap<String, Arc<Slot>>,
    /// How each slot's model was loaded (the template for promotions), and
    /// whether the slot makes route decisions.
    specs: BTreeMap<String, (ModelSpec, bool)>,
}

impl ModelRegistry {
    /// Load every model entry that a slot uses (once each) and bind the
    /// router slot and one slot per expert.
    ///
    /// # Errors
    /// The first model that fails to load.
    pub async fn load(settings: &EngineSettings, loader: &dyn EngineLoader) -> Result<Self, EngineError> {
        let mut loaded: BTreeMap<(&str, bool), Arc<ServedModel>> = BTreeMap::new();
        let bindings = std::iter::once((ROUTER_SLOT.to_string(), settings.router.model.as_str(), true)).chain(
            settings
                .experts
                .iter()
                .map(|e| (expert_slot(&e.name), e.model.as_str(), false)),
        );
        let mut slots = BTreeMap::new();
        let mut specs = BTreeMap::new();
        for (slot, model_name, router) in bindings {
            let served = match loaded.get(&(model_name, router)) {
                Some(m) => m.clone(),
                None => {
                    let spec = settings
                        .models
                        .get(model_name)
                        .ok_or_else(|| EngineError::ModelNotFound {
                            path: format!("[models.{model_name}]"),
                        })?;
                    let served = Arc::new(ServedModel::load(spec, loader, router).await?);
                    loaded.insert((model_name, router), served.clone());
                    served
                }
            };
            if let Some(spec) = settings.models.get(model_name) {
                specs.insert(slot.clone(), (spec.clone(), router));
            }
            slots.insert(slot.clone(), Arc::new(Slot::new(slot, served)));
        }
        Ok(Self { slots, specs })
    }

    /// A registry from ready slots (tests, benchmarks).
    pub fn from_slots(slots: impl IntoIterator<Item = Arc<Slot>>) -> Self {
        Self {
            slots: slots.into_iter().map(|s| (s.name().to_string(), s)).collect(),
            specs: BTreeMap::new(),
        }
    }

    /// How `slot`'s model was configured and whether it routes (`None` for
    /// slots built with [`ModelRegistry::from_slots`]).
    pub fn spec(&self, slot: &str) -> Option<&(ModelSpec, bool)> {
        self.specs.get(slot)
    }

    /// A slot by name.
    pub fn slot(&self, name: &str) -> Option<&Arc<Slot>> {
        self.slots.get(name)
    }

    /// All slots, by name.
    pub fn slots(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.slots.values()
    }
}
