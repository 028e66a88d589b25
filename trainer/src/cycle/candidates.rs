//! The candidates a cycle trains: a configured list (`--candidates`, a TOML
//! file of `[[candidate]]` tables, or the demo's own list), each trained on
//! the curated gold set and, for classifier kinds, distilled from a teacher
//! over the cycle's logged traffic ([`crate::distill`]). A candidate whose
//! training fails is recorded and skipped; the others go on.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use flywheel_router::data::journal::{CandidateRun, CycleRecord};
use flywheel_router::engine::ModelKind;
use flywheel_router::engine::classifier::Training;
use serde::{Deserialize, Serialize};

use super::CycleArgs;
use crate::distill::{self, DistillArgs};
use crate::finetune::{self, TrainArgs};

/// One candidate: a router kind and its training settings. Unset fields
/// take `train`'s defaults (or the cycle's flags: base, seed, sample size).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidateSpec {
    /// Name in the cycle's table and folder (letters, digits, `-`, `_`).
    pub name: String,
    /// Router kind.
    pub kind: ModelKind,
    /// Base GGUF of a label-scoring router or decoder classifier.
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// Encoder of an encoder classifier.
    #[serde(default)]
    pub encoder: Option<PathBuf>,
    /// Encoder classifiers: `head-only` or `end-to-end`.
    #[serde(default)]
    pub encoder_training: Option<Training>,
    /// Passes over the data.
    #[serde(default)]
    pub epochs: Option<usize>,
    /// Blocks trained.
    #[serde(default)]
    pub trained_blocks: Option<usize>,
    /// Keep only the first k blocks of the base.
    #[serde(default)]
    pub keep_layers: Option<usize>,
    /// Train the blocks' weights instead of LoRA adapters.
    #[serde(default)]
    pub full: bool,
    /// Peak learning rate.
    #[serde(default)]
    pub lr: Option<f64>,
    /// At most this many gold examples (stratified sample).
    #[serde(default)]
    pub max_examples: Option<usize>,
    /// Learn from the teacher's distributions over the logged traffic too
    /// (classifier kinds; default: yes when the teacher is a trained router).
    #[serde(default)]
    pub distil: Option<bool>,
    /// Softening of the teacher's distributions.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Loss weight of gold examples.
    #[serde(default)]
    pub gold_weight: Option<f32>,
    /// Loss weight of teacher-labelled examples.
    #[serde(default)]
    pub teacher_weight: Option<f32>,
    /// At most this many logged queries labelled by the teacher.
    #[serde(default)]
    pub max_unlabelled: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CandidatesFile {
    candidate: Vec<CandidateSpec>,
}

impl CandidateSpec {
    /// A candidate of `kind` with every setting at its default.
    pub fn new(name: &str, kind: ModelKind) -> Self {
        Self {
            name: name.into(),
            kind,
            base: None,
            encoder: None,
            encoder_training: None,
            epochs: None,
            trained_blocks: None,
            keep_layers: None,
            full: false,
            lr: None,
            max_examples: None,
            distil: None,
            temperature: None,
            gold_weight: None,
            teacher_weight: None,
            max_unlabelled: None,
        }
    }

    /// Whether it trains on the teacher too, given whether the teacher is a
    /// trained router (a zero-shot base model is no teacher by default).
    pub fn distils(&self, teacher_trained: bool) -> bool {
        self.distil.unwrap_or(self.kind.is_classifier() && teacher_trained)
    }
}

/// Read a `--candidates` file.
///
/// # Errors
/// Unreadable or malformed files, and the checks of [`check`].
pub fn read(path: &Path) -> anyhow::Result<Vec<CandidateSpec>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: CandidatesFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    check(&file.candidate).with_context(|| format!("in {}", path.display()))?;
    Ok(file.candidate)
}

/// At least one candidate, unique names usable as folder names, and
/// distillation only for the kinds that learn from distributions.
///
/// # Errors
/// The first rule broken, naming the candidate.
pub fn check(specs: &[CandidateSpec]) -> anyhow::Result<()> {
    anyhow::ensure!(!specs.is_empty(), "no candidate: add at least one [[candidate]] table");
    let mut names = HashSet::new();
    for s in specs {
        anyhow::ensure!(
            !s.name.is_empty()
                && s.name.len() <= 64
                && s.name != "incumbent"
                && s.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')),
            "candidate name `{}`: use 1-64 letters, digits, `-` or `_` (and not `incumbent`)",
            s.name
        );
        anyhow::ensure!(names.insert(&s.name), "two candidates are named `{}`", s.name);
        anyhow::ensure!(
            s.distil != Some(true) || s.kind.is_classifier(),
            "candidate `{}`: distil = true needs a classifier kind (encoder-classifier or \
             decoder-classifier); a {} router learns from gold labels only",
            s.name,
            s.kind
        );
    }
    Ok(())
}

/// Where a candidate's training writes.
pub fn out_dir(record: &CycleRecord, name: &str) -> PathBuf {
    record.work_dir.join("candidates").join(name)
}

/// `train`'s arguments for `spec` on the gold file `data`.
///
/// # Errors
/// Settings `train` refuses.
pub fn train_args(
    args: &CycleArgs,
    spec: &CandidateSpec,
    data: &Path,
    out: &Path,
    labels: &[String],
) -> anyhow::Result<TrainArgs> {
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: TrainArgs,
    }
    let k = &args.training;
    let mut argv: Vec<String> = vec![
        "train".into(),
        "--kind".into(),
        spec.kind.to_string(),
        "--data".into(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--base".into(),
        spec.base.as_ref().unwrap_or(&k.base).display().to_string(),
        "--seed".into(),
        k.seed.to_string(),
    ];
    let mut opt = |flag: &str, v: Option<String>| {
        if let Some(v) = v {
            argv.extend([flag.to_string(), v]);
        }
    };
    opt("--encoder", spec.encoder.as_ref().map(|p| p.display().to_string()));
    opt(
        "--encoder-training",
        spec.encoder_training.map(|t| match t {
            Training::HeadOnly => "head-only".to_string(),
            Training::EndToEnd => "end-to-end".to_string(),
        }),
    );
    opt("--epochs", spec.epochs.map(|v| v.to_string()));
    opt("--trained-blocks", spec.trained_blocks.map(|v| v.to_string()));
    opt("--keep-layers", spec.keep_layers.map(|v| v.to_string()));
    opt("--lr", spec.lr.map(|v| v.to_string()));
    opt(
        "--max-examples",
        spec.max_examples.or(k.max_train_examples).map(|v| v.to_string()),
    );
    opt("--labels", (!labels.is_empty()).then(|| labels.join(",")));
    opt("--device", args.device.choice.map(|d| d.to_string()));
    if spec.full {
        argv.push("--full".into());
    }
    if k.quiet {
        argv.push("--quiet".into());
    }
    Ok(Wrap::try_parse_from(argv)
        .with_context(|| format!("candidate `{}`: building the training settings", spec.name))?
        .args)
}

/// What a candidate learns from beyond its gold file.
pub struct Teaching<'a> {
    /// The teacher's model (file or folder).
    pub teacher: &'a Path,
    /// Whether it is a trained router.
    pub trained: bool,
    /// The frozen test split (never trains).
    pub frozen: &'a Path,
}

/// Train one candidate (gold only, or distilled) and describe the outcome;
/// a failure is the outcome's `error`, not an `Err`.
pub async fn train_one(
    args: &CycleArgs,
    record: &CycleRecord,
    spec: &CandidateSpec,
    gold: &Path,
    labels: &[String],
    teaching: &Teaching<'_>,
) -> CandidateRun {
    let dir = out_dir(record, &spec.name);
    let distilled = spec.distils(teaching.trained);
    let t = Instant::now();
    let result = train_inner(args, record, spec, gold, labels, teaching, &dir, distilled).await;
    let seconds = t.elapsed().as_secs_f64();
    match result {
        Ok(version) => {
            println!("  {}: {version} ({} s)", spec.name, seconds.round());
            CandidateRun {
                name: spec.name.clone(),
                kind: spec.kind.to_string(),
                dir,
                version: Some(version),
                distilled,
                seconds,
                error: None,
            }
        }
        Err(e) => {
            let error = format!("{e:#}");
            tracing::warn!(candidate = %spec.name, %error, "candidate failed; the others go on");
            println!("  {}: FAILED ({error})", spec.name);
            CandidateRun {
                name: spec.name.clone(),
                kind: spec.kind.to_string(),
                dir,
                version: None,
                distilled,
                seconds,
                error: Some(error),
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn train_inner(
    args: &CycleArgs,
    record: &CycleRecord,
    spec: &CandidateSpec,
    gold: &Path,
    labels: &[String],
    teaching: &Teaching<'_>,
    dir: &Path,
    distilled: bool,
) -> anyhow::Result<String> {
    let train = train_args(args, spec, gold, dir, labels)?;
    if distilled {
        let d = DistillArgs {
            train,
            teacher: teaching.teacher.to_path_buf(),
            unlabelled: Vec::new(),
            log: Some(args.log.clone()),
            unlabelled_text_column: "text".into(),
            max_unlabelled: spec.max_unlabelled,
            exclude: vec![teaching.frozen.to_path_buf()],
            temperature: spec.temperature.unwrap_or(2.0),
            gold_weight: spec.gold_weight.unwrap_or(1.0),
            teacher_weight: spec.teacher_weight.unwrap_or(1.0),
            server_config: args.server_config.clone(),
            log_until_ms: Some(record.log_until_ms),
        };
        let m = distill::run(&d).await?;
        return Ok(m.version);
    }
    if train.kind.is_classifier() {
        let m = tokio::task::spawn_blocking(move || match train.kind {
            ModelKind::DecoderClassifier => finetune::decoder::run(&train),
            _ => finetune::encoder::run(&train),
        })
        .await??;
        return Ok(m.version);
    }
    let manifest = finetune::run(&train).await?;
    anyhow::ensure!(
        manifest.training.final_train_accuracy.is_finite(),
        "training diverged (train accuracy is not a number)"
    );
    Ok(manifest.version)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_candidates_file_reads_and_bad_lists_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("candidates.toml");
        std::fs::write(
            &path,
            r#"
[[candidate]]
name = "encoder"
kind = "encoder-classifier"
encoder_training = "end-to-end"
epochs = 1

[[candidate]]
name = "decoder-12"
kind = "decoder-classifier"
keep_layers = 12
temperature = 3.0

[[candidate]]
name = "lora"
kind = "label-scoring"
"#,
        )
        .unwrap();
        let specs = read(&path).unwrap();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[0].encoder_training, Some(Training::EndToEnd));
        assert_eq!((specs[1].keep_layers, specs[1].temperature), (Some(12), Some(3.0)));
        // Classifiers distil from a trained teacher by default, never from a base model;
        // a label-scoring router never does.
        assert!(specs[0].distils(true) && !specs[0].distils(false));
        assert!(!specs[2].distils(true));

        let refuse = |text: &str, needle: &str| {
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", read(&path).unwrap_err());
            assert!(err.contains(needle), "{err}");
        };
        refuse("", "missing field `candidate`");
        refuse("candidate = []", "no candidate");
        refuse(
            "[[candidate]]\nname = \"a\"\nkind = \"encoder-classifier\"\n[[candidate]]\nname = \"a\"\nkind = \"label-scoring\"",
            "two candidates are named `a`",
        );
        refuse(
            "[[candidate]]\nname = \"../x\"\nkind = \"encoder-classifier\"",
            "candidate name `../x`",
        );
        refuse(
            "[[candidate]]\nname = \"x\"\nkind = \"label-scoring\"\ndistil = true",
            "distil = true needs a classifier kind",
        );
        refuse(
            "[[candidate]]\nname = \"x\"\nkind = \"encoder-classifier\"\nepoch = 2",
            "unknown field `epoch`",
        );
    }
}
