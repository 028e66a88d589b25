//! Low-rank adapters (LoRA, Hu et al., 2021).
//!
//! A frozen weight `W` (`[out, in]`) gets a trainable update `ΔW = (α/r)·B·A`
//! with `A: [r, in]` and `B: [out, r]`. `A` starts random (Kaiming-uniform,
//! as PEFT does) and `B` at zero, so a fresh adapter leaves the model
//! unchanged. After training the update is merged into `W`, so the served
//! model runs at the base model's speed.

use candle_core::{Device, Tensor, Var};
use rand::Rng;
use rand::rngs::StdRng;

/// One adapter.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    /// `α / r`.
    pub scale: f64,
}

impl LoraAdapter {
    /// A fresh adapter for a `[out, in]` weight on `device`: `A`
    /// Kaiming-uniform from `rng`, `B` zero.
    ///
    /// # Errors
    /// Tensor creation failures.
    pub fn new(
        out_dim: usize,
        in_dim: usize,
        rank: usize,
        alpha: f64,
        rng: &mut StdRng,
        device: &Device,
    ) -> candle_core::Result<Self> {
        // PEFT: kaiming_uniform_(a=√5) on a [r, in] matrix gives a bound of 1/√in.
        let bound = 1.0 / (in_dim as f32).sqrt();
        let a: Vec<f32> = (0..rank * in_dim).map(|_| rng.random_range(-bound..bound)).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (rank, in_dim), device)?)?;
        let b = Var::zeros((out_dim, rank), candle_core::DType::F32, device)?;
        Ok(Self {
            a,
            b,
            scale: alpha / rank as f64,
        })
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `scale · x Aᵀ Bᵀ` for `x: [n, in]`.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Scaled at rank width, the narrowest point.
        x.matmul(&self.a.as_tensor().t()?)?
            .affine(self.scale, 0.0)?
            .matmul(&self.b.as_tensor().t()?)
    }

    /// `W + scale · B A`.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn merge(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        weight + self.b.as_tensor().matmul(self.a.as_tensor())?.affine(self.scale, 0.0)?
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::llama::ops::max_abs_diff;
    use crate::llama::{Linear, Weight};

    fn random(shape: (usize, usize), rng: &mut StdRng) -> Tensor {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn merged_weight_is_base_plus_scaled_b_times_a() {
        let mut rng = StdRng::seed_from_u64(1);
        let w = random((6, 5), &mut rng);
        let mut lora = LoraAdapter::new(6, 5, 2, 8.0, &mut rng, &Device::Cpu).unwrap();
        lora.b = Var::from_tensor(&random((6, 2), &mut rng)).unwrap();
        let merged = lora.merge(&w).unwrap();
        let (a, b) = (
            lora.a.as_tensor().to_vec2::<f32>().unwrap(),
            lora.b.as_tensor().to_vec2::<f32>().unwrap(),
        );
        let w_v = w.to_vec2::<f32>().unwrap();
        let m_v = merged.to_vec2::<f32>().unwrap();
        for i in 0..6 {
            for j in 0..5 {
                let ba: f32 = (0..2).map(|k| b[i][k] * a[k][j]).sum();
                let expected = w_v[i][j] + 4.0 * ba; // scale = alpha / r = 8 / 2
                assert!(
                    (m_v[i][j] - expected).abs() < 1e-5,
                    "[{i},{j}] {} vs {expected}",
                    m_v[i][j]
                );
            }
        }
        // The adapted layer and the merged layer compute the same function.
        let x = random((3, 5), &mut rng);
        let adapted = Linear {
            weight: Weight::Frozen(w.clone()),
            lora: Some(lora.clone()),
        }
        .forward(&x, None)
        .unwrap();
        let plain = Linear {
            weight: Weight::Frozen(merged),
            lora: None,
        }
        .forward(&x, None)
        .unwrap();
        assert!(max_abs_diff(&adapted, &plain) < 1e-4);
    }

    #[test]
    fn fresh_adapter_changes_nothing() {
        let mut rng = StdRng::seed_from_u64(2);
        let w = random((4, 7), &mut rng);
        let lora = LoraAdapter::new(4, 7, 3, 16.0, &mut rng, &Device::Cpu).unwrap();
        assert!(
            lora.a
                .as_tensor()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        assert_eq!(max_abs_diff(&lora.merge(&w).unwrap(), &w), 0.0);
        let x = random((2, 7), &mut rng);
        let with = Linear {
            weight: Weight::Frozen(w.clone()),
            lora: Some(lora),
        }
        .forward(&x, None)
        .unwrap();
        let without = x.matmul(&w.t().unwrap()).unwrap();
        assert_eq!(max_abs_diff(&with, &without), 0.0);
    }
}
