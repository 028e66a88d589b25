//! Command-line arguments of the curation commands and their wiring to the
//! [`crate::curate`] library (config file, flags, judge engine).

use std::path::{Path, PathBuf};

use anyhow::Context;
use flywheel_router::config::EngineSettings;
use flywheel_router::data::feedback::FeedbackKind;
use flywheel_router::engine::EngineLoader;
use flywheel_router::engine::mistral::MistralLoader;
use serde::Deserialize;

use crate::curate::judge::{Judge, JudgeMode};
use crate::curate::select::Filters;
use crate::curate::{CurateOptions, CurationSpec, Manifest, review};

/// The trainer's TOML file: `[curation]` settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainerFile {
    #[serde(default)]
    curation: CurationSpec,
}

/// `flywheel-trainer curate`.
#[derive(Debug, Clone, clap::Args)]
pub struct CurateArgs {
    /// Request log of the server (its SQLite file or a `postgres://` URL);
    /// omit to curate imports only.
    #[arg(long, env = "FLYWHEEL_LOG_PATH")]
    pub log: Option<PathBuf>,
    /// Output folder for the dataset and its manifest.
    #[arg(long)]
    pub out: PathBuf,
    /// TOML file with a `[curation]` table (flags override it).
    #[arg(long, env = "FLYWHEEL_TRAINER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Server config, for the experts' descriptions shown to the judge.
    #[arg(long)]
    pub server_config: Option<PathBuf>,
    /// Requests received since: Unix ms, or an age such as 90m, 24h, 7d.
    #[arg(long)]
    pub since: Option<String>,
    /// Requests received before: Unix ms, or an age such as 1h.
    #[arg(long)]
    pub until: Option<String>,
    /// Only requests routed to this expert (repeatable).
    #[arg(long = "expert")]
    pub experts: Vec<String>,
    /// Only decisions of this router model version.
    #[arg(long)]
    pub model_version: Option<String>,
    /// Only requests with feedback of these kinds: explicit, review, rephrase, abandoned (repeatable).
    #[arg(long = "feedback", value_parser = parse_kind)]
    pub feedback_kinds: Vec<FeedbackKind>,
    /// Labelled file to add (JSONL or CSV with `text` and `label`; repeatable).
    #[arg(long = "import")]
    pub imports: Vec<PathBuf>,
    /// Text column of imported files.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Label column of imported files (e.g. `scenario` for HWU64's experts).
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Keep this test split (a `test.jsonl` of an earlier run) frozen.
    #[arg(long)]
    pub frozen_test: Option<PathBuf>,
    /// Review queue file (.csv or .jsonl; default `<out>/review_queue.csv`).
    #[arg(long)]
    pub review_out: Option<PathBuf>,
    /// GGUF model that judges unsatisfactory requests (none: all go to review).
    #[arg(long)]
    pub judge_model: Option<PathBuf>,
    /// How the judge answers: `generate` (three-line format, parsed) or
    /// `choice` (label scoring; never malformed, suits small models).
    #[arg(long, value_enum, default_value_t = JudgeMode::Generate)]
    pub judge_mode: JudgeMode,
    /// Test share of each label.
    #[arg(long)]
    pub test_fraction: Option<f64>,
    /// Validation share of each label.
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Seed of the split.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Near-duplicate Jaccard threshold.
    #[arg(long)]
    pub near_dup_threshold: Option<f64>,
    /// Keep examples that contain PII (dropped by default).
    #[arg(long)]
    pub keep_pii: bool,
}

/// `flywheel-trainer review-import`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReviewImportArgs {
    /// Request log (SQLite file or `postgres://` URL) to add the reviewed labels to.
    #[arg(long, env = "FLYWHEEL_LOG_PATH")]
    pub log: PathBuf,
    /// The reviewed queue (.csv or .jsonl) with `reviewed_expert` filled in.
    #[arg(long)]
    pub file: PathBuf,
    /// Reviewer id for rows that do not name one.
    #[arg(long)]
    pub reviewer: Option<String>,
    /// Server config whose experts are the only accepted labels.
    #[arg(long)]
    pub server_config: Option<PathBuf>,
}

fn parse_kind(s: &str) -> Result<FeedbackKind, String> {
    FeedbackKind::parse(s).ok_or_else(|| format!("`{s}` is not one of explicit, review, rephrase, abandoned"))
}

/// A time bound: Unix ms, or an age (`90m`, `24h`, `7d`, `30s`) before `now_ms`.
///
/// # Errors
/// Anything else, with the accepted forms.
pub fn parse_time(s: &str, now_ms: i64) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .with_context(|| format!("`{s}`: expected Unix ms or an age such as 90m, 24h, 7d"))?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => anyhow::bail!("`{s}`: unknown unit `{unit}`; use s, m, h or d"),
    };
    Ok(now_ms - n * unit_ms)
}

/// The engine settings of a server config file (defaults without one).
///
/// # Errors
/// Unreadable or invalid file.
pub fn settings(server_config: Option<&Path>) -> anyhow::Result<EngineSettings> {
    Ok(match server_config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            EngineSettings::from_config_file(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => EngineSettings::default(),
    })
}

impl CurateArgs {
    /// The curation options these flags describe.
    ///
    /// # Errors
    /// Unreadable config or malformed time bounds.
    pub fn options(&self) -> anyhow::Result<CurateOptions> {
        let mut spec = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<TrainerFile>(&text)
                    .with_context(|| format!("parsing {}", path.display()))?
                    .curation
            }
            None => CurationSpec::default(),
        };
        if let Some(v) = self.test_fraction {
            spec.test_fraction = v;
        }
        if let Some(v) = self.val_fraction {
            spec.val_fraction = v;
        }
        if let Some(v) = self.seed {
            spec.seed = v;
        }
        if let Some(v) = self.near_dup_threshold {
            spec.near_dup_threshold = v;
        }
        if self.keep_pii {
            spec.drop_pii = false;
        }
        let now = flywheel_router::data::log::unix_ms(std::time::SystemTime::now());
        Ok(CurateOptions {
            log: self.log.clone(),
            out: self.out.clone(),
            filters: Filters {
                since_ms: self.since.as_deref().map(|s| parse_time(s, now)).transpose()?,
                until_ms: self.until.as_deref().map(|s| parse_time(s, now)).transpose()?,
                experts: self.experts.clone(),
                model_version: self.model_version.clone(),
                feedback_kinds: self.feedback_kinds.clone(),
            },
            imports: self.imports.clone(),
            columns: crate::curate::dataset::Columns {
                text: self.text_column.clone(),
                label: self.label_column.clone(),
            },
            frozen_test: self.frozen_test.clone(),
            review_out: self.review_out.clone(),
            spec,
        })
    }
}

/// Run `curate` and print a summary.
///
/// # Errors
/// Any failure of the run, with context.
pub async fn curate(args: CurateArgs) -> anyhow::Result<Manifest> {
    let opts = args.options()?;
    opts.spec.validate()?;
    let judge = match &args.judge_model {
        Some(path) => {
            let settings = settings(args.server_config.as_deref())?;
            let mut spec = settings
                .models
                .values()
                .next()
                .cloned()
                .context("the server config defines no model")?;
            spec.path = path.clone();
            spec.version = None;
            // Choice mode scores labels, which the router engine does best.
            let engine = MistralLoader
                .load(&spec, args.judge_mode == JudgeMode::Choice)
                .await
                .with_context(|| format!("loading judge model {}", path.display()))?;
            let experts = settings
                .experts
                .iter()
                .map(|e| (e.name.clone(), e.description.clone()))
                .collect();
            Some(Judge::new(engine, spec.version_label(), experts).with_mode(args.judge_mode))
        }
        None => None,
    };
    let manifest = crate::curate::run(&opts, judge.as_ref()).await?;
    print_summary(&opts, &manifest);
    Ok(manifest)
}

fn print_summary(opts: &CurateOptions, m: &Manifest) {
    let s = &m.selection;
    println!(
        "selected {} logged requests: labelled {:?}, unsatisfactory {}, neutral {}, no feedback {}; imported {}",
        s.candidates, s.labelled, s.unsatisfactory, s.neutral, s.no_feedback, s.imported
    );
    if let Some(j) = &m.judge {
        println!(
            "judge {}: {} judged, causes {:?}, malformed {:?}",
            j.model_version, j.judged, j.causes, j.malformed
        );
    }
    if let Some(q) = &m.review_queue {
        println!("review queue: {} rows in {}", q.rows, q.path.display());
    }
    let c = &m.clean;
    println!(
        "cleaned {} -> {}: pii {}, exact duplicates {}, conflicting {}, near duplicates {}",
        c.input, c.output, c.pii, c.exact_duplicates, c.conflicting, c.near_duplicates
    );
    for (name, split) in &m.splits {
        println!("{name:>5}: {:>6} examples {:?}", split.total, split.labels);
    }
    println!(
        "leakage: train/test {} val/test {} train/val {} (dropped {} near-duplicates of the frozen test set)",
        m.leakage.train_test, m.leakage.val_test, m.leakage.train_val, m.leakage.dropped_for_frozen_test
    );
    println!("wrote {}", opts.out.join(crate::curate::MANIFEST).display());
}

/// `flywheel-trainer store-copy`.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreCopyArgs {
    /// The log to copy: a SQLite file (upgraded to the current schema
    /// first) or a `postgres://` URL.
    #[arg(long)]
    pub from: PathBuf,
    /// An empty log to copy into (created when new): a `postgres://` URL or
    /// a SQLite file.
    #[arg(long)]
    pub to: PathBuf,
}

/// Run `store-copy`: every request record, feedback row and shadow run of
/// one log into another, with a running count.
///
/// # Errors
/// Either log cannot be opened, read or written; the target is not empty.
pub fn store_copy(args: &StoreCopyArgs) -> anyhow::Result<flywheel_router::data::log::CopyReport> {
    use flywheel_router::data::log::{LogLocation, copy_log};
    let (from, to) = (LogLocation::from(&args.from), LogLocation::from(&args.to));
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg}: {pos} rows ({per_sec})") {
        bar.set_style(style);
    }
    bar.set_message(format!("{from} -> {to}"));
    let report = copy_log(&from, &to, |rows| bar.set_position(rows))
        .with_context(|| format!("copying the request log {from} to {to}"))?;
    bar.finish_and_clear();
    println!(
        "copied {} request records, {} feedback rows and {} shadow runs from {from} to {to} ({} records there now)",
        report.records, report.feedback, report.shadows, report.target_records
    );
    Ok(report)
}

/// Run `review-import` and print what it did.
///
/// # Errors
/// Unknown requests or labels (nothing imported), unreadable files.
pub fn review_import(args: ReviewImportArgs) -> anyhow::Result<review::ImportReport> {
    let labels: Option<Vec<String>> = match &args.server_config {
        Some(path) => Some(settings(Some(path))?.experts.iter().map(|e| e.name.clone()).collect()),
        None => None,
    };
    let report = review::import(&args.log, &args.file, args.reviewer.as_deref(), labels.as_deref())?;
    println!(
        "imported {} reviewed labels from {} ({} rows left unreviewed)",
        report.imported,
        report.file.display(),
        report.unreviewed
    );
    Ok(report)
}

/// Log lines to stderr (`RUST_LOG`, default `info`), without mistral.rs's
/// known false alarm; the trainer exports no traces.
pub fn init_logs() {
    use tracing_subscriber::filter::{EnvFilter, filter_fn};
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(flywheel_router::observe::DEFAULT_LOG_FILTER));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(filter_fn(|meta| {
            !flywheel_router::engine::mistral::is_false_alarm(meta)
        }))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_bounds_accept_unix_ms_and_ages() {
        assert_eq!(parse_time("1700000000000", 0).unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time("90m", 10_000_000).unwrap(), 10_000_000 - 5_400_000);
        assert_eq!(parse_time("7d", 0).unwrap(), -604_800_000);
        assert!(parse_time("7w", 0).unwrap_err().to_string().contains("unknown unit"));
        assert!(parse_time("soon", 0).is_err());
    }
}
