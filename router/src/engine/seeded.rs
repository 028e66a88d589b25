//! Seeded sampling: the next token drawn from the softened, nucleus-cut
//! distribution with a generator seeded per request, so the same seed,
//! prompt and settings give the same answer (OpenAI's `seed`).
//!
//! Backend-independent: a backend whose sampler takes no per-request seed
//! (mistral.rs 0.8.1) runs [`SeededSampler::choose`] on each step's logits
//! and lets its own greedy sampler take the one token left possible.

use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A per-request sampler with its own seeded generator.
pub struct SeededSampler {
    temperature: f64,
    top_p: f64,
    rng: Mutex<StdRng>,
}

impl SeededSampler {
    /// Sample at `temperature` (> 0) within nucleus mass `top_p` (`None`: 1).
    pub fn new(seed: u64, temperature: f64, top_p: Option<f64>) -> Self {
        Self {
            temperature,
            top_p: top_p.unwrap_or(1.0).clamp(f64::MIN_POSITIVE, 1.0),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    /// The index of the next token given its logits.
    pub fn choose(&self, logits: &[f32]) -> usize {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return 0;
        }
        let weights: Vec<f64> = logits
            .iter()
            .map(|&l| (f64::from(l - max) / self.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        // Most likely first (ties by index, so the order is deterministic).
        let mut order: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0.0).collect();
        order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        let mut kept = 0.0;
        let mut nucleus = 0;
        for &i in &order {
            kept += weights[i];
            nucleus += 1;
            if kept >= self.top_p * total {
                break;
            }
        }
        let draw = self
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .random::<f64>()
            * kept;
        let mut acc = 0.0;
        for &i in &order[..nucleus] {
            acc += weights[i];
            if draw < acc {
                return i;
            }
        }
        order[nucleus - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(seed: u64, top_p: Option<f64>, n: usize) -> Vec<usize> {
        let s = SeededSampler::new(seed, 1.0, top_p);
        let logits = [1.0f32, 0.9, 0.8, 0.7, f32::NEG_INFINITY];
        (0..n).map(|_| s.choose(&logits)).collect()
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_another_seed_others() {
        assert_eq!(draws(42, None, 50), draws(42, None, 50));
        assert_ne!(draws(42, None, 50), draws(43, None, 50));
        // Every finite token is drawn sometimes; the impossible one never.
        let d = draws(1, None, 400);
        assert!((0..4).all(|t| d.contains(&t)) && !d.contains(&4), "{d:?}");
    }

    #[test]
    fn the_nucleus_keeps_only_the_most_likely_tokens() {
        // top_p tiny: only the most likely token survives.
        assert!(draws(5, Some(1e-6), 50).iter().all(|&t| t == 0));
        // About half the mass: the two most likely tokens (0.29 + 0.26 of it).
        let d = draws(5, Some(0.5), 200);
        assert!(d.iter().all(|&t| t <= 1) && d.contains(&1), "{d:?}");
    }
}
