//! Seeded, stratified train/validation/test splits with a leakage check.
//!
//! Order inside each label is by SHA-256 of (seed, normalised text): the
//! split depends only on the seed and the texts, not on the order rows
//! arrived in, so re-running curation on the same data gives the same split.
//! With a frozen test set (from an earlier cycle) the test split is reused
//! as is and new examples that duplicate or nearly duplicate a test text are
//! dropped, so models are compared on the same ground cycle after cycle.

use std::collections::BTreeMap;

use flywheel_router::data::similarity::{NearDupIndex, normalize};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::dataset::Example;

/// Split settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    /// Share of each label in the test split.
    pub test_fraction: f64,
    /// Share of each label in the validation split.
    pub val_fraction: f64,
    /// Seed of the ordering.
    pub seed: u64,
}

/// The three splits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Splits {
    /// Training examples.
    pub train: Vec<Example>,
    /// Validation examples (empty when the fraction is 0).
    pub val: Vec<Example>,
    /// Test examples.
    pub test: Vec<Example>,
}

fn order_key(seed: u64, text: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(normalize(text).as_bytes());
    h.finalize().into()
}

fn sorted(mut v: Vec<Example>, seed: u64) -> Vec<Example> {
    v.sort_by_cached_key(|e| order_key(seed, &e.text));
    v
}

/// How many of `n` examples of one label go to test and validation: the
/// rounded fractions, with at least one training example always, and at
/// least one test example from two examples up.
fn quotas(n: usize, spec: &SplitSpec) -> (usize, usize) {
    if n < 2 {
        return (0, 0);
    }
    let test = ((n as f64 * spec.test_fraction).round() as usize).clamp(usize::from(spec.test_fraction > 0.0), n - 1);
    let val = ((n as f64 * spec.val_fraction).round() as usize).min(n - 1 - test);
    (test, val)
}

/// Split `examples` stratified by label.
pub fn stratified(examples: Vec<Example>, spec: &SplitSpec) -> Splits {
    let mut by_label: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for e in examples {
        by_label.entry(e.label.clone()).or_default().push(e);
    }
    let mut out = Splits::default();
    for (_, group) in by_label {
        let group = sorted(group, spec.seed);
        let (n_test, n_val) = quotas(group.len(), spec);
        let mut it = group.into_iter();
        out.test.extend(it.by_ref().take(n_test));
        out.val.extend(it.by_ref().take(n_val));
        out.train.extend(it);
    }
    out.train = sorted(out.train, spec.seed);
    out.val = sorted(out.val, spec.seed);
    out.test = sorted(out.test, spec.seed);
    out
}

/// Split `examples` into train/validation around a frozen `test` set;
/// returns the splits and how many examples were dropped as (near-)
/// duplicates of a test text.
pub fn around_frozen(
    examples: Vec<Example>,
    test: Vec<Example>,
    spec: &SplitSpec,
    shingle: usize,
    threshold: f64,
) -> (Splits, usize) {
    let mut index = NearDupIndex::new(shingle, threshold);
    for t in &test {
        index.insert(&t.text);
    }
    let before = examples.len();
    let rest: Vec<Example> = examples
        .into_iter()
        .filter(|e| index.matches(&e.text).is_empty())
        .collect();
    let dropped = before - rest.len();
    let no_test = SplitSpec {
        test_fraction: 0.0,
        ..*spec
    };
    let mut splits = stratified(rest, &no_test);
    splits.test = test;
    (splits, dropped)
}

/// Pairs (a, b) with `a` in `left` and `b` in `right` whose texts are
/// duplicates or near-duplicates: the leakage between two splits.
pub fn leakage_pairs(left: &[Example], right: &[Example], shingle: usize, threshold: f64) -> usize {
    let mut index = NearDupIndex::new(shingle, threshold);
    for e in right {
        index.insert(&e.text);
    }
    left.iter().map(|e| index.matches(&e.text).len()).sum()
}

#[cfg(test)]
mod tests {
    use super::super::dataset::{LabelSource, label_counts};
    use super::*;

    fn ex(text: String, label: &str) -> Example {
        Example {
            text,
            label: label.into(),
            source: LabelSource::Import,
            request_id: None,
        }
    }

    fn skewed() -> Vec<Example> {
        let mut v = Vec::new();
        for i in 0..50 {
            v.push(ex(format!("alarm request number {i}"), "alarm"));
        }
        for i in 0..5 {
            v.push(ex(format!("weather question {i}"), "weather"));
        }
        v.push(ex("a lone music query".into(), "music"));
        v.push(ex("two calendar items a".into(), "calendar"));
        v.push(ex("two calendar items b".into(), "calendar"));
        v
    }

    fn spec() -> SplitSpec {
        SplitSpec {
            test_fraction: 0.4,
            val_fraction: 0.0,
            seed: 7,
        }
    }

    #[test]
    fn stratified_split_keeps_label_shares_on_skewed_labels() {
        let s = stratified(skewed(), &spec());
        let test = label_counts(&s.test);
        let train = label_counts(&s.train);
        assert_eq!(test["alarm"], 20);
        assert_eq!(train["alarm"], 30);
        assert_eq!(test["weather"], 2);
        assert_eq!(train["weather"], 3);
        // A single example trains; two give one of each.
        assert_eq!(train["music"], 1);
        assert!(!test.contains_key("music"));
        assert_eq!((train["calendar"], test["calendar"]), (1, 1));
        assert_eq!(s.train.len() + s.test.len(), skewed().len());
    }

    #[test]
    fn the_split_depends_on_seed_and_texts_not_input_order() {
        let a = stratified(skewed(), &spec());
        let mut reversed = skewed();
        reversed.reverse();
        let b = stratified(reversed, &spec());
        assert_eq!(a, b);
        let c = stratified(skewed(), &SplitSpec { seed: 8, ..spec() });
        assert_ne!(a.test, c.test);
    }

    #[test]
    fn validation_split_comes_out_of_the_remainder() {
        let s = stratified(
            skewed(),
            &SplitSpec {
                val_fraction: 0.1,
                ..spec()
            },
        );
        assert_eq!(label_counts(&s.val)["alarm"], 5);
        assert_eq!(label_counts(&s.train)["alarm"], 25);
    }

    #[test]
    fn a_frozen_test_set_stays_and_its_near_duplicates_leave_train() {
        let first = stratified(skewed(), &spec());
        let mut new = skewed();
        new.push(ex(
            format!("{}!", first.test[0].text.to_uppercase()),
            &first.test[0].label,
        ));
        new.push(ex("a completely new kind of request".into(), "music"));
        let (s, dropped) = around_frozen(new, first.test.clone(), &spec(), 5, 0.8);
        assert_eq!(s.test, first.test);
        assert!(dropped > first.test.len(), "dropped {dropped}");
        assert_eq!(leakage_pairs(&s.train, &s.test, 5, 0.8), 0);
        assert!(s.train.iter().any(|e| e.text == "a completely new kind of request"));
    }

    #[test]
    fn leakage_check_counts_cross_split_near_duplicates() {
        let a = vec![ex("turn off the kitchen lights please".into(), "iot")];
        let b = vec![ex("Turn off the kitchen lights, please".into(), "iot")];
        assert_eq!(leakage_pairs(&a, &b, 5, 0.8), 1);
        assert_eq!(leakage_pairs(&a, &[ex("play jazz".into(), "music")], 5, 0.8), 0);
    }
}
