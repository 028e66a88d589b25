//! `flywheel-trainer distill`: a classifier router (the student) trained on
//! gold labels plus a teacher router's distributions over unlabelled queries
//! (logged traffic is free labels once a good router has scored it).
//!
//! 1. Gold: `--data`, read and sampled as `train` reads it.
//! 2. Unlabelled: the text column of every `--unlabelled` file (any label
//!    column is ignored) and the queries of the `--log`, less repeats of a
//!    gold query or of each other, `--max-unlabelled` of them sampled with
//!    the seed.
//! 3. Nothing of an `--exclude` file (a frozen test split) trains: gold and
//!    unlabelled queries that are duplicates or near-duplicates of its
//!    queries (MinHash, the curation settings) are dropped.
//! 4. The teacher (any router kind the server serves, loaded as `eval` loads
//!    it) scores every query, [`TEACHER_CONCURRENCY`] at a time so a
//!    classifier teacher batches them; a logged query the teacher's own
//!    version decided keeps its logged scores. Unlabelled queries it turns away (its
//!    out-of-scope rule) are left out: they are no expert's examples.
//! 5. The student ([`crate::finetune::encoder`] or
//!    [`crate::finetune::decoder`], all of `train`'s flags) trains toward
//!    each gold label with weight `--gold-weight` and toward the teacher's
//!    distribution softened by `--temperature` with weight
//!    `--teacher-weight` ([`crate::finetune::targets`]); its manifest
//!    records the teacher and which rows it labelled (the gold rows first).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use flywheel_router::agents::{RouteDecision, RouterAgent};
use flywheel_router::data::log::LogReader;
use flywheel_router::data::similarity::{DEFAULT_SHINGLE, NearDupIndex, normalize};
use flywheel_router::engine::ModelKind;
use futures::StreamExt;
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::curate::DEFAULT_NEAR_DUP_THRESHOLD;
use crate::curate::dataset::{Example, LabelSource, read_texts};
use crate::eval::{DeviceArg, EvalSetup, load_router};
use crate::finetune::encoder::ClassifierManifest;
use crate::finetune::manifest::Distillation;
use crate::finetune::targets::{Supervised, soften};
use crate::finetune::{TrainArgs, TrainingData, decoder, encoder, read_training_data};

/// Queries the teacher scores at once.
pub const TEACHER_CONCURRENCY: usize = 32;

/// `flywheel-trainer distill`.
#[derive(Debug, Clone, clap::Args)]
pub struct DistillArgs {
    /// The student: `train`'s flags (`--data` is the gold file, `--kind` the
    /// student's kind: `encoder-classifier` or `decoder-classifier`).
    #[command(flatten)]
    pub train: TrainArgs,
    /// The teacher: a router model of any kind (GGUF file or classifier folder)
    /// trained for the gold data's labels, or a base model that routes zero-shot.
    #[arg(long)]
    pub teacher: PathBuf,
    /// Unlabelled queries (JSONL or CSV; repeatable), e.g. exported traffic.
    #[arg(long = "unlabelled")]
    pub unlabelled: Vec<PathBuf>,
    /// The server's request log (SQLite file or `postgres://` URL): its logged queries are unlabelled
    /// traffic too, and the decisions the teacher's own version made there
    /// are used as logged instead of being scored again.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Text column of the `--unlabelled` files.
    #[arg(long, default_value = "text")]
    pub unlabelled_text_column: String,
    /// Use at most this many unlabelled queries, sampled with the seed.
    #[arg(long)]
    pub max_unlabelled: Option<usize>,
    /// Files whose queries (and their near-duplicates) must not train, e.g.
    /// the frozen test split (repeatable; read with `--text-column`).
    #[arg(long = "exclude")]
    pub exclude: Vec<PathBuf>,
    /// Temperature softening the teacher's distributions (1: as they are).
    #[arg(long, default_value_t = 2.0)]
    pub temperature: f32,
    /// Loss weight of each gold example.
    #[arg(long, default_value_t = 1.0)]
    pub gold_weight: f32,
    /// Loss weight of each teacher-labelled example.
    #[arg(long, default_value_t = 1.0)]
    pub teacher_weight: f32,
    /// Server config whose router entry loads the teacher (and whose
    /// instructions prompt a base teacher), as for `eval`.
    #[arg(long)]
    pub server_config: Option<PathBuf>,
    /// Only requests logged before this Unix ms (a cycle's window).
    #[arg(skip)]
    pub log_until_ms: Option<i64>,
}

impl DistillArgs {
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.train.kind.is_classifier(),
            "distill trains classifier students: --kind encoder-classifier or decoder-classifier, not {}",
            self.train.kind
        );
        anyhow::ensure!(
            self.temperature.is_finite() && self.temperature > 0.0,
            "--temperature must be a positive number, not {}",
            self.temperature
        );
        for (flag, w) in [
            ("--gold-weight", self.gold_weight),
            ("--teacher-weight", self.teacher_weight),
        ] {
            anyhow::ensure!(w.is_finite() && w >= 0.0, "{flag} must be a number >= 0, not {w}");
        }
        anyhow::ensure!(
            self.gold_weight + self.teacher_weight > 0.0,
            "--gold-weight and --teacher-weight cannot both be 0"
        );
        anyhow::ensure!(self.max_unlabelled != Some(0), "--max-unlabelled must be at least 1");
        anyhow::ensure!(
            !self.unlabelled.is_empty() || self.log.is_some(),
            "nothing to distil from: give --unlabelled files, a --log, or both"
        );
        match self.train.kind {
            ModelKind::DecoderClassifier => decoder::check(&self.train)?,
            _ => encoder::check_oos_accuracy_loss(&self.train)?,
        }
        Ok(())
    }
}

/// Run `flywheel-trainer distill`.
///
/// # Errors
/// Unusable settings or data, a teacher that cannot route the gold labels,
/// training failures.
pub async fn run(args: &DistillArgs) -> anyhow::Result<ClassifierManifest> {
    args.check()?;
    let mut gold = read_training_data(&args.train)?;
    let names = gold.labels.names().to_vec();

    // Queries that must not train.
    let mut frozen = NearDupIndex::new(DEFAULT_SHINGLE, DEFAULT_NEAR_DUP_THRESHOLD);
    for path in &args.exclude {
        for t in read_texts(path, &args.train.text_column)? {
            frozen.insert(&t);
        }
    }
    let excluded = |t: &str| !frozen.is_empty() && !frozen.matches(t).is_empty();
    let before = gold.examples.len();
    gold.examples.retain(|e| !excluded(&e.text));
    let mut dropped_excluded = before - gold.examples.len();

    // Unlabelled queries, each with the decision logged for it (if any).
    let mut queries: Vec<(String, Option<RouteDecision>)> = Vec::new();
    for path in &args.unlabelled {
        queries.extend(
            read_texts(path, &args.unlabelled_text_column)?
                .into_iter()
                .map(|t| (t, None)),
        );
    }
    if let Some(log) = &args.log {
        let reader = LogReader::open(log).with_context(|| {
            format!(
                "opening the request log {}",
                flywheel_router::data::log::LogLocation::from(log)
            )
        })?;
        queries.extend(
            reader
                .records_between(0, args.log_until_ms.unwrap_or(i64::MAX))?
                .into_iter()
                .filter(|r| !r.query.is_empty())
                .map(|r| (r.query, r.route)),
        );
    }
    let rows = queries.len();
    // The teacher is known before the queries are deduplicated: of a query
    // asked several times, the copy the teacher itself decided is kept.
    let setup = EvalSetup::new(
        args.server_config.as_deref(),
        DeviceArg {
            choice: Some(args.train.device),
        },
    )?;
    let started = Instant::now();
    let (agent, served) = load_router(&args.teacher, &names, &setup)
        .await
        .context("loading the teacher")?;
    let teacher_version = served.version.clone();
    let teacher_kind = served.kind();
    let by_teacher = |d: &Option<RouteDecision>| {
        d.as_ref()
            .is_some_and(|d| logged_score(d, &teacher_version, &names).is_some())
    };
    let decided: HashMap<String, TeacherScore> = queries
        .iter()
        .filter_map(|(t, d)| {
            d.as_ref()
                .and_then(|d| logged_score(d, &teacher_version, &names))
                .map(|s| (normalize(t), s))
        })
        .collect();
    let gold_texts: HashSet<String> = gold.examples.iter().map(|e| normalize(&e.text)).collect();
    let mut first: HashMap<String, usize> = HashMap::new();
    let mut unlabelled: Vec<(String, Option<RouteDecision>)> = Vec::new();
    let mut dropped_repeats = 0usize;
    for (t, logged) in queries {
        let key = normalize(&t);
        if excluded(&t) {
            dropped_excluded += 1;
        } else if gold_texts.contains(&key) {
            dropped_repeats += 1;
        } else if let Some(&i) = first.get(&key) {
            dropped_repeats += 1;
            if by_teacher(&logged) && !by_teacher(&unlabelled[i].1) {
                unlabelled[i] = (t, logged);
            }
        } else {
            first.insert(key, unlabelled.len());
            unlabelled.push((t, logged));
        }
    }
    if let Some(n) = args.max_unlabelled {
        unlabelled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.train.seed));
        unlabelled.truncate(n);
    }
    anyhow::ensure!(
        !unlabelled.is_empty(),
        "no unlabelled query is left to distil from ({rows} rows read, {dropped_repeats} repeats, \
         {dropped_excluded} excluded)"
    );

    // The teacher's own logged decisions stand (gold queries asked again
    // count too); the rest it scores now: the gold queries for its
    // agreement, the unlabelled ones to learn from.
    let gold_logged: Vec<Option<TeacherScore>> = gold
        .examples
        .iter()
        .map(|e| decided.get(&normalize(&e.text)).cloned())
        .collect();
    let gold_texts: Vec<&str> = gold.examples.iter().map(|e| e.text.as_str()).collect();
    let on_gold = complete_scores(&agent, &names, &gold_texts, gold_logged, args.train.quiet).await?;
    let logged: Vec<Option<TeacherScore>> = unlabelled
        .iter()
        .map(|(_, d)| d.as_ref().and_then(|d| logged_score(d, &teacher_version, &names)))
        .collect();
    let logged_scores = logged.iter().flatten().count();
    let texts: Vec<&str> = unlabelled.iter().map(|(t, _)| t.as_str()).collect();
    let scored = complete_scores(&agent, &names, &texts, logged, args.train.quiet).await?;
    let teacher_seconds = started.elapsed().as_secs_f64();
    drop((agent, served));

    let agree = gold
        .examples
        .iter()
        .zip(&on_gold)
        .filter(|(e, s)| names[top(&s.probs)] == e.label)
        .count();
    let gold_examples = gold.examples.len();
    let mut supervised = Supervised::gold(gold);
    for t in supervised.targets.weights_mut() {
        *t = args.gold_weight;
    }
    let mut teacher_labelled = 0usize;
    for ((text, _), s) in unlabelled.into_iter().zip(scored) {
        if s.turned_away {
            continue;
        }
        supervised.data.examples.push(Example {
            text,
            label: names[top(&s.probs)].clone(),
            source: LabelSource::Teacher,
            request_id: None,
        });
        supervised
            .targets
            .push_soft(&soften(&s.probs, args.temperature), args.teacher_weight);
        teacher_labelled += 1;
    }
    recount(&mut supervised.data);
    supervised.distillation = Some(Distillation {
        teacher: args.teacher.display().to_string(),
        teacher_version,
        teacher_kind,
        temperature: args.temperature,
        gold_weight: args.gold_weight,
        teacher_weight: args.teacher_weight,
        gold_examples,
        teacher_labelled,
        unlabelled_rows: rows,
        dropped_repeats,
        dropped_excluded,
        teacher_gold_agreement: agree as f64 / gold_examples.max(1) as f64,
        teacher_seconds,
        logged_scores,
    });
    tracing::info!(
        gold = gold_examples,
        teacher_labelled,
        teacher_seconds,
        "training the student"
    );
    let train = args.train.clone();
    let examples = supervised.data.examples.clone();
    let manifest = tokio::task::spawn_blocking(move || match train.kind {
        ModelKind::DecoderClassifier => decoder::train(&train, supervised),
        _ => encoder::train(&train, supervised),
    })
    .await??;
    // The training set as trained on: gold rows first, then the teacher's.
    crate::curate::export::jsonl(&args.train.out, TRAINING_SET, &examples)?;
    Ok(manifest)
}

/// The file in the output folder that lists the examples trained on.
pub const TRAINING_SET: &str = "distilled.jsonl";

/// A teacher's view of one query.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherScore {
    /// Probability of each label, in the student's label order.
    pub probs: Vec<f32>,
    /// The teacher turned the query away (out of scope).
    pub turned_away: bool,
}

/// The teacher's distribution over `labels` for each of `texts`, scored
/// [`TEACHER_CONCURRENCY`] at a time, with a progress bar.
///
/// # Errors
/// A decision that fails, or that names no score for one of `labels`.
pub async fn teacher_scores(
    agent: &RouterAgent,
    labels: &[String],
    texts: &[&str],
    quiet: bool,
) -> anyhow::Result<Vec<TeacherScore>> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(texts.len() as u64)
    };
    let decisions: Vec<_> = futures::stream::iter(texts.iter().map(|t| agent.decide(t)))
        .buffered(TEACHER_CONCURRENCY)
        .inspect(|_| bar.inc(1))
        .collect()
        .await;
    bar.finish_and_clear();
    decisions
        .into_iter()
        .map(|d| {
            let d = d.context("the teacher failed to score a query")?;
            let probs = labels
                .iter()
                .map(|l| {
                    d.scores
                        .iter()
                        .find(|s| &s.expert == l)
                        .map(|s| s.probability)
                        .with_context(|| format!("the teacher gave no score for `{l}`"))
                })
                .collect::<anyhow::Result<Vec<f32>>>()?;
            Ok(TeacherScore {
                probs,
                turned_away: d.fallback,
            })
        })
        .collect()
}

/// Each text's score: `known[i]` where given, the rest scored by the teacher now.
///
/// # Errors
/// As [`teacher_scores`].
async fn complete_scores(
    agent: &RouterAgent,
    labels: &[String],
    texts: &[&str],
    known: Vec<Option<TeacherScore>>,
    quiet: bool,
) -> anyhow::Result<Vec<TeacherScore>> {
    let missing: Vec<&str> = texts
        .iter()
        .zip(&known)
        .filter(|(_, k)| k.is_none())
        .map(|(t, _)| *t)
        .collect();
    let mut fresh = teacher_scores(agent, labels, &missing, quiet).await?.into_iter();
    known
        .into_iter()
        .map(|k| k.or_else(|| fresh.next()))
        .collect::<Option<_>>()
        .context("the teacher scored fewer queries than it was given")
}

/// The teacher's distribution as `decision` logged it, when the teacher's
/// version (`teacher`) made it and it scored every one of `labels`.
fn logged_score(decision: &RouteDecision, teacher: &str, labels: &[String]) -> Option<TeacherScore> {
    if decision.forced || decision.router_model_version != teacher {
        return None;
    }
    let probs = labels
        .iter()
        .map(|l| decision.scores.iter().find(|s| &s.expert == l).map(|s| s.probability))
        .collect::<Option<Vec<f32>>>()?;
    Some(TeacherScore {
        probs,
        turned_away: decision.fallback,
    })
}

fn top(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Recount `data`'s examples per label after teacher-labelled ones were added.
fn recount(data: &mut TrainingData) {
    data.label_counts.clear();
    for e in &data.examples {
        *data.label_counts.entry(e.label.clone()).or_default() += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::path::Path;

    use flywheel_router::engine::classifier::{BatchSettings, Classifier};

    use super::*;
    use crate::finetune::tests::{encoder_dir, train_args};

    const LABELS: [&str; 3] = ["alarm", "reminder", "calendar"];

    /// What the teacher learned from (and the student sees unlabelled).
    const TRAFFIC: [(&str, usize); 24] = [
        ("wake me up at seven", 0),
        ("set an alarm for 6 am", 0),
        ("cancel my morning alarm", 0),
        ("snooze the alarm for ten minutes", 0),
        ("turn off all my alarms", 0),
        ("I need to get up early tomorrow so ring at five", 0),
        ("make a loud noise at half past six to get me out of bed", 0),
        ("delete the alarm for monday", 0),
        ("remind me to call my mother tonight", 1),
        ("don't let me forget to buy milk", 1),
        ("tell me to take my pills after lunch", 1),
        ("remind me about the rent on the first", 1),
        ("nudge me to water the plants this evening", 1),
        ("I must not forget to email the landlord", 1),
        ("ping me to stretch every hour", 1),
        ("remind me to pick up the kids at three", 1),
        ("what meetings do I have tomorrow", 2),
        ("schedule lunch with anna on friday", 2),
        ("add the dentist appointment to my agenda", 2),
        ("move my 3 pm meeting to four", 2),
        ("am I free on saturday afternoon", 2),
        ("book a call with the team next week", 2),
        ("what is on my schedule today", 2),
        ("cancel the budget review on thursday", 2),
    ];

    /// Scarce gold: one query per label.
    const GOLD: [(&str, usize); 3] = [
        ("alarm at noon please", 0),
        ("remind me to call bob", 1),
        ("create an event", 2),
    ];

    /// The frozen test split.
    const TEST: [(&str, usize); 9] = [
        ("get me up at 8 tomorrow morning", 0),
        ("stop the buzzer that rings at nine", 0),
        ("I want a wake up call at five thirty", 0),
        ("don't let me forget the gym at six", 1),
        ("I have to send the invoice later so tell me", 1),
        ("make sure I remember to feed the cat", 1),
        ("do I have anything on monday morning", 2),
        ("put a meeting with sales on my agenda for noon", 2),
        ("when is my next appointment", 2),
    ];

    fn csv(path: &Path, rows: &[(&str, usize)]) {
        let body: String = std::iter::once("text,label".to_string())
            .chain(rows.iter().map(|(t, l)| format!("{t},{}", LABELS[*l])))
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(path, body).unwrap();
    }

    fn args(dir: &Path, data: &Path, out: &str) -> TrainArgs {
        let mut a = train_args(data, &LABELS.join(","));
        a.kind = ModelKind::EncoderClassifier;
        a.encoder = encoder_dir();
        a.out = dir.join(out);
        a.quiet = true;
        a
    }

    /// Accuracy on TEST and mean KL(teacher || model) there.
    async fn measure(model: &Path, teacher: &Classifier) -> (usize, f64) {
        let c = Classifier::load(model, BatchSettings::default(), &candle_core::Device::Cpu).unwrap();
        let mut right = 0;
        let mut kl = 0.0;
        for (text, label) in TEST {
            let s = c.classify(text).await.unwrap().log_probs;
            let t = teacher.classify(text).await.unwrap().log_probs;
            right += usize::from(top(&s) == label);
            kl += t
                .iter()
                .zip(&s)
                .map(|(tl, sl)| f64::from(tl.exp()) * f64::from(tl - sl))
                .sum::<f64>();
        }
        (right, kl / TEST.len() as f64)
    }

    /// Scarce gold plus a teacher's view of unlabelled traffic trains a
    /// student closer to the teacher, and more accurate, than the gold
    /// alone; the test split never trains, not even when it comes back as
    /// traffic (verbatim or nearly).
    #[tokio::test]
    async fn distilling_beats_scarce_gold_and_keeps_the_test_split_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        csv(&p("traffic-labelled.csv"), &TRAFFIC);
        csv(&p("gold.csv"), &GOLD);
        csv(&p("test.csv"), &TEST);
        // Live traffic: the teacher's queries, the test queries again, one
        // near-duplicate of a test query, and a repeat of a gold query.
        let mut traffic: Vec<String> = TRAFFIC.iter().map(|(t, _)| t.to_string()).collect();
        traffic.extend(TEST.iter().map(|(t, _)| t.to_string()));
        traffic.push("I want a wake up call at five thirty please".into());
        traffic.push("Remind me to call Bob".into());
        std::fs::write(p("traffic.csv"), format!("text\n{}", traffic.join("\n"))).unwrap();

        let teacher_args = args(dir.path(), &p("traffic-labelled.csv"), "teacher");
        encoder::run(&teacher_args).unwrap();
        let gold_only = encoder::run(&args(dir.path(), &p("gold.csv"), "gold-only")).unwrap();
        let d = DistillArgs {
            train: args(dir.path(), &p("gold.csv"), "student"),
            teacher: teacher_args.out.clone(),
            unlabelled: vec![p("traffic.csv")],
            log: None,
            unlabelled_text_column: "text".into(),
            max_unlabelled: None,
            exclude: vec![p("test.csv")],
            temperature: 2.0,
            gold_weight: 1.0,
            teacher_weight: 1.0,
            server_config: None,
            log_until_ms: None,
        };
        let student = run(&d).await.unwrap();
        let info = student.distillation.clone().unwrap();
        assert_eq!(
            (info.gold_examples, info.teacher_labelled, info.unlabelled_rows),
            (3, 24, 35)
        );
        assert_eq!((info.dropped_excluded, info.dropped_repeats), (10, 1), "{info:?}");
        assert_eq!(info.teacher_kind, ModelKind::EncoderClassifier);
        assert_eq!(student.data.examples, 27);
        assert!(gold_only.distillation.is_none());

        // The training set as trained on: no test query, nor its near-duplicate.
        let trained =
            crate::curate::dataset::read_examples(&d.train.out.join(TRAINING_SET), LabelSource::Import).unwrap();
        assert_eq!(trained.len(), 27);
        for (t, _) in TEST {
            assert!(trained.iter().all(|e| !e.text.starts_with(t)), "{t} was trained on");
        }
        assert_eq!(trained.iter().filter(|e| e.source == LabelSource::Teacher).count(), 24);

        let teacher = Classifier::load(&teacher_args.out, BatchSettings::default(), &candle_core::Device::Cpu).unwrap();
        let (gold_right, gold_kl) = measure(&gold_only_path(&d), &teacher).await;
        let (student_right, student_kl) = measure(&d.train.out, &teacher).await;
        assert!(
            student_kl < gold_kl * 0.5,
            "KL to the teacher: distilled {student_kl:.3}, gold only {gold_kl:.3}"
        );
        assert!(
            student_right > gold_right,
            "test accuracy: distilled {student_right}/9, gold only {gold_right}/9"
        );
    }

    fn gold_only_path(d: &DistillArgs) -> std::path::PathBuf {
        d.train.out.with_file_name("gold-only")
    }

    /// A pruned decoder (two blocks of the real SmolLM2) learns from an
    /// encoder teacher: the student is a decoder classifier the server loads,
    /// and it agrees with the teacher on most of the traffic it was taught.
    #[tokio::test]
    async fn a_pruned_decoder_student_learns_from_an_encoder_teacher() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        csv(&p("traffic-labelled.csv"), &TRAFFIC);
        csv(&p("gold.csv"), &GOLD);
        let traffic: Vec<&str> = TRAFFIC.iter().map(|(t, _)| *t).collect();
        std::fs::write(p("traffic.csv"), format!("text\n{}", traffic.join("\n"))).unwrap();
        let teacher_args = args(dir.path(), &p("traffic-labelled.csv"), "teacher");
        encoder::run(&teacher_args).unwrap();

        let mut student = args(dir.path(), &p("gold.csv"), "student");
        student.kind = ModelKind::DecoderClassifier;
        student.base = flywheel_router::testing::test_model();
        student.keep_layers = Some(2);
        student.epochs = Some(6);
        student.batch_size = 4;
        student.lr = 2e-3;
        let d = DistillArgs {
            train: student,
            teacher: teacher_args.out.clone(),
            unlabelled: vec![p("traffic.csv")],
            log: None,
            unlabelled_text_column: "text".into(),
            max_unlabelled: None,
            exclude: Vec::new(),
            temperature: 2.0,
            gold_weight: 1.0,
            teacher_weight: 1.0,
            server_config: None,
            log_until_ms: None,
        };
        let m = run(&d).await.unwrap();
        assert_eq!(m.kind, ModelKind::DecoderClassifier);
        assert_eq!(m.decoder.as_ref().unwrap().blocks, 2);
        assert_eq!(m.distillation.as_ref().unwrap().teacher_labelled, TRAFFIC.len());
        let path = d.train.out.join("model.gguf");
        let c = Classifier::load(&path, BatchSettings::default(), &candle_core::Device::Cpu).unwrap();
        let teacher = Classifier::load(&teacher_args.out, BatchSettings::default(), &candle_core::Device::Cpu).unwrap();
        let mut agree = 0;
        for (text, _) in TRAFFIC {
            let s = c.classify(text).await.unwrap().log_probs;
            let t = teacher.classify(text).await.unwrap().log_probs;
            agree += usize::from(top(&s) == top(&t));
        }
        assert!(
            agree >= 20,
            "the student agrees with the teacher on {agree} of {}",
            TRAFFIC.len()
        );
    }

    fn decided(version: &str, probs: [f32; 3], forced: bool) -> RouteDecision {
        use flywheel_router::agents::ExpertScore;
        let best = top(&probs);
        RouteDecision {
            scores: LABELS
                .iter()
                .zip(probs)
                .map(|(l, p)| ExpertScore {
                    expert: l.to_string(),
                    probability: p,
                    logprob: p.ln(),
                })
                .collect(),
            router_model_version: version.into(),
            forced,
            confidence: probs[best],
            ..RouteDecision::forced(LABELS[best])
        }
    }

    /// A request log is traffic too: the queries the teacher's own version
    /// decided keep their logged scores (here deliberately unlike what the
    /// teacher would answer now), the others are scored by the teacher.
    #[tokio::test]
    async fn a_logs_queries_train_and_the_teachers_own_decisions_are_reused() {
        use flywheel_router::config::LogSpec;
        use flywheel_router::data::log::{RequestLog, RequestRecord};
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        csv(&p("traffic-labelled.csv"), &TRAFFIC);
        csv(&p("gold.csv"), &GOLD);
        let mut teacher_args = args(dir.path(), &p("traffic-labelled.csv"), "teacher");
        teacher_args.version = Some("teacher-v1".into());
        encoder::run(&teacher_args).unwrap();

        let log = RequestLog::open(&LogSpec {
            path: p("requests.db"),
            ..LogSpec::default()
        })
        .unwrap();
        let rows = [
            // The teacher's version decided it: "calendar", as logged.
            ("wake me up at seven", decided("teacher-v1", [0.1, 0.1, 0.8], false)),
            // Another version's decision: scored again by the teacher.
            ("set an alarm for 6 am", decided("base", [0.1, 0.1, 0.8], false)),
            // The caller chose the expert: no scores, scored by the teacher.
            (
                "what meetings do I have tomorrow",
                decided("teacher-v1", [0.0, 1.0, 0.0], true),
            ),
            // A gold query the teacher's version decided ("calendar", as
            // logged): its agreement with the gold label is read from the log.
            ("Alarm at noon, please", decided("teacher-v1", [0.1, 0.1, 0.8], false)),
            // Asked again later and decided by the teacher's version: this
            // copy is the one kept ("reminder", as logged).
            (
                "What meetings do I have tomorrow?",
                decided("teacher-v1", [0.1, 0.8, 0.1], false),
            ),
        ];
        for (i, (query, route)) in rows.iter().enumerate() {
            log.submit(RequestRecord {
                request_id: format!("r{i}"),
                kind: "route".into(),
                query: query.to_string(),
                status: "ok".into(),
                route: Some(route.clone()),
                ..RequestRecord::default()
            });
        }
        log.shutdown().await;

        let d = DistillArgs {
            train: args(dir.path(), &p("gold.csv"), "student"),
            teacher: teacher_args.out.clone(),
            unlabelled: Vec::new(),
            log: Some(p("requests.db")),
            unlabelled_text_column: "text".into(),
            max_unlabelled: None,
            exclude: Vec::new(),
            temperature: 1.0,
            gold_weight: 1.0,
            teacher_weight: 1.0,
            server_config: None,
            log_until_ms: None,
        };
        let m = run(&d).await.unwrap();
        let info = m.distillation.unwrap();
        assert_eq!(
            (
                info.unlabelled_rows,
                info.teacher_labelled,
                info.logged_scores,
                info.dropped_repeats
            ),
            (5, 3, 2, 2),
            "{info:?}"
        );
        // The teacher routes the other two gold queries as labelled.
        assert!((info.teacher_gold_agreement - 2.0 / 3.0).abs() < 1e-9, "{info:?}");
        let trained =
            crate::curate::dataset::read_examples(&d.train.out.join(TRAINING_SET), LabelSource::Import).unwrap();
        let label_of = |q: &str| trained.iter().find(|e| e.text == q).map(|e| e.label.clone());
        assert_eq!(label_of("wake me up at seven").as_deref(), Some("calendar"));
        assert_eq!(label_of("set an alarm for 6 am").as_deref(), Some("alarm"));
        assert_eq!(
            label_of("What meetings do I have tomorrow?").as_deref(),
            Some("reminder")
        );
        assert_eq!(label_of("what meetings do I have tomorrow"), None);
    }

    #[tokio::test]
    async fn settings_a_student_cannot_take_are_refused_before_any_work() {
        let mut a = DistillArgs {
            train: train_args(Path::new("missing.csv"), "a,b"),
            teacher: "missing".into(),
            unlabelled: vec!["missing.csv".into()],
            log: None,
            unlabelled_text_column: "text".into(),
            max_unlabelled: None,
            exclude: Vec::new(),
            temperature: 2.0,
            gold_weight: 1.0,
            teacher_weight: 1.0,
            server_config: None,
            log_until_ms: None,
        };
        let err = run(&a).await.unwrap_err().to_string();
        assert!(err.contains("--kind encoder-classifier or decoder-classifier"), "{err}");
        a.train.kind = ModelKind::EncoderClassifier;
        a.temperature = 0.0;
        let err = run(&a).await.unwrap_err().to_string();
        assert!(err.contains("--temperature"), "{err}");
        a.temperature = 1.0;
        a.gold_weight = 0.0;
        a.teacher_weight = 0.0;
        let err = run(&a).await.unwrap_err().to_string();
        assert!(err.contains("cannot both be 0"), "{err}");
        a.gold_weight = 1.0;
        a.unlabelled.clear();
        let err = run(&a).await.unwrap_err().to_string();
        assert!(err.contains("give --unlabelled files, a --log, or both"), "{err}");
    }
}
