//! The demo's before/after table in the seed's shape, as JSON and Markdown.

use std::collections::{BTreeMap, HashSet};

use flywheel_router::data::journal::CycleRecord;
use serde::{Deserialize, Serialize};

use super::replay::{BackgroundStats, FeedbackStats, Replay};
use flywheel_trainer::rails::eval::Latency;

/// The measurements of one replay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplayStats {
    /// Router model version that decided (the most frequent one).
    pub router_version: String,
    /// Size of its file in bytes.
    pub router_bytes: u64,
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed (any error but a rail's refusal).
    pub failed: usize,
    /// Requests the rails refused.
    pub refused: usize,
    /// Requests decided by `router_version`.
    pub served_by_version: usize,
    /// Routed right, among all answered requests.
    pub accuracy_all: f64,
    /// Routed right, among answered requests that got no feedback (a random
    /// share of the traffic that never reached curation or training).
    pub accuracy_held_out: f64,
    /// Those requests.
    pub held_out: usize,
    /// Server-side route decision latency (ms).
    pub route_p50_ms: f64,
    /// 99th percentile of it.
    pub route_p99_ms: f64,
    /// Time to first answer token of the streamed chats (ms, includes routing).
    pub ttft_p50_ms: f64,
    /// 99th percentile of it.
    pub ttft_p99_ms: f64,
    /// Streamed chats.
    pub chats: usize,
    /// Answer tokens per second of decoding, over the streamed chats.
    pub answer_tokens_per_second: f64,
    /// Requests per second over the replay.
    pub requests_per_second: f64,
    /// CPU seconds (server and client) per 1,000 requests: the cost proxy.
    pub cpu_seconds_per_1k: f64,
}

/// Measure one replay; `held_out` holds the traffic positions that got no feedback.
pub fn stats(replay: &Replay, held_out: &HashSet<usize>, version_bytes: &BTreeMap<String, u64>) -> ReplayStats {
    let ok: Vec<_> = replay.outcomes.iter().filter(|o| o.error.is_none()).collect();
    let mut by_version: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &ok {
        *by_version.entry(o.version.as_str()).or_insert(0) += 1;
    }
    let (version, served) = by_version
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or(("", 0), |(v, n)| (*v, *n));
    let share = |items: &[&&super::replay::Outcome]| {
        if items.is_empty() {
            0.0
        } else {
            items.iter().filter(|o| o.routed == o.truth).count() as f64 / items.len() as f64
        }
    };
    let all: Vec<_> = ok.iter().collect();
    let held: Vec<_> = ok.iter().filter(|o| held_out.contains(&o.index)).collect();
    let route = Latency::of(ok.iter().map(|o| o.route_ms).collect());
    let chats: Vec<_> = ok.iter().filter(|o| o.ttft_ms.is_some()).collect();
    let ttft = Latency::of(chats.iter().filter_map(|o| o.ttft_ms).collect());
    let tokens: f64 = chats
        .iter()
        .map(|o| f64::from(o.completion_tokens.saturating_sub(1)))
        .sum();
    let decode_s: f64 = chats.iter().map(|o| o.decode_ms).sum::<f64>() / 1e3;
    let n = replay.outcomes.len();
    ReplayStats {
        router_version: version.to_string(),
        router_bytes: version_bytes.get(version).copied().unwrap_or(0),
        requests: n,
        failed: replay.outcomes.iter().filter(|o| o.failed()).count(),
        refused: replay.outcomes.iter().filter(|o| o.refused()).count(),
        served_by_version: served,
        accuracy_all: share(&all),
        accuracy_held_out: share(&held),
        held_out: held.len(),
        route_p50_ms: route.p50,
        route_p99_ms: route.p99,
        ttft_p50_ms: ttft.p50,
        ttft_p99_ms: ttft.p99,
        chats: chats.len(),
        answer_tokens_per_second: if decode_s > 0.0 { tokens / decode_s } else { 0.0 },
        requests_per_second: if replay.seconds > 0.0 {
            n as f64 / replay.seconds
        } else {
            0.0
        },
        cpu_seconds_per_1k: if n > 0 {
            replay.cpu_seconds / n as f64 * 1000.0
        } else {
            0.0
        },
    }
}

/// The second cycle: routers distilled from the first cycle's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Students {
    /// Its record (candidates, the Pareto gate's table).
    pub cycle: CycleRecord,
    /// Traffic that ran while it trained, evaluated and swapped.
    pub background: BackgroundStats,
    /// The third replay (after it).
    pub after: ReplayStats,
    /// Every router of the demo, the seed's way.
    pub table: Vec<super::models::ModelLine>,
}

impl Students {
    /// Size of the frozen test split.
    pub fn frozen_n(&self) -> usize {
        self.cycle.dataset.as_ref().map_or(0, |d| d.test)
    }
}

/// Time spent in one stage of the demo.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    /// What it did.
    pub name: String,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The whole demo's report (`report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoReport {
    /// Where the traffic came from.
    pub traffic: String,
    /// Device of the models (server, training, evaluations), as asked.
    #[serde(default)]
    pub device: String,
    /// Requests per replay.
    pub requests: usize,
    /// Experts (the traffic's labels).
    pub experts: usize,
    /// The quick (CI-sized) settings were used.
    pub quick: bool,
    /// The simulated feedback.
    pub feedback: FeedbackStats,
    /// The cycle's record (dataset, gate, decision).
    pub cycle: CycleRecord,
    /// First replay (the incumbent).
    pub before: ReplayStats,
    /// Second replay (after the cycle).
    pub after: ReplayStats,
    /// Traffic that ran while the cycle trained, evaluated and swapped.
    pub background: BackgroundStats,
    /// The second cycle, when it ran (`--cycles 2`).
    #[serde(default)]
    pub students: Option<Students>,
    /// Time per stage.
    pub stages: Vec<Stage>,
    /// Whole run, seconds.
    pub total_seconds: f64,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn ms(x: f64) -> String {
    if x >= 1000.0 {
        format!("{:.2} s", x / 1000.0)
    } else {
        format!("{x:.0} ms")
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

fn ratio(before: f64, after: f64) -> String {
    if before > 0.0 && after > 0.0 {
        format!("{:.2}x", after / before)
    } else {
        "-".into()
    }
}

/// The Markdown table (also printed at the end of the demo).
pub fn markdown(r: &DemoReport) -> String {
    let (b, a) = (&r.before, &r.after);
    let m = r.cycle.metrics.as_ref();
    let mut s = String::new();
    s.push_str(&format!(
        "Traffic: {} ({} requests per replay, {} experts; models on `{}`). Feedback: {} thumbs up, {} thumbs down, {} reviewer corrections ({} noisy), {} silent.\n\n",
        r.traffic,
        r.requests,
        r.experts,
        r.device,
        r.feedback.thumbs_up,
        r.feedback.thumbs_down,
        r.feedback.corrected,
        r.feedback.noisy_corrections,
        r.feedback.silent
    ));
    if let Some(d) = &r.cycle.dataset {
        s.push_str(&format!(
            "Curated: {} train / {} test examples (frozen test split). Cycle `{}`: {}.\n\n",
            d.train,
            d.test,
            r.cycle.id,
            r.cycle.status.as_str()
        ));
    }
    s.push_str("| | before | after | after / before |\n|---|---|---|---|\n");
    let row = |s: &mut String, name: &str, x: String, y: String, z: String| {
        s.push_str(&format!("| {name} | {x} | {y} | {z} |\n"));
    };
    row(
        &mut s,
        "router model",
        b.router_version.clone(),
        a.router_version.clone(),
        String::new(),
    );
    row(
        &mut s,
        &format!("accuracy, live requests never rated (held out, n = {})", a.held_out),
        pct(b.accuracy_held_out),
        pct(a.accuracy_held_out),
        format!("{:+.1} pts", (a.accuracy_held_out - b.accuracy_held_out) * 100.0),
    );
    if let Some(m) = m {
        row(
            &mut s,
            &format!("accuracy, frozen test split (n = {}, gate)", m.n),
            pct(m.incumbent_accuracy),
            pct(m.candidate_accuracy),
            format!(
                "{:+.1} pts, McNemar p = {}",
                (m.candidate_accuracy - m.incumbent_accuracy) * 100.0,
                if m.p_value < 0.001 {
                    format!("{:.0e}", m.p_value)
                } else {
                    format!("{:.3}", m.p_value)
                }
            ),
        );
    }
    row(
        &mut s,
        "accuracy, all live requests",
        pct(b.accuracy_all),
        pct(a.accuracy_all),
        String::new(),
    );
    row(
        &mut s,
        "route latency p50",
        ms(b.route_p50_ms),
        ms(a.route_p50_ms),
        ratio(b.route_p50_ms, a.route_p50_ms),
    );
    row(
        &mut s,
        "route latency p99",
        ms(b.route_p99_ms),
        ms(a.route_p99_ms),
        ratio(b.route_p99_ms, a.route_p99_ms),
    );
    row(
        &mut s,
        &format!("TTFT p50 (streamed chats, n = {})", a.chats),
        ms(b.ttft_p50_ms),
        ms(a.ttft_p50_ms),
        ratio(b.ttft_p50_ms, a.ttft_p50_ms),
    );
    row(
        &mut s,
        "router model size",
        mb(b.router_bytes),
        mb(a.router_bytes),
        ratio(b.router_bytes as f64, a.router_bytes as f64),
    );
    row(
        &mut s,
        "answer tokens/s (decoding)",
        format!("{:.0}", b.answer_tokens_per_second),
        format!("{:.0}", a.answer_tokens_per_second),
        ratio(b.answer_tokens_per_second, a.answer_tokens_per_second),
    );
    row(
        &mut s,
        "requests/s",
        format!("{:.2}", b.requests_per_second),
        format!("{:.2}", a.requests_per_second),
        ratio(b.requests_per_second, a.requests_per_second),
    );
    row(
        &mut s,
        "cost: CPU-seconds per 1k requests",
        format!("{:.0}", b.cpu_seconds_per_1k),
        format!("{:.0}", a.cpu_seconds_per_1k),
        ratio(b.cpu_seconds_per_1k, a.cpu_seconds_per_1k),
    );
    row(
        &mut s,
        "failed requests",
        b.failed.to_string(),
        a.failed.to_string(),
        String::new(),
    );
    s.push_str(&format!(
        "\nDuring the cycle {} background requests ran, {} failed; versions that answered them: {}.\n",
        r.background.requests,
        r.background.failed,
        r.background
            .versions
            .iter()
            .map(|(v, n)| format!("`{v}` {n}"))
            .collect::<Vec<_>>()
            .join(", then ")
    ));
    if let Some(st) = &r.students {
        let c = &st.cycle;
        s.push_str(&format!(
            "\nSecond cycle `{}`: {} of {} candidates trained, from the gold labels and `{}`'s decisions over the logged traffic; {}.\n\n",
            c.id,
            c.candidates.iter().filter(|x| x.error.is_none()).count(),
            c.candidates.len(),
            c.gate.as_ref().and_then(|g| g.teacher.clone()).unwrap_or_default(),
            c.gate
                .as_ref()
                .map_or_else(|| c.status.as_str().to_string(), |g| g.summary.clone())
        ));
        s.push_str(&super::models::markdown(&st.table, st.frozen_n(), st.after.held_out));
        if let Some(g) = &c.gate {
            s.push('\n');
            for m in &g.models {
                s.push_str(&format!("- {}: {}\n", m.name, m.verdict));
            }
        }
        let (a, t) = (&r.after, &st.after);
        s.push_str(&format!(
            "\nLive, third replay (after the second cycle), router `{}`: unrated accuracy {} (teacher {}), route p50 / p99 {} / {} (teacher {} / {}, {}), CPU-seconds per 1k requests {:.0} (teacher {:.0}), {} failed; {} background requests during the cycle, {} failed.\n",
            t.router_version,
            pct(t.accuracy_held_out),
            pct(a.accuracy_held_out),
            ms(t.route_p50_ms),
            ms(t.route_p99_ms),
            ms(a.route_p50_ms),
            ms(a.route_p99_ms),
            ratio(a.route_p50_ms, t.route_p50_ms),
            t.cpu_seconds_per_1k,
            a.cpu_seconds_per_1k,
            t.failed,
            st.background.requests,
            st.background.failed
        ));
    }
    s.push_str("\n| stage | time |\n|---|---|\n");
    for st in &r.stages {
        s.push_str(&format!("| {} | {:.0} s |\n", st.name, st.seconds));
    }
    s.push_str(&format!("| **total** | **{:.1} min** |\n", r.total_seconds / 60.0));
    s
}

#[cfg(test)]
mod tests {
    use super::super::replay::Outcome;
    use super::*;

    fn outcome(index: usize, truth: &str, routed: &str, route_ms: f64) -> Outcome {
        Outcome {
            index,
            truth: truth.into(),
            routed: routed.into(),
            version: "v1".into(),
            route_ms,
            ..Outcome::default()
        }
    }

    #[test]
    fn held_out_accuracy_counts_only_unrated_requests_and_errors_count_apart() {
        let replay = Replay {
            outcomes: vec![
                outcome(0, "a", "a", 10.0),
                outcome(1, "a", "b", 20.0),
                outcome(2, "b", "b", 30.0),
                Outcome {
                    error: Some("Internal".into()),
                    ..outcome(3, "b", "", 0.0)
                },
            ],
            seconds: 2.0,
            cpu_seconds: 1.0,
        };
        let held_out: HashSet<usize> = [1, 2].into_iter().collect();
        let bytes = BTreeMap::from([("v1".to_string(), 7u64)]);
        let s = stats(&replay, &held_out, &bytes);
        assert_eq!((s.requests, s.failed, s.refused, s.served_by_version), (4, 1, 0, 3));
        assert!((s.accuracy_all - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(s.held_out, 2);
        assert!((s.accuracy_held_out - 0.5).abs() < 1e-9);
        assert_eq!((s.router_version.as_str(), s.router_bytes), ("v1", 7));
        assert!((s.requests_per_second - 2.0).abs() < 1e-9);
        assert!((s.cpu_seconds_per_1k - 250.0).abs() < 1e-9);
    }
}
