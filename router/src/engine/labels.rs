//! Label scoring without free-text generation.
//!
//! A router decision is "which of these labels would the model write next?".
//! Each label is tokenized; a label's score is the log-probability of its
//! tokens up to the point where it differs from every other label. When all
//! labels start with different tokens this is one forward pass over the prompt
//! (the usual case); labels sharing leading tokens need one extra pass per
//! shared prefix. [`LabelPlan`] works out which prefixes to evaluate and
//! combines the per-token log-probabilities; the engine only supplies them.

use std::collections::BTreeMap;

use super::EngineError;

/// A label a router model may be trained with that names no expert: a query
/// whose top label it is takes the fallback expert.
pub const OUT_OF_SCOPE_LABEL: &str = "out_of_scope";

/// A validated, ordered set of distinct labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelSet {
    names: Vec<String>,
}

impl LabelSet {
    /// Build a label set.
    ///
    /// # Errors
    /// [`EngineError::InvalidLabels`] when empty or when a label repeats or is blank.
    pub fn new(names: Vec<String>) -> Result<Self, EngineError> {
        if names.is_empty() {
            return Err(EngineError::InvalidLabels("no labels".into()));
        }
        for (i, n) in names.iter().enumerate() {
            if n.trim().is_empty() {
                return Err(EngineError::InvalidLabels(format!("label #{i} is blank")));
            }
            if names[..i].contains(n) {
                return Err(EngineError::InvalidLabels(format!("label `{n}` appears twice")));
            }
        }
        Ok(Self { names })
    }

    /// The labels, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Always false: a label set has at least one label.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Scores of a label set, in the set's order.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScores {
    /// Log-probability of each label (natural log).
    pub logprobs: Vec<f32>,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Forward passes the engine ran.
    pub forward_passes: u32,
    /// The engine judged the query unlike anything it was trained to route
    /// (classifiers with an out-of-scope rule): the fallback expert answers.
    pub out_of_scope: bool,
}

impl LabelScores {
    /// Probabilities renormalised over the labels (softmax of the log-probabilities).
    pub fn probabilities(&self) -> Vec<f32> {
        let max = self.logprobs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            let n = self.logprobs.len().max(1) as f32;
            return vec![1.0 / n; self.logprobs.len()];
        }
        let exps: Vec<f32> = self.logprobs.iter().map(|l| (l - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        exps.into_iter().map(|e| e / sum).collect()
    }
}

/// One forward pass of a plan: the prompt continued by `prefix`, and the next
/// tokens whose log-probabilities are needed there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanStep {
    /// Tokens appended to the prompt before this pass (empty for the first).
    pub prefix: Vec<u32>,
    /// Tokens whose log-probability is read at the end of the pass.
    pub next_tokens: Vec<u32>,
}

/// Which forward passes score a tokenized label set, and how to combine them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelPlan {
    /// Per label: the tokens that identify it (its distinguishing prefix).
    keys: Vec<Vec<u32>>,
    steps: Vec<PlanStep>,
}

impl LabelPlan {
    /// Plan the scoring of labels tokenized as `sequences`.
    ///
    /// `end_token` (the model's end-of-turn token) is appended to every label
    /// when one label's tokens are a prefix of another's, so that "the label
    /// ends here" can be scored.
    ///
    /// # Errors
    /// [`EngineError::InvalidLabels`] when a label tokenizes to nothing or two
    /// labels tokenize identically.
    pub fn new(sequences: &[Vec<u32>], end_token: Option<u32>) -> Result<Self, EngineError> {
        if sequences.iter().any(Vec::is_empty) {
            return Err(EngineError::InvalidLabels("a label tokenizes to no tokens".into()));
        }
        let is_prefix_of_other = sequences.iter().enumerate().any(|(i, a)| {
            sequences
                .iter()
                .enumerate()
                .any(|(j, b)| i != j && b.len() >= a.len() && b.starts_with(a))
        });
        let seqs: Vec<Vec<u32>> = if is_prefix_of_other {
            let end = end_token.ok_or_else(|| {
                EngineError::InvalidLabels(
                    "one label's tokens are a prefix of another's and the model has no end token".into(),
                )
            })?;
            sequences
                .iter()
                .map(|s| s.iter().copied().chain([end]).collect())
                .collect()
        } else {
            sequences.to_vec()
        };
        let mut keys = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            let shared = seqs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, o)| s.iter().zip(o).take_while(|(a, b)| a == b).count())
                .max()
                .unwrap_or(0);
            if shared >= s.len() {
                return Err(EngineError::InvalidLabels(format!(
                    "labels #{i} and another tokenize identically"
                )));
            }
            keys.push(s[..=shared].to_vec());
        }
        // Group the needed (prefix -> next token) lookups; BTreeMap keeps the
        // order deterministic, with the empty prefix (the prompt itself) first.
        let mut by_prefix: BTreeMap<Vec<u32>, Vec<u32>> = BTreeMap::new();
        for key in &keys {
            for k in 0..key.len() {
                let next = by_prefix.entry(key[..k].to_vec()).or_default();
                if !next.contains(&key[k]) {
                    next.push(key[k]);
                }
            }
        }
        let steps = by_prefix
            .into_iter()
            .map(|(prefix, next_tokens)| PlanStep { prefix, next_tokens })
            .collect();
        Ok(Self { keys, steps })
    }

    /// The forward passes to run.
    pub fn steps(&self) -> &[PlanStep] {
        &self.steps
    }

    /// Combine per-step log-probabilities (`step_logprobs[s][t]` is the
    /// log-probability of `steps()[s].next_tokens[t]`) into one score per label.
    ///
    /// # Panics
    /// If `step_logprobs` does not match the plan's shape (a caller bug).
    pub fn combine(&self, step_logprobs: &[Vec<f32>]) -> Vec<f32> {
        assert_eq!(step_logprobs.len(), self.steps.len(), "one result per plan step");
        self.keys
            .iter()
            .map(|key| {
                (0..key.len())
                    .map(|k| {
                        let s = self
                            .steps
                            .iter()
                            .position(|st| st.prefix == key[..k])
                            .expect("every key prefix is a step");
                        let t = self.steps[s]
                            .next_tokens
                            .iter()
                            .position(|&tok| tok == key[k])
                            .expect("every key token is in its step");
                        step_logprobs[s][t]
                    })
                    .sum()
            })
            .collect()
    }
}

/// Log-softmax of `logits` read at `tokens`.
pub fn log_softmax_at(logits: &[f32], tokens: &[u32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum: f32 = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    tokens
        .iter()
        .map(|&t| logits.get(t as usize).map_or(f32::NEG_INFINITY, |l| l - log_sum))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_first_tokens_need_one_pass() {
        let plan = LabelPlan::new(&[vec![5, 9], vec![6], vec![7, 1, 2]], None).unwrap();
        assert_eq!(plan.steps().len(), 1);
        assert_eq!(plan.steps()[0].prefix, Vec::<u32>::new());
        assert_eq!(plan.steps()[0].next_tokens, vec![5, 6, 7]);
        assert_eq!(plan.combine(&[vec![-1.0, -2.0, -3.0]]), vec![-1.0, -2.0, -3.0]);
    }

    #[test]
    fn shared_prefix_adds_a_pass_and_sums_logprobs() {
        // "takeaway" = [take, away], "takeoff" = [take, off], "music" = [music]
        let plan = LabelPlan::new(&[vec![10, 11], vec![10, 12], vec![20]], None).unwrap();
        assert_eq!(plan.steps().len(), 2);
        assert_eq!(plan.steps()[1].prefix, vec![10]);
        assert_eq!(plan.steps()[1].next_tokens, vec![11, 12]);
        let scores = plan.combine(&[vec![-0.5, -2.0], vec![-0.1, -3.0]]);
        for (got, want) in scores.iter().zip([-0.6, -3.5, -2.0]) {
            assert!((got - want).abs() < 1e-6, "{scores:?}");
        }
    }

    #[test]
    fn label_that_prefixes_another_is_scored_with_end_token() {
        let plan = LabelPlan::new(&[vec![1], vec![1, 2]], Some(99)).unwrap();
        assert_eq!(plan.steps()[1].prefix, vec![1]);
        assert_eq!(plan.steps()[1].next_tokens, vec![99, 2]);
        assert!(LabelPlan::new(&[vec![1], vec![1, 2]], None).is_err());
    }

    #[test]
    fn identical_or_empty_tokenizations_are_rejected() {
        assert!(LabelPlan::new(&[vec![1, 2], vec![1, 2]], Some(0)).is_err());
        assert!(LabelPlan::new(&[vec![], vec![1]], Some(0)).is_err());
    }

    #[test]
    fn label_set_rejects_duplicates_and_blanks() {
        assert!(LabelSet::new(vec![]).is_err());
        assert!(LabelSet::new(vec!["a".into(), "a".into()]).is_err());
        assert!(LabelSet::new(vec!["a".into(), " ".into()]).is_err());
        assert_eq!(LabelSet::new(vec!["a".into(), "b".into()]).unwrap().len(), 2);
    }

    #[test]
    fn probabilities_are_a_softmax_over_labels() {
        let s = LabelScores {
            logprobs: vec![(0.2f32).ln(), (0.6f32).ln()],
            prompt_tokens: 3,
            forward_passes: 1,
            out_of_scope: false,
        };
        let p = s.probabilities();
        assert!((p[0] - 0.25).abs() < 1e-6 && (p[1] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn log_softmax_matches_definition() {
        let lp = log_softmax_at(&[1.0, 2.0, 3.0], &[2, 0, 7]);
        let z = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        assert!((lp[0] - (3.0 - z)).abs() < 1e-6);
        assert!((lp[1] - (1.0 - z)).abs() < 1e-6);
        assert_eq!(lp[2], f32::NEG_INFINITY);
    }
}
