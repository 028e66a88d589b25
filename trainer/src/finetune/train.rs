//! The training loop: supervised fine-tuning with the loss on answer tokens only.
//!
//! Blocks below the first trained block never change, so their output for
//! each training sequence is computed once ([`Trainer::new`]) and every step
//! runs only the trained blocks and the head, and the head only at the answer
//! positions. With LoRA on the top blocks this is what makes an epoch fit in
//! minutes on two CPU cores.
//!
//! Everything random (adapter init, epoch order, dropout masks) derives from
//! the seed and the step number, so a run resumed from a checkpoint takes
//! exactly the steps the uninterrupted run would have taken.

use candle_core::{D, DType, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::adamw::{AdamW, AdamWParams};
use super::llama::{Linear, Llama, Target, Weight};
use super::lora::LoraAdapter;
use super::{FinetuneError, gguf_err};

/// One training sequence: prompt tokens followed by the answer tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Prompt then answer.
    pub tokens: Vec<u32>,
    /// Where the answer starts; the loss covers `tokens[prompt_len..]`.
    pub prompt_len: usize,
}

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay to zero.
    Cosine,
    /// Linear decay to zero.
    Linear,
    /// Constant.
    Constant,
}

/// What is trained and how.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hyper {
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    pub alpha: f64,
    /// Dropout on the adapters' inputs.
    pub dropout: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule after warm-up.
    pub schedule: Schedule,
    /// Share of the steps spent warming up linearly.
    pub warmup_ratio: f64,
    /// Passes over the data.
    pub epochs: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Longer sequences are left out (and counted).
    pub max_seq_len: usize,
    /// Seed of everything random.
    pub seed: u64,
    /// Linear layers that get adapters.
    pub targets: Vec<Target>,
    /// Adapt (or fully train) only the top N blocks; all when `None`.
    pub trained_blocks: Option<usize>,
    /// Train the weights of the trained blocks themselves instead of adapters.
    pub full: bool,
    /// Optimizer settings.
    pub adamw: AdamWParams,
}

/// One point of the training curve.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CurvePoint {
    /// Step (1-based).
    pub step: usize,
    /// Epoch (1-based) the step belongs to.
    pub epoch: usize,
    /// Mean loss over the step's answer tokens.
    pub loss: f32,
    /// Share of the step's sequences whose first answer token is the argmax.
    pub first_token_accuracy: f32,
    /// Learning rate used.
    pub lr: f64,
}

/// The first of the top `trained_blocks` of `n` blocks (all when `None`).
///
/// # Errors
/// `trained_blocks` outside 1..=`n`.
pub fn first_trained_block(n: usize, trained_blocks: Option<usize>) -> Result<usize, FinetuneError> {
    let trained = trained_blocks.unwrap_or(n);
    if trained == 0 || trained > n {
        return Err(FinetuneError::Invalid(format!(
            "--trained-blocks {trained}: the model has {n} blocks; train between 1 and {n}"
        )));
    }
    Ok(n - trained)
}

/// Give `model` its trainable parameters; returns the first trained block.
///
/// # Errors
/// Invalid settings (rank 0, no targets, more trained blocks than the model has).
pub fn attach(model: &mut Llama, hyper: &Hyper) -> Result<usize, FinetuneError> {
    let first = first_trained_block(model.blocks.len(), hyper.trained_blocks)?;
    if !hyper.full && (hyper.rank == 0 || hyper.targets.is_empty()) {
        return Err(FinetuneError::Invalid(
            "LoRA needs --rank > 0 and at least one --targets module".into(),
        ));
    }
    let device = model.device().clone();
    let mut rng = StdRng::seed_from_u64(hyper.seed);
    for block in &mut model.blocks[first..] {
        if hyper.full {
            for w in [&mut block.attn_norm, &mut block.ffn_norm] {
                *w = Weight::Trained(candle_core::Var::from_tensor(w.tensor()).map_err(gguf_err)?);
            }
            for l in &mut block.linears {
                l.weight = Weight::Trained(candle_core::Var::from_tensor(l.weight.tensor()).map_err(gguf_err)?);
            }
            continue;
        }
        for &t in &hyper.targets {
            let l: &mut Linear = block.linear_mut(t);
            let (out_dim, in_dim) = l.weight.tensor().dims2().map_err(gguf_err)?;
            l.lora =
                Some(LoraAdapter::new(out_dim, in_dim, hyper.rank, hyper.alpha, &mut rng, &device).map_err(gguf_err)?);
        }
    }
    Ok(first)
}

/// Learning rate at `step` (0-based) of `total`.
pub fn learning_rate(hyper: &Hyper, step: usize, total: usize) -> f64 {
    let warmup = ((total as f64) * hyper.warmup_ratio).round() as usize;
    if step < warmup {
        return hyper.lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    match hyper.schedule {
        Schedule::Constant => hyper.lr,
        Schedule::Linear => hyper.lr * (1.0 - progress),
        Schedule::Cosine => hyper.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// A training run over fixed sequences.
pub struct Trainer<'m> {
    model: &'m Llama,
    hyper: Hyper,
    first: usize,
    seqs: Vec<Sequence>,
    /// Output of the frozen blocks for each sequence, `[len, d]`.
    cached: Vec<Tensor>,
    /// The optimizer (holds the trainable variables and the step count).
    pub opt: AdamW,
}

impl<'m> Trainer<'m> {
    /// Prepare a run: computes the frozen blocks' output for every sequence once.
    ///
    /// # Errors
    /// Empty data, tensor failures.
    pub fn new(model: &'m Llama, first: usize, hyper: Hyper, seqs: Vec<Sequence>) -> Result<Self, FinetuneError> {
        if seqs.is_empty() {
            return Err(FinetuneError::Invalid("no training sequences".into()));
        }
        let mut cached = Vec::with_capacity(seqs.len());
        // Frozen blocks in batches of similar length: no gradients are tracked
        // because nothing below `first` is a variable.
        const FROZEN_BATCH: usize = 32;
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].tokens.len());
        let mut slots: Vec<Option<Tensor>> = vec![None; seqs.len()];
        for chunk in order.chunks(FROZEN_BATCH) {
            let t = chunk.iter().map(|&i| seqs[i].tokens.len()).max().unwrap_or(1);
            let mut ids = Vec::with_capacity(chunk.len() * t);
            for &i in chunk {
                let s = &seqs[i].tokens;
                ids.extend_from_slice(s);
                ids.extend(std::iter::repeat_n(0u32, t - s.len()));
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), t), model.device()).map_err(gguf_err)?;
            let x = model.embed(&ids).map_err(gguf_err)?;
            let h = model
                .blocks_forward(&x, 0..first, &mut |_| Ok(None))
                .map_err(gguf_err)?;
            for (row, &i) in chunk.iter().enumerate() {
                let len = seqs[i].tokens.len();
                slots[i] = Some(h.get(row).and_then(|r| r.narrow(0, 0, len)).map_err(gguf_err)?);
            }
        }
        cached.extend(slots.into_iter().flatten());
        let opt = AdamW::new(model.trainable(), hyper.adamw).map_err(gguf_err)?;
        Ok(Self {
            model,
            hyper,
            first,
            seqs,
            cached,
            opt,
        })
    }

    /// Steps in one epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.seqs.len().div_ceil(self.hyper.batch_size.max(1))
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.hyper.epochs
    }

    /// Tokens a step at `step` (0-based) processes in the trained blocks.
    pub fn step_tokens(&self, step: usize) -> usize {
        self.batch(step).iter().map(|&i| self.seqs[i].tokens.len()).sum()
    }

    fn batch(&self, step: usize) -> Vec<usize> {
        let per = self.steps_per_epoch();
        let (epoch, b) = (step / per, step % per);
        let mut order: Vec<usize> = (0..self.seqs.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            self.hyper.seed ^ (0x5EED_0000 + epoch as u64),
        ));
        let bs = self.hyper.batch_size.max(1);
        order[b * bs..((b + 1) * bs).min(order.len())].to_vec()
    }

    /// Run step number `self.opt.step` (0-based), returning its curve point.
    ///
    /// # Errors
    /// Tensor failures.
    pub fn step(&mut self) -> Result<CurvePoint, FinetuneError> {
        let step = self.opt.step;
        let total = self.total_steps();
        let batch = self.batch(step);
        let d = self.model.cfg.n_embd;
        let dev = self.model.device();
        let t = batch.iter().map(|&i| self.seqs[i].tokens.len()).max().unwrap_or(1);
        let mut rows = Vec::with_capacity(batch.len());
        let mut gather: Vec<u32> = Vec::new();
        let mut targets: Vec<u32> = Vec::new();
        let mut first_rows: Vec<usize> = Vec::new();
        for (j, &i) in batch.iter().enumerate() {
            let s = &self.seqs[i];
            let c = &self.cached[i];
            let pad = t - s.tokens.len();
            rows.push(if pad == 0 {
                c.clone()
            } else {
                Tensor::cat(&[c, &Tensor::zeros((pad, d), DType::F32, dev).map_err(gguf_err)?], 0).map_err(gguf_err)?
            });
            first_rows.push(gather.len());
            for k in s.prompt_len..s.tokens.len() {
                gather.push((j * t + k - 1) as u32);
                targets.push(s.tokens[k]);
            }
        }
        let x = Tensor::stack(&rows, 0).map_err(gguf_err)?;
        let dropout = self.hyper.dropout;
        let mut rng = StdRng::seed_from_u64(self.hyper.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64);
        let mut masks = |dims: &[usize]| -> candle_core::Result<Option<Tensor>> {
            if dropout <= 0.0 {
                return Ok(None);
            }
            let n: usize = dims.iter().product();
            let keep = (1.0 / (1.0 - dropout)) as f32;
            let v: Vec<f32> = (0..n)
                .map(|_| if rng.random::<f64>() < dropout { 0.0 } else { keep })
                .collect();
            Tensor::from_vec(v, dims, dev).map(Some)
        };
        let h = self
            .model
            .blocks_forward(&x, self.first..self.model.blocks.len(), &mut masks)
            .map_err(gguf_err)?;
        let n_gather = gather.len();
        let idx = Tensor::from_vec(gather, n_gather, dev).map_err(gguf_err)?;
        let picked = h
            .reshape((batch.len() * t, d))
            .and_then(|h| h.index_select(&idx, 0))
            .map_err(gguf_err)?;
        let logits = self.model.logits(&picked).map_err(gguf_err)?;
        let target_t = Tensor::from_vec(targets.clone(), n_gather, dev).map_err(gguf_err)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &target_t).map_err(gguf_err)?;
        let grads = loss.backward().map_err(gguf_err)?;
        let lr = learning_rate(&self.hyper, step, total);
        self.opt.step(&grads, lr).map_err(gguf_err)?;
        let argmax: Vec<u32> = logits.argmax(D::Minus1).and_then(|a| a.to_vec1()).map_err(gguf_err)?;
        let correct = first_rows.iter().filter(|&&r| argmax[r] == targets[r]).count();
        Ok(CurvePoint {
            step: step + 1,
            epoch: step / self.steps_per_epoch() + 1,
            loss: loss.to_scalar::<f32>().map_err(gguf_err)?,
            first_token_accuracy: correct as f32 / batch.len() as f32,
            lr,
        })
    }
}
