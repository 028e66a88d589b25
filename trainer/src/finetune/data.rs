//! The examples a training run uses: read, sampled, checked, and (for
//! label-scoring models) tokenized by the serving engine.

use std::collections::BTreeMap;

use flywheel_router::engine::mistral::MistralEngine;
use flywheel_router::engine::{ChatMessage, LabelSet};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::train::Sequence;
use super::{FinetuneError, TrainArgs};
use crate::curate::dataset::{Columns, Example, LabelSource, read_examples_with};

/// Sample at most `n` examples, keeping each label's share (largest
/// remainders), in a seeded order.
pub fn stratified_sample(examples: Vec<Example>, n: usize, seed: u64) -> Vec<Example> {
    if examples.len() <= n {
        return examples;
    }
    let mut by_label: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for e in examples {
        by_label.entry(e.label.clone()).or_default().push(e);
    }
    let total: usize = by_label.values().map(Vec::len).sum();
    let mut quotas: Vec<(String, usize, f64)> = by_label
        .iter()
        .map(|(l, v)| {
            let exact = v.len() as f64 * n as f64 / total as f64;
            (l.clone(), exact.floor() as usize, exact - exact.floor())
        })
        .collect();
    let mut left = n - quotas.iter().map(|q| q.1).sum::<usize>();
    let mut order: Vec<usize> = (0..quotas.len()).collect();
    order.sort_by(|&a, &b| quotas[b].2.total_cmp(&quotas[a].2).then(a.cmp(&b)));
    for i in order {
        if left == 0 {
            break;
        }
        quotas[i].1 += 1;
        left -= 1;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    for (label, quota, _) in quotas {
        let mut v = by_label.remove(&label).unwrap_or_default();
        v.shuffle(&mut rng);
        out.extend(v.into_iter().take(quota));
    }
    out.shuffle(&mut rng);
    out
}

/// Build the training sequences of `examples` with the serving engine's
/// tokenizer and chat template: `[system, user(text)]` + label tokens + end of
/// turn; and the lengths of those left out for being over `max_seq_len`.
///
/// # Errors
/// Engine failures.
pub async fn tokenize(
    engine: &MistralEngine,
    examples: &[Example],
    labels: &LabelSet,
    system_prompt: &str,
    max_seq_len: usize,
) -> Result<(Vec<Sequence>, Vec<usize>), FinetuneError> {
    let (label_tokens, end) = engine.label_tokens(labels).await?;
    let answers: BTreeMap<&str, Vec<u32>> = labels
        .names()
        .iter()
        .zip(label_tokens)
        .map(|(l, mut t)| {
            t.extend(end);
            (l.as_str(), t)
        })
        .collect();
    let mut out = Vec::with_capacity(examples.len());
    let mut too_long = Vec::new();
    for e in examples {
        let mut tokens = engine
            .chat_tokens(&[ChatMessage::system(system_prompt), ChatMessage::user(&e.text)])
            .await?;
        let prompt_len = tokens.len();
        tokens.extend(&answers[e.label.as_str()]);
        if tokens.len() > max_seq_len {
            too_long.push(tokens.len());
            continue;
        }
        out.push(Sequence { tokens, prompt_len });
    }
    Ok((out, too_long))
}

/// The examples a training run uses, whatever the kind of model.
#[derive(Debug, Clone)]
pub struct TrainingData {
    /// Examples (sampled when `--max-examples` is set).
    pub examples: Vec<Example>,
    /// Rows in the file.
    pub rows: usize,
    /// Examples per label.
    pub label_counts: BTreeMap<String, usize>,
    /// The model's label set.
    pub labels: LabelSet,
}

/// Read, sample and check the training data `args` names.
///
/// # Errors
/// An unreadable file, fewer than two labels, labels outside `--labels`.
pub fn read_training_data(args: &TrainArgs) -> Result<TrainingData, FinetuneError> {
    let columns = Columns {
        text: args.text_column.clone(),
        label: args.label_column.clone(),
    };
    let rows = read_examples_with(&args.data, LabelSource::Import, &columns)?;
    let n_rows = rows.len();
    let examples = match args.max_examples {
        Some(n) => stratified_sample(rows, n, args.seed),
        None => rows,
    };
    let mut label_counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &examples {
        *label_counts.entry(e.label.clone()).or_default() += 1;
    }
    if label_counts.len() < 2 {
        return Err(FinetuneError::Invalid(format!(
            "{} has {} distinct label(s) in column `{}`; a classifier needs at least 2",
            args.data.display(),
            label_counts.len(),
            args.label_column
        )));
    }
    let labels = if args.labels.is_empty() {
        LabelSet::new(label_counts.keys().cloned().collect())?
    } else {
        let oos = flywheel_router::engine::labels::OUT_OF_SCOPE_LABEL;
        let outside: Vec<&String> = label_counts
            .keys()
            .filter(|l| !args.labels.contains(l) && l.as_str() != oos)
            .collect();
        if !outside.is_empty() {
            return Err(FinetuneError::Invalid(format!(
                "{} has labels {outside:?} that are not in --labels {:?}",
                args.data.display(),
                args.labels
            )));
        }
        // Out-of-scope examples name no expert: the model learns the label
        // beside the experts, and the router sends its queries to the fallback.
        let mut names = args.labels.clone();
        if label_counts.contains_key(oos) && !names.iter().any(|l| l == oos) {
            names.push(oos.to_string());
        }
        LabelSet::new(names)?
    };
    Ok(TrainingData {
        examples,
        rows: n_rows,
        label_counts,
        labels,
    })
}
