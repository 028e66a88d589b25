//! The Pareto gate: of several candidate routers and the incumbent, all
//! measured on the same frozen test split, promote the cheapest candidate
//! whose accuracy is not worse than the best model's by more than the
//! tolerance (and, when a budget is set, whose p99 fits it); nothing when
//! none holds, or when the incumbent itself is the cheapest that holds.
//! Every model gets a row saying why it won or lost, and whether it is on
//! the accuracy-versus-cost Pareto front.

use serde::{Deserialize, Serialize};

use crate::eval::ModelReport;

/// What "cheapest" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CostMeasure {
    /// Median decision latency.
    #[default]
    P50,
    /// CPU seconds per 1,000 decisions.
    Cpu,
}

impl CostMeasure {
    /// The cost of `report`.
    pub fn of(self, report: &ModelReport) -> f64 {
        match self {
            CostMeasure::P50 => report.latency_p50_ms,
            CostMeasure::Cpu => report.cpu_seconds_per_1k,
        }
    }

    fn describe(self, v: f64) -> String {
        match self {
            CostMeasure::P50 => format!("p50 {v:.1} ms"),
            CostMeasure::Cpu => format!("{v:.1} CPU-s per 1k decisions"),
        }
    }
}

/// The gate's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ParetoSpec {
    /// Accuracy a winner may lose against the best model (0.02: two points).
    pub tolerance: f64,
    /// What the winner is cheapest in.
    pub cost: CostMeasure,
    /// Most p99 decision latency a winner may have (ms).
    pub max_p99_ms: Option<f64>,
}

/// One model's row: the cycle journal's, so a cycle record keeps it as decided.
pub use flywheel_router::data::journal::ModelRow as Row;

/// The gate's decision over all models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParetoDecision {
    /// The settings.
    pub spec: ParetoSpec,
    /// The most accurate model's name.
    pub best: String,
    /// The candidate to promote, if any.
    pub winner: Option<String>,
    /// Every model, candidates first, in the order given.
    pub rows: Vec<Row>,
    /// One sentence on the outcome.
    pub summary: String,
}

/// Whether another (accuracy, cost) point is at least as accurate and at
/// most as costly as `point`, strictly better in one of them (`point` is
/// then off the Pareto front).
pub fn dominated(point: (f64, f64), others: impl IntoIterator<Item = (f64, f64)>) -> bool {
    let (accuracy, cost) = point;
    others
        .into_iter()
        .any(|(a, c)| a >= accuracy && c <= cost && (a > accuracy || c < cost))
}

/// Decide among `candidates` (name, report) and the `incumbent`, all measured
/// on the same test set.
pub fn choose(candidates: &[(String, ModelReport)], incumbent: &ModelReport, spec: ParetoSpec) -> ParetoDecision {
    let mut all: Vec<(&str, &ModelReport, bool)> = candidates.iter().map(|(n, r)| (n.as_str(), r, false)).collect();
    all.push(("incumbent", incumbent, true));
    let cost = |r: &ModelReport| spec.cost.of(r);
    let best = all
        .iter()
        .max_by(|a, b| a.1.accuracy.total_cmp(&b.1.accuracy))
        .map_or(incumbent, |m| m.1);
    let best_name = all
        .iter()
        .find(|m| std::ptr::eq(m.1, best))
        .map_or("incumbent", |m| m.0)
        .to_string();
    let floor = best.accuracy - spec.tolerance;
    let fails = |r: &ModelReport| -> Vec<String> {
        let mut why = Vec::new();
        if r.accuracy + 1e-12 < floor {
            why.push(format!(
                "accuracy {:.2}% is more than {:.2} points below the best ({best_name}, {:.2}%)",
                r.accuracy * 100.0,
                spec.tolerance * 100.0,
                best.accuracy * 100.0
            ));
        }
        if let Some(max) = spec.max_p99_ms
            && r.latency_p99_ms > max
        {
            why.push(format!(
                "p99 {:.1} ms is over the budget of {max:.1} ms",
                r.latency_p99_ms
            ));
        }
        why
    };
    // The cheapest model that holds, candidates before the incumbent on a tie.
    let cheapest = all
        .iter()
        .filter(|m| fails(m.1).is_empty())
        .min_by(|a, b| cost(a.1).total_cmp(&cost(b.1)).then(a.2.cmp(&b.2)))
        .copied();
    let winner = cheapest.filter(|m| !m.2).map(|m| m.0.to_string());
    let rows = all
        .iter()
        .map(|&(name, r, is_incumbent)| {
            let on_front = !dominated(
                (r.accuracy, cost(r)),
                all.iter().map(|&(_, o, _)| (o.accuracy, cost(o))),
            );
            let why = fails(r);
            let holds = why.is_empty();
            let verdict = if !holds {
                why.join("; ")
            } else if cheapest.is_some_and(|c| c.0 == name) {
                if is_incumbent {
                    "holds and is the cheapest: keeps serving".to_string()
                } else {
                    format!("holds and is the cheapest ({}): promoted", spec.cost.describe(cost(r)))
                }
            } else {
                let c = cheapest.map_or(0.0, |c| cost(c.1));
                format!(
                    "holds, but {} costs more than {} ({})",
                    spec.cost.describe(cost(r)),
                    cheapest.map_or("", |c| c.0),
                    spec.cost.describe(c)
                )
            };
            Row {
                name: name.to_string(),
                version: r.version.clone(),
                kind: r.kind.to_string(),
                incumbent: is_incumbent,
                parameters: r.parameters,
                size_bytes: r.size_bytes,
                accuracy: r.accuracy,
                macro_f1: r.macro_f1,
                teacher_agreement: None,
                p_value_vs_best: crate::eval::compare(r, best).p_value,
                p50_ms: r.latency_p50_ms,
                p99_ms: r.latency_p99_ms,
                cpu_seconds_per_1k: r.cpu_seconds_per_1k,
                on_front,
                holds,
                verdict,
            }
        })
        .collect();
    let summary = match (&winner, cheapest) {
        (Some(w), _) => format!(
            "promote {w}: the cheapest model within {:.2} points of the best accuracy ({best_name})",
            spec.tolerance * 100.0
        ),
        (None, Some(_)) => "promote nothing: the incumbent is the cheapest model that holds".to_string(),
        (None, None) => "promote nothing: no model holds (see each row)".to_string(),
    };
    ParetoDecision {
        spec,
        best: best_name,
        winner,
        rows,
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tolerance: f64) -> ParetoSpec {
        ParetoSpec {
            tolerance,
            cost: CostMeasure::P50,
            max_p99_ms: None,
        }
    }

    fn cands(v: &[(&str, f64, f64)]) -> Vec<(String, ModelReport)> {
        v.iter()
            .map(|&(n, acc, p50)| (n.to_string(), ModelReport::fixture(n, acc, p50, p50 * 2.0)))
            .collect()
    }

    #[test]
    fn the_cheapest_candidate_within_the_tolerance_of_the_best_wins() {
        let c = cands(&[
            ("decoder-30", 0.900, 95.0),
            ("encoder", 0.913, 9.0),
            ("decoder-12", 0.897, 40.0),
            ("tiny", 0.850, 2.0),
        ]);
        let incumbent = ModelReport::fixture("label-scoring", 0.891, 250.0, 300.0);
        let d = choose(&c, &incumbent, spec(0.02));
        assert_eq!(d.best, "encoder");
        assert_eq!(d.winner.as_deref(), Some("encoder"));
        let row = |n: &str| d.rows.iter().find(|r| r.name == n).unwrap();
        assert!(!row("tiny").holds && row("tiny").verdict.contains("below the best"));
        assert!(row("decoder-12").holds && row("decoder-12").verdict.contains("costs more than encoder"));
        assert!(row("incumbent").incumbent && !row("incumbent").holds);
        // The front: tiny (cheapest) and encoder (most accurate, next cheapest).
        let front: Vec<&str> = d.rows.iter().filter(|r| r.on_front).map(|r| r.name.as_str()).collect();
        assert_eq!(front, ["encoder", "tiny"]);

        // With a wider tolerance the cheaper, less accurate one wins.
        let d = choose(&c, &incumbent, spec(0.07));
        assert_eq!(d.winner.as_deref(), Some("tiny"));
        // Cost in CPU seconds instead: the fixture's CPU cost is its p50.
        let by_cpu = choose(
            &c,
            &incumbent,
            ParetoSpec {
                cost: CostMeasure::Cpu,
                ..spec(0.02)
            },
        );
        assert_eq!(by_cpu.winner.as_deref(), Some("encoder"));
    }

    #[test]
    fn nothing_is_promoted_when_no_candidate_holds_and_each_row_says_why() {
        let c = cands(&[("a", 0.80, 5.0), ("b", 0.84, 20.0)]);
        let incumbent = ModelReport::fixture("served", 0.90, 200.0, 250.0);
        let d = choose(&c, &incumbent, spec(0.02));
        assert_eq!(d.winner, None);
        assert_eq!(d.best, "incumbent");
        assert!(d.summary.contains("incumbent is the cheapest"), "{}", d.summary);
        for r in d.rows.iter().filter(|r| !r.incumbent) {
            assert!(!r.holds && r.verdict.contains("below the best"), "{r:?}");
        }
        // A p99 budget nobody meets: nothing holds, the incumbent included.
        let strict = ParetoSpec {
            max_p99_ms: Some(1.0),
            ..spec(0.5)
        };
        let d = choose(&c, &incumbent, strict);
        assert_eq!(d.winner, None);
        assert!(d.summary.contains("no model holds"), "{}", d.summary);
        assert!(d.rows.iter().all(|r| r.verdict.contains("over the budget")));
    }

    #[test]
    fn a_cheaper_incumbent_that_holds_keeps_serving() {
        let c = cands(&[("slow", 0.92, 300.0)]);
        let incumbent = ModelReport::fixture("served", 0.91, 10.0, 20.0);
        let d = choose(&c, &incumbent, spec(0.02));
        assert_eq!(d.winner, None);
        assert_eq!(d.best, "slow");
        assert!(d.rows[1].verdict.contains("keeps serving"), "{:?}", d.rows[1]);
        // The decision round-trips as the cycle record stores it.
        let back: ParetoDecision = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }
}
