//! A/B splits: live traffic of a slot divided between model versions.
//!
//! Each request is assigned an arm by a stable hash of its session id, else
//! its user id, else its request id: a session or user always lands on the
//! same version while the split stands. The arm is the model version, which
//! the request log already records for every step (`router_model_version`,
//! `expert_model_version`). The report compares arms on positive-feedback
//! rate (Wilson 95% interval), latency and tokens, and recommends an arm only
//! when a two-proportion test finds the difference significant.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::models::slots::ServedModel;
use crate::trials::shadow::sample_point;

/// Weights must sum to 1 within this.
const WEIGHT_TOLERANCE: f64 = 1e-6;
/// Significance level of the recommendation.
pub const SIGNIFICANCE: f64 = 0.05;

/// One arm of a split.
#[derive(Clone)]
pub struct Arm {
    /// Version.
    pub version: String,
    /// Share of traffic.
    pub weight: f64,
    /// The model, loaded and warm.
    pub model: Arc<ServedModel>,
}

/// A slot's split.
pub struct Split {
    /// Slot.
    pub slot: String,
    /// Arms, in the order given.
    pub arms: Vec<Arm>,
    /// Unix ms when the split started.
    pub since_ms: i64,
}

impl std::fmt::Debug for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let arms: Vec<(&str, f64)> = self.arms.iter().map(|a| (a.version.as_str(), a.weight)).collect();
        f.debug_struct("Split")
            .field("slot", &self.slot)
            .field("arms", &arms)
            .finish()
    }
}

/// Check split weights: at least two distinct versions, each weight in
/// (0, 1], summing to 1.
///
/// # Errors
/// What is wrong, in words.
pub fn validate(weights: &[(String, f64)]) -> Result<(), String> {
    if weights.len() < 2 {
        return Err("a split needs at least two versions".into());
    }
    for (i, (v, w)) in weights.iter().enumerate() {
        if !(*w > 0.0 && *w <= 1.0) {
            return Err(format!("weight of `{v}` is {w}; weights must be in (0, 1]"));
        }
        if weights[..i].iter().any(|(u, _)| u == v) {
            return Err(format!("version `{v}` appears twice"));
        }
    }
    let sum: f64 = weights.iter().map(|(_, w)| w).sum();
    if (sum - 1.0).abs() > WEIGHT_TOLERANCE {
        return Err(format!("weights sum to {sum}; they must sum to 1"));
    }
    Ok(())
}

impl Split {
    /// The arm for a request: by session id, else user id, else request id.
    pub fn pick(&self, session_id: Option<&str>, user_id: Option<&str>, request_id: &str) -> &Arm {
        let key = session_id
            .filter(|s| !s.is_empty())
            .map(|s| format!("session:{s}"))
            .or_else(|| user_id.filter(|u| !u.is_empty()).map(|u| format!("user:{u}")))
            .unwrap_or_else(|| format!("request:{request_id}"));
        let x = sample_point(&format!("{}|{key}", self.slot));
        let mut acc = 0.0;
        for arm in &self.arms {
            acc += arm.weight;
            if x < acc {
                return arm;
            }
        }
        self.arms.last().expect("a split has arms")
    }
}

/// One arm's numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArmReport {
    /// Version.
    pub version: String,
    /// Weight.
    pub weight: f64,
    /// Requests served since the split started.
    pub requests: usize,
    /// Of those, with an explicit rating.
    pub rated: usize,
    /// Rated positively.
    pub positive: usize,
    /// `positive / rated`.
    pub positive_rate: Option<f64>,
    /// Wilson 95% interval of the rate.
    pub ci_low: Option<f64>,
    /// Upper bound.
    pub ci_high: Option<f64>,
    /// Step latency p50 (ms).
    pub p50_ms: Option<f64>,
    /// Step latency p99 (ms).
    pub p99_ms: Option<f64>,
    /// Mean completion tokens.
    pub mean_completion_tokens: Option<f64>,
}

/// The split's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitReport {
    /// Slot.
    pub slot: String,
    /// Arms.
    pub arms: Vec<ArmReport>,
    /// Two-sided p-value of the best vs the worst positive rate.
    pub p_value: Option<f64>,
    /// The better version, only when the difference is significant.
    pub recommendation: Option<String>,
}

/// Wilson score interval (95%) of `k` successes in `n`.
pub fn wilson(k: usize, n: usize) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let z = 1.959_963_984_540_054_f64;
    let (n, p) = (n as f64, k as f64 / n as f64);
    let denom = 1.0 + z * z / n;
    let center = (p + z * z / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) / n) + z * z / (4.0 * n * n)).sqrt() / denom;
    Some(((center - half).max(0.0), (center + half).min(1.0)))
}

/// Complementary error function (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7).
fn erfc(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let r = poly * (-x * x).exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Two-sided p-value of a two-proportion z-test.
pub fn two_proportion_p(k1: usize, n1: usize, k2: usize, n2: usize) -> Option<f64> {
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let (p1, p2) = (k1 as f64 / n1 as f64, k2 as f64 / n2 as f64);
    let p = (k1 + k2) as f64 / (n1 + n2) as f64;
    let se = (p * (1.0 - p) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
    if se == 0.0 {
        return Some(1.0);
    }
    Some(erfc(((p1 - p2) / se).abs() / std::f64::consts::SQRT_2))
}

/// Fill `p_value` and `recommendation` from the arms' rates.
pub fn recommend(report: &mut SplitReport) {
    let rated: Vec<&ArmReport> = report.arms.iter().filter(|a| a.rated > 0).collect();
    if rated.len() < 2 {
        return;
    }
    let rate = |a: &ArmReport| a.positive as f64 / a.rated as f64;
    let best = rated.iter().max_by(|a, b| rate(a).total_cmp(&rate(b))).copied();
    let worst = rated.iter().min_by(|a, b| rate(a).total_cmp(&rate(b))).copied();
    if let (Some(b), Some(w)) = (best, worst) {
        report.p_value = two_proportion_p(b.positive, b.rated, w.positive, w.rated);
        if report.p_value.is_some_and(|p| p < SIGNIFICANCE) {
            report.recommendation = Some(b.version.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arms(weights: &[(&str, f64)]) -> Split {
        let model = Arc::new(crate::testing::stub_model("x"));
        Split {
            slot: "router".into(),
            arms: weights
                .iter()
                .map(|(v, w)| Arm {
                    version: v.to_string(),
                    weight: *w,
                    model: model.clone(),
                })
                .collect(),
            since_ms: 0,
        }
    }

    #[test]
    fn weights_must_be_positive_distinct_and_sum_to_one() {
        let w = |v: &[(&str, f64)]| v.iter().map(|(a, b)| (a.to_string(), *b)).collect::<Vec<_>>();
        assert!(validate(&w(&[("a", 0.5), ("b", 0.5)])).is_ok());
        assert!(validate(&w(&[("a", 0.5), ("b", 0.4)])).unwrap_err().contains("sum to"));
        assert!(validate(&w(&[("a", 1.0)])).is_err());
        assert!(validate(&w(&[("a", 0.5), ("a", 0.5)])).unwrap_err().contains("twice"));
        assert!(validate(&w(&[("a", 0.0), ("b", 1.0)])).is_err());
        assert!(validate(&w(&[("a", f64::NAN), ("b", 1.0)])).is_err());
    }

    #[test]
    fn assignment_is_sticky_per_session_and_follows_the_weights() {
        let split = arms(&[("a", 0.8), ("b", 0.2)]);
        let first = split.pick(Some("s1"), None, "r1").version.clone();
        for i in 0..20 {
            assert_eq!(split.pick(Some("s1"), Some("u9"), &format!("r{i}")).version, first);
        }
        let b = (0..10_000)
            .filter(|i| split.pick(None, Some(&format!("user{i}")), "r").version == "b")
            .count();
        assert!((1800..2200).contains(&b), "{b}");
    }

    #[test]
    fn statistics_match_known_values() {
        let (lo, hi) = wilson(50, 100).unwrap();
        assert!((lo - 0.4038).abs() < 1e-3 && (hi - 0.5962).abs() < 1e-3, "{lo} {hi}");
        // 60/100 vs 40/100: z = 2.828, p = 0.00468.
        let p = two_proportion_p(60, 100, 40, 100).unwrap();
        assert!((p - 0.00468).abs() < 2e-4, "{p}");
        let mut r = SplitReport {
            arms: vec![
                ArmReport {
                    version: "a".into(),
                    rated: 100,
                    positive: 60,
                    ..Default::default()
                },
                ArmReport {
                    version: "b".into(),
                    rated: 100,
                    positive: 40,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        recommend(&mut r);
        assert_eq!(r.recommendation.as_deref(), Some("a"));
        r.arms[1].positive = 55;
        r.recommendation = None;
        recommend(&mut r);
        assert_eq!(r.recommendation, None, "not significant: no recommendation");
    }
}
