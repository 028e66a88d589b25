//! Curation: from logged traffic and feedback to a clean, leak-free,
//! reproducible ground-truth dataset for the router.
//!
//! The steps, each in its own module:
//! 1. [`select`]: requests in a time window / expert / model version /
//!    feedback kind, labelled by precedence (review > correction > positive
//!    feedback); unsatisfactory ones are set aside;
//! 2. [`judge`]: an LLM judge (our own engine) attributes each
//!    unsatisfactory request to a cause; wrong routes and uncertain verdicts
//!    go to the [`review`] queue, whose labels are imported back as `review`
//!    feedback;
//! 3. [`dataset`]: external labelled files (JSONL / CSV, `text` + `label`)
//!    join the same path;
//! 4. [`clean`]: PII, exact and near-duplicate removal;
//! 5. [`split`]: seeded stratified split (default 60/40), or train/val
//!    around a frozen test set, then a leakage check across splits;
//! 6. [`export`]: JSONL (plain and chat), Parquet, and a manifest with
//!    counts, hashes, seed and filters.

pub mod clean;
pub mod dataset;
pub mod export;
pub mod judge;
pub mod review;
pub mod select;
pub mod split;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use self::clean::{CleanReport, CleanSpec};
use self::dataset::{Example, LabelSource, WrittenFile, label_counts, source_counts};
use self::judge::{Cause, Judge};
use self::review::ReviewItem;
use self::select::{Decision, Filters};
use self::split::{SplitSpec, Splits};

/// Errors of curation.
#[derive(Debug, thiserror::Error)]
pub enum CurateError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A data file has a malformed row.
    #[error("{path}:{line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A review file names unknown requests or labels; nothing was imported.
    #[error("{path}: nothing imported: {}", problems.join("; "))]
    Review {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<String>,
    },
    /// The request log failed.
    #[error("request log")]
    Log(#[from] flywheel_router::data::log::LogError),
    /// Parquet encoding failed.
    #[error("parquet")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// The judge's engine failed.
    #[error("judge engine")]
    Engine(#[from] flywheel_router::engine::EngineError),
    /// A setting is out of range.
    #[error("invalid setting `{key}`: {reason}")]
    Setting {
        /// Dotted key.
        key: &'static str,
        /// What is expected.
        reason: String,
    },
    /// Nothing to build a dataset from.
    #[error("no labelled examples: {0}")]
    Empty(String),
    /// The leakage check failed (a bug: splits are built to be disjoint).
    #[error("leakage check failed: {0} near-duplicate pairs across splits")]
    Leak(usize),
}

/// Maps an I/O error on `path` to [`CurateError::Io`].
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CurateError + '_ {
    move |source| CurateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Seed's split: 60% train, 40% test.
pub const DEFAULT_TEST_FRACTION: f64 = 0.4;
/// Default seed of the split order.
pub const DEFAULT_SEED: u64 = 42;
/// Character 5-gram Jaccard from which two queries are near-duplicates:
/// 0.8 catches re-typed and lightly edited queries, while queries that share
/// a template but differ in their key words stay apart.
pub const DEFAULT_NEAR_DUP_THRESHOLD: f64 = 0.8;
/// Judge verdicts below this confidence (1-10) go to human review.
pub const DEFAULT_MIN_JUDGE_SCORE: u8 = 6;
/// System message of chat-format exports.
pub const DEFAULT_CHAT_SYSTEM_PROMPT: &str =
    "Route the user's question to the team that should answer it. Reply with the team name only.";

/// Curation settings (`[curation]` in the trainer's TOML; flags override).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CurationSpec {
    /// Share of each label in the test split.
    pub test_fraction: f64,
    /// Share of each label in the validation split (0 = none).
    pub val_fraction: f64,
    /// Seed of the split.
    pub seed: u64,
    /// Near-duplicate Jaccard threshold.
    pub near_dup_threshold: f64,
    /// Shingle size (characters) for near-duplicates.
    pub shingle: usize,
    /// Drop examples with unredacted PII.
    pub drop_pii: bool,
    /// Judge confidence under which a verdict goes to review.
    pub min_judge_score: u8,
    /// System message of chat-format exports.
    pub chat_system_prompt: String,
}

impl Default for CurationSpec {
    fn default() -> Self {
        Self {
            test_fraction: DEFAULT_TEST_FRACTION,
            val_fraction: 0.0,
            seed: DEFAULT_SEED,
            near_dup_threshold: DEFAULT_NEAR_DUP_THRESHOLD,
            shingle: flywheel_router::data::similarity::DEFAULT_SHINGLE,
            drop_pii: true,
            min_judge_score: DEFAULT_MIN_JUDGE_SCORE,
            chat_system_prompt: DEFAULT_CHAT_SYSTEM_PROMPT.into(),
        }
    }
}

impl CurationSpec {
    /// Check ranges.
    ///
    /// # Errors
    /// The first setting out of range.
    pub fn validate(&self) -> Result<(), CurateError> {
        let bad = |key, reason: &str| {
            Err(CurateError::Setting {
                key,
                reason: reason.into(),
            })
        };
        if !(0.0..1.0).contains(&self.test_fraction) {
            return bad("curation.test_fraction", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.val_fraction) || self.test_fraction + self.val_fraction >= 1.0 {
            return bad(
                "curation.val_fraction",
                "must be in [0, 1) with test_fraction + val_fraction < 1",
            );
        }
        if !(self.near_dup_threshold > 0.0 && self.near_dup_threshold <= 1.0) {
            return bad("curation.near_dup_threshold", "must be in (0, 1]");
        }
        if self.shingle == 0 {
            return bad("curation.shingle", "must be at least 1");
        }
        if !(1..=10).contains(&self.min_judge_score) {
            return bad("curation.min_judge_score", "must be between 1 and 10");
        }
        Ok(())
    }

    fn clean(&self) -> CleanSpec {
        CleanSpec {
            near_dup_threshold: self.near_dup_threshold,
            shingle: self.shingle,
            drop_pii: self.drop_pii,
        }
    }

    fn split(&self) -> SplitSpec {
        SplitSpec {
            test_fraction: self.test_fraction,
            val_fraction: self.val_fraction,
            seed: self.seed,
        }
    }
}

/// One curation run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CurateOptions {
    /// The request log (none: imports only).
    pub log: Option<PathBuf>,
    /// Output folder.
    pub out: PathBuf,
    /// Which logged requests to consider.
    pub filters: Filters,
    /// External labelled files to add.
    pub imports: Vec<PathBuf>,
    /// Column names of the imported files.
    pub columns: dataset::Columns,
    /// A test split to keep as is (from an earlier cycle).
    pub frozen_test: Option<PathBuf>,
    /// Review queue file (default `<out>/review_queue.csv`).
    pub review_out: Option<PathBuf>,
    /// Settings.
    pub spec: CurationSpec,
}

/// Counts of the selection step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SelectionReport {
    /// Logged requests matching the filters.
    pub candidates: usize,
    /// Labelled requests per label source.
    pub labelled: BTreeMap<String, usize>,
    /// Requests the user was not satisfied with (no label).
    pub unsatisfactory: usize,
    /// Neutral ratings.
    pub neutral: usize,
    /// Requests without feedback.
    pub no_feedback: usize,
    /// Rows from imported files.
    pub imported: usize,
}

/// What the judge found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgeReport {
    /// Judge model version.
    pub model_version: String,
    /// Requests judged.
    pub judged: usize,
    /// Parsed verdicts per cause.
    pub causes: BTreeMap<String, usize>,
    /// Answers that could not be parsed, per reason.
    pub malformed: BTreeMap<String, usize>,
}

/// Example counts of one split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitReport {
    /// Examples.
    pub total: usize,
    /// Per label.
    pub labels: BTreeMap<String, usize>,
    /// Per label source.
    pub sources: BTreeMap<String, usize>,
}

impl SplitReport {
    fn of(examples: &[Example]) -> Self {
        Self {
            total: examples.len(),
            labels: label_counts(examples),
            sources: source_counts(examples),
        }
    }
}

/// Near-duplicate pairs across splits (all zero in a written dataset).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LeakageReport {
    /// Threshold used.
    pub threshold: f64,
    /// Train x test pairs.
    pub train_test: usize,
    /// Validation x test pairs.
    pub val_test: usize,
    /// Train x validation pairs.
    pub train_val: usize,
    /// New examples dropped as near-duplicates of the frozen test set.
    pub dropped_for_frozen_test: usize,
}

/// The frozen test set used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrozenTest {
    /// Its file.
    pub path: PathBuf,
    /// SHA-256 of that file.
    pub sha256: String,
    /// Its examples.
    pub rows: usize,
}

/// Everything needed to reproduce a dataset; written as `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// When it was built (Unix ms).
    pub created_at_ms: i64,
    /// flywheel-trainer version.
    pub tool_version: String,
    /// Request log read.
    pub log: Option<PathBuf>,
    /// Files imported.
    pub imports: Vec<PathBuf>,
    /// Their text and label columns.
    pub columns: dataset::Columns,
    /// Filters applied.
    pub filters: Filters,
    /// Settings (seed, fractions, thresholds).
    pub spec: CurationSpec,
    /// Selection counts.
    pub selection: SelectionReport,
    /// Judge results, when a judge ran.
    pub judge: Option<JudgeReport>,
    /// Review queue written (rows), if any.
    pub review_queue: Option<WrittenFile>,
    /// Cleaning counts.
    pub clean: CleanReport,
    /// Frozen test set, when one was given.
    pub frozen_test: Option<FrozenTest>,
    /// Split counts (`train`, `val`, `test`).
    pub splits: BTreeMap<String, SplitReport>,
    /// Leakage check.
    pub leakage: LeakageReport,
    /// Files written, with hashes.
    pub files: Vec<WrittenFile>,
}

/// Manifest file name in the output folder.
pub const MANIFEST: &str = "manifest.json";

async fn attribute(
    unsatisfied: &[select::Candidate],
    judge: Option<&Judge>,
    min_score: u8,
    out: &Path,
) -> Result<(Vec<ReviewItem>, Option<JudgeReport>), CurateError> {
    let item = |c: &select::Candidate, reason: &str| ReviewItem {
        request_id: c.record.request_id.clone(),
        query: c.record.query.clone(),
        routed_expert: c.routed_expert().unwrap_or_default().to_string(),
        router_confidence: c.record.route.as_ref().map(|r| r.confidence),
        reason: reason.into(),
        comment: flywheel_router::data::feedback::latest_explicit(&c.feedback).and_then(|f| f.comment.clone()),
        ..ReviewItem::default()
    };
    let Some(judge) = judge else {
        return Ok((unsatisfied.iter().map(|c| item(c, "unjudged")).collect(), None));
    };
    let mut report = JudgeReport {
        model_version: judge.model_version().to_string(),
        ..JudgeReport::default()
    };
    let mut queue = Vec::new();
    let mut lines = String::new();
    for c in unsatisfied {
        let rails: Vec<String> = c
            .record
            .guardrails
            .iter()
            .filter(|v| v.decision != flywheel_router::guardrails::RailDecision::Allow)
            .map(|v| v.rail.clone())
            .collect();
        let comment = item(c, "").comment;
        let case = judge::Case {
            query: &c.record.query,
            routed_expert: c.routed_expert().unwrap_or("(not routed)"),
            answer: c.record.answer.as_deref().unwrap_or_default(),
            comment: comment.as_deref(),
            rails: &rails,
        };
        let judgement = judge.judge(&c.record.request_id, &case).await?;
        report.judged += 1;
        lines.push_str(&serde_json::to_string(&judgement).unwrap_or_default());
        lines.push('\n');
        match &judgement.verdict {
            Ok(v) => {
                *report.causes.entry(v.cause.as_str().into()).or_default() += 1;
                let reason = if v.score < min_score {
                    Some("judge_uncertain")
                } else if v.cause == Cause::WrongRoute {
                    Some("judge_wrong_route")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    let mut it = item(c, reason);
                    it.judge_cause = Some(v.cause.as_str().into());
                    it.judge_score = Some(v.score);
                    it.suggested_expert = v.expert.clone();
                    queue.push(it);
                }
            }
            Err(e) => {
                *report.malformed.entry(e.to_string()).or_default() += 1;
                queue.push(item(c, "judge_malformed"));
            }
        }
    }
    let path = out.join("judgements.jsonl");
    std::fs::write(&path, lines).map_err(io(&path))?;
    Ok((queue, Some(report)))
}

/// Run curation; writes the dataset, the review queue and the manifest into
/// `opts.out` and returns the manifest.
///
/// # Errors
/// Invalid settings, unreadable inputs, judge engine failures, an empty
/// result, I/O failures.
pub async fn run(opts: &CurateOptions, judge: Option<&Judge>) -> Result<Manifest, CurateError> {
    opts.spec.validate()?;
    std::fs::create_dir_all(&opts.out).map_err(io(&opts.out))?;
    let mut selection = SelectionReport::default();
    let mut examples: Vec<Example> = Vec::new();
    let mut unsatisfied = Vec::new();
    if let Some(log) = &opts.log {
        let candidates = select::load(log, &opts.filters)?;
        selection.candidates = candidates.len();
        for c in candidates {
            match select::decide(&c) {
                Decision::Labelled(e) => {
                    *selection.labelled.entry(e.source.as_str().into()).or_default() += 1;
                    examples.push(e);
                }
                Decision::Unsatisfactory => unsatisfied.push(c),
                Decision::Neutral => selection.neutral += 1,
                Decision::NoFeedback => selection.no_feedback += 1,
            }
        }
        selection.unsatisfactory = unsatisfied.len();
    }
    let (queue, judge_report) = attribute(&unsatisfied, judge, opts.spec.min_judge_score, &opts.out).await?;
    for path in &opts.imports {
        let rows = dataset::read_examples_with(path, LabelSource::Import, &opts.columns)?;
        selection.imported += rows.len();
        examples.extend(rows);
    }
    let (examples, clean_report) = clean::clean(examples, &opts.spec.clean());
    let spec = opts.spec.split();
    let (splits, frozen, dropped) = match &opts.frozen_test {
        Some(path) => {
            let test = dataset::read_examples_with(path, LabelSource::Import, &opts.columns)?;
            let frozen = FrozenTest {
                path: path.clone(),
                sha256: export::sha256_file(path)?,
                rows: test.len(),
            };
            let (s, dropped) =
                split::around_frozen(examples, test, &spec, opts.spec.shingle, opts.spec.near_dup_threshold);
            (s, Some(frozen), dropped)
        }
        None => (split::stratified(examples, &spec), None, 0),
    };
    let Splits { train, val, test } = splits;
    if train.is_empty() {
        return Err(CurateError::Empty(
            "no example reached the training split; submit feedback (Feedback.Submit), import reviewed labels, \
             or add a labelled file with --import"
                .into(),
        ));
    }
    let (sh, th) = (opts.spec.shingle, opts.spec.near_dup_threshold);
    let leakage = LeakageReport {
        threshold: th,
        train_test: split::leakage_pairs(&train, &test, sh, th),
        val_test: split::leakage_pairs(&val, &test, sh, th),
        train_val: split::leakage_pairs(&train, &val, sh, th),
        dropped_for_frozen_test: dropped,
    };
    let leaks = leakage.train_test + leakage.val_test + leakage.train_val;
    if leaks > 0 {
        return Err(CurateError::Leak(leaks));
    }
    let dir = opts.out.as_path();
    let system = opts.spec.chat_system_prompt.as_str();
    let mut files = Vec::new();
    let mut splits_report = BTreeMap::new();
    for (name, part) in [("train", &train), ("val", &val), ("test", &test)] {
        if part.is_empty() && name == "val" {
            continue;
        }
        files.push(export::jsonl(dir, &format!("{name}.jsonl"), part)?);
        files.push(export::chat_jsonl(dir, &format!("{name}.chat.jsonl"), part, system)?);
        files.push(export::parquet(dir, &format!("{name}.parquet"), part)?);
        splits_report.insert(name.to_string(), SplitReport::of(part));
    }
    let review_path = opts
        .review_out
        .clone()
        .unwrap_or_else(|| opts.out.join("review_queue.csv"));
    let review_queue = if queue.is_empty() {
        None
    } else {
        review::write_queue(&review_path, &queue)?;
        Some(WrittenFile {
            sha256: export::sha256_file(&review_path)?,
            path: review_path,
            rows: queue.len(),
        })
    };
    let manifest = Manifest {
        created_at_ms: flywheel_router::data::log::unix_ms(std::time::SystemTime::now()),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        // A store URL is recorded without its password.
        log: opts
            .log
            .as_ref()
            .map(|l| PathBuf::from(flywheel_router::data::log::LogLocation::from(l).to_string())),
        imports: opts.imports.clone(),
        columns: opts.columns.clone(),
        filters: opts.filters.clone(),
        spec: opts.spec.clone(),
        selection,
        judge: judge_report,
        review_queue,
        clean: clean_report,
        frozen_test: frozen,
        splits: splits_report,
        leakage,
        files,
    };
    let path = opts.out.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| CurateError::Parse {
        path: path.clone(),
        line: 0,
        reason: e.to_string(),
    })?;
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_settings_are_valid_and_bad_ones_name_their_key() {
        CurationSpec::default().validate().unwrap();
        let bad = CurationSpec {
            test_fraction: 0.7,
            val_fraction: 0.3,
            ..CurationSpec::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("curation.val_fraction")
        );
        let bad = CurationSpec {
            near_dup_threshold: 0.0,
            ..CurationSpec::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("near_dup_threshold"));
    }

    #[tokio::test]
    async fn imports_alone_build_a_reproducible_split() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("ext.csv");
        let mut csv = String::from("text,label\n");
        for i in 0..30 {
            csv.push_str(&format!("set an alarm for {i} o'clock on day {},alarm\n", i * 13));
            csv.push_str(&format!("play song number {i} from album {},music\n", i * 7));
        }
        csv.push_str("set an alarm for 0 o'clock on day 0,alarm\n"); // exact duplicate
        std::fs::write(&data, csv).unwrap();
        let opts = |out: &str| CurateOptions {
            out: dir.path().join(out),
            imports: vec![data.clone()],
            ..CurateOptions::default()
        };
        let a = run(&opts("a"), None).await.unwrap();
        assert_eq!(a.selection.imported, 61);
        assert_eq!(a.clean.exact_duplicates, 1);
        let test = &a.splits["test"];
        let train = &a.splits["train"];
        assert_eq!(test.total + train.total + a.clean.near_duplicates, 60);
        assert_eq!(test.labels["alarm"] as f64, (a.clean.output as f64 / 2.0 * 0.4).round());
        let b = run(&opts("b"), None).await.unwrap();
        let hashes = |m: &Manifest| m.files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>();
        assert_eq!(hashes(&a), hashes(&b), "same inputs and seed, same bytes");
        assert!(dir.path().join("a/manifest.json").exists());
    }
}
