//! `flywheel-trainer compare`: several router models (any kinds) and the
//! incumbent measured on one test set as the server serves them, the Pareto
//! gate's choice ([`crate::pareto`]), a table with each model's latency and
//! cost relative to the incumbent, and the accuracy-versus-latency plot with
//! the front marked. It changes nothing; `promote` swaps a model in.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::eval::{self, DeviceArg, EvalSetup, ModelReport, TestArgs};
use crate::pareto::{self, CostMeasure, ParetoDecision, ParetoSpec};
use crate::plot;

/// `flywheel-trainer compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// A candidate (repeatable): GGUF file, training output folder or classifier folder.
    #[arg(long = "model", required = true)]
    pub models: Vec<PathBuf>,
    /// The model serving now: the gate's incumbent and the reference of the ratios.
    #[arg(long)]
    pub incumbent: PathBuf,
    /// The test set, e.g. the frozen test split.
    #[command(flatten)]
    pub test: TestArgs,
    /// Server config (prompts a base model; its router entry loads the models).
    #[arg(long)]
    pub server_config: Option<PathBuf>,
    /// Device.
    #[command(flatten)]
    pub device: DeviceArg,
    /// Accuracy a winner may lose against the most accurate model (0.02: two points).
    #[arg(long, default_value_t = 0.02)]
    pub tolerance: f64,
    /// What the winner is cheapest in: `p50` (decision latency) or `cpu`
    /// (CPU seconds per 1,000 decisions).
    #[arg(long, value_enum, default_value_t = CostMeasure::P50)]
    pub cost: CostMeasure,
    /// Largest accepted p99 decision latency, in ms.
    #[arg(long)]
    pub max_p99_ms: Option<f64>,
    /// Write the JSON report (every evaluation and the decision) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write the accuracy-versus-latency plot (PNG) here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// What `compare` measured and decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareReport {
    /// Test file.
    pub data: String,
    /// Candidates' evaluations, in the order given.
    pub candidates: Vec<ModelReport>,
    /// The incumbent's.
    pub incumbent: ModelReport,
    /// The gate's decision (rows in the same order, the incumbent last).
    pub decision: ParetoDecision,
}

/// Run `flywheel-trainer compare`.
///
/// # Errors
/// Unreadable data, models that fail to load or were trained for other labels.
pub async fn run(args: &CompareArgs) -> anyhow::Result<CompareReport> {
    anyhow::ensure!(
        args.tolerance.is_finite() && (0.0..1.0).contains(&args.tolerance),
        "--tolerance must be in [0, 1), not {}",
        args.tolerance
    );
    let setup = EvalSetup::new(args.server_config.as_deref(), args.device)?;
    let (examples, labels) = args.test.read()?;
    let files: Vec<PathBuf> = args.models.iter().map(|m| eval::model_file(m)).collect();
    let incumbent_file = eval::model_file(&args.incumbent);
    let mut all: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    all.push(&incumbent_file);
    let labels = eval::label_space(&labels, &all)?;
    let mut candidates = Vec::with_capacity(files.len());
    for f in &files {
        tracing::info!(model = %f.display(), n = examples.len(), "evaluating");
        candidates.push(
            eval::evaluate_model(f, &examples, &labels, &setup, None)
                .await
                .with_context(|| format!("evaluating {}", f.display()))?,
        );
    }
    let incumbent = eval::evaluate_model(&incumbent_file, &examples, &labels, &setup, None)
        .await
        .with_context(|| format!("evaluating the incumbent {}", incumbent_file.display()))?;
    let named: Vec<(String, ModelReport)> = candidates.iter().map(|r| (r.version.clone(), r.clone())).collect();
    let decision = pareto::choose(
        &named,
        &incumbent,
        ParetoSpec {
            tolerance: args.tolerance,
            cost: args.cost,
            max_p99_ms: args.max_p99_ms,
        },
    );
    let report = CompareReport {
        data: args.test.data.display().to_string(),
        candidates,
        incumbent,
        decision,
    };
    if let Some(path) = &args.report {
        eval::write_json(path, &report)?;
    }
    if let Some(path) = &args.plot {
        let points: Vec<plot::Point> = report
            .decision
            .rows
            .iter()
            .map(|r| plot::Point {
                name: r.version.clone(),
                latency_ms: r.p50_ms,
                accuracy: r.accuracy,
                on_front: r.on_front,
            })
            .collect();
        let title = format!("accuracy vs decision latency, {} test queries", report.incumbent.n);
        plot::pareto_png(&points, &title, path)?;
    }
    Ok(report)
}

/// The table: every model with its numbers, ratios to the incumbent, the
/// front, and the gate's verdict.
pub fn render(report: &CompareReport) -> String {
    let inc = &report.incumbent;
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "-".into() };
    let mut s = format!(
        "{} test queries of {}; ratios are to the incumbent ({})\n\n",
        inc.n, report.data, inc.version
    );
    s.push_str(&format!(
        "{:<30} {:<19} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>7} {:>5}\n",
        "model", "kind", "MB", "accuracy", "macro-F1", "p50 ms", "p99 ms", "CPU-s/1k", "p50 vs", "cost vs", "front"
    ));
    let reports = report.candidates.iter().chain(std::iter::once(inc));
    for (r, row) in reports.zip(&report.decision.rows) {
        s.push_str(&format!(
            "{:<30} {:<19} {:>8.1} {:>7.1}% {:>9.3} {:>9.1} {:>9.1} {:>8.1} {:>8} {:>7} {:>5}\n",
            if row.incumbent {
                format!("{} (incumbent)", r.version)
            } else {
                r.version.clone()
            },
            r.kind.to_string(),
            r.size_bytes as f64 / 1e6,
            r.accuracy * 100.0,
            r.macro_f1,
            r.latency_p50_ms,
            r.latency_p99_ms,
            r.cpu_seconds_per_1k,
            ratio(r.latency_p50_ms, inc.latency_p50_ms),
            ratio(r.cpu_seconds_per_1k, inc.cpu_seconds_per_1k),
            if row.on_front { "yes" } else { "" }
        ));
    }
    s.push('\n');
    for row in &report.decision.rows {
        s.push_str(&format!("{}: {}\n", row.version, row.verdict));
    }
    s.push_str(&format!("\n{}\n", report.decision.summary));
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use flywheel_router::engine::ModelKind;

    use super::*;
    use crate::finetune::tests::{encoder_dir, train_args};

    const ROWS: [(&str, &str); 12] = [
        ("wake me up at seven", "alarm"),
        ("set an alarm for 6 am", "alarm"),
        ("cancel my morning alarm", "alarm"),
        ("snooze the alarm", "alarm"),
        ("is it going to rain today", "weather"),
        ("forecast for the weekend", "weather"),
        ("will it be sunny in Paris", "weather"),
        ("how cold is it outside", "weather"),
        ("play some jazz", "music"),
        ("skip this song", "music"),
        ("put on my workout playlist", "music"),
        ("turn the music up", "music"),
    ];

    fn csv(path: &Path, rows: &[(&str, &str)]) {
        let body: Vec<String> = rows.iter().map(|(t, l)| format!("{t},{l}")).collect();
        std::fs::write(path, format!("text,label\n{}", body.join("\n"))).unwrap();
    }

    /// Two classifiers and an incumbent through the whole command: every
    /// model measured on the same rows, the winner the cheapest that holds,
    /// the report and the plot written.
    #[tokio::test]
    async fn compare_measures_every_model_and_the_gate_picks_the_cheapest_that_holds() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        csv(&p("all.csv"), &ROWS);
        csv(&p("few.csv"), &[ROWS[0], ROWS[4], ROWS[8]]);
        let mut outs = Vec::new();
        for (data, out, version) in [("all.csv", "a", "enc-all"), ("few.csv", "f", "enc-few")] {
            let mut a = train_args(&p(data), "alarm,weather,music");
            a.kind = ModelKind::EncoderClassifier;
            a.encoder = encoder_dir();
            a.out = p(out);
            a.version = Some(version.into());
            a.quiet = true;
            crate::finetune::encoder::run(&a).unwrap();
            outs.push(a.out);
        }
        let args = CompareArgs {
            models: outs.clone(),
            incumbent: outs[1].clone(),
            test: TestArgs {
                data: p("all.csv"),
                text_column: "text".into(),
                label_column: "label".into(),
                limit: None,
            },
            server_config: None,
            device: DeviceArg::default(),
            tolerance: 0.99,
            cost: CostMeasure::Cpu,
            max_p99_ms: None,
            report: Some(p("r.json")),
            plot: Some(p("p.png")),
        };
        let r = run(&args).await.unwrap();
        assert_eq!(r.candidates.len(), 2);
        assert!(r.candidates.iter().all(|c| c.n == ROWS.len()));
        assert_eq!(r.candidates[0].accuracy, 1.0, "trained on the test rows");
        assert_eq!(r.decision.rows.len(), 3);
        assert!(r.decision.rows[2].incumbent);
        // Everything holds at this tolerance: the winner is the cheapest candidate
        // unless the incumbent is cheaper still.
        let cheapest = r
            .decision
            .rows
            .iter()
            .min_by(|a, b| a.cpu_seconds_per_1k.total_cmp(&b.cpu_seconds_per_1k))
            .unwrap();
        match &r.decision.winner {
            Some(w) => assert_eq!(w, &cheapest.name),
            None => assert!(cheapest.incumbent, "{:?}", r.decision),
        }
        let back: CompareReport = serde_json::from_slice(&std::fs::read(p("r.json")).unwrap()).unwrap();
        assert_eq!(
            (back.decision.winner, back.incumbent.version),
            (r.decision.winner.clone(), r.incumbent.version.clone())
        );
        // Each model's decisions were timed on its own encodings.
        assert!(
            r.decision.rows.iter().all(|row| row.p50_ms > 0.1),
            "{:?}",
            r.decision.rows
        );
        assert!(image::open(p("p.png")).is_ok());
        let table = render(&r);
        assert!(
            table.contains("enc-few (incumbent)") && table.contains("1.00x"),
            "{table}"
        );
    }
}
