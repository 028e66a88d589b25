//! Training the jailbreak head: logistic regression over [embedding ;
//! signals] with candle (AdamW, class-balanced binary cross-entropy), and a
//! threshold chosen for a target false-positive rate on benign training rows.

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use flywheel_router::embed::Embedder;
use flywheel_router::guardrails::jailbreak::{Head, SIGNAL_COUNT, SIGNALS, signals};

use super::data::{JAILBREAK, Row};

/// Training settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainSpec {
    /// Full-batch optimisation steps.
    pub steps: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay (L2 pull toward simple heads that generalise).
    pub weight_decay: f64,
    /// False-positive rate the threshold allows on benign training rows.
    pub target_fpr: f64,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            steps: 400,
            learning_rate: 0.05,
            weight_decay: 0.01,
            // 0.2% let terse queries ("hr question 7") through the benign
            // training rows' tail: at 0.03% the held-out rate stays far below 1%.
            target_fpr: 0.0003,
        }
    }
}

/// Features of `rows`, read from `cache` when it was written for exactly
/// these texts by this embedder (a SHA-256 of both heads the file), else computed (and
/// written to `cache` when given).
///
/// # Errors
/// Embedder or I/O failures.
pub fn features_cached(
    embedder: &Embedder,
    rows: &[Row],
    cache: Option<&std::path::Path>,
) -> anyhow::Result<Vec<Vec<f32>>> {
    use sha2::{Digest, Sha256};
    let width = embedder.dim() + SIGNALS.len();
    let mut h = Sha256::new();
    // Another encoder, or another rule for cutting texts, means other features.
    h.update(embedder.fingerprint().as_bytes());
    for r in rows {
        h.update(r.text.as_bytes());
        h.update([0u8]);
    }
    let key: [u8; 32] = h.finalize().into();
    if let Some(path) = cache
        && let Ok(bytes) = std::fs::read(path)
        && bytes.len() == 32 + rows.len() * width * 4
        && bytes[..32] == key
    {
        let floats: Vec<f32> = bytes[32..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        return Ok(floats.chunks(width).map(<[f32]>::to_vec).collect());
    }
    let x = features(embedder, rows)?;
    if let Some(path) = cache {
        let mut bytes: Vec<u8> = key.to_vec();
        bytes.extend(x.iter().flatten().flat_map(|f| f.to_le_bytes()));
        std::fs::write(path, bytes)?;
    }
    Ok(x)
}

/// Features of `rows`: embedding then signals.
///
/// # Errors
/// Embedder failures.
pub fn features(embedder: &Embedder, rows: &[Row]) -> anyhow::Result<Vec<Vec<f32>>> {
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    let embeddings = embedder.embed_batch(&texts, 32)?;
    Ok(embeddings
        .into_iter()
        .zip(&texts)
        .map(|(mut e, t)| {
            e.extend_from_slice(&signals(t));
            e
        })
        .collect())
}

/// Train a head on `x` (features) and `rows` (labels).
///
/// # Errors
/// Tensor failures.
pub fn train(x: &[Vec<f32>], rows: &[Row], spec: &TrainSpec, embedder_name: &str) -> anyhow::Result<Head> {
    let device = Device::Cpu;
    let dim = x.first().map_or(0, Vec::len);
    anyhow::ensure!(dim > SIGNALS.len(), "no training rows");
    let n = x.len();
    let y: Vec<f32> = rows.iter().map(|r| f32::from(u8::from(r.label == JAILBREAK))).collect();
    let positives = y.iter().sum::<f32>();
    anyhow::ensure!(
        positives > 0.0 && positives < n as f32,
        "need both jailbreak and benign rows"
    );
    // Balance the classes: each contributes half of the loss.
    let w_pos = n as f32 / (2.0 * positives);
    let w_neg = n as f32 / (2.0 * (n as f32 - positives));
    let weights: Vec<f32> = y.iter().map(|&t| if t > 0.5 { w_pos } else { w_neg }).collect();
    let flat: Vec<f32> = x.iter().flatten().copied().collect();
    let xs = Tensor::from_vec(flat, (n, dim), &device)?;
    let ys = Tensor::from_vec(y.clone(), (n, 1), &device)?;
    let ws = Tensor::from_vec(weights, (n, 1), &device)?;
    // Zero initialisation: the problem is convex, and a fixed start makes
    // training deterministic.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let weight = vb.get_with_hints((1, dim), "head.weight", candle_nn::Init::Const(0.0))?;
    let bias = vb.get_with_hints(1, "head.bias", candle_nn::Init::Const(0.0))?;
    let linear = Linear::new(weight, Some(bias));
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: spec.learning_rate,
            weight_decay: spec.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    for _ in 0..spec.steps {
        let logits = linear.forward(&xs)?;
        // Weighted BCE with logits: softplus(z) - y z, numerically stable.
        let softplus = logits.exp()?.affine(1.0, 1.0)?.log()?;
        let per_row = (softplus - (&logits * &ys)?)?;
        let loss = (per_row * &ws)?.mean_all()?;
        opt.backward_step(&loss)?;
    }
    let w: Vec<f32> = linear.weight().flatten_all()?.to_vec1()?;
    let b: f32 = linear
        .bias()
        .map(|b| b.flatten_all().and_then(|t| t.to_vec1::<f32>()))
        .transpose()?
        .and_then(|v| v.first().copied())
        .unwrap_or(0.0);
    let mut head = Head {
        embedder: embedder_name.into(),
        weights: w,
        bias: b,
        threshold: 0.5,
        training: serde_json::Value::Null,
    };
    // Threshold: halfway between the benign score at the target
    // false-positive rate and the 1st-percentile attack score, so that both
    // classes keep a margin on unseen data (class-balanced training inflates
    // the rare class's probabilities, so 0.5 sits too close to odd benign
    // queries); clamped to [0.5, 0.95].
    let score = |f: &Vec<f32>| head.probability(&f[..dim - SIGNALS.len()], &tail(f));
    let mut benign: Vec<f32> = x
        .iter()
        .zip(&y)
        .filter(|(_, t)| **t < 0.5)
        .map(|(f, _)| score(f))
        .collect();
    let mut attacks: Vec<f32> = x
        .iter()
        .zip(&y)
        .filter(|(_, t)| **t > 0.5)
        .map(|(f, _)| score(f))
        .collect();
    benign.sort_by(f32::total_cmp);
    attacks.sort_by(f32::total_cmp);
    let allowed = (benign.len() as f64 * spec.target_fpr).floor() as usize;
    let benign_edge = benign
        .get(benign.len().saturating_sub(allowed + 1))
        .copied()
        .unwrap_or(0.5);
    let attack_edge = attacks.get(attacks.len() / 100).copied().unwrap_or(0.5);
    head.threshold = (f32::midpoint(benign_edge, attack_edge)).clamp(0.5, 0.95);
    Ok(head)
}

/// The signal part of a feature vector.
pub fn tail(f: &[f32]) -> [f32; SIGNAL_COUNT] {
    let mut out = [0.0; SIGNAL_COUNT];
    out.copy_from_slice(&f[f.len() - SIGNAL_COUNT..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: &str) -> Row {
        Row {
            text: String::new(),
            label: label.into(),
            source: String::new(),
        }
    }

    #[test]
    fn learns_a_separable_toy_problem_and_sets_a_strict_threshold() {
        // Feature 0 separates the classes; the signal slots are noise-free zeros.
        let mut x = Vec::new();
        let mut rows = Vec::new();
        for i in 0..200 {
            let positive = i % 10 == 0;
            let v = if positive { 1.0 } else { -1.0 } + (i % 7) as f32 * 0.01;
            let mut f = vec![v, 0.3];
            f.extend([0.0; SIGNAL_COUNT]);
            x.push(f);
            rows.push(row(if positive { JAILBREAK } else { "benign" }));
        }
        let head = train(&x, &rows, &TrainSpec::default(), "toy").unwrap();
        let p = |f: &[f32]| head.probability(&f[..2], &tail(f));
        let with_signals = |v: f32| [vec![v, 0.3], vec![0.0; SIGNAL_COUNT]].concat();
        assert!(p(&with_signals(1.0)) > 0.9);
        assert!(p(&with_signals(-1.0)) < 0.1);
        assert!(head.threshold >= 0.5);
        let fp = x
            .iter()
            .zip(&rows)
            .filter(|(f, r)| r.label != JAILBREAK && p(f) >= head.threshold)
            .count();
        assert_eq!(fp, 0);
    }
}
