//! Cleaning: drop PII-bearing texts, exact duplicates (after
//! normalisation) and near-duplicates (MinHash LSH, Jaccard threshold).
//!
//! Stronger label sources are kept first (review > correction > positive
//! feedback > import), so a duplicate of a reviewed example never displaces
//! it. Exact duplicates with different labels at the strongest source are
//! contradictory ground truth: the whole group is dropped and counted.

use std::collections::BTreeMap;

use flywheel_router::data::similarity::{NearDupIndex, normalize};
use flywheel_router::guardrails::pii;
use serde::{Deserialize, Serialize};

use super::dataset::Example;

/// What cleaning removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanReport {
    /// Examples in.
    pub input: usize,
    /// Dropped for unredacted PII.
    pub pii: usize,
    /// Dropped as exact duplicates (same normalised text).
    pub exact_duplicates: usize,
    /// Dropped because duplicates disagreed on the label.
    pub conflicting: usize,
    /// Dropped as near-duplicates of a kept example.
    pub near_duplicates: usize,
    /// Examples out.
    pub output: usize,
}

/// Cleaning settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CleanSpec {
    /// Jaccard similarity (character shingles) from which two texts are near-duplicates.
    pub near_dup_threshold: f64,
    /// Shingle size in characters.
    pub shingle: usize,
    /// Drop texts with detectable PII (redacted placeholders are fine).
    pub drop_pii: bool,
}

/// Clean `examples`; the output keeps the strongest-source-first order.
pub fn clean(mut examples: Vec<Example>, spec: &CleanSpec) -> (Vec<Example>, CleanReport) {
    let mut report = CleanReport {
        input: examples.len(),
        ..CleanReport::default()
    };
    if spec.drop_pii {
        examples.retain(|e| !pii::contains_pii(&e.text));
        report.pii = report.input - examples.len();
    }
    // Stable sort: within a source, the original (time) order is kept.
    examples.sort_by_key(|e| e.source);
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for (i, e) in examples.iter().enumerate() {
        let key = normalize(&e.text);
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(i);
    }
    let mut unique: Vec<usize> = Vec::new();
    for key in &order {
        let members = &groups[key];
        let first = &examples[members[0]];
        let strongest: Vec<&Example> = members
            .iter()
            .map(|&i| &examples[i])
            .filter(|e| e.source == first.source)
            .collect();
        if strongest.iter().any(|e| e.label != first.label) {
            report.conflicting += members.len();
            continue;
        }
        report.exact_duplicates += members.len() - 1;
        unique.push(members[0]);
    }
    unique.sort_unstable();
    let mut index = NearDupIndex::new(spec.shingle, spec.near_dup_threshold);
    let mut kept = Vec::new();
    for i in unique {
        let e = &examples[i];
        if !index.matches(&e.text).is_empty() {
            report.near_duplicates += 1;
            continue;
        }
        index.insert(&e.text);
        kept.push(e.clone());
    }
    report.output = kept.len();
    (kept, report)
}

#[cfg(test)]
mod tests {
    use super::super::dataset::LabelSource;
    use super::*;

    fn ex(text: &str, label: &str, source: LabelSource) -> Example {
        Example {
            text: text.into(),
            label: label.into(),
            source,
            request_id: None,
        }
    }

    fn spec() -> CleanSpec {
        CleanSpec {
            near_dup_threshold: 0.8,
            shingle: 5,
            drop_pii: true,
        }
    }

    #[test]
    fn removes_exact_and_near_duplicates_keeping_the_strongest_source() {
        let input = vec![
            ex("book a table for two tonight at eight", "calendar", LabelSource::Import),
            ex(
                "Book a table for two tonight, at eight!",
                "calendar",
                LabelSource::Review,
            ),
            ex(
                "book a table for two tonight at eight pm",
                "calendar",
                LabelSource::Correction,
            ),
            ex("what is the weather in paris", "weather", LabelSource::PositiveFeedback),
        ];
        let (out, report) = clean(input, &spec());
        assert_eq!(report.exact_duplicates, 1);
        assert_eq!(report.near_duplicates, 1);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].source, LabelSource::Review);
    }

    #[test]
    fn contradictory_duplicates_are_dropped_and_pii_is_filtered() {
        let input = vec![
            ex("reset my password", "it", LabelSource::Correction),
            ex("Reset my password", "hr", LabelSource::Correction),
            ex("reset my password", "finance", LabelSource::Import),
            ex("mail me at jane@example.com", "hr", LabelSource::Correction),
            ex("mail me at <EMAIL_1>", "hr", LabelSource::Correction),
        ];
        let (out, report) = clean(input, &spec());
        assert_eq!(report.pii, 1);
        assert_eq!(report.conflicting, 3);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].text, "mail me at <EMAIL_1>");
    }
}
