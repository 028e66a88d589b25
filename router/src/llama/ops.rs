//! Training ops with candle's fused forward kernels or constant operands,
//! and hand-written backward passes.
//!
//! candle's backward pass computes a gradient for every operand of every op,
//! constants included, and starts each one from a zeroed tensor: for `x Wᵀ`
//! with a frozen `W` it runs the full weight-gradient product (as much work
//! as the forward product) and zeroes and adds a weight-sized tensor, all
//! thrown away; a product with a rotary table or an added mask costs the same
//! kind of waste. And candle's fused `rms_norm` and `softmax_last_dim` (one
//! kernel each) cannot be differentiated, while the differentiable versions
//! are built from 7 and 5 small ops whose backward passes take more still.
//! On a GPU every op is a kernel launch, and training a 135M model is
//! launch-bound; on a CPU the weight gradients are a third of the products.
//!
//! So each op here runs its forward pass on detached inputs (fused kernels
//! where candle has them) and attaches the result to the graph through a
//! custom op whose forward copies it (one device copy) and whose backward is
//! the closed form for the inputs that need it. The values are the forward
//! kernels'; the gradients match the differentiable versions' to rounding
//! (see the tests).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, D, Layout, MetalStorage, Result, Shape, Storage, Tensor,
};

/// `x / sqrt(mean(x²) + eps) · alpha` over the last dimension of `x`.
/// `alpha` (`[d]`) may be a trained variable.
///
/// # Errors
/// Shape mismatches, a non-contiguous `x`.
pub fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    let y = candle_nn::ops::rms_norm(&x.detach(), &alpha.detach(), eps)?;
    if !x.track_op() && !alpha.track_op() {
        return Ok(y);
    }
    x.apply_op2_arc(alpha, Arc::new(Box::new(FusedRmsNorm { y: Precomputed(y), eps })))
}

/// Softmax over the last dimension of `x + mask` (`mask` a constant
/// broadcast to `x`, e.g. an additive causal mask; `None`: no mask).
///
/// # Errors
/// Shape mismatches.
pub fn softmax_last_dim(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let input = match mask {
        Some(m) => x.detach().broadcast_add(m)?,
        None => x.detach(),
    };
    let y = candle_nn::ops::softmax_last_dim(&input)?;
    // y = softmax(x + m): dx = y ⊙ (g − Σ g⊙y)
    attach(x, y, "fused-softmax-last-dim", |y, g| {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        g.broadcast_sub(&dot)? * y
    })
}

/// `x Wᵀ` for `x: [n, in]` and a constant `weight: [out, in]`: the backward
/// pass computes only `x`'s gradient.
///
/// # Errors
/// Shape mismatches.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let y = x.detach().matmul(&weight.t()?)?;
    let w = weight.detach();
    attach(x, y, "frozen-matmul", move |_, g| g.matmul(&w))
}

/// Rotary embedding `x·cos + swap(x)·sin` of `x: [.., t, d]` with constant
/// tables `cos`, `sin` (`[t, d]`) and `swap` the index permutation `[d]`
/// that exchanges the two halves of each rotated pair (its own inverse).
///
/// # Errors
/// Shape mismatches.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, swap: &Tensor) -> Result<Tensor> {
    let last = x.rank() - 1;
    let xd = x.detach();
    let y = (xd.broadcast_mul(cos)? + xd.index_select(swap, last)?.broadcast_mul(sin)?)?;
    let (cos, sin, swap) = (cos.detach(), sin.detach(), swap.detach());
    // dx = g·cos + swap(g·sin)
    attach(x, y, "rope", move |_, g| {
        g.broadcast_mul(&cos)? + g.broadcast_mul(&sin)?.index_select(&swap, last)?
    })
}

/// `y`, computed from `x` outside the graph, as the result of an op on `x`
/// whose backward pass gives `x`'s gradient as `bwd(y, grad_y)` (`y` itself
/// when `x` needs no gradient).
fn attach(
    x: &Tensor,
    y: Tensor,
    name: &'static str,
    bwd: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1_arc(Arc::new(Box::new(Attached {
        y: Precomputed(y),
        name,
        bwd: Box::new(bwd),
    })))
}

/// A result computed outside the graph; the custom ops below attach it to
/// the graph with their backward passes.
struct Precomputed(Tensor);

impl Precomputed {
    /// A copy of the result's storage (an op's output must be fresh
    /// storage; the fused kernels return contiguous tensors).
    fn copy<S: BackendStorage>(&self, op: &str, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let (storage, layout) = self.0.storage_and_layout();
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("{op}: the fused result is not a contiguous tensor");
        }
        let storage = pick(&storage).ok_or_else(|| candle_core::Error::Msg(format!("{op}: device mismatch")))?;
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }

    fn cpu(&self, op: &str) -> Result<(CpuStorage, Shape)> {
        self.copy(op, |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda(&self, op: &str) -> Result<(CudaStorage, Shape)> {
        self.copy(op, |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn metal(&self, op: &str) -> Result<(MetalStorage, Shape)> {
        self.copy(op, |s| match s {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
    }
}

type Backward = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

struct Attached {
    y: Precomputed,
    name: &'static str,
    bwd: Backward,
}

impl CustomOp1 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.y.cpu(self.name)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.y.cuda(self.name)
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.y.metal(self.name)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        (self.bwd)(y, g).map(Some)
    }
}

struct FusedRmsNorm {
    y: Precomputed,
    eps: f32,
}

impl CustomOp2 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.y.cpu(self.name())
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.y.cuda(self.name())
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.y.metal(self.name())
    }

    /// `y = α ⊙ x·r` with `r = (Σx²/d + eps)^-½`:
    /// `dx = r·(g⊙α) − x·(r³/d)·Σ(g⊙α⊙x)`, `dα = Σ_rows g ⊙ x·r`.
    fn bwd(&self, x: &Tensor, alpha: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let ga = g.broadcast_mul(alpha)?;
        let s = (&ga * x)?.sum_keepdim(D::Minus1)?;
        let r = x
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .affine(1.0 / d as f64, f64::from(self.eps))?
            .powf(-0.5)?;
        let k = (s * r.powf(3.0)?)?.affine(-1.0 / d as f64, 0.0)?;
        let dx = (ga.broadcast_mul(&r)? + x.broadcast_mul(&k)?)?;
        let dalpha = if alpha.track_op() {
            let gxr = (g * x.broadcast_mul(&r)?)?;
            Some(gxr.reshape((gxr.elem_count() / d, d))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(dx), dalpha))
    }
}

/// Largest absolute difference between two same-shape f32 tensors (tests
/// and equivalence checks).
///
/// # Panics
/// Tensors of different shapes or another dtype.
#[allow(clippy::expect_used)]
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("same-shape f32 tensors")
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, IndexOp, Var};

    use super::*;

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff <= tol, "max |a - b| = {diff} > {tol}");
    }

    /// A loss that weighs every output differently, so that a wrong gradient
    /// for any element shows.
    fn weighted_sum(y: &Tensor, w: &Tensor) -> Tensor {
        (y * w).unwrap().sum_all().unwrap()
    }

    #[test]
    fn rms_norm_matches_the_differentiable_one_in_value_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 1.5, (2, 3, 16), &dev).unwrap() + 0.3).unwrap()).unwrap();
        let alpha = Var::from_tensor(&Tensor::randn(1f32, 0.2, 16, &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, 16), &dev).unwrap();
        let eps = 1e-5;
        let fused = rms_norm(&x, &alpha, eps).unwrap();
        let slow = candle_nn::ops::rms_norm_slow(&x, &alpha, eps).unwrap();
        close(&fused, &slow, 1e-5);
        let gf = weighted_sum(&fused, &w).backward().unwrap();
        let gs = weighted_sum(&slow, &w).backward().unwrap();
        close(gf.get(&x).unwrap(), gs.get(&x).unwrap(), 1e-5);
        close(gf.get(&alpha).unwrap(), gs.get(&alpha).unwrap(), 1e-4);

        // A frozen weight gets no gradient; the input's is unchanged.
        let frozen = alpha.as_tensor().detach();
        let g = weighted_sum(&rms_norm(&x, &frozen, eps).unwrap(), &w)
            .backward()
            .unwrap();
        assert!(g.get(&frozen).is_none());
        close(g.get(&x).unwrap(), gs.get(&x).unwrap(), 1e-5);
    }

    #[test]
    fn softmax_matches_the_differentiable_one_in_value_and_gradients() {
        let dev = Device::Cpu;
        // Rows with a large masked entry, as attention rows have.
        let mut v: Vec<f32> = Tensor::randn(0f32, 2.0, 4 * 9, &dev).unwrap().to_vec1().unwrap();
        v[5] = -1e9;
        let x = Var::from_tensor(&Tensor::from_vec(v, (4, 9), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 9), &dev).unwrap();
        let fused = softmax_last_dim(&x, None).unwrap();
        let slow = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
        close(&fused, &slow, 1e-6);
        let rows = fused.sum(1).unwrap();
        close(&rows, &Tensor::ones(4, DType::F32, &dev).unwrap(), 1e-5);
        let gf = weighted_sum(&fused, &w).backward().unwrap();
        let gs = weighted_sum(&slow, &w).backward().unwrap();
        close(gf.get(&x).unwrap(), gs.get(&x).unwrap(), 1e-5);

        // With a broadcast additive mask (a constant: no gradient for it).
        let mask = Tensor::from_vec((0..9).map(|j| if j > 5 { -1e9f32 } else { 0.0 }).collect(), 9, &dev).unwrap();
        let fused = softmax_last_dim(&x, Some(&mask)).unwrap();
        let slow = candle_nn::ops::softmax(&x.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        close(&fused, &slow, 1e-6);
        assert_eq!(
            fused
                .i((.., 6..))
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let gf = weighted_sum(&fused, &w).backward().unwrap();
        let gs = weighted_sum(&slow, &w).backward().unwrap();
        close(gf.get(&x).unwrap(), gs.get(&x).unwrap(), 1e-5);
        assert!(gf.get(&mask).is_none());
    }

    #[test]
    fn frozen_matmul_matches_the_product_and_gives_only_the_input_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 12), &dev).unwrap()).unwrap();
        let weight = Tensor::randn(0f32, 0.3, (7, 12), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap();
        let fast = frozen_matmul(&x, &weight).unwrap();
        let slow = x.matmul(&weight.t().unwrap()).unwrap();
        close(&fast, &slow, 1e-6);
        let gf = weighted_sum(&fast, &w).backward().unwrap();
        let gs = weighted_sum(&slow, &w).backward().unwrap();
        close(gf.get(&x).unwrap(), gs.get(&x).unwrap(), 1e-6);
        assert!(gf.get(&weight).is_none());
    }

    #[test]
    fn rope_matches_the_composed_rotation_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (t, d) = (6, 8);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, t, d), &dev).unwrap()).unwrap();
        let cos = Tensor::randn(0f32, 1.0, (t, d), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (t, d), &dev).unwrap();
        let swap: Vec<u32> = (0..d as u32).map(|i| i ^ 1).collect();
        let swap = Tensor::new(swap.as_slice(), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, t, d), &dev).unwrap();
        let fast = rope(&x, &cos, &sin, &swap).unwrap();
        let slow =
            (x.broadcast_mul(&cos).unwrap() + x.index_select(&swap, 3).unwrap().broadcast_mul(&sin).unwrap()).unwrap();
        close(&fast, &slow, 1e-6);
        let gf = weighted_sum(&fast, &w).backward().unwrap();
        let gs = weighted_sum(&slow, &w).backward().unwrap();
        close(gf.get(&x).unwrap(), gs.get(&x).unwrap(), 1e-5);
    }

    #[test]
    fn untracked_inputs_give_the_fused_result_without_a_graph() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
        let alpha = Tensor::ones(8, DType::F32, &dev).unwrap();
        let y = rms_norm(&x, &alpha, 1e-6).unwrap();
        assert!(!y.track_op());
        close(&y, &candle_nn::ops::rms_norm(&x, &alpha, 1e-6).unwrap(), 0.0);
        let s = softmax_last_dim(&x, None).unwrap();
        assert!(!s.track_op());
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let m = frozen_matmul(&x, &w).unwrap();
        assert!(!m.track_op());
        close(&m, &x.matmul(&w.t().unwrap()).unwrap(), 0.0);
    }
}
