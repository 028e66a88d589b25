//! The demo's traffic: labelled queries (the embedded HWU64 sample or any
//! JSONL/CSV with text and label columns) and an expert set matching their
//! labels.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use flywheel_trainer::curate::dataset::{Columns, LabelSource, read_examples_with};

/// The embedded default traffic: 2,400 HWU64 queries (CC BY 4.0) labelled
/// with their scenario; see `trainer/data/hwu64/README.md`.
pub const HWU64_TRAFFIC: &str = include_str!("../../trainer/data/hwu64/traffic.csv");
/// The experts of the default traffic: HWU64's 18 scenarios.
pub const HWU64_CONFIG: &str = include_str!("../../server/config/hwu64.toml");

/// One query with the expert that should answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// What the user asks.
    pub text: String,
    /// The expert that should answer (the label as an expert name).
    pub expert: String,
}

/// An expert name for a label: lower case, whitespace as `_`.
pub fn expert_name(label: &str) -> String {
    label
        .trim()
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .flat_map(char::to_lowercase)
        .collect()
}

/// Read a labelled file; every label becomes an expert name.
///
/// # Errors
/// An unreadable file, or fewer than two labels.
pub fn read(path: &Path, columns: &Columns) -> anyhow::Result<Vec<Query>> {
    let rows = read_examples_with(path, LabelSource::Import, columns)
        .with_context(|| format!("reading the traffic file {}", path.display()))?;
    let queries: Vec<Query> = rows
        .into_iter()
        .filter(|e| !e.text.trim().is_empty() && !e.label.trim().is_empty())
        .map(|e| Query {
            text: e.text,
            expert: expert_name(&e.label),
        })
        .collect();
    let labels = label_counts(&queries);
    anyhow::ensure!(
        labels.len() >= 2,
        "{} has {} distinct label(s) in its label column; routing needs at least two",
        path.display(),
        labels.len()
    );
    Ok(queries)
}

/// Queries per expert.
pub fn label_counts(queries: &[Query]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for q in queries {
        *counts.entry(q.expert.clone()).or_insert(0) += 1;
    }
    counts
}

/// `n` queries in a seeded random order (all of them when there are fewer).
pub fn sample(queries: &[Query], n: usize, seed: u64) -> Vec<Query> {
    let mut all = queries.to_vec();
    all.shuffle(&mut StdRng::seed_from_u64(seed));
    all.truncate(n);
    all
}

/// A server config whose experts are the traffic's labels (the most
/// frequent one is the fallback; the threshold is 0, so it only answers
/// what the router sends it).
pub fn experts_config(queries: &[Query]) -> String {
    let counts = label_counts(queries);
    let fallback = counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(name, _)| name.clone())
        .unwrap_or_default();
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut out = format!(
        "# Experts generated from the traffic's labels by `flywheel-demo`.\n\n\
         [router]\n\
         model = \"smollm2\"\n\
         instructions = \"You route requests to the right expert. Reply with the name of the one expert that should handle the request.\"\n\
         fallback_expert = {}\n\
         confidence_threshold = 0.0\n\
         calibrate = true\n",
        quote(&fallback)
    );
    for name in counts.keys() {
        let words = name.replace(['_', '-'], " ");
        out.push_str(&format!(
            "\n[[experts]]\nname = {}\ndescription = {}\nsystem_prompt = {}\n",
            quote(name),
            quote(&format!("{words} requests")),
            quote(&format!("You are the {words} expert. Answer briefly.")),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str, expert: &str) -> Query {
        Query {
            text: text.into(),
            expert: expert.into(),
        }
    }

    #[test]
    fn labels_become_valid_expert_names() {
        assert_eq!(expert_name(" Card Payment "), "card_payment");
        assert_eq!(expert_name("IoT"), "iot");
    }

    #[test]
    fn the_generated_config_serves_the_labels_with_the_commonest_as_fallback() {
        let traffic = [
            q("a", "weather"),
            q("b", "alarm"),
            q("c", "weather"),
            q("d", "card_\"x\""),
        ];
        let text = experts_config(&traffic);
        let config = flywheel_server::Config::from_toml(&text).unwrap();
        config.settings.validate().unwrap();
        let names: Vec<&str> = config.settings.experts.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["alarm", "card_\"x\"", "weather"]);
        assert_eq!(config.settings.router.fallback_expert, "weather");
    }

    #[test]
    fn the_embedded_traffic_reads_with_the_hwu64_experts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, HWU64_TRAFFIC).unwrap();
        let columns = Columns {
            text: "text".into(),
            label: "label".into(),
        };
        let traffic = read(&path, &columns).unwrap();
        assert_eq!(traffic.len(), 2400);
        let config = flywheel_server::Config::from_toml(HWU64_CONFIG).unwrap();
        let experts: Vec<String> = config.settings.experts.iter().map(|e| e.name.clone()).collect();
        let labels: Vec<String> = label_counts(&traffic).into_keys().collect();
        assert_eq!(labels, experts);
        let s = sample(&traffic, 10, 1);
        assert_eq!(s, sample(&traffic, 10, 1));
        assert_eq!(s.len(), 10);
    }
}
