//! What each training example of a classifier is trained toward: its gold
//! label (a one-hot row), or a teacher's temperature-softened distribution
//! over the labels (distillation, `flywheel-trainer distill`), each row with a
//! weight. The losses are cross-entropies against these rows, so a gold row
//! is ordinary cross-entropy and a teacher row is the KL divergence to the
//! teacher plus a constant (the teacher's entropy).

use candle_core::{D, Device, Tensor};

use super::data::TrainingData;
use super::manifest::Distillation;

/// Target distributions and weights of `n` examples over `labels` labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    labels: usize,
    /// `[n * labels]`, each row summing to 1.
    probs: Vec<f32>,
    /// `[n]`.
    weights: Vec<f32>,
}

impl Targets {
    /// No examples yet.
    pub fn new(labels: usize) -> Self {
        Self {
            labels,
            probs: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// Gold labels `y`, weight 1 each.
    pub fn hard(y: &[u32], labels: usize) -> Self {
        let mut t = Self::new(labels);
        for &l in y {
            t.push_hard(l, 1.0);
        }
        t
    }

    /// Add an example of gold label `label`.
    pub fn push_hard(&mut self, label: u32, weight: f32) {
        let at = self.probs.len();
        self.probs.resize(at + self.labels, 0.0);
        self.probs[at + label as usize] = 1.0;
        self.weights.push(weight);
    }

    /// Add an example trained toward `probs` (one per label, summing to 1).
    pub fn push_soft(&mut self, probs: &[f32], weight: f32) {
        debug_assert_eq!(probs.len(), self.labels);
        self.probs.extend_from_slice(probs);
        self.weights.push(weight);
    }

    /// Examples.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// No examples.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Labels.
    pub fn labels(&self) -> usize {
        self.labels
    }

    /// Example `i`'s distribution.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.probs[i * self.labels..(i + 1) * self.labels]
    }

    /// Every example's weight.
    pub fn weights_mut(&mut self) -> &mut [f32] {
        &mut self.weights
    }

    /// Example `i`'s weight.
    pub fn weight(&self, i: usize) -> f32 {
        self.weights[i]
    }

    /// Each example's most likely label (its gold label, or the teacher's top one).
    pub fn top(&self) -> Vec<u32> {
        (0..self.len())
            .map(|i| {
                self.row(i)
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(l, _)| l as u32)
            })
            .collect()
    }

    /// Examples `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Self {
        let mut t = Self::new(self.labels);
        for &i in idx {
            t.push_soft(self.row(i), self.weights[i]);
        }
        t
    }

    /// The distributions `[idx, labels]` and weights `[idx]` of examples `idx`.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn tensors(&self, idx: &[usize], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let probs: Vec<f32> = idx.iter().flat_map(|&i| self.row(i).iter().copied()).collect();
        let weights: Vec<f32> = idx.iter().map(|&i| self.weights[i]).collect();
        Ok((
            Tensor::from_vec(probs, (idx.len(), self.labels), device)?,
            Tensor::from_vec(weights, idx.len(), device)?,
        ))
    }
}

/// The examples of a classifier run and what each is trained toward.
#[derive(Debug, Clone)]
pub struct Supervised {
    /// The examples (a teacher-labelled one carries the teacher's top label).
    pub data: TrainingData,
    /// One row per example.
    pub targets: Targets,
    /// The teacher, when some rows are its distributions.
    pub distillation: Option<Distillation>,
}

impl Supervised {
    /// Every example trained toward its gold label.
    pub fn gold(data: TrainingData) -> Self {
        let names = data.labels.names();
        let y: Vec<u32> = data
            .examples
            .iter()
            .map(|e| names.iter().position(|l| *l == e.label).unwrap_or(0) as u32)
            .collect();
        let targets = Targets::hard(&y, names.len());
        Self {
            data,
            targets,
            distillation: None,
        }
    }
}

/// `probs` softened by `temperature` (`p^(1/T)`, normalised): the teacher's
/// distribution as `softmax(log p / T)`. Above 1 it shows more of how the
/// teacher ranks the other labels; 1 leaves it as it is.
pub fn soften(probs: &[f32], temperature: f32) -> Vec<f32> {
    let logs: Vec<f32> = probs.iter().map(|p| p.max(1e-30).ln() / temperature).collect();
    let max = logs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logs.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Large-margin cosine loss (CosFace) of unit-length `features` (`[n, dim]`)
/// against `label_vectors` (`[labels, dim]`, normalised here), toward target
/// distributions `probs` (`[n, labels]`) with per-row `weights` (`[n]`):
/// the weighted mean over rows of the cross-entropy between the row's target
/// and `softmax(scale · (cos − margin · target))`. With one-hot targets it is
/// CosFace itself (the margin on the gold label only); a soft target takes
/// each label's margin in proportion to its probability.
///
/// # Errors
/// Tensor failures.
pub fn cosface_loss(
    features: &Tensor,
    label_vectors: &Tensor,
    probs: &Tensor,
    weights: &Tensor,
    scale: f64,
    margin: f64,
) -> candle_core::Result<Tensor> {
    let w = label_vectors.broadcast_div(&label_vectors.sqr()?.sum_keepdim(1)?.sqrt()?)?;
    let probs = probs.to_dtype(features.dtype())?;
    let logits = ((features.matmul(&w.t()?)? - (&probs * margin)?)? * scale)?;
    soft_cross_entropy(&logits, &probs, weights)
}

/// Weighted mean over rows of `−Σ target · log_softmax(logits)`.
///
/// # Errors
/// Tensor failures.
pub fn soft_cross_entropy(logits: &Tensor, probs: &Tensor, weights: &Tensor) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let per_row = (probs * logp)?.sum(D::Minus1)?.neg()?;
    let weights = weights.to_dtype(per_row.dtype())?;
    (per_row * &weights)?.sum_all()? / f64::from(weights.sum_all()?.to_scalar::<f32>()?.max(1e-12))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn hard_targets_give_the_cosface_cross_entropy() {
        let cpu = Device::Cpu;
        let f = Tensor::new(&[[0.6f32, 0.8], [1.0, 0.0], [0.0, -1.0]], &cpu).unwrap();
        let w = Tensor::new(&[[1.0f32, 0.0], [0.0, 2.0], [-1.0, -1.0]], &cpu).unwrap();
        let y = [1u32, 0, 2];
        let t = Targets::hard(&y, 3);
        let (p, wt) = t.tensors(&[0, 1, 2], &cpu).unwrap();
        let got = cosface_loss(&f, &w, &p, &wt, 30.0, 0.35)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // By hand: logits = 30 (cos - 0.35 [gold]), mean of -log softmax at gold.
        let r = std::f32::consts::FRAC_1_SQRT_2;
        let cos = [[0.6f32, 0.8, -1.4 * r], [1.0, 0.0, -r], [0.0, -1.0, r]];
        let mut want = 0.0;
        for (r, &g) in y.iter().enumerate() {
            let z: Vec<f32> = (0..3)
                .map(|c| 30.0 * (cos[r][c] - if c == g as usize { 0.35 } else { 0.0 }))
                .collect();
            let lse = z.iter().map(|v| v.exp()).sum::<f32>().ln();
            want += lse - z[g as usize];
        }
        want /= 3.0;
        assert!((got - want).abs() < 1e-3 * want.abs().max(1.0), "{got} vs {want}");
    }

    #[test]
    fn weights_scale_each_rows_share_and_soft_rows_are_kl_plus_entropy() {
        let cpu = Device::Cpu;
        let logits = Tensor::new(&[[2.0f32, 0.0, -1.0], [0.0, 1.0, 0.0]], &cpu).unwrap();
        let mut t = Targets::new(3);
        t.push_hard(0, 3.0);
        t.push_soft(&[0.2, 0.5, 0.3], 1.0);
        let (p, w) = t.tensors(&[0, 1], &cpu).unwrap();
        let got = soft_cross_entropy(&logits, &p, &w).unwrap().to_scalar::<f32>().unwrap();
        let lsm = |z: [f32; 3]| {
            let l = z.iter().map(|v| v.exp()).sum::<f32>().ln();
            z.map(|v| v - l)
        };
        let a = -lsm([2.0, 0.0, -1.0])[0];
        let q = lsm([0.0, 1.0, 0.0]);
        let b = -(0.2 * q[0] + 0.5 * q[1] + 0.3 * q[2]);
        let want = (3.0 * a + b) / 4.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert_eq!(t.top(), vec![0, 1]);
    }

    #[test]
    fn softening_keeps_the_order_and_flattens() {
        let p = [0.7f32, 0.2, 0.1];
        assert!(soften(&p, 1.0).iter().zip(p).all(|(a, b)| (a - b).abs() < 1e-6));
        let s = soften(&p, 2.0);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(s[0] > s[1] && s[1] > s[2] && s[0] < 0.7 && s[2] > 0.1, "{s:?}");
    }
}
