//! End-to-end tuning of a sentence encoder for classification
//! (`--encoder-training end-to-end`): the encoder's layers learn to place
//! queries of one label together, before the head and the out-of-scope rule
//! are fitted on its embeddings as for a frozen encoder.
//!
//! Loss: large-margin cosine loss (CosFace; Lin & Xu 2019 use it for unknown
//! intent detection): cross-entropy over `scale · (cos(e, w_l) − margin·[l =
//! label])`, with label vectors that start at the frozen encoder's class
//! means. It draws each query towards its label's direction and away from
//! the others' by a margin, so labels form tight, separated clusters and a
//! query of no label lies far from all of them: what the nearest-neighbour
//! out-of-scope rule reads afterwards. The token embeddings stay frozen
//! ([`Bert`]); the layers train with AdamW, a tenth of the steps of linear
//! warm-up, then linear decay.

use std::path::Path;
use std::time::Instant;

use candle_core::{D, Device, Tensor, Var};
use flywheel_router::embed::{Embedder, padded};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::adamw::{AdamW, AdamWParams};
use super::bert::Bert;
use super::targets::{Targets, cosface_loss};

/// Settings of a tuning run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TuneSpec {
    /// Passes over the data.
    pub epochs: usize,
    /// Queries per step.
    pub batch_size: usize,
    /// Learning rate of the encoder's layers.
    pub lr: f64,
    /// Learning rate of the label vectors.
    pub head_lr: f64,
    /// Logit scale of the cosine classifier.
    pub scale: f64,
    /// Cosine margin subtracted from the true label's similarity (large
    /// margin cosine loss): a query must be nearer its label than the others
    /// by this much before the loss lets go.
    pub margin: f64,
    /// Shuffling seed.
    pub seed: u64,
}

impl Default for TuneSpec {
    fn default() -> Self {
        Self {
            epochs: 4,
            batch_size: 32,
            lr: 1e-4,
            head_lr: 1e-3,
            scale: 30.0,
            margin: 0.35,
            seed: 0,
        }
    }
}

/// What a tuning run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TuneReport {
    /// The settings.
    pub spec: TuneSpec,
    /// Mean loss of each epoch.
    pub epoch_loss: Vec<f64>,
    /// Seconds.
    pub seconds: f64,
}

/// Tune the encoder in `encoder_dir` on `texts` toward `targets` (gold
/// labels or a teacher's distributions, one row per text) and write the tuned
/// encoder (config, tokenizer, weights) to `out`.
///
/// # Errors
/// Unreadable encoder files, tensor or I/O failures.
pub fn tune(
    encoder_dir: &Path,
    texts: &[&str],
    targets: &Targets,
    spec: TuneSpec,
    out: &Path,
    quiet: bool,
) -> anyhow::Result<TuneReport> {
    let started = Instant::now();
    let device = Device::Cpu;
    let embedder = Embedder::load(encoder_dir)?;
    let bert = Bert::load(encoder_dir, &device)?;
    let windows: Vec<Vec<Vec<u32>>> = texts.iter().map(|t| embedder.windows(t)).collect::<Result<_, _>>()?;
    let dim = embedder.dim();
    // Label vectors start at the frozen encoder's class means.
    let labels = targets.labels();
    let frozen = embedder.embed_windows(&windows)?;
    let mut means = vec![0f32; labels * dim];
    for (v, l) in frozen.iter().zip(targets.top()) {
        for (m, x) in means[l as usize * dim..(l as usize + 1) * dim].iter_mut().zip(v) {
            *m += x;
        }
    }
    let label_vectors = Var::from_tensor(&Tensor::from_vec(means, (labels, dim), &device)?)?;
    let params = AdamWParams {
        weight_decay: 0.01,
        ..AdamWParams::default()
    };
    let mut encoder_opt = AdamW::new(bert.vars(), params)?;
    let mut head_opt = AdamW::new(vec![("label_vectors".into(), label_vectors.clone())], params)?;
    let steps_per_epoch = texts.len().div_ceil(spec.batch_size.max(1));
    let total = spec.epochs * steps_per_epoch;
    let bar = super::progress_bar(total, 0, quiet);
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut order: Vec<usize> = (0..texts.len()).collect();
    let mut epoch_loss = Vec::with_capacity(spec.epochs);
    let mut step = 0usize;
    for _ in 0..spec.epochs {
        order.shuffle(&mut rng);
        let mut sum = 0.0;
        for idx in order.chunks(spec.batch_size.max(1)) {
            let factor = warmup_linear(step, total);
            let embeddings = batch_embeddings(&bert, &windows, idx, &device)?;
            let (probs, weights) = targets.tensors(idx, &device)?;
            let loss = cosface_loss(
                &embeddings,
                label_vectors.as_tensor(),
                &probs,
                &weights,
                spec.scale,
                spec.margin,
            )?;
            let grads = loss.backward()?;
            encoder_opt.step(&grads, spec.lr * factor)?;
            head_opt.step(&grads, spec.head_lr * factor)?;
            sum += f64::from(loss.to_scalar::<f32>()?);
            step += 1;
            bar.inc(1);
        }
        epoch_loss.push(sum / steps_per_epoch as f64);
    }
    bar.finish_and_clear();
    std::fs::create_dir_all(out)?;
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(encoder_dir.join(f), out.join(f))?;
    }
    bert.save(&out.join("model.safetensors"))?;
    Ok(TuneReport {
        spec,
        epoch_loss,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Learning-rate factor at `step` of `total`: linear warm-up over the first
/// tenth, then linear decay.
pub fn warmup_linear(step: usize, total: usize) -> f64 {
    let warm = (total / 10).max(1);
    if step < warm {
        (step + 1) as f64 / warm as f64
    } else {
        (total - step) as f64 / (total - warm).max(1) as f64
    }
}

/// Sentence embeddings `[idx, dim]` of the texts `idx` (the normalised mean
/// of each text's windows, as the server computes it).
fn batch_embeddings(bert: &Bert, windows: &[Vec<Vec<u32>>], idx: &[usize], device: &Device) -> anyhow::Result<Tensor> {
    let flat: Vec<&[u32]> = idx.iter().flat_map(|&i| windows[i].iter().map(Vec::as_slice)).collect();
    let (ids, mask) = padded(&flat, device)?;
    let per_window = bert.embed(&ids, &mask)?;
    // Average each text's windows: [texts, windows] x [windows, dim].
    let mut avg = vec![0f32; idx.len() * flat.len()];
    let mut col = 0;
    for (r, &i) in idx.iter().enumerate() {
        let n = windows[i].len();
        for c in col..col + n {
            avg[r * flat.len() + c] = 1.0 / n as f32;
        }
        col += n;
    }
    let avg = Tensor::from_vec(avg, (idx.len(), flat.len()), device)?;
    let mean = avg.matmul(&per_window)?;
    let norm = mean.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(mean.broadcast_div(&norm)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use flywheel_router::embed::cosine;

    /// Mean similarity of same-label pairs minus that of other-label pairs.
    fn separation(e: &Embedder, texts: &[&str], y: &[u32]) -> f32 {
        let v = e.embed_batch(texts, 16).unwrap();
        let (mut same, mut other) = (Vec::new(), Vec::new());
        for i in 0..v.len() {
            for j in i + 1..v.len() {
                let s = cosine(&v[i], &v[j]);
                if y[i] == y[j] { same.push(s) } else { other.push(s) }
            }
        }
        let mean = |x: &[f32]| x.iter().sum::<f32>() / x.len() as f32;
        mean(&same) - mean(&other)
    }

    #[test]
    fn tuning_draws_each_labels_queries_together_and_the_server_loads_the_result() {
        let base = crate::finetune::tests::encoder_dir();
        let texts = [
            "wake me up at seven tomorrow",
            "set an alarm for 6 am",
            "cancel my morning alarm",
            "is it going to rain today",
            "what is the forecast for the weekend",
            "will it be sunny in Paris",
            "play some jazz",
            "put on my workout playlist",
            "skip this song",
        ];
        let y = [0, 0, 0, 1, 1, 1, 2, 2, 2];
        let out = tempfile::tempdir().unwrap();
        let spec = TuneSpec {
            epochs: 6,
            batch_size: 9,
            lr: 1e-4,
            ..TuneSpec::default()
        };
        let report = tune(&base, &texts, &Targets::hard(&y, 3), spec, out.path(), true).unwrap();
        assert_eq!(report.epoch_loss.len(), 6);
        assert!(report.epoch_loss[5] < report.epoch_loss[0], "{:?}", report.epoch_loss);
        let before = separation(&Embedder::load(&base).unwrap(), &texts, &y);
        let after = separation(&Embedder::load(out.path()).unwrap(), &texts, &y);
        assert!(after > before + 0.05, "separation {before} -> {after}");
    }
}
