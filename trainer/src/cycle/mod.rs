//! `flywheel-trainer cycle`: one turn of the flywheel against a live server
//! (curate the log and feedback, train the candidates, evaluate them and the
//! incumbent on the frozen test split, gate, promote), once or on a cadence.
//!
//! A cycle trains one candidate (the `--kind` flags) or a configured list
//! ([`candidates`]: e.g. an encoder classifier, a pruned decoder classifier
//! and a LoRA label router), classifier candidates distilled from a teacher
//! (the best router the registry has seen) over the window's logged traffic.
//! The [`gate`] promotes the cheapest candidate whose accuracy holds against
//! the best model's ([`crate::pareto`]).
//!
//! Every cycle has a record in the registry's journal
//! ([`flywheel_router::data::journal`]), written at each stage and readable through
//! `Admin.ListCycles`, with the gate's whole table. One cycle runs at a time
//! (an OS file lock in the registry). A cycle that dies keeps its record
//! `running`; the next cycle resumes it from the first stage not done
//! (curation of the same log window, the candidates not yet trained). A
//! cycle that fails or is refused by the gate never touches the serving model.

pub mod candidates;
pub mod gate;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use flywheel_router::data::journal::{CycleDataset, CycleJournal, CycleMetrics, CycleRecord, CycleStatus, StageTime};
use flywheel_router::data::log::{LogLocation, LogReader, StoreCycleLock, unix_ms};

use crate::curate::select::Filters;
use crate::curate::{self, CurateOptions, CurationSpec, MANIFEST};
use crate::eval;
use crate::pareto::{CostMeasure, ParetoSpec};
use crate::promote::{self, PromoteArgs, ServerArgs};
use candidates::{CandidateSpec, Teaching};

/// Fewest curated training examples a cycle trains on; below, it is `skipped`.
pub const DEFAULT_MIN_EXAMPLES: usize = 40;
/// Frozen test split shared by every cycle of a work folder.
const FROZEN_TEST: &str = "frozen_test.jsonl";
/// The evaluations of the gate inside a cycle's folder.
const GATE_REPORT: &str = "gate.json";

/// `flywheel-trainer cycle`.
#[derive(Debug, Clone, clap::Args)]
pub struct CycleArgs {
    /// Server, admin token, slot.
    #[command(flatten)]
    pub server: ServerArgs,
    /// The server's request log (its SQLite file or a `postgres://` URL).
    #[arg(long, env = "FLYWHEEL_LOG_PATH")]
    pub log: PathBuf,
    /// The server's model registry (holds the models and the cycle journal).
    #[arg(long, env = "FLYWHEEL_REGISTRY_DIR")]
    pub registry_dir: PathBuf,
    /// Folder for the cycles' datasets and training outputs.
    #[arg(long, default_value = "var/cycles")]
    pub work_dir: PathBuf,
    /// Server config (router instructions and expert descriptions for a base
    /// incumbent; its router model entry loads the evaluated models).
    #[arg(long)]
    pub server_config: Option<PathBuf>,
    /// Device of the evaluations, and of training when given.
    #[command(flatten)]
    pub device: eval::DeviceArg,
    /// Training settings (of the one candidate, when no `--candidates`).
    #[command(flatten)]
    pub training: TrainingKnobs,
    /// TOML file of `[[candidate]]` tables: the candidates each cycle trains
    /// (name, kind and training settings each; see docs/distillation.md).
    #[arg(long = "candidates")]
    pub candidates_file: Option<PathBuf>,
    /// Candidates given in code (the demo's); override `--candidates`.
    #[arg(skip)]
    pub candidates: Vec<CandidateSpec>,
    /// Teacher of the distilled candidates (default: the most accurate
    /// router the registry has seen on the frozen split, else the incumbent).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// What the gate's winner is cheapest in: `p50` decision latency or `cpu` seconds per 1k.
    #[arg(long, value_enum, default_value_t = CostMeasure::P50)]
    pub cost: CostMeasure,
    /// Test share of each label when the first cycle creates the frozen test split.
    #[arg(long, default_value_t = curate::DEFAULT_TEST_FRACTION)]
    pub test_fraction: f64,
    /// Skip (and record why) when fewer curated training examples.
    #[arg(long, default_value_t = DEFAULT_MIN_EXAMPLES)]
    pub min_examples: usize,
    /// Accuracy a winner may lose against the most accurate model (absolute).
    #[arg(long, default_value_t = promote::DEFAULT_TOLERANCE)]
    pub tolerance: f64,
    /// Largest accepted p99 decision latency of the candidate, in ms.
    #[arg(long)]
    pub max_p99_ms: Option<f64>,
    /// Run continuously: start a cycle whenever this many new feedback rows were logged.
    #[arg(long)]
    pub every_labels: Option<u64>,
    /// Run continuously: start a cycle at this interval (e.g. 30m, 6h).
    #[arg(long, value_parser = parse_duration)]
    pub every: Option<Duration>,
    /// How often the continuous mode checks the log.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub poll: Duration,
    /// Stop the continuous mode after this many cycles.
    #[arg(long)]
    pub max_cycles: Option<usize>,
    /// What started the cycle, as recorded (`manual` unless a cadence did).
    #[arg(long, hide = true, default_value = "manual")]
    pub trigger: String,
}

/// The fine-tuning settings a cycle exposes (the rest keep `train`'s defaults).
#[derive(Debug, Clone, clap::Args)]
pub struct TrainingKnobs {
    /// Kind of router each cycle trains: `label-scoring` (fine-tunes `--base`),
    /// `encoder-classifier` (a head over the rails' embedder) or
    /// `decoder-classifier` (`--base` tuned with a head over its last state).
    #[arg(long, default_value = "label-scoring")]
    pub kind: flywheel_router::engine::ModelKind,
    /// Base model every cycle fine-tunes (the dataset grows; training restarts from the base).
    #[arg(long, default_value = flywheel_router::config::DEFAULT_MODEL_PATH)]
    pub base: PathBuf,
    /// Passes over the data (default: `train`'s for the kind).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Train only the top N blocks (default: `train`'s for the kind).
    #[arg(long)]
    pub trained_blocks: Option<usize>,
    /// Keep only the first k blocks of the base (smaller, faster model).
    #[arg(long)]
    pub keep_layers: Option<usize>,
    /// Use at most this many training examples (stratified sample).
    #[arg(long)]
    pub max_train_examples: Option<usize>,
    /// Seed of sampling, initialisation and order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `"90s"`, `"30m"`, `"6h"`, `"1d"` or plain seconds.
///
/// # Errors
/// Anything else.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: use e.g. 90s, 30m, 6h, 1d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("`{s}` has an unknown unit: use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

fn now_ms() -> i64 {
    unix_ms(std::time::SystemTime::now())
}

/// Feedback rows in the log (the cadence's counter).
fn feedback_rows(log: &Path) -> anyhow::Result<u64> {
    let reader = LogReader::open(log).with_context(|| format!("opening the request log {}", LogLocation::from(log)))?;
    Ok(reader.feedback_between(0, i64::MAX)?.len() as u64)
}

impl CycleArgs {
    /// The candidates: given in code, from `--candidates`, or the one the `--kind` flags describe.
    ///
    /// # Errors
    /// An unreadable or invalid candidates file.
    pub fn candidate_specs(&self) -> anyhow::Result<Vec<CandidateSpec>> {
        if !self.candidates.is_empty() {
            candidates::check(&self.candidates)?;
            return Ok(self.candidates.clone());
        }
        if let Some(path) = &self.candidates_file {
            return candidates::read(path);
        }
        let k = &self.training;
        Ok(vec![CandidateSpec {
            epochs: k.epochs,
            trained_blocks: k.trained_blocks,
            keep_layers: k.keep_layers,
            ..CandidateSpec::new(k.kind.as_str(), k.kind)
        }])
    }

    fn promote_args(&self, candidate: &Path, test: &Path) -> PromoteArgs {
        PromoteArgs {
            server: self.server.clone(),
            candidate: candidate.to_path_buf(),
            version: None,
            test: test.to_path_buf(),
            text_column: "text".into(),
            label_column: "label".into(),
            server_config: self.server_config.clone(),
            device: self.device,
            tolerance: self.tolerance,
            max_p99_ms: self.max_p99_ms,
            registry_dir: self.registry_dir.clone(),
            report: None,
            dry_run: false,
        }
    }
}

/// Run one cycle (resuming an interrupted one first, if any) and return its record.
///
/// # Errors
/// Another cycle is running, or the journal cannot be written. Failures of
/// the stages themselves end in a `failed` record, not an error.
pub async fn run_once(args: &CycleArgs) -> anyhow::Result<CycleRecord> {
    args.candidate_specs()?;
    let journal = CycleJournal::open(&args.registry_dir)?;
    let _lock = journal.lock()?;
    // Trainers on other machines sharing the store take turns too.
    let _store_lock = match LogLocation::from(args.log.as_path()) {
        LogLocation::Postgres(url) => Some(StoreCycleLock::try_take(&url).await?.with_context(|| {
            format!(
                "another flywheel cycle is running on the store {} (see Admin.ListCycles); wait for it to finish",
                LogLocation::from(args.log.as_path())
            )
        })?),
        LogLocation::Sqlite(_) => None,
    };
    let interrupted = journal
        .list()?
        .into_iter()
        .find(|r| r.status == CycleStatus::Running && r.slot == args.server.slot);
    let mut record = match interrupted {
        Some(mut r) => {
            r.resumed += 1;
            tracing::warn!(cycle = %r.id, next = ?r.next_stage(), "resuming an interrupted cycle");
            println!(
                "resuming interrupted cycle {} at stage {}",
                r.id,
                r.next_stage().unwrap_or("end")
            );
            r
        }
        None => {
            let now = now_ms();
            let id = format!("cycle-{now}");
            let mut r = CycleRecord::new(
                id.clone(),
                &args.trigger,
                &args.server.slot,
                now,
                args.work_dir.join(&id),
            );
            r.labels_seen = feedback_rows(&args.log)?;
            r
        }
    };
    journal.write(&record)?;
    if let Err(e) = stages(args, &journal, &mut record).await {
        tracing::error!(cycle = %record.id, error = %format!("{e:#}"), "cycle failed");
        record.status = CycleStatus::Failed;
        record.error = Some(format!("{e:#}"));
    }
    record.finished_unix_ms = Some(now_ms());
    record.updated_unix_ms = now_ms();
    journal.write(&record)?;
    Ok(record)
}

async fn stages(args: &CycleArgs, journal: &CycleJournal, record: &mut CycleRecord) -> anyhow::Result<()> {
    std::fs::create_dir_all(&record.work_dir).with_context(|| format!("creating {}", record.work_dir.display()))?;
    let data_dir = record.work_dir.join("data");
    let frozen = args.work_dir.join(FROZEN_TEST);
    while let Some(stage) = record.next_stage() {
        println!("[{}] {stage}", record.id);
        let t = Instant::now();
        match stage {
            "curate" => {
                let dataset = curate_stage(args, record, &data_dir, &frozen).await?;
                let enough = dataset.train >= args.min_examples;
                record.dataset = Some(dataset);
                if !enough {
                    record.status = CycleStatus::Skipped;
                    record.error = Some(format!(
                        "{} curated training examples, fewer than --min-examples {}",
                        record.dataset.as_ref().map_or(0, |d| d.train),
                        args.min_examples
                    ));
                    finish_stage(journal, record, stage, t)?;
                    return Ok(());
                }
            }
            "train" => train_stage(args, journal, record, &data_dir.join("train.jsonl"), &frozen).await?,
            "evaluate" => {
                let (report, table) = evaluate_stage(args, journal, record, &frozen).await?;
                let path = record.work_dir.join(GATE_REPORT);
                eval::write_json(&path, &report)?;
                print!("{}", gate::render(&table));
                // The chosen candidate (else the most accurate) against the incumbent.
                let shown = table
                    .winner
                    .as_ref()
                    .or_else(|| {
                        report
                            .candidates
                            .iter()
                            .max_by(|a, b| a.1.accuracy.total_cmp(&b.1.accuracy))
                            .map(|c| &c.0)
                    })
                    .and_then(|name| report.candidates.iter().find(|c| &c.0 == name));
                if let Some((_, c)) = shown {
                    record.candidate_version = Some(c.version.clone());
                    record.metrics = Some(CycleMetrics {
                        incumbent_version: report.incumbent.version.clone(),
                        incumbent_accuracy: report.incumbent.accuracy,
                        candidate_accuracy: c.accuracy,
                        p_value: eval::compare(c, &report.incumbent).p_value,
                        n: c.n,
                        candidate_p99_ms: c.latency_p99_ms,
                        incumbent_p99_ms: report.incumbent.latency_p99_ms,
                    });
                }
                record.decision = table
                    .models
                    .iter()
                    .map(|m| format!("{}: {}", m.name, m.verdict))
                    .collect();
                record.gate = Some(table);
            }
            "promote" => {
                let table = record.gate.clone().context("the evaluate stage left no gate table")?;
                let winner = table
                    .winner
                    .as_ref()
                    .and_then(|w| record.candidates.iter().find(|c| &c.name == w))
                    .cloned();
                match winner {
                    Some(run) => {
                        let version = run.version.clone().context("the winner has no version")?;
                        let mut client = promote::admin(&args.server).await?;
                        // Resumed after the swap but before the record: already done.
                        let serving = promote::serving(&mut client, &args.server).await?;
                        if serving.version != version {
                            // The training folder: the model and its manifest go to the registry.
                            promote::apply(&args.promote_args(&run.dir, &frozen), &version).await?;
                        }
                        record.candidate_version = Some(version.clone());
                        record.promoted = true;
                        record.status = CycleStatus::Promoted;
                        println!("  `{version}` ({}) now serves `{}`", run.name, args.server.slot);
                    }
                    None => {
                        record.status = CycleStatus::Rejected;
                        println!("  {}; `{}` is untouched", table.summary, args.server.slot);
                    }
                }
            }
            other => anyhow::bail!("unknown cycle stage `{other}`"),
        }
        finish_stage(journal, record, stage, t)?;
    }
    Ok(())
}

/// The experts the server routes to: a model must be trained for exactly them.
async fn server_experts(args: &CycleArgs) -> anyhow::Result<Vec<String>> {
    Ok(promote::admin(&args.server)
        .await?
        .status(flywheel_proto::v1::StatusRequest {})
        .await
        .context("asking the server for its experts")?
        .into_inner()
        .experts)
}

/// Train every candidate not trained yet (a resumed cycle skips those its
/// record has), recording each outcome as it ends.
async fn train_stage(
    args: &CycleArgs,
    journal: &CycleJournal,
    record: &mut CycleRecord,
    gold: &Path,
    frozen: &Path,
) -> anyhow::Result<()> {
    let specs = args.candidate_specs()?;
    let experts = server_experts(args).await?;
    let mut client = promote::admin(&args.server).await?;
    let incumbent = promote::serving(&mut client, &args.server).await?;
    // Chosen once per cycle (a resumed one keeps its teacher); the
    // evaluation measures agreement with the same model.
    let teacher = match &record.teacher {
        Some(t) => t.clone(),
        None => gate::choose_teacher(
            args.teacher.as_deref(),
            &args.registry_dir,
            &args.server.slot,
            Path::new(&incumbent.path),
        )?,
    };
    record.teacher = Some(teacher.clone());
    let trained = flywheel_router::models::task::read_task(&teacher)
        .with_context(|| format!("reading the teacher {}", teacher.display()))?
        .is_some();
    if specs.iter().any(|s| s.distils(trained)) {
        println!("  teacher: {}", teacher.display());
    }
    let teaching = Teaching {
        teacher: &teacher,
        trained,
        frozen,
    };
    for spec in &specs {
        if record.candidates.iter().any(|c| c.name == spec.name) {
            continue;
        }
        let run = candidates::train_one(args, record, spec, gold, &experts, &teaching).await;
        record.candidates.push(run);
        record.updated_unix_ms = now_ms();
        journal.write(record)?;
    }
    let failed: Vec<String> = record
        .candidates
        .iter()
        .filter_map(|c| c.error.as_ref().map(|e| format!("{}: {e}", c.name)))
        .collect();
    anyhow::ensure!(
        failed.len() < record.candidates.len(),
        "every candidate failed to train: {}",
        failed.join("; ")
    );
    Ok(())
}

/// Evaluate the incumbent and the candidates on the frozen split and apply the Pareto gate.
async fn evaluate_stage(
    args: &CycleArgs,
    journal: &CycleJournal,
    record: &CycleRecord,
    frozen: &Path,
) -> anyhow::Result<(gate::GateReport, flywheel_router::data::journal::CycleGate)> {
    let mut client = promote::admin(&args.server).await?;
    let incumbent = promote::serving(&mut client, &args.server).await?;
    let setup = eval::EvalSetup::new(args.server_config.as_deref(), args.device)?;
    let teacher = record
        .teacher
        .as_deref()
        .filter(|_| record.candidates.iter().any(|c| c.distilled));
    let spec = ParetoSpec {
        tolerance: args.tolerance,
        cost: args.cost,
        max_p99_ms: args.max_p99_ms,
    };
    let known = gate::earlier_reports(journal, &args.server.slot, GATE_REPORT)?;
    gate::evaluate(
        frozen,
        Path::new(&incumbent.path),
        &record.candidates,
        teacher,
        &setup,
        spec,
        &known,
    )
    .await
}

fn finish_stage(journal: &CycleJournal, record: &mut CycleRecord, stage: &str, t: Instant) -> anyhow::Result<()> {
    record.stages.push(StageTime {
        stage: stage.into(),
        seconds: t.elapsed().as_secs_f64(),
    });
    record.updated_unix_ms = now_ms();
    journal.write(record)?;
    Ok(())
}

async fn curate_stage(
    args: &CycleArgs,
    record: &CycleRecord,
    out: &Path,
    frozen: &Path,
) -> anyhow::Result<CycleDataset> {
    let frozen_exists = frozen.is_file();
    let opts = CurateOptions {
        log: Some(args.log.clone()),
        out: out.to_path_buf(),
        filters: Filters {
            until_ms: Some(record.log_until_ms),
            ..Filters::default()
        },
        imports: Vec::new(),
        columns: curate::dataset::Columns {
            text: "text".into(),
            label: "label".into(),
        },
        frozen_test: frozen_exists.then(|| frozen.to_path_buf()),
        review_out: None,
        spec: CurationSpec {
            test_fraction: args.test_fraction,
            ..CurationSpec::default()
        },
    };
    opts.spec.validate()?;
    let manifest = curate::run(&opts, None).await.context("curating the log")?;
    let test_file = out.join("test.jsonl");
    if !frozen_exists {
        // The first cycle's test split stays the test split of every later cycle.
        let tmp = frozen.with_extension("jsonl.tmp");
        std::fs::copy(&test_file, &tmp).with_context(|| format!("copying {}", test_file.display()))?;
        std::fs::rename(&tmp, frozen).with_context(|| format!("writing {}", frozen.display()))?;
    }
    let count = |name: &str| manifest.splits.get(name).map_or(0, |s| s.total);
    let dataset = CycleDataset {
        dir: out.to_path_buf(),
        train: count("train"),
        test: count("test"),
        manifest_sha256: curate::export::sha256_file(&out.join(MANIFEST))?,
    };
    println!(
        "  {} labelled requests -> {} train / {} test examples (frozen test: {})",
        manifest.selection.labelled.values().sum::<usize>(),
        dataset.train,
        dataset.test,
        frozen.display()
    );
    Ok(dataset)
}

/// Run `flywheel-trainer cycle`: once, or on the cadence until `max_cycles`.
///
/// # Errors
/// As [`run_once`], and an unreadable log.
pub async fn run(args: &CycleArgs) -> anyhow::Result<Vec<CycleRecord>> {
    if args.every_labels.is_none() && args.every.is_none() {
        let record = run_once(args).await?;
        print_record(&record);
        return Ok(vec![record]);
    }
    let journal = CycleJournal::open(&args.registry_dir)?;
    let mut done = Vec::new();
    let mut last_start = Instant::now();
    let mut last_labels = journal
        .list()?
        .into_iter()
        .find(|r| r.slot == args.server.slot)
        .map_or(0, |r| r.labels_seen);
    loop {
        let labels = feedback_rows(&args.log)?;
        let by_labels = args
            .every_labels
            .is_some_and(|n| labels.saturating_sub(last_labels) >= n);
        let by_time = args.every.is_some_and(|d| last_start.elapsed() >= d);
        if by_labels || by_time {
            let mut a = args.clone();
            a.trigger = if by_labels { "labels" } else { "interval" }.into();
            last_start = Instant::now();
            let record = run_once(&a).await?;
            print_record(&record);
            last_labels = record.labels_seen.max(labels);
            done.push(record);
            if args.max_cycles.is_some_and(|m| done.len() >= m) {
                return Ok(done);
            }
        }
        tokio::time::sleep(args.poll).await;
    }
}

fn print_record(r: &CycleRecord) {
    let stages: Vec<String> = r
        .stages
        .iter()
        .map(|s| format!("{} {:.0}s", s.stage, s.seconds))
        .collect();
    println!(
        "cycle {}: {}{} [{}]",
        r.id,
        r.status.as_str(),
        r.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default(),
        stages.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::ModelReport;

    fn args(root: &Path) -> CycleArgs {
        CycleArgs {
            server: ServerArgs {
                // Nothing listens here: a resumed cycle refused by the gate needs no server.
                server: "http://127.0.0.1:9".into(),
                admin_token: "t".repeat(16),
                slot: "router".into(),
            },
            log: root.join("requests.db"),
            registry_dir: root.join("registry"),
            work_dir: root.join("cycles"),
            server_config: None,
            device: eval::DeviceArg::default(),
            candidates_file: None,
            candidates: Vec::new(),
            teacher: None,
            cost: CostMeasure::P50,
            training: TrainingKnobs {
                kind: flywheel_router::engine::ModelKind::LabelScoring,
                base: root.join("base.gguf"),
                epochs: Some(1),
                trained_blocks: Some(1),
                keep_layers: None,
                max_train_examples: None,
                seed: 0,
                quiet: true,
            },
            test_fraction: 0.4,
            min_examples: 1,
            tolerance: 0.01,
            max_p99_ms: None,
            every_labels: None,
            every: None,
            poll: Duration::from_secs(1),
            max_cycles: None,
            trigger: "manual".into(),
        }
    }

    fn model(version: &str, accuracy: f64) -> ModelReport {
        ModelReport {
            n: 10,
            ..ModelReport::fixture(version, accuracy, 1.0, 2.0)
        }
    }

    #[tokio::test]
    async fn an_interrupted_cycle_resumes_at_its_first_unfinished_stage() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path());
        let journal = CycleJournal::open(&args.registry_dir).unwrap();
        // A cycle that died after evaluating: its record still says running.
        let work = args.work_dir.join("cycle-1");
        std::fs::create_dir_all(&work).unwrap();
        let mut dead = CycleRecord::new("cycle-1".into(), "manual", "router", 1, work.clone());
        for stage in ["curate", "train", "evaluate"] {
            dead.stages.push(StageTime {
                stage: stage.into(),
                seconds: 1.0,
            });
        }
        let incumbent = model("base", 0.8);
        let candidates = vec![("label-scoring".to_string(), model("ft-1", 0.5))];
        let spec = ParetoSpec {
            tolerance: 0.01,
            cost: CostMeasure::P50,
            max_p99_ms: None,
        };
        let decision = crate::pareto::choose(&candidates, &incumbent, spec);
        dead.gate = Some(gate::table(&decision, &candidates, &incumbent, None, None, &[]));
        journal.write(&dead).unwrap();
        let record = run_once(&args).await.unwrap();
        assert_eq!(record.id, "cycle-1");
        assert_eq!(record.resumed, 1);
        assert_eq!(record.status, CycleStatus::Rejected, "{record:?}");
        assert_eq!(record.stages.len(), 4);
        assert!(!record.promoted && record.finished_unix_ms.is_some());
        assert_eq!(journal.get("cycle-1").unwrap(), record);
    }

    #[tokio::test]
    async fn a_second_cycle_is_refused_while_one_runs() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path());
        let held = CycleJournal::open(&args.registry_dir).unwrap().lock().unwrap();
        let err = run_once(&args).await.unwrap_err();
        assert!(err.to_string().contains("another flywheel cycle is running"), "{err}");
        drop(held);
    }

    #[tokio::test]
    async fn a_second_cycle_on_another_machine_sharing_the_store_is_refused() {
        let Some(url) = flywheel_router::testing::postgres_database() else {
            return;
        };
        // The running cycle holds the store's lock (its registry, and so its
        // file lock, is elsewhere); this trainer has a registry of its own.
        let held = StoreCycleLock::try_take(&url).await.unwrap().expect("a free lock");
        let dir = tempfile::tempdir().unwrap();
        let mut second = args(dir.path());
        second.log = url.clone().into();
        let err = run_once(&second).await.unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("another flywheel cycle is running on the store"),
            "{message}"
        );
        assert!(!message.contains("password"), "{message}");
        drop(held);
    }

    #[test]
    fn the_device_reaches_training_and_the_gate() {
        use flywheel_router::device::DeviceChoice;
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.device.choice = Some(DeviceChoice::Auto);
        let spec = &a.candidate_specs().unwrap()[0];
        let train = candidates::train_args(&a, spec, Path::new("train.jsonl"), Path::new("out"), &[]).unwrap();
        assert_eq!(train.device, DeviceChoice::Auto);
        let gate = a.promote_args(Path::new("out"), Path::new("test.jsonl"));
        assert_eq!(gate.device.choice, Some(DeviceChoice::Auto));
    }

    #[test]
    fn durations_parse_with_units_and_refuse_others() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("6h").unwrap(), Duration::from_secs(21_600));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("m").is_err());
    }
}
