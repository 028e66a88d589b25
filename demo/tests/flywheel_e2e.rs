//! The flywheel end to end, CI-sized: `flywheel-demo --quick` as a
//! process on a small labelled traffic file (four HWU64 scenarios, so the
//! experts come from the file's labels). It starts the real server with the
//! real SmolLM2 router, replays the traffic through the gRPC API, gives
//! feedback, runs a cycle (curate, a short LoRA run, evaluation, gate,
//! promotion under background traffic), replays again, runs the second
//! cycle (encoder classifiers distilled from the promoted router, the Pareto
//! gate) and replays a third time. Asserts that the router got more
//! accurate, that the promoted versions decided the replays after them,
//! that no request failed, and that the cycles' records say so.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::path::Path;

use flywheel_demo::report::DemoReport;
use flywheel_demo::traffic::HWU64_TRAFFIC;
use flywheel_router::data::journal::{CycleJournal, CycleStatus};

/// Four scenarios the zero-shot router confuses (its expert descriptions
/// are only the label names), so a short training run has room to show.
const LABELS: [&str; 4] = ["general", "iot", "play", "qa"];

fn write_traffic(path: &Path) -> usize {
    let mut reader = csv::Reader::from_reader(HWU64_TRAFFIC.as_bytes());
    let mut writer = csv::Writer::from_path(path).unwrap();
    writer.write_record(["query", "scenario"]).unwrap();
    let mut n = 0;
    for row in reader.records() {
        let row = row.unwrap();
        if LABELS.contains(&&row[1]) {
            writer.write_record([&row[0], &row[1]]).unwrap();
            n += 1;
        }
    }
    writer.flush().unwrap();
    n
}

#[test]
fn one_cycle_makes_the_router_more_accurate_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let traffic = dir.path().join("traffic.csv");
    assert!(write_traffic(&traffic) > 200);
    let out = dir.path().join("demo");
    let models = flywheel_router::testing::test_model().canonicalize().unwrap();
    let models_dir = models.parent().unwrap().to_str().unwrap();
    // The second cycle's students: two encoder classifiers, and one whose
    // base model does not exist (it fails; the others go on).
    let students = dir.path().join("students.toml");
    let encoder = Path::new(models_dir).join("all-minilm-l6-v2");
    std::fs::write(
        &students,
        format!(
            "[[candidate]]\nname = \"encoder-tuned\"\nkind = \"encoder-classifier\"\nencoder = {enc:?}\n\
             encoder_training = \"end-to-end\"\nepochs = 1\n\n\
             [[candidate]]\nname = \"encoder-head\"\nkind = \"encoder-classifier\"\nencoder = {enc:?}\n\n\
             [[candidate]]\nname = \"broken\"\nkind = \"decoder-classifier\"\nbase = \"no/such/model.gguf\"\n",
            enc = encoder.display().to_string()
        ),
    )
    .unwrap();
    let stdout = common::demo(&[
        "--students",
        students.to_str().unwrap(),
        "--quick",
        "--traffic",
        traffic.to_str().unwrap(),
        "--text-column",
        "query",
        "--label-column",
        "scenario",
        "--requests",
        "140",
        // Every wrong route gets a reviewer's label, and the short run makes
        // more passes: enough signal for a clear gain in a CI-sized run.
        "--reviewer-share",
        "1.0",
        "--epochs",
        "10",
        "--background-pause-ms",
        "300",
        "--out",
        out.to_str().unwrap(),
        "--models-dir",
        models_dir,
    ]);
    let report: DemoReport = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let summary = format!("{stdout}\n{}", std::fs::read_to_string(out.join("report.md")).unwrap());

    // The experts came from the file's labels.
    assert_eq!(report.experts, 4, "{summary}");
    assert_eq!(report.device, "cpu", "{summary}");
    assert!(summary.contains("models on `cpu`"), "{summary}");
    let config = std::fs::read_to_string(out.join("server.toml")).unwrap();
    for label in LABELS {
        assert!(config.contains(&format!("name = \"{label}\"")), "{config}");
    }

    // The cycle promoted a fine-tuned router through the gate.
    let cycle = &report.cycle;
    assert_eq!(cycle.status, CycleStatus::Promoted, "{summary}");
    let stages: Vec<&str> = cycle.stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(stages, ["curate", "train", "evaluate", "promote"]);
    let version = cycle.candidate_version.clone().unwrap();
    let metrics = cycle.metrics.clone().unwrap();
    assert!(
        metrics.candidate_accuracy >= metrics.incumbent_accuracy - 0.01,
        "{summary}"
    );

    // More accurate after the cycle, on the whole replay and on the requests
    // that never reached training.
    assert!(report.after.accuracy_all > report.before.accuracy_all, "{summary}");
    assert!(
        report.after.accuracy_held_out > report.before.accuracy_held_out,
        "{summary}"
    );
    assert!(report.after.held_out > 0);

    // The promoted version decided every answered request of the second
    // replay; the first was the base model's.
    assert_eq!(report.after.router_version, version, "{summary}");
    assert_eq!(
        report.after.served_by_version,
        report.after.requests - report.after.refused,
        "{summary}"
    );
    assert_ne!(report.before.router_version, version);

    // No request failed: not in the replays, not while the model was swapped.
    assert_eq!((report.before.failed, report.after.failed), (0, 0), "{summary}");
    assert!(report.background.requests > 0);
    assert_eq!(report.background.failed, 0, "{summary}");

    // The journal in the registry holds the same record (what Admin.ListCycles serves).
    let journal = CycleJournal::open(&out.join("registry")).unwrap();
    assert_eq!(journal.get(&cycle.id).unwrap(), *cycle);
    assert!(out.join("route_latency.png").is_file());

    // The second cycle distilled the promoted router into classifier
    // students over the logged traffic and put them all, with the
    // incumbent, through the Pareto gate on the same frozen split.
    let students = report.students.as_ref().expect("the second cycle ran");
    let second = &students.cycle;
    assert!(
        matches!(second.status, CycleStatus::Promoted | CycleStatus::Rejected),
        "{summary}"
    );
    assert_eq!(
        second.dataset.as_ref().unwrap().test,
        cycle.dataset.as_ref().unwrap().test
    );
    let trained: Vec<(&str, bool, bool)> = second
        .candidates
        .iter()
        .map(|c| (c.name.as_str(), c.distilled, c.error.is_none()))
        .collect();
    assert_eq!(
        trained,
        [
            ("encoder-tuned", true, true),
            ("encoder-head", true, true),
            ("broken", true, false)
        ],
        "{summary}"
    );
    let gate = second.gate.as_ref().unwrap();
    assert_eq!(gate.teacher.as_deref(), Some(version.as_str()), "{summary}");
    let rows: Vec<&str> = gate.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        rows,
        ["encoder-tuned", "encoder-head", "incumbent", "broken"],
        "{summary}"
    );
    let broken = &gate.models[3];
    assert!(
        !broken.holds && broken.verdict.starts_with("training failed: "),
        "{broken:?}"
    );
    let incumbent = &gate.models[2];
    assert_eq!(incumbent.version, version);
    for m in &gate.models[..2] {
        assert_eq!(m.kind, "encoder-classifier");
        // MiniLM-L6 and a head: ~22.7M weights against the teacher's 135M.
        assert!(m.parameters > 20_000_000 && m.parameters < 25_000_000, "{m:?}");
        assert!(m.parameters * 4 < incumbent.parameters, "{m:?} vs {incumbent:?}");
        assert!(m.teacher_agreement.unwrap() > 0.5, "{m:?}");
        assert!(!m.verdict.is_empty());
    }
    // The gate's choice is the cheapest model that holds.
    let holding: Vec<_> = gate.models.iter().filter(|m| m.holds).collect();
    let cheapest = holding.iter().min_by(|a, b| a.p50_ms.total_cmp(&b.p50_ms)).unwrap();
    if cheapest.incumbent {
        assert_eq!((second.status, gate.winner.as_deref()), (CycleStatus::Rejected, None));
    } else {
        assert_eq!(gate.winner.as_deref(), Some(cheapest.name.as_str()), "{summary}");
        assert_eq!(second.status, CycleStatus::Promoted);
        // The winner decided the third replay.
        assert_eq!(students.after.router_version, cheapest.version, "{summary}");
    }
    assert_eq!(journal.get(&second.id).unwrap(), *second);
    // The seed's table: the base, the teacher and both students, with ratios to the teacher.
    let roles: Vec<&str> = students.table.iter().map(|l| l.role.as_str()).collect();
    assert_eq!(roles, ["base", "student", "student", "teacher"], "{summary}");
    let teacher = &students.table[3];
    assert!((teacher.p50_vs_teacher - 1.0).abs() < 1e-9);
    assert!(students.table.iter().all(|l| l.unrated_accuracy > 0.0), "{summary}");
    assert!(students.table[1].p50_vs_teacher < 1.0, "{summary}");
    assert!(summary.contains("p50 vs teacher"), "{summary}");
    assert_eq!((students.after.failed, students.background.failed), (0, 0), "{summary}");
    assert!(out.join("pareto.png").is_file());
    println!("{summary}");
}
