//! The seed's table: every router the demo served or trained (the zero-shot
//! base, the fine-tuned teacher, the distilled students), with parameters,
//! size, accuracy on the frozen split and on live traffic nobody rated,
//! decision latency, CPU cost, and latency and cost relative to the teacher.

use std::path::Path;

use anyhow::Context;
use flywheel_router::data::journal::{CycleRecord, ModelRow};
use flywheel_router::device::DeviceChoice;
use serde::{Deserialize, Serialize};

use flywheel_trainer::curate::dataset::{Example, LabelSource};
use flywheel_trainer::cycle::gate::candidate_model;
use flywheel_trainer::eval::{self, DeviceArg, EvalSetup};

use super::traffic::Query;

/// One router's line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelLine {
    /// `base`, `teacher` or `student`.
    pub role: String,
    /// Candidate name in its cycle (`incumbent` for the served one).
    pub name: String,
    /// Version.
    pub version: String,
    /// Router kind.
    pub kind: String,
    /// Weights.
    pub parameters: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Accuracy on the frozen test split (the gates').
    pub frozen_accuracy: f64,
    /// Accuracy on the live requests nobody rated.
    pub unrated_accuracy: f64,
    /// That accuracy comes from a replay it served (else from deciding the
    /// same queries in process).
    pub unrated_live: bool,
    /// Decision latency on the frozen split, p50 (ms).
    pub p50_ms: f64,
    /// p99 (ms).
    pub p99_ms: f64,
    /// CPU seconds per 1,000 decisions.
    pub cpu_seconds_per_1k: f64,
    /// p50 relative to the teacher's.
    pub p50_vs_teacher: f64,
    /// CPU cost relative to the teacher's.
    pub cost_vs_teacher: f64,
    /// On the accuracy-versus-p50 Pareto front of these routers.
    pub on_front: bool,
    /// Serves the router slot at the end of the demo.
    pub serving: bool,
}

fn line(role: &str, row: &ModelRow) -> ModelLine {
    ModelLine {
        role: role.into(),
        name: row.name.clone(),
        version: row.version.clone(),
        kind: row.kind.clone(),
        parameters: row.parameters,
        size_bytes: row.size_bytes,
        frozen_accuracy: row.accuracy,
        unrated_accuracy: 0.0,
        unrated_live: false,
        p50_ms: row.p50_ms,
        p99_ms: row.p99_ms,
        cpu_seconds_per_1k: row.cpu_seconds_per_1k,
        p50_vs_teacher: 0.0,
        cost_vs_teacher: 0.0,
        on_front: false,
        serving: false,
    }
}

/// Build the table from the two cycles' gates. `served` holds, per replay,
/// the version that decided it and its accuracy on the unrated requests
/// (the last replay's version is the one serving); a router no replay
/// served decides the `unrated` queries in process.
///
/// # Errors
/// A cycle without a gate table, or a student that fails to load.
pub async fn table(
    first: &CycleRecord,
    second: &CycleRecord,
    served: &[(String, f64)],
    unrated: &[Query],
    experts: &[String],
    server_config: &Path,
    device: DeviceChoice,
) -> anyhow::Result<Vec<ModelLine>> {
    let g1 = first.gate.as_ref().context("the first cycle has no gate table")?;
    let g2 = second.gate.as_ref().context("the second cycle has no gate table")?;
    let mut lines = Vec::new();
    if let Some(base) = g1.models.iter().find(|m| m.incumbent) {
        lines.push(line("base", base));
    }
    for m in g2.models.iter().filter(|m| !m.version.is_empty()) {
        lines.push(line(if m.incumbent { "teacher" } else { "student" }, m));
    }
    let setup = EvalSetup::new(Some(server_config), DeviceArg { choice: Some(device) })?;
    let examples: Vec<Example> = unrated
        .iter()
        .map(|q| Example {
            text: q.text.clone(),
            label: q.expert.clone(),
            source: LabelSource::Import,
            request_id: None,
        })
        .collect();
    for l in &mut lines {
        if let Some((_, acc)) = served.iter().find(|(v, _)| *v == l.version) {
            l.unrated_accuracy = *acc;
            l.unrated_live = true;
        } else if let Some(run) = second
            .candidates
            .iter()
            .find(|c| c.name == l.name && !examples.is_empty())
        {
            let r = eval::evaluate_model(&candidate_model(run), &examples, experts, &setup, None)
                .await
                .with_context(|| format!("deciding the unrated queries with {}", l.name))?;
            l.unrated_accuracy = r.accuracy;
        }
    }
    let serving = served.last().map(|s| s.0.clone()).unwrap_or_default();
    let teacher = lines.iter().find(|l| l.role == "teacher").cloned();
    let all = lines.clone();
    for l in &mut lines {
        l.serving = l.version == serving;
        if let Some(t) = &teacher {
            l.p50_vs_teacher = l.p50_ms / t.p50_ms.max(f64::MIN_POSITIVE);
            l.cost_vs_teacher = l.cpu_seconds_per_1k / t.cpu_seconds_per_1k.max(f64::MIN_POSITIVE);
        }
        l.on_front = !flywheel_trainer::pareto::dominated(
            (l.frozen_accuracy, l.p50_ms),
            all.iter().map(|o| (o.frozen_accuracy, o.p50_ms)),
        );
    }
    Ok(lines)
}

/// The table in Markdown.
pub fn markdown(lines: &[ModelLine], frozen_n: usize, unrated_n: usize) -> String {
    let mut s = format!(
        "| router | kind | parameters | size | accuracy, frozen split (n = {frozen_n}) | accuracy, unrated live traffic (n = {unrated_n}) | decision p50 / p99 | CPU-s per 1k | p50 vs teacher | cost vs teacher |\n|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for l in lines {
        s.push_str(&format!(
            "| {}{} `{}`{} | {} | {:.1} M | {:.0} MB | {:.1}% | {:.1}%{} | {:.1} / {:.1} ms | {:.1} | {:.2}x | {:.2}x |\n",
            l.role,
            if l.role == "student" { format!(" {}", l.name) } else { String::new() },
            l.version,
            match (l.serving, l.on_front) {
                (true, true) => " (serving; Pareto front)",
                (true, false) => " (serving)",
                (false, true) => " (Pareto front)",
                (false, false) => "",
            },
            l.kind,
            l.parameters as f64 / 1e6,
            l.size_bytes as f64 / 1e6,
            l.frozen_accuracy * 100.0,
            l.unrated_accuracy * 100.0,
            if l.unrated_live { " (live)" } else { "" },
            l.p50_ms,
            l.p99_ms,
            l.cpu_seconds_per_1k,
            l.p50_vs_teacher,
            l.cost_vs_teacher,
        ));
    }
    s
}

/// Accuracy against decision latency of the routers, the front marked.
///
/// # Errors
/// The PNG cannot be written.
pub fn plot(lines: &[ModelLine], frozen_n: usize, path: &Path) -> anyhow::Result<()> {
    let points: Vec<flywheel_trainer::plot::Point> = lines
        .iter()
        .map(|l| flywheel_trainer::plot::Point {
            name: if l.role == "student" {
                l.name.clone()
            } else {
                l.role.clone()
            },
            latency_ms: l.p50_ms,
            accuracy: l.frozen_accuracy,
            on_front: l.on_front,
        })
        .collect();
    flywheel_trainer::plot::pareto_png(
        &points,
        &format!("routers: accuracy on the frozen split (n = {frozen_n}) vs decision p50"),
        path,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_markdown_names_each_router_with_its_ratios_to_the_teacher() {
        let l = |role: &str, name: &str, p50: f64, acc: f64| ModelLine {
            role: role.into(),
            name: name.into(),
            version: format!("{name}-v"),
            kind: "encoder-classifier".into(),
            parameters: 22_700_000,
            size_bytes: 91_000_000,
            frozen_accuracy: acc,
            unrated_accuracy: acc - 0.01,
            unrated_live: role != "student",
            p50_ms: p50,
            p99_ms: p50 * 2.0,
            cpu_seconds_per_1k: p50,
            p50_vs_teacher: p50 / 200.0,
            cost_vs_teacher: p50 / 200.0,
            on_front: true,
            serving: name == "encoder-tuned",
        };
        let md = markdown(
            &[
                l("teacher", "incumbent", 200.0, 0.86),
                l("student", "encoder-tuned", 12.0, 0.85),
            ],
            253,
            260,
        );
        assert!(md.contains("accuracy, frozen split (n = 253)"), "{md}");
        assert!(
            md.contains("| student encoder-tuned `encoder-tuned-v` (serving; Pareto front) |"),
            "{md}"
        );
        assert!(md.contains("| 0.06x | 0.06x |"), "{md}");
        assert!(md.contains("| 85.0% (live) |") || md.contains("| 85.0% |"), "{md}");
    }
}
