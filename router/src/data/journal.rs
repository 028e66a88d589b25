//! The flywheel's cycle journal: one JSON record per cycle (curate,
//! fine-tune, evaluate, gate, promote) in `<registry>/cycles/`, and the lock
//! that lets one cycle run at a time.
//!
//! ```text
//! <root>/cycles/<id>.json   a cycle's record (written atomically at every stage)
//! <root>/cycles/cycle.lock  held (OS file lock) by the running cycle
//! ```
//!
//! The trainer writes the records; the server's `Admin.ListCycles` reads
//! them. The lock is an operating-system file lock, so a cycle that dies
//! releases it; the next cycle then finds its record still `running` and
//! resumes it from the first stage not done.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::models::store::{StoreError, io, write_atomic};

/// Folder of the records inside the registry.
pub const CYCLES_DIR: &str = "cycles";
const LOCK_FILE: &str = "cycle.lock";

/// Where a cycle stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CycleStatus {
    /// Running (or interrupted, until the next cycle resumes it).
    Running,
    /// The candidate passed the gate and serves the slot.
    Promoted,
    /// The candidate did not pass the gate; the slot is untouched.
    Rejected,
    /// Too little new data to train on; nothing was trained.
    Skipped,
    /// A stage failed; the slot is untouched.
    Failed,
}

impl CycleStatus {
    /// The lower-case name used in records and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Promoted => "promoted",
            Self::Rejected => "rejected",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
        }
    }
}

/// The stages of a cycle, in order.
pub const STAGES: [&str; 4] = ["curate", "train", "evaluate", "promote"];

/// Time spent in one finished stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTime {
    /// Stage name (one of [`STAGES`]).
    pub stage: String,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The curated dataset of a cycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CycleDataset {
    /// Folder with `train.jsonl`, `test.jsonl` and `manifest.json`.
    pub dir: PathBuf,
    /// Training examples.
    pub train: usize,
    /// Test examples (the frozen test split).
    pub test: usize,
    /// SHA-256 of the curation manifest.
    pub manifest_sha256: String,
}

/// The gate's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CycleMetrics {
    /// Version of the model serving the slot when the cycle evaluated.
    pub incumbent_version: String,
    /// Its accuracy on the test split.
    pub incumbent_accuracy: f64,
    /// The candidate's accuracy on the test split.
    pub candidate_accuracy: f64,
    /// McNemar p-value of the difference.
    pub p_value: f64,
    /// Test examples.
    pub n: usize,
    /// Candidate's p99 decision latency (ms).
    pub candidate_p99_ms: f64,
    /// Incumbent's p99 decision latency (ms).
    pub incumbent_p99_ms: f64,
}

/// One candidate of a cycle's training stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateRun {
    /// The candidate's configured name.
    pub name: String,
    /// Router kind (`label-scoring`, `encoder-classifier`, `decoder-classifier`).
    pub kind: String,
    /// Training output folder.
    pub dir: PathBuf,
    /// Version of the trained model (none when training failed).
    pub version: Option<String>,
    /// Trained on a teacher's distributions over the logged traffic as well as gold.
    pub distilled: bool,
    /// Wall-clock seconds of its training.
    pub seconds: f64,
    /// Why its training failed (the cycle went on with the others).
    pub error: Option<String>,
}

/// One model's row of a cycle's comparison on the frozen test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRow {
    /// Candidate name, or `incumbent`.
    pub name: String,
    /// Version.
    pub version: String,
    /// Router kind.
    pub kind: String,
    /// The model serving the slot when the cycle evaluated.
    pub incumbent: bool,
    /// Weights, counted in the model's files (0: unknown).
    pub parameters: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Accuracy on the frozen test split.
    pub accuracy: f64,
    /// Macro-F1 there.
    pub macro_f1: f64,
    /// Share of test queries on which it picks the teacher's expert.
    pub teacher_agreement: Option<f64>,
    /// McNemar p-value of its difference with the most accurate model.
    pub p_value_vs_best: f64,
    /// Decision latency p50 (ms).
    pub p50_ms: f64,
    /// Decision latency p99 (ms).
    pub p99_ms: f64,
    /// CPU seconds per 1,000 decisions.
    pub cpu_seconds_per_1k: f64,
    /// No other model is at least as accurate and at most as costly.
    pub on_front: bool,
    /// Within the tolerance of the best accuracy (and the p99 budget).
    pub holds: bool,
    /// Why it won or lost.
    pub verdict: String,
}

/// The Pareto gate of a cycle: every candidate and the incumbent, and why
/// the winner won.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CycleGate {
    /// What "cheapest" meant: `p50` or `cpu`.
    pub cost: String,
    /// Accuracy a winner may lose against the best model.
    pub tolerance: f64,
    /// p99 budget (ms).
    pub max_p99_ms: Option<f64>,
    /// The teacher's version, when candidates were distilled.
    pub teacher: Option<String>,
    /// The most accurate model's name.
    pub best: String,
    /// The candidate promoted (none: the incumbent keeps serving).
    pub winner: Option<String>,
    /// One sentence on the outcome.
    pub summary: String,
    /// Every evaluated model, candidates first.
    pub models: Vec<ModelRow>,
}

/// One cycle's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CycleRecord {
    /// Cycle id (`cycle-<unix ms>`).
    pub id: String,
    /// Where it stands.
    pub status: CycleStatus,
    /// Stages finished, in order, with their time.
    pub stages: Vec<StageTime>,
    /// What started it (`manual`, `labels`, `interval`, `demo`).
    pub trigger: String,
    /// Slot it trains for.
    pub slot: String,
    /// Unix ms it started.
    pub started_unix_ms: i64,
    /// Unix ms of its last record write.
    pub updated_unix_ms: i64,
    /// Unix ms it ended.
    pub finished_unix_ms: Option<i64>,
    /// Requests logged before this time are its data (kept so a resumed
    /// cycle curates the same window).
    pub log_until_ms: i64,
    /// Labelled feedback rows in the log when it started (the cadence's counter).
    pub labels_seen: u64,
    /// Work folder (dataset, training output).
    pub work_dir: PathBuf,
    /// The curated dataset.
    pub dataset: Option<CycleDataset>,
    /// Version of the trained candidate.
    pub candidate_version: Option<String>,
    /// The gate's measurements.
    pub metrics: Option<CycleMetrics>,
    /// The model the cycle's distilled candidates learn from (chosen once,
    /// kept when the cycle resumes).
    #[serde(default)]
    pub teacher: Option<PathBuf>,
    /// Each candidate's training (several per cycle when configured).
    #[serde(default)]
    pub candidates: Vec<CandidateRun>,
    /// The Pareto gate's table.
    #[serde(default)]
    pub gate: Option<CycleGate>,
    /// The gate's reasons (why it passed or not).
    pub decision: Vec<String>,
    /// Whether the candidate was promoted.
    pub promoted: bool,
    /// Times the cycle was resumed after an interruption.
    pub resumed: u32,
    /// What went wrong, for `failed` and `skipped`.
    pub error: Option<String>,
}

impl CycleRecord {
    /// A new running record.
    pub fn new(id: String, trigger: &str, slot: &str, now_ms: i64, work_dir: PathBuf) -> Self {
        Self {
            id,
            status: CycleStatus::Running,
            stages: Vec::new(),
            trigger: trigger.into(),
            slot: slot.into(),
            started_unix_ms: now_ms,
            updated_unix_ms: now_ms,
            finished_unix_ms: None,
            log_until_ms: now_ms,
            labels_seen: 0,
            work_dir,
            dataset: None,
            candidate_version: None,
            metrics: None,
            teacher: None,
            candidates: Vec::new(),
            gate: None,
            decision: Vec::new(),
            promoted: false,
            resumed: 0,
            error: None,
        }
    }

    /// Whether `stage` has finished.
    pub fn done(&self, stage: &str) -> bool {
        self.stages.iter().any(|s| s.stage == stage)
    }

    /// The stage that runs next (`None` when all have finished).
    pub fn next_stage(&self) -> Option<&'static str> {
        STAGES.iter().copied().find(|s| !self.done(s))
    }
}

/// The journal folder.
#[derive(Debug, Clone)]
pub struct CycleJournal {
    dir: PathBuf,
}

/// Held while a cycle runs; dropping it (or the process dying) releases it.
#[derive(Debug)]
pub struct CycleLock {
    _file: File,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

impl CycleJournal {
    /// Open (creating) the journal of the registry at `registry_root`.
    ///
    /// # Errors
    /// The folder cannot be created.
    pub fn open(registry_root: &Path) -> Result<Self, StoreError> {
        let dir = registry_root.join(CYCLES_DIR);
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        Ok(Self { dir })
    }

    /// The journal of `registry_root` if one was ever opened there, without creating it.
    pub fn existing(registry_root: &Path) -> Option<Self> {
        let dir = registry_root.join(CYCLES_DIR);
        dir.is_dir().then_some(Self { dir })
    }

    /// Take the cycle lock without waiting.
    ///
    /// # Errors
    /// [`StoreError::CycleRunning`] while another cycle (any process) holds it.
    pub fn lock(&self) -> Result<CycleLock, StoreError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("cannot open", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(CycleLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(StoreError::CycleRunning(self.dir.clone())),
            Err(TryLockError::Error(e)) => Err(io("cannot lock", &path)(e)),
        }
    }

    fn path(&self, id: &str) -> Result<PathBuf, StoreError> {
        if !valid_id(id) {
            return Err(StoreError::UnknownCycle(id.to_string()));
        }
        Ok(self.dir.join(format!("{id}.json")))
    }

    /// Write `record` (atomically: readers see the old or the new record).
    ///
    /// # Errors
    /// An invalid id or I/O failures.
    pub fn write(&self, record: &CycleRecord) -> Result<(), StoreError> {
        let path = self.path(&record.id)?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Corrupt {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &bytes)
    }

    /// One record.
    ///
    /// # Errors
    /// [`StoreError::UnknownCycle`], unreadable or corrupt records.
    pub fn get(&self, id: &str) -> Result<CycleRecord, StoreError> {
        let path = self.path(id)?;
        if !path.is_file() {
            return Err(StoreError::UnknownCycle(id.to_string()));
        }
        read(&path)
    }

    /// All records, newest first.
    ///
    /// # Errors
    /// An unreadable folder or a corrupt record.
    pub fn list(&self) -> Result<Vec<CycleRecord>, StoreError> {
        let entries = std::fs::read_dir(&self.dir).map_err(io("cannot read", &self.dir))?;
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(io("cannot read", &self.dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(read(&path)?);
            }
        }
        out.sort_by(|a, b| b.started_unix_ms.cmp(&a.started_unix_ms).then(b.id.cmp(&a.id)));
        Ok(out)
    }
}

fn read(path: &Path) -> Result<CycleRecord, StoreError> {
    let bytes = std::fs::read(path).map_err(io("cannot read", path))?;
    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lock_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let journal = CycleJournal::open(dir.path()).unwrap();
        let held = journal.lock().unwrap();
        // A second open file description is refused while the first holds it.
        assert!(matches!(journal.lock(), Err(StoreError::CycleRunning(_))));
        drop(held);
        assert!(journal.lock().is_ok());
    }

    #[test]
    fn records_round_trip_newest_first_and_track_stages() {
        let dir = tempfile::tempdir().unwrap();
        let journal = CycleJournal::open(dir.path()).unwrap();
        let mut old = CycleRecord::new("cycle-1".into(), "manual", "router", 1, dir.path().join("w1"));
        old.stages.push(StageTime {
            stage: "curate".into(),
            seconds: 1.5,
        });
        assert_eq!(old.next_stage(), Some("train"));
        old.teacher = Some(dir.path().join("registry/versions/ft-1/model.gguf"));
        old.candidates.push(CandidateRun {
            name: "encoder".into(),
            kind: "encoder-classifier".into(),
            dir: dir.path().join("w1/encoder"),
            version: Some("enc-1".into()),
            distilled: true,
            seconds: 42.0,
            error: None,
        });
        let row = |name: &str, accuracy: f64, p50_ms: f64| ModelRow {
            name: name.into(),
            version: format!("{name}-v"),
            kind: "encoder-classifier".into(),
            incumbent: name == "incumbent",
            parameters: 22_713_216,
            size_bytes: 90_000_000,
            accuracy,
            macro_f1: accuracy - 0.01,
            teacher_agreement: Some(0.93),
            p_value_vs_best: 0.5,
            p50_ms,
            p99_ms: p50_ms * 2.0,
            cpu_seconds_per_1k: p50_ms * 1.5,
            on_front: true,
            holds: true,
            verdict: "holds".into(),
        };
        old.gate = Some(CycleGate {
            cost: "p50".into(),
            tolerance: 0.02,
            max_p99_ms: Some(50.0),
            teacher: Some("ft-1".into()),
            best: "incumbent".into(),
            winner: Some("encoder".into()),
            summary: "promote encoder".into(),
            models: vec![row("encoder", 0.9, 12.0), row("incumbent", 0.91, 200.0)],
        });
        journal.write(&old).unwrap();
        let new = CycleRecord::new("cycle-2".into(), "labels", "router", 2, dir.path().join("w2"));
        journal.write(&new).unwrap();
        let all = journal.list().unwrap();
        assert_eq!(
            all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["cycle-2", "cycle-1"]
        );
        assert_eq!(journal.get("cycle-1").unwrap(), old);
        assert!(matches!(journal.get("cycle-9"), Err(StoreError::UnknownCycle(_))));
        assert!(matches!(journal.get("../slots"), Err(StoreError::UnknownCycle(_))));
    }
}
