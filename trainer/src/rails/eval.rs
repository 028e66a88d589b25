//! `eval-rails`: measure each rail on a labelled file.
//!
//! Rows labelled as attacks (`jailbreak`, `injection`, `attack`, `harmful`,
//! `unsafe`, `1`) are positives for the jailbreak rail; `benign`, `safe`,
//! `0` rows are negatives (others are ignored by it). Rows labelled `pii`
//! are positives for the PII rail (any entity found), `no_pii` negatives.
//! Span-level PII recall and precision come from a Presidio-format file.
//! Latency is measured per rail and for all input rails together, through
//! the same [`RailSet`] the server runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use flywheel_router::guardrails::InputRails;
use flywheel_router::guardrails::pii::{self, PiiKind};
use flywheel_router::guardrails::rails::{JailbreakDetector, RailSet};
use serde::{Deserialize, Serialize};

use super::data::Row;

const POSITIVE: &[&str] = &["jailbreak", "injection", "attack", "harmful", "unsafe", "1", "true"];
const NEGATIVE: &[&str] = &["benign", "safe", "0", "false"];

/// Percentiles of a latency set (ms).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Samples.
    pub n: usize,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Latency {
    /// The percentiles of `v` (any order).
    pub fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Self {
            p50: percentile(&v, 0.5),
            p99: percentile(&v, 0.99),
            n: v.len(),
        }
    }
}

/// Binary classification quality of one rail.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RailReport {
    /// Positives caught / positives.
    pub detection_rate: f64,
    /// Negatives flagged / negatives.
    pub false_positive_rate: f64,
    /// Flagged positives / flagged.
    pub precision: f64,
    /// Confusion table: `tp`, `fn`, `fp`, `tn`.
    pub confusion: BTreeMap<String, usize>,
    /// Time per decision.
    pub latency_ms: Latency,
    /// Per-source detection or false-positive rates.
    pub by_source: BTreeMap<String, f64>,
    /// Detection and false-positive rates at other thresholds (jailbreak rail).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sweep: Vec<SweepPoint>,
}

/// One point of a threshold sweep.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// Threshold.
    pub threshold: f32,
    /// Detection rate at it.
    pub detection_rate: f64,
    /// False-positive rate at it.
    pub false_positive_rate: f64,
}

fn sweep(scored: &[(bool, f32)]) -> Vec<SweepPoint> {
    let pos = scored.iter().filter(|(p, _)| *p).count().max(1) as f64;
    let neg = scored.iter().filter(|(p, _)| !*p).count().max(1) as f64;
    [0.5f32, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]
        .into_iter()
        .map(|t| SweepPoint {
            threshold: t,
            detection_rate: scored.iter().filter(|(p, s)| *p && *s >= t).count() as f64 / pos,
            false_positive_rate: scored.iter().filter(|(p, s)| !*p && *s >= t).count() as f64 / neg,
        })
        .collect()
}

fn report(outcomes: &[(bool, bool, String)], latencies: Vec<f64>) -> RailReport {
    let count = |p: bool, f: bool| outcomes.iter().filter(|(pos, flag, _)| *pos == p && *flag == f).count();
    let (tp, fnn, fp, tn) = (
        count(true, true),
        count(true, false),
        count(false, true),
        count(false, false),
    );
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let mut by_source: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (_, flag, source) in outcomes {
        // Flag rate per source: detection for attack sources, false
        // positives for benign ones.
        let e = by_source.entry(source.clone()).or_default();
        e.0 += usize::from(*flag);
        e.1 += 1;
    }
    RailReport {
        detection_rate: ratio(tp, tp + fnn),
        false_positive_rate: ratio(fp, fp + tn),
        precision: ratio(tp, tp + fp),
        confusion: BTreeMap::from([
            ("tp".into(), tp),
            ("fn".into(), fnn),
            ("fp".into(), fp),
            ("tn".into(), tn),
        ]),
        latency_ms: Latency::of(latencies),
        by_source: by_source.into_iter().map(|(k, (f, n))| (k, ratio(f, n))).collect(),
        sweep: Vec::new(),
    }
}

/// Span-level PII quality on a Presidio-format file, for the entity types
/// the rail detects.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PiiSpanReport {
    /// Gold spans of covered types found (overlapping a detection of the same type).
    pub recall: f64,
    /// Detections that overlap a gold span of the same type.
    pub precision: f64,
    /// Recall per Presidio entity type (covered types).
    pub recall_by_type: BTreeMap<String, f64>,
    /// Gold spans of types the rail does not cover (names, addresses, ...), not counted above.
    pub uncovered_spans: BTreeMap<String, usize>,
    /// Sentences.
    pub samples: usize,
    /// Up to 20 missed gold spans, `TYPE: value`.
    pub missed: Vec<String>,
    /// Up to 20 detections matching no gold span, `kind: value`.
    pub spurious: Vec<String>,
}

fn presidio_kind(t: &str) -> Option<PiiKind> {
    match t {
        "EMAIL_ADDRESS" => Some(PiiKind::Email),
        "IBAN_CODE" => Some(PiiKind::Iban),
        "CREDIT_CARD" => Some(PiiKind::CreditCard),
        "US_SSN" => Some(PiiKind::Ssn),
        "IP_ADDRESS" => Some(PiiKind::IpAddress),
        "PHONE_NUMBER" => Some(PiiKind::Phone),
        _ => None,
    }
}

/// Span recall and precision of the PII detector on a Presidio JSON file.
///
/// # Errors
/// Unreadable or malformed file.
pub fn pii_spans(path: &Path) -> anyhow::Result<PiiSpanReport> {
    #[derive(Deserialize)]
    struct Span {
        entity_type: String,
        start_position: usize,
        end_position: usize,
    }
    #[derive(Deserialize)]
    struct Sample {
        full_text: String,
        spans: Vec<Span>,
    }
    let samples: Vec<Sample> = serde_json::from_slice(&std::fs::read(path)?)?;
    let mut per_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut uncovered: BTreeMap<String, usize> = BTreeMap::new();
    let (mut found, mut gold, mut correct, mut detected) = (0, 0, 0, 0);
    let (mut missed, mut spurious) = (Vec::new(), Vec::new());
    for s in &samples {
        // Presidio positions are character offsets; ours are bytes.
        let byte = |c: usize| s.full_text.char_indices().nth(c).map_or(s.full_text.len(), |(b, _)| b);
        let dets = pii::detect(&s.full_text);
        let covered: Vec<(PiiKind, usize, usize, &str)> = s
            .spans
            .iter()
            .filter_map(|g| {
                presidio_kind(&g.entity_type)
                    .map(|k| (k, byte(g.start_position), byte(g.end_position), g.entity_type.as_str()))
            })
            .collect();
        for g in &s.spans {
            if presidio_kind(&g.entity_type).is_none() {
                *uncovered.entry(g.entity_type.clone()).or_default() += 1;
            }
        }
        for (k, a, b, name) in &covered {
            gold += 1;
            let hit = dets.iter().any(|d| d.kind == *k && d.start < *b && *a < d.end);
            found += usize::from(hit);
            if !hit && missed.len() < 20 {
                missed.push(format!("{name}: {}", &s.full_text[*a..*b]));
            }
            let e = per_type.entry((*name).to_string()).or_default();
            e.0 += usize::from(hit);
            e.1 += 1;
        }
        for d in &dets {
            detected += 1;
            let ok = covered
                .iter()
                .any(|(k, a, b, _)| d.kind == *k && d.start < *b && *a < d.end);
            correct += usize::from(ok);
            if !ok && spurious.len() < 20 {
                spurious.push(format!("{:?}: {}", d.kind, &s.full_text[d.start..d.end]));
            }
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok(PiiSpanReport {
        recall: ratio(found, gold),
        precision: ratio(correct, detected),
        recall_by_type: per_type.into_iter().map(|(k, (f, n))| (k, ratio(f, n))).collect(),
        uncovered_spans: uncovered,
        samples: samples.len(),
        missed,
        spurious,
    })
}

/// The whole evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Jailbreak rail (absent when the data has no jailbreak labels).
    pub jailbreak: Option<RailReport>,
    /// PII rail on `pii` / `no_pii` rows.
    pub pii: Option<RailReport>,
    /// PII span quality on a Presidio file.
    pub pii_spans: Option<PiiSpanReport>,
    /// All input rails together, every row.
    pub all_input_rails_ms: Latency,
    /// All input rails together on rows of 150-250 characters.
    pub all_input_rails_200_chars_ms: Latency,
    /// The jailbreak threshold used.
    pub jailbreak_threshold: Option<f32>,
    /// Rows evaluated.
    pub rows: usize,
}

/// Evaluate `rails` (and its jailbreak `detector`) on `rows`.
///
/// # Errors
/// Detector failures.
pub async fn evaluate(
    rows: &[Row],
    rails: &RailSet,
    detector: Option<&JailbreakDetector>,
) -> anyhow::Result<EvalReport> {
    let mut jb = Vec::new();
    let mut scored = Vec::new();
    let mut jb_ms = Vec::new();
    let mut pii_out = Vec::new();
    let mut pii_ms = Vec::new();
    let mut all_ms = Vec::new();
    let mut all_200 = Vec::new();
    for r in rows {
        let label = r.label.to_lowercase();
        let source = if r.source.is_empty() {
            label.clone()
        } else {
            r.source.clone()
        };
        if let Some(d) = detector
            && (POSITIVE.contains(&label.as_str()) || NEGATIVE.contains(&label.as_str()))
        {
            let t = Instant::now();
            let p = d.score(&r.text)?;
            jb_ms.push(t.elapsed().as_secs_f64() * 1e3);
            jb.push((POSITIVE.contains(&label.as_str()), p >= d.threshold(), source.clone()));
            scored.push((POSITIVE.contains(&label.as_str()), p));
        }
        if label == "pii" || label == "no_pii" {
            let t = Instant::now();
            let hit = pii::contains_pii(&r.text);
            pii_ms.push(t.elapsed().as_secs_f64() * 1e3);
            pii_out.push((label == "pii", hit, source.clone()));
        }
        let t = Instant::now();
        let _ = rails.check(&r.text).await;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        all_ms.push(ms);
        if (150..=250).contains(&r.text.chars().count()) {
            all_200.push(ms);
        }
    }
    Ok(EvalReport {
        jailbreak: (!jb.is_empty()).then(|| RailReport {
            sweep: sweep(&scored),
            ..report(&jb, jb_ms)
        }),
        pii: (!pii_out.is_empty()).then(|| report(&pii_out, pii_ms)),
        pii_spans: None,
        all_input_rails_ms: Latency::of(all_ms),
        all_input_rails_200_chars_ms: Latency::of(all_200),
        jailbreak_threshold: detector.map(JailbreakDetector::threshold),
        rows: rows.len(),
    })
}

/// A readable table of `r`.
pub fn table(r: &EvalReport) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>9}   confusion",
        "rail", "detect", "fpr", "precision", "p50 ms", "p99 ms"
    ));
    for (name, rr) in [("jailbreak", &r.jailbreak), ("pii", &r.pii)] {
        if let Some(x) = rr {
            line(format!(
                "{name:<10} {:>8.2}% {:>8.2}% {:>8.2}% {:>9.2} {:>9.2}   tp {} fn {} fp {} tn {}",
                x.detection_rate * 100.0,
                x.false_positive_rate * 100.0,
                x.precision * 100.0,
                x.latency_ms.p50,
                x.latency_ms.p99,
                x.confusion["tp"],
                x.confusion["fn"],
                x.confusion["fp"],
                x.confusion["tn"],
            ));
        }
    }
    if let Some(s) = &r.pii_spans {
        line(format!(
            "pii spans: recall {:.2}% precision {:.2}% over {} sentences; by type {:?}; not covered {:?}",
            s.recall * 100.0,
            s.precision * 100.0,
            s.samples,
            s.recall_by_type,
            s.uncovered_spans
        ));
    }
    line(format!(
        "all input rails: p50 {:.2} ms p99 {:.2} ms ({} rows); 150-250 chars: p50 {:.2} ms p99 {:.2} ms ({} rows)",
        r.all_input_rails_ms.p50,
        r.all_input_rails_ms.p99,
        r.all_input_rails_ms.n,
        r.all_input_rails_200_chars_ms.p50,
        r.all_input_rails_200_chars_ms.p99,
        r.all_input_rails_200_chars_ms.n
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_and_rates_follow_their_definitions() {
        let o = vec![
            (true, true, "a".to_string()),
            (true, false, "a".into()),
            (false, true, "b".into()),
            (false, false, "b".into()),
            (false, false, "b".into()),
            (false, false, "b".into()),
        ];
        let r = report(&o, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(r.detection_rate, 0.5);
        assert_eq!(r.false_positive_rate, 0.25);
        assert_eq!(r.precision, 0.5);
        assert_eq!(r.by_source["b"], 0.25);
        assert_eq!(r.latency_ms.p50, 2.0);
        assert_eq!(r.latency_ms.p99, 4.0);
    }

    #[test]
    fn pii_span_scoring_uses_character_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        std::fs::write(
            &p,
            r#"[{"full_text":"Zoë mails zoe@example.com","spans":[{"entity_type":"EMAIL_ADDRESS","start_position":10,"end_position":25},{"entity_type":"PERSON","start_position":0,"end_position":3}]},
                {"full_text":"call 415-555-0134 now","spans":[]}]"#,
        )
        .unwrap();
        let r = pii_spans(&p).unwrap();
        assert_eq!(r.recall, 1.0);
        assert_eq!(r.precision, 0.5); // the phone is not labelled in the file
        assert_eq!(r.uncovered_spans["PERSON"], 1);
    }
}
