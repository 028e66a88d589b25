//! The cycle's evaluation: every trained candidate and the incumbent on the
//! frozen test split (and the teacher, for the agreement column), the
//! Pareto gate over them ([`crate::pareto`]), and the table the cycle record
//! keeps.

use std::path::{Path, PathBuf};

use anyhow::Context;
use flywheel_router::data::journal::{CandidateRun, CycleGate, CycleJournal, ModelRow};
use flywheel_router::models::store::ModelStore;
use serde::{Deserialize, Serialize};

use crate::eval::{self, EvalSetup, ModelReport};
use crate::pareto::{self, ParetoDecision, ParetoSpec};

/// Everything the evaluate stage measured (`gate.json` in the cycle's folder).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateReport {
    /// The incumbent's evaluation.
    pub incumbent: ModelReport,
    /// Each evaluated candidate's, by name.
    pub candidates: Vec<(String, ModelReport)>,
    /// The teacher's, when it is neither the incumbent nor a candidate.
    pub teacher: Option<ModelReport>,
    /// The gate's decision.
    pub decision: ParetoDecision,
}

/// The model the candidates learn from: `--teacher` when given, else the
/// most accurate router the registry has seen on this frozen split (from
/// earlier cycles' tables) that it still holds, else the incumbent.
///
/// # Errors
/// An unreadable journal or registry.
pub fn choose_teacher(
    explicit: Option<&Path>,
    registry: &Path,
    slot: &str,
    incumbent: &Path,
) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let store = ModelStore::open(registry)?;
    let held = store.versions()?;
    let mut best: Option<(f64, String)> = None;
    if let Some(journal) = CycleJournal::existing(registry) {
        for r in journal.list()?.into_iter().filter(|r| r.slot == slot) {
            let mut seen: Vec<(f64, String)> = Vec::new();
            if let Some(g) = &r.gate {
                seen.extend(g.models.iter().map(|m| (m.accuracy, m.version.clone())));
            } else if let Some(m) = &r.metrics {
                seen.push((m.incumbent_accuracy, m.incumbent_version.clone()));
                if let Some(v) = &r.candidate_version {
                    seen.push((m.candidate_accuracy, v.clone()));
                }
            }
            for (accuracy, version) in seen {
                if held.contains(&version) && best.as_ref().is_none_or(|b| accuracy > b.0) {
                    best = Some((accuracy, version));
                }
            }
        }
    }
    match best {
        Some((_, version)) => Ok(store.model_path(&version)?),
        None => Ok(incumbent.to_path_buf()),
    }
}

/// Whether two paths name the same file (however each is spelled).
fn same(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// The model a candidate's training wrote.
pub fn candidate_model(run: &CandidateRun) -> PathBuf {
    eval::model_file(&run.dir)
}

/// The evaluations earlier cycles of `slot` made on the frozen split (their
/// `gate.json`), newest first: a trained model measured there already is
/// not measured again (the split never changes within a work folder).
///
/// # Errors
/// An unreadable journal.
pub fn earlier_reports(journal: &CycleJournal, slot: &str, file: &str) -> anyhow::Result<Vec<ModelReport>> {
    let mut out = Vec::new();
    for r in journal
        .list()?
        .into_iter()
        .filter(|r| r.slot == slot && r.gate.is_some())
    {
        let path = r.work_dir.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        match serde_json::from_str::<GateReport>(&text) {
            Ok(g) => {
                out.push(g.incumbent);
                out.extend(g.candidates.into_iter().map(|c| c.1));
                out.extend(g.teacher);
            }
            Err(e) => tracing::warn!(report = %path.display(), error = %e, "ignoring an unreadable gate report"),
        }
    }
    Ok(out)
}

/// Evaluate `model` on `examples`, or take its earlier evaluation among
/// `known`: the same trained version (a manifest's), device, labels and test
/// size. Base models (no manifest) are always measured.
async fn measure(
    model: &Path,
    examples: &[crate::curate::dataset::Example],
    labels: &[String],
    setup: &EvalSetup,
    known: &[ModelReport],
) -> anyhow::Result<ModelReport> {
    let version = eval::manifest_version(model);
    let device = setup.device().to_string();
    let earlier = known.iter().find(|r| {
        version.as_deref() == Some(r.version.as_str())
            && r.device == device
            && r.n == examples.len()
            && r.labels == labels
            && r.predicted.len() == examples.len()
    });
    if let Some(r) = earlier {
        println!("  {}: measured on this split by an earlier cycle, not again", r.version);
        return Ok(r.clone());
    }
    eval::evaluate_model(model, examples, labels, setup, None).await
}

/// Evaluate the incumbent, every trained candidate and (for the agreement
/// column) the teacher on `test`, and decide. A trained incumbent or teacher
/// that an earlier cycle measured on the same split (in `known`) is not
/// measured again.
///
/// # Errors
/// Unreadable test data, or the incumbent failing to evaluate. A candidate
/// that fails to evaluate gets a row saying so.
pub async fn evaluate(
    test: &Path,
    incumbent: &Path,
    runs: &[CandidateRun],
    teacher: Option<&Path>,
    setup: &EvalSetup,
    spec: ParetoSpec,
    known: &[ModelReport],
) -> anyhow::Result<(GateReport, CycleGate)> {
    let (examples, labels) = eval::read_test(test, "text", "label", None)?;
    let mut paths: Vec<PathBuf> = vec![incumbent.to_path_buf()];
    paths.extend(runs.iter().filter(|r| r.version.is_some()).map(candidate_model));
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let labels = eval::label_space(&labels, &refs)?;
    let incumbent_report = measure(incumbent, &examples, &labels, setup, known)
        .await
        .context("evaluating the incumbent")?;
    let mut candidates = Vec::new();
    let mut failed: Vec<(String, String)> = runs
        .iter()
        .filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| (r.name.clone(), format!("training failed: {e}")))
        })
        .collect();
    for run in runs.iter().filter(|r| r.version.is_some()) {
        match eval::evaluate_model(&candidate_model(run), &examples, &labels, setup, None).await {
            Ok(r) => candidates.push((run.name.clone(), r)),
            Err(e) => failed.push((run.name.clone(), format!("evaluation failed: {e:#}"))),
        }
    }
    let teacher_report = match teacher {
        Some(t) if !paths.iter().any(|p| same(p, t)) => Some(
            measure(t, &examples, &labels, setup, known)
                .await
                .context("evaluating the teacher")?,
        ),
        _ => None,
    };
    let decision = pareto::choose(&candidates, &incumbent_report, spec);
    let teacher_predictions: Option<&[String]> = match teacher {
        None => None,
        Some(t) if same(t, incumbent) => Some(&incumbent_report.predicted),
        Some(t) => teacher_report.as_ref().map(|r| r.predicted.as_slice()).or_else(|| {
            runs.iter()
                .position(|r| same(&candidate_model(r), t))
                .and_then(|i| candidates.iter().find(|c| c.0 == runs[i].name))
                .map(|c| c.1.predicted.as_slice())
        }),
    };
    let teacher_version = match teacher {
        None => None,
        Some(t) if same(t, incumbent) => Some(incumbent_report.version.clone()),
        Some(t) => teacher_report.as_ref().map(|r| r.version.clone()).or_else(|| {
            runs.iter()
                .find(|r| same(&candidate_model(r), t))
                .and_then(|r| r.version.clone())
        }),
    };
    let table = table(
        &decision,
        &candidates,
        &incumbent_report,
        teacher_predictions,
        teacher_version,
        &failed,
    );
    Ok((
        GateReport {
            incumbent: incumbent_report,
            candidates,
            teacher: teacher_report,
            decision,
        },
        table,
    ))
}

/// Share of positions where two prediction lists agree.
fn agreement(a: &[String], b: &[String]) -> Option<f64> {
    (!a.is_empty() && a.len() == b.len())
        .then(|| a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64)
}

/// The journal's table of a decision: its rows with each model's agreement
/// with the teacher's predictions, then a row per candidate that failed.
pub fn table(
    decision: &ParetoDecision,
    candidates: &[(String, ModelReport)],
    incumbent: &ModelReport,
    teacher: Option<&[String]>,
    teacher_version: Option<String>,
    failed: &[(String, String)],
) -> CycleGate {
    let mut models = decision.rows.clone();
    for row in &mut models {
        let report = if row.incumbent {
            Some(incumbent)
        } else {
            candidates.iter().find(|c| c.0 == row.name).map(|c| &c.1)
        };
        row.teacher_agreement = teacher.zip(report).and_then(|(t, r)| agreement(&r.predicted, t));
    }
    models.extend(failed.iter().map(|(name, why)| ModelRow {
        name: name.clone(),
        version: String::new(),
        kind: String::new(),
        incumbent: false,
        parameters: 0,
        size_bytes: 0,
        accuracy: 0.0,
        macro_f1: 0.0,
        teacher_agreement: None,
        p_value_vs_best: 1.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        cpu_seconds_per_1k: 0.0,
        on_front: false,
        holds: false,
        verdict: why.clone(),
    }));
    CycleGate {
        cost: match decision.spec.cost {
            pareto::CostMeasure::P50 => "p50".into(),
            pareto::CostMeasure::Cpu => "cpu".into(),
        },
        tolerance: decision.spec.tolerance,
        max_p99_ms: decision.spec.max_p99_ms,
        teacher: teacher_version,
        best: decision.best.clone(),
        winner: decision.winner.clone(),
        summary: decision.summary.clone(),
        models,
    }
}

/// The table as text: one line per model.
pub fn render(gate: &CycleGate) -> String {
    let mut s = format!(
        "  {:<14} {:<20} {:>8} {:>9} {:>8} {:>9} {:>9} {:>8}  verdict\n",
        "model", "kind", "acc %", "agree %", "p50 ms", "p99 ms", "CPU-s/1k", "params M"
    );
    for m in &gate.models {
        s.push_str(&format!(
            "  {:<14} {:<20} {:>8.1} {:>9} {:>8.1} {:>9.1} {:>9.1} {:>8.1}  {}\n",
            m.name,
            m.kind,
            m.accuracy * 100.0,
            m.teacher_agreement
                .map_or("-".to_string(), |a| format!("{:.1}", a * 100.0)),
            m.p50_ms,
            m.p99_ms,
            m.cpu_seconds_per_1k,
            m.parameters as f64 / 1e6,
            m.verdict
        ));
    }
    s.push_str(&format!("  {}\n", gate.summary));
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pareto::CostMeasure;

    fn report(version: &str, accuracy: f64, p50: f64, predicted: &[&str], correct: &[bool]) -> ModelReport {
        ModelReport {
            n: predicted.len(),
            predicted: predicted.iter().map(|s| s.to_string()).collect(),
            correct: correct.to_vec(),
            ..ModelReport::fixture(version, accuracy, p50, p50 * 2.0)
        }
    }

    /// Every candidate fails the gate: nothing is promoted and each row says
    /// why; a candidate that failed to train has a row too.
    #[test]
    fn a_cycle_whose_candidates_all_fail_promotes_nothing_and_says_why_per_candidate() {
        let incumbent = report("ft-1", 0.90, 200.0, &["a", "b", "a"], &[true, true, false]);
        let candidates = vec![
            (
                "encoder".to_string(),
                report("enc-1", 0.80, 12.0, &["a", "a", "a"], &[true, false, false]),
            ),
            (
                "decoder-12".to_string(),
                report("dec-1", 0.84, 40.0, &["a", "b", "b"], &[true, true, false]),
            ),
        ];
        let spec = ParetoSpec {
            tolerance: 0.02,
            cost: CostMeasure::P50,
            max_p99_ms: None,
        };
        let decision = pareto::choose(&candidates, &incumbent, spec);
        let failed = vec![("lora".to_string(), "training failed: out of memory".to_string())];
        let gate = table(
            &decision,
            &candidates,
            &incumbent,
            Some(&incumbent.predicted),
            Some("ft-1".into()),
            &failed,
        );
        assert_eq!(gate.winner, None);
        assert!(gate.summary.contains("incumbent is the cheapest"), "{}", gate.summary);
        let names: Vec<&str> = gate.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["encoder", "decoder-12", "incumbent", "lora"]);
        for m in &gate.models[..2] {
            assert!(
                !m.holds && m.verdict.contains("more than 2.00 points below the best"),
                "{m:?}"
            );
        }
        assert_eq!(gate.models[3].verdict, "training failed: out of memory");
        // Agreement with the teacher (the incumbent here) per model.
        let agree: Vec<Option<f64>> = gate.models.iter().map(|m| m.teacher_agreement).collect();
        assert_eq!(agree[..3], [Some(2.0 / 3.0), Some(2.0 / 3.0), Some(1.0)]);
        assert_eq!(gate.teacher.as_deref(), Some("ft-1"));
        assert!(render(&gate).contains("training failed: out of memory"));
    }

    /// A trained model an earlier cycle measured on the frozen split is taken
    /// from that cycle's report; another device or split size is measured.
    #[tokio::test]
    async fn a_model_measured_by_an_earlier_cycle_is_not_measured_again() {
        use flywheel_router::data::journal::CycleRecord;
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("registry");
        let journal = CycleJournal::open(&registry).unwrap();
        // The teacher of cycle 1: not a loadable model, so measuring it fails.
        let model_dir = dir.path().join("ft-1");
        std::fs::create_dir_all(&model_dir).unwrap();
        std::fs::write(model_dir.join("model.gguf"), b"not a model").unwrap();
        std::fs::write(model_dir.join("manifest.json"), r#"{"version":"ft-1"}"#).unwrap();
        let model = model_dir.join("model.gguf");
        let examples: Vec<crate::curate::dataset::Example> = ["set an alarm", "play jazz"]
            .iter()
            .map(|t| crate::curate::dataset::Example {
                text: t.to_string(),
                label: "alarm".into(),
                source: crate::curate::dataset::LabelSource::Import,
                request_id: None,
            })
            .collect();
        let labels = vec!["alarm".to_string(), "music".to_string()];
        let measured = ModelReport {
            labels: labels.clone(),
            ..report("ft-1", 0.5, 200.0, &["alarm", "music"], &[true, false])
        };
        let work = dir.path().join("cycle-1");
        std::fs::create_dir_all(&work).unwrap();
        let spec = ParetoSpec {
            tolerance: 0.02,
            cost: CostMeasure::P50,
            max_p99_ms: None,
        };
        let decision = pareto::choose(&[], &measured, spec);
        let report_file = GateReport {
            incumbent: measured.clone(),
            candidates: Vec::new(),
            teacher: None,
            decision: decision.clone(),
        };
        std::fs::write(work.join("gate.json"), serde_json::to_string(&report_file).unwrap()).unwrap();
        let mut r = CycleRecord::new("cycle-1".into(), "manual", "router", 1, work);
        r.gate = Some(table(&decision, &[], &measured, None, None, &[]));
        journal.write(&r).unwrap();

        let known = earlier_reports(&journal, "router", "gate.json").unwrap();
        assert_eq!(known, vec![measured.clone()]);
        assert!(earlier_reports(&journal, "other-slot", "gate.json").unwrap().is_empty());
        let setup = EvalSetup::new(None, eval::DeviceArg::default()).unwrap();
        let again = measure(&model, &examples, &labels, &setup, &known).await.unwrap();
        assert_eq!(again, measured);
        // Another split size, or no earlier report: measured, and this file fails.
        assert!(measure(&model, &examples[..1], &labels, &setup, &known).await.is_err());
        assert!(measure(&model, &examples, &labels, &setup, &[]).await.is_err());
    }

    #[test]
    fn the_teacher_is_the_best_model_the_registry_still_holds() {
        use flywheel_router::data::journal::{CycleMetrics, CycleRecord};
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("registry");
        let store = ModelStore::open(&registry).unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"GGUF").unwrap();
        store.add("ft-good", &model, None).unwrap();
        let incumbent = dir.path().join("incumbent.gguf");
        // No cycle yet: the incumbent teaches.
        assert_eq!(
            choose_teacher(None, &registry, "router", &incumbent).unwrap(),
            incumbent
        );
        let journal = CycleJournal::open(&registry).unwrap();
        let mut r = CycleRecord::new("cycle-1".into(), "manual", "router", 1, dir.path().join("w"));
        r.candidate_version = Some("ft-good".into());
        r.metrics = Some(CycleMetrics {
            incumbent_version: "base".into(),
            incumbent_accuracy: 0.3,
            candidate_accuracy: 0.85,
            p_value: 0.0,
            n: 10,
            candidate_p99_ms: 1.0,
            incumbent_p99_ms: 1.0,
        });
        journal.write(&r).unwrap();
        let mut later = CycleRecord::new("cycle-2".into(), "manual", "router", 2, dir.path().join("w2"));
        // A better model the registry no longer holds does not teach.
        later.candidate_version = Some("ft-gone".into());
        later.metrics = Some(CycleMetrics {
            candidate_accuracy: 0.95,
            ..r.metrics.clone().unwrap()
        });
        journal.write(&later).unwrap();
        assert_eq!(
            choose_teacher(None, &registry, "router", &incumbent).unwrap(),
            store.model_path("ft-good").unwrap()
        );
        let explicit = dir.path().join("teacher");
        assert_eq!(
            choose_teacher(Some(&explicit), &registry, "router", &incumbent).unwrap(),
            explicit
        );
    }
}
