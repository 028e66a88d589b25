//! Guardrail jobs: build the jailbreak datasets from the shared data, train
//! the jailbreak head, and evaluate the rails on any labelled file
//! (`flywheel-trainer rails-data | train-rails | eval-rails`).

pub mod data;
pub mod eval;
pub mod train;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use flywheel_router::embed::Embedder;
use flywheel_router::guardrails::jailbreak::{Head, SIGNAL_COUNT};
use flywheel_router::guardrails::rails::{JailbreakDetector, RailSet, RailsSpec};

/// `flywheel-trainer rails-data`.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// The shared data folder (holds pyrit_jailbreak_templates/, hwu64/, banking77/, pii_presidio_synth/).
    #[arg(long, default_value = "../shared/data")]
    pub shared: PathBuf,
    /// Output folder for jailbreak_train.jsonl and jailbreak_test.jsonl.
    #[arg(long, default_value = "data/rails")]
    pub out: PathBuf,
    /// Seed of the template split.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `flywheel-trainer train-rails`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Training rows (JSONL/CSV with `text` and `label`: jailbreak / benign); repeatable.
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Embedder folder.
    #[arg(long, default_value = "models/all-minilm-l6-v2")]
    pub embedder: PathBuf,
    /// Where to write the head (JSON).
    #[arg(long, default_value = "router/assets/jailbreak_head.json")]
    pub out: PathBuf,
    /// Optimisation steps.
    #[arg(long, default_value_t = train::TrainSpec::default().steps)]
    pub steps: usize,
    /// False-positive rate allowed on benign training rows when picking the threshold.
    #[arg(long, default_value_t = train::TrainSpec::default().target_fpr)]
    pub target_fpr: f64,
    /// Folder of feature caches (one raw f32 file per data file), reused
    /// when a cache matches its file's row count.
    #[arg(long)]
    pub features_cache: Option<PathBuf>,
}

/// `flywheel-trainer eval-rails`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Labelled rows (JSONL/CSV with `text` and `label`).
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the JSON report.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Embedder folder.
    #[arg(long, default_value = "models/all-minilm-l6-v2")]
    pub embedder: PathBuf,
    /// A head file to evaluate instead of the built-in one.
    #[arg(long)]
    pub head: Option<PathBuf>,
    /// Jailbreak threshold (default: the head's).
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Presidio-format PII file for span recall/precision.
    #[arg(long)]
    pub pii_spans: Option<PathBuf>,
}

/// Build and write the jailbreak datasets.
///
/// # Errors
/// Missing shared files, I/O failures.
pub fn build_data(args: &DataArgs) -> anyhow::Result<()> {
    let (train, mut test) = data::jailbreak_sets(&data::SharedData::under(&args.shared), args.seed)?;
    let terse_train = data::terse(&train, args.seed);
    test.extend(data::terse(&test, args.seed));
    let (hard_train, hard_test) = data::hard_cases(args.seed);
    test.extend(hard_test);
    data::write_rows(&args.out.join("jailbreak_train.jsonl"), &train)?;
    data::write_rows(&args.out.join("jailbreak_train_terse.jsonl"), &terse_train)?;
    data::write_rows(&args.out.join("jailbreak_train_hard.jsonl"), &hard_train)?;
    data::write_rows(&args.out.join("jailbreak_test.jsonl"), &test)?;
    println!(
        "wrote {} (train {:?}) and {} (test {:?})",
        args.out.join("jailbreak_train.jsonl").display(),
        data::label_counts(&train),
        args.out.join("jailbreak_test.jsonl").display(),
        data::label_counts(&test)
    );
    Ok(())
}

/// Train the head and write it.
///
/// # Errors
/// Unreadable data or embedder, training failures.
pub fn train_head(args: &TrainArgs) -> anyhow::Result<Head> {
    let embedder = Embedder::load(&args.embedder)?;
    let started = std::time::Instant::now();
    let (mut rows, mut x) = (Vec::new(), Vec::new());
    for file in &args.data {
        let part = data::read_rows(file)?;
        eprintln!("embedding {} rows of {} ...", part.len(), file.display());
        let cache = match &args.features_cache {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let stem = file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Some(dir.join(format!("{stem}.features")))
            }
            None => None,
        };
        x.extend(train::features_cached(&embedder, &part, cache.as_deref())?);
        rows.extend(part);
    }
    let embed_s = started.elapsed().as_secs_f64();
    let spec = train::TrainSpec {
        steps: args.steps,
        target_fpr: args.target_fpr,
        ..train::TrainSpec::default()
    };
    let mut head = train::train(&x, &rows, &spec, "all-MiniLM-L6-v2")?;
    let scores: Vec<(bool, f32)> = x
        .iter()
        .zip(&rows)
        .map(|(f, r)| {
            (
                r.label == data::JAILBREAK,
                head.probability(&f[..f.len() - SIGNAL_COUNT], &train::tail(f)),
            )
        })
        .collect();
    for t in [0.5f32, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98] {
        let pos = scores.iter().filter(|(p, _)| *p).count().max(1);
        let neg = scores.iter().filter(|(p, _)| !*p).count().max(1);
        let tp = scores.iter().filter(|(p, s)| *p && *s >= t).count();
        let fp = scores.iter().filter(|(p, s)| !*p && *s >= t).count();
        eprintln!(
            "threshold {t:.2}: train detection {:.2}% false positives {:.3}%",
            100.0 * tp as f64 / pos as f64,
            100.0 * fp as f64 / neg as f64
        );
    }
    let (mut tp, mut fp, mut pos, mut neg) = (0, 0, 0, 0);
    for (f, r) in x.iter().zip(&rows) {
        let flagged = head.probability(&f[..f.len() - SIGNAL_COUNT], &train::tail(f)) >= head.threshold;
        if r.label == data::JAILBREAK {
            pos += 1;
            tp += usize::from(flagged);
        } else {
            neg += 1;
            fp += usize::from(flagged);
        }
    }
    head.training = serde_json::json!({
        "data": args.data,
        "rows": rows.len(),
        "labels": data::label_counts(&rows),
        "steps": spec.steps,
        "learning_rate": spec.learning_rate,
        "weight_decay": spec.weight_decay,
        "target_fpr": spec.target_fpr,
        "train_detection_rate": tp as f64 / pos.max(1) as f64,
        "train_false_positive_rate": fp as f64 / neg.max(1) as f64,
        "embedding_seconds": embed_s,
        "total_seconds": started.elapsed().as_secs_f64(),
    });
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&head)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {}: threshold {:.4}, train detection {:.2}% at {:.2}% false positives ({:.0} s)",
        args.out.display(),
        head.threshold,
        100.0 * tp as f64 / pos.max(1) as f64,
        100.0 * fp as f64 / neg.max(1) as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(head)
}

/// Evaluate the rails and write the report.
///
/// # Errors
/// Unreadable inputs, detector failures.
pub async fn evaluate(args: &EvalArgs) -> anyhow::Result<eval::EvalReport> {
    let rows = data::read_rows(&args.data)?;
    let embedder = Arc::new(Embedder::load(&args.embedder)?);
    let head = match &args.head {
        Some(p) => serde_json::from_slice(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)?,
        None => Head::builtin()?,
    };
    let mut spec = RailsSpec::default();
    spec.jailbreak.threshold = args.threshold;
    let detector = JailbreakDetector::new(embedder.clone(), head.clone(), args.threshold);
    // The same rail set the server builds, with this head.
    let rails = RailSet::new(
        spec.clone(),
        Some(Arc::new(JailbreakDetector::new(embedder, head, args.threshold))),
    );
    let mut report = eval::evaluate(&rows, &rails, Some(&detector)).await?;
    if let Some(p) = &args.pii_spans {
        report.pii_spans = Some(eval::pii_spans(p)?);
    }
    print!("{}", eval::table(&report));
    if let Some(path) = &args.report {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    Ok(report)
}
