//! The model registry on disk: model versions, and which one each slot serves.
//!
//! ```text
//! <root>/versions/<version>/model.gguf      the served file
//! <root>/versions/<version>/manifest.json   how it was made (optional)
//! <root>/slots.json                         per slot: serving version + history
//! ```
//!
//! The trainer adds versions ([`ModelStore::add`]); the server resolves a
//! version to its file when promoting and records every promotion and
//! rollback, so a restarted server serves what was last promoted. Every file
//! is written to a temporary name and renamed, so a crash never leaves a
//! half-copied model or a torn `slots.json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the model file inside a version folder.
pub const MODEL_FILE: &str = "model.gguf";
/// Name of an encoder classifier's folder inside a version folder.
pub const CLASSIFIER_DIR: &str = "classifier";
/// Name of the manifest inside a version folder.
pub const MANIFEST_FILE: &str = "manifest.json";
const SLOTS_FILE: &str = "slots.json";

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `slots.json` is not valid.
    #[error("{path} is corrupt")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// No such version.
    #[error("model version `{0}` is not in the registry")]
    UnknownVersion(String),
    /// A version name that cannot be a folder name.
    #[error("invalid version name `{0}`: use letters, digits, `.`, `_` and `-`")]
    InvalidVersion(String),
    /// The version exists with different content.
    #[error("model version `{0}` already exists with a different file; pick another version name")]
    VersionExists(String),
    /// Rollback with nothing served before.
    #[error("slot `{0}` has no earlier version to roll back to")]
    NothingToRollBack(String),
    /// Another flywheel cycle holds the registry's cycle lock.
    #[error("another flywheel cycle is running on {0} (see Admin.ListCycles); wait for it to finish")]
    CycleRunning(PathBuf),
    /// No such cycle record.
    #[error("no flywheel cycle `{0}` in the registry")]
    UnknownCycle(String),
}

/// A version bound to a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Version label.
    pub version: String,
    /// Model file.
    pub path: PathBuf,
}

/// A shadow as it is kept in the serving state: what every replica
/// mirrors a slot's traffic to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowSetting {
    /// The candidate version.
    pub version: String,
    /// Share of live requests mirrored.
    pub fraction: f64,
    /// Runs at once at most (per replica).
    pub max_concurrency: usize,
}

/// An A/B split as it is kept in the serving state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitSetting {
    /// `(version, weight)` per arm, in the order given.
    pub weights: Vec<(String, f64)>,
    /// Unix ms when the split started (its report counts from there).
    pub since_ms: i64,
}

/// One slot's serving state: what it serves, what it served before, and
/// the trials running on it. Every change raises `revision`, which is how
/// a replica following a shared state knows it has a change to apply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotState {
    /// What it serves.
    pub serving: Option<Binding>,
    /// What it served before, oldest first (rollback pops the last).
    #[serde(default)]
    pub history: Vec<Binding>,
    /// The shadow mirroring it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSetting>,
    /// The split sharing its traffic, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitSetting>,
    /// Changes made so far.
    #[serde(default)]
    pub revision: u64,
}

impl SlotState {
    /// Serve `new`, having served `old`.
    pub fn promote(&mut self, old: Binding, new: Binding) {
        self.history.push(old);
        self.serving = Some(new);
    }

    /// The version served before the current one.
    ///
    /// # Errors
    /// [`StoreError::NothingToRollBack`].
    pub fn previous(&self, slot: &str) -> Result<&Binding, StoreError> {
        self.history
            .last()
            .ok_or_else(|| StoreError::NothingToRollBack(slot.to_string()))
    }

    /// Serve again the version served before; returns it.
    ///
    /// # Errors
    /// [`StoreError::NothingToRollBack`].
    pub fn roll_back(&mut self, slot: &str) -> Result<Binding, StoreError> {
        let prev = self
            .history
            .pop()
            .ok_or_else(|| StoreError::NothingToRollBack(slot.to_string()))?;
        self.serving = Some(prev.clone());
        Ok(prev)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SlotsFile {
    slots: BTreeMap<String, SlotState>,
}

/// The registry folder.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
}

pub(crate) fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && !v.starts_with('.')
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl ModelStore {
    /// Open (creating) the registry at `root`.
    ///
    /// # Errors
    /// The folder cannot be created.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let versions = root.join("versions");
        std::fs::create_dir_all(&versions).map_err(io("cannot create", &versions))?;
        Ok(Self { root })
    }

    /// The registry folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Folder of a version.
    fn dir(&self, version: &str) -> PathBuf {
        self.root.join("versions").join(version)
    }

    /// Copy `model` (and its `manifest`) in as `version`; returns the stored
    /// model path. Adding the same file again under the same name is a no-op.
    ///
    /// # Errors
    /// An invalid or taken version name, I/O failures.
    pub fn add(&self, version: &str, model: &Path, manifest: Option<&Path>) -> Result<PathBuf, StoreError> {
        if !valid_version(version) {
            return Err(StoreError::InvalidVersion(crate::text::quote(version)));
        }
        if crate::engine::classifier::is_classifier(model) {
            return self.add_classifier(version, model);
        }
        let dir = self.dir(version);
        let target = dir.join(MODEL_FILE);
        if target.is_file() || dir.join(CLASSIFIER_DIR).is_dir() {
            let same = target.is_file()
                && std::fs::read(&target).map_err(io("cannot read", &target))?
                    == std::fs::read(model).map_err(io("cannot read", model))?;
            return if same {
                Ok(target)
            } else {
                Err(StoreError::VersionExists(version.to_string()))
            };
        }
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        if let Some(m) = manifest {
            copy_atomic(m, &dir.join(MANIFEST_FILE))?;
        }
        copy_atomic(model, &target)?;
        Ok(target)
    }

    /// Add an encoder classifier folder (its files, copied into a temporary
    /// folder renamed into place: a reader sees all of them or none).
    fn add_classifier(&self, version: &str, model: &Path) -> Result<PathBuf, StoreError> {
        let dir = self.dir(version);
        let target = dir.join(CLASSIFIER_DIR);
        let files = |d: &Path| -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
            let mut out = BTreeMap::new();
            for name in [
                crate::engine::classifier::CARD_FILE,
                crate::engine::classifier::HEAD_FILE,
            ] {
                let p = d.join(name);
                out.insert(name.to_string(), std::fs::read(&p).map_err(io("cannot read", &p))?);
            }
            Ok(out)
        };
        if target.is_dir() || dir.join(MODEL_FILE).is_file() {
            return if target.is_dir() && files(&target)? == files(model)? {
                Ok(target)
            } else {
                Err(StoreError::VersionExists(version.to_string()))
            };
        }
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let tmp = tempfile::TempDir::new_in(&dir).map_err(io("cannot create a folder in", &dir))?;
        for entry in std::fs::read_dir(model).map_err(io("cannot list", model))? {
            let entry = entry.map_err(io("cannot list", model))?;
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                let to = tmp.path().join(entry.file_name());
                if std::fs::hard_link(entry.path(), &to).is_err() {
                    std::fs::copy(entry.path(), &to).map_err(io("cannot copy", &entry.path()))?;
                }
            }
        }
        let manifest = model.join(MANIFEST_FILE);
        if manifest.is_file() {
            copy_atomic(&manifest, &dir.join(MANIFEST_FILE))?;
        }
        std::fs::rename(tmp.keep(), &target).map_err(io("cannot rename into", &target))?;
        Ok(target)
    }

    /// Model file (or encoder classifier folder) of `version`.
    ///
    /// # Errors
    /// [`StoreError::UnknownVersion`].
    pub fn model_path(&self, version: &str) -> Result<PathBuf, StoreError> {
        if !valid_version(version) {
            return Err(StoreError::InvalidVersion(crate::text::quote(version)));
        }
        let p = self.dir(version).join(MODEL_FILE);
        let classifier = self.dir(version).join(CLASSIFIER_DIR);
        if p.is_file() {
            Ok(p)
        } else if classifier.is_dir() {
            Ok(classifier)
        } else {
            Err(StoreError::UnknownVersion(crate::text::quote(version)))
        }
    }

    /// Stored versions, sorted.
    ///
    /// # Errors
    /// The folder cannot be listed.
    pub fn versions(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("versions");
        let mut out: Vec<String> = std::fs::read_dir(&dir)
            .map_err(io("cannot list", &dir))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(MODEL_FILE).is_file() || e.path().join(CLASSIFIER_DIR).is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        out.sort();
        Ok(out)
    }

    fn read_slots(&self) -> Result<SlotsFile, StoreError> {
        let path = self.root.join(SLOTS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SlotsFile::default()),
            Err(e) => Err(io("cannot read", &path)(e)),
        }
    }

    fn write_slots(&self, slots: &SlotsFile) -> Result<(), StoreError> {
        let path = self.root.join(SLOTS_FILE);
        let bytes = serde_json::to_vec_pretty(slots).map_err(|source| StoreError::Corrupt {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &bytes)
    }

    /// State of `slot` (default when never recorded).
    ///
    /// # Errors
    /// Unreadable `slots.json`.
    pub fn slot(&self, slot: &str) -> Result<SlotState, StoreError> {
        Ok(self.read_slots()?.slots.remove(slot).unwrap_or_default())
    }

    /// Every slot's state, by slot.
    ///
    /// # Errors
    /// Unreadable `slots.json`.
    pub fn slot_states(&self) -> Result<BTreeMap<String, SlotState>, StoreError> {
        Ok(self.read_slots()?.slots)
    }

    /// Change `slot`'s state with `change` and record it (its revision
    /// raised by one); returns what `change` returned and the new state.
    /// Nothing is written when `change` fails.
    ///
    /// # Errors
    /// `change`'s error, I/O failures.
    pub fn update_slot<T, E: From<StoreError>>(
        &self,
        slot: &str,
        change: impl FnOnce(&mut SlotState) -> Result<T, E>,
    ) -> Result<(T, SlotState), E> {
        let mut file = self.read_slots()?;
        let state = file.slots.entry(slot.to_string()).or_default();
        let out = change(state)?;
        state.revision += 1;
        let state = state.clone();
        self.write_slots(&file)?;
        Ok((out, state))
    }
}

fn temp_in(path: &Path) -> Result<tempfile::NamedTempFile, StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    tempfile::NamedTempFile::new_in(dir).map_err(io("cannot create a file in", dir))
}

fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<(), StoreError> {
    tmp.as_file().sync_all().map_err(io("cannot sync", path))?;
    tmp.persist(path).map_err(|e| io("cannot rename into", path)(e.error))?;
    Ok(())
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut tmp = temp_in(path)?;
    tmp.write_all(bytes).map_err(io("cannot write", path))?;
    persist(tmp, path)
}

fn copy_atomic(from: &Path, to: &Path) -> Result<(), StoreError> {
    let mut tmp = temp_in(to)?;
    let mut src = std::fs::File::open(from).map_err(io("cannot open", from))?;
    std::io::copy(&mut src, &mut tmp).map_err(io("cannot copy", from))?;
    persist(tmp, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(v: &str) -> Binding {
        Binding {
            version: v.into(),
            path: PathBuf::from(format!("/m/{v}")),
        }
    }

    #[test]
    fn an_encoder_classifier_folder_is_stored_whole_and_found_as_a_version() {
        use crate::engine::classifier::{CARD_FILE, HEAD_FILE};
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path().join("reg")).unwrap();
        let folder = |name: &str, head: &[u8]| {
            let f = dir.path().join(name);
            std::fs::create_dir_all(&f).unwrap();
            std::fs::write(f.join(CARD_FILE), b"{}").unwrap();
            std::fs::write(f.join(HEAD_FILE), head).unwrap();
            std::fs::write(f.join("model.safetensors"), b"encoder").unwrap();
            std::fs::write(f.join(MANIFEST_FILE), b"{\"version\": \"c1\"}").unwrap();
            f
        };
        let a = folder("a", b"head a");
        let stored = store.add("c1", &a, None).unwrap();
        assert_eq!(stored, store.model_path("c1").unwrap());
        assert_eq!(std::fs::read(stored.join("model.safetensors")).unwrap(), b"encoder");
        assert!(store.dir("c1").join(MANIFEST_FILE).is_file());
        assert_eq!(store.versions().unwrap(), ["c1"]);
        // Idempotent; another classifier or a GGUF under the name is refused.
        assert_eq!(store.add("c1", &a, None).unwrap(), stored);
        let b = folder("b", b"head b");
        assert!(matches!(store.add("c1", &b, None), Err(StoreError::VersionExists(_))));
        let gguf = dir.path().join("m.gguf");
        std::fs::write(&gguf, b"model").unwrap();
        assert!(matches!(
            store.add("c1", &gguf, None),
            Err(StoreError::VersionExists(_))
        ));
        // No temporary folder left beside it.
        let left: Vec<_> = std::fs::read_dir(store.dir("c1")).unwrap().collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    #[test]
    fn add_is_idempotent_and_refuses_a_different_file_under_a_taken_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path().join("reg")).unwrap();
        let a = dir.path().join("a.gguf");
        let b = dir.path().join("b.gguf");
        std::fs::write(&a, b"model a").unwrap();
        std::fs::write(&b, b"model b").unwrap();
        let p = store.add("v1", &a, None).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"model a");
        assert_eq!(store.add("v1", &a, None).unwrap(), p);
        assert!(matches!(store.add("v1", &b, None), Err(StoreError::VersionExists(_))));
        assert!(matches!(
            store.add("../x", &b, None),
            Err(StoreError::InvalidVersion(_))
        ));
        assert_eq!(store.versions().unwrap(), vec!["v1"]);
        assert!(matches!(store.model_path("v2"), Err(StoreError::UnknownVersion(_))));
    }

    #[test]
    fn promotions_and_rollbacks_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let promote = |store: &ModelStore, old: &str, new: &str| {
            store
                .update_slot("router", |s| {
                    s.promote(binding(old), binding(new));
                    Ok::<_, StoreError>(())
                })
                .unwrap()
                .1
        };
        let roll_back = |store: &ModelStore| store.update_slot("router", |s| s.roll_back("router"));
        assert!(matches!(roll_back(&store), Err(StoreError::NothingToRollBack(_))));
        assert_eq!(promote(&store, "base", "v1").revision, 1);
        assert_eq!(promote(&store, "v1", "v2").revision, 2);
        let reopened = ModelStore::open(dir.path()).unwrap();
        assert_eq!(reopened.slot("router").unwrap().serving, Some(binding("v2")));
        assert_eq!(
            reopened.slot("router").unwrap().previous("router").unwrap(),
            &binding("v1")
        );
        assert_eq!(roll_back(&reopened).unwrap().0, binding("v1"));
        assert_eq!(roll_back(&reopened).unwrap().0, binding("base"));
        assert!(matches!(roll_back(&reopened), Err(StoreError::NothingToRollBack(_))));
        let state = reopened.slot("router").unwrap();
        assert_eq!(state.serving, Some(binding("base")));
        // A refused change wrote nothing.
        assert_eq!(state.revision, 4);
    }

    #[test]
    fn a_slots_file_of_an_earlier_version_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"{"slots":{"router":{"serving":{"version":"v1","path":"/m/v1.gguf"},"history":[]}}}"#;
        std::fs::write(dir.path().join(SLOTS_FILE), old).unwrap();
        let state = ModelStore::open(dir.path()).unwrap().slot("router").unwrap();
        assert_eq!(state.serving.unwrap().version, "v1");
        assert_eq!((state.revision, state.shadow, state.split), (0, None, None));
    }
}
