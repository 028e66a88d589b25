//! AdamW (Loshchilov & Hutter) with its moments exposed, so a checkpoint can
//! save and restore them and a resumed run continues exactly where it stopped
//! (candle-nn's optimizer keeps its state private).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Optimizer settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimizer over named variables.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken.
    pub step: usize,
    params: AdamWParams,
}

impl AdamW {
    /// An optimizer with zero moments.
    ///
    /// # Errors
    /// Tensor allocation failures.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> candle_core::Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<Result<Vec<_>, _>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            vars,
            m,
            v,
            step: 0,
            params,
        })
    }

    /// One update with learning rate `lr`; variables without a gradient are left alone.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> candle_core::Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let c1 = 1.0 - p.beta1.powi(t);
        let c2 = 1.0 - p.beta2.powi(t);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&m / c1)?;
            let v_hat = (&v / c2)?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Variables and moments by name (`<var>`, `<var>.adam_m`, `<var>.adam_v`).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, var)) in self.vars.iter().enumerate() {
            out.insert(name.clone(), var.as_tensor().clone());
            out.insert(format!("{name}.adam_m"), self.m[i].clone());
            out.insert(format!("{name}.adam_v"), self.v[i].clone());
        }
        out
    }

    /// Restore variables and moments saved by [`AdamW::state`] after `step` steps.
    ///
    /// # Errors
    /// A missing or mis-shaped entry.
    pub fn restore(&mut self, state: &HashMap<String, Tensor>, step: usize) -> candle_core::Result<()> {
        let get = |key: &str| {
            state
                .get(key)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint has no `{key}`")))
        };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            // Checkpoints are read into host memory; the run may be on a GPU.
            let dev = var.device();
            var.set(&get(name)?.to_device(dev)?)?;
            self.m[i] = get(&format!("{name}.adam_m"))?.to_device(dev)?;
            self.v[i] = get(&format!("{name}.adam_v"))?.to_device(dev)?;
        }
        self.step = step;
        Ok(())
    }
}
