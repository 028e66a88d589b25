//! A Llama in candle, read from GGUF: the forward pass the trainer
//! differentiates and the decoder classifier router serves (one
//! implementation, so training and serving cannot drift).
//!
//! The forward pass matches the GGUF Llama that mistral.rs serves (interleaved
//! rotary embedding on the GGUF's permuted Q/K rows, RMS norms, SwiGLU MLP,
//! grouped-query attention, tied or separate output head), built from ops
//! candle can differentiate and the fused RMS norm and softmax of
//! [`ops`], which bring their own backward passes. Base weights are
//! dequantized to f32 and stay constants; trainable parameters are the
//! [`LoraAdapter`]s and, with full fine-tuning, the weights of the trained
//! blocks ([`Weight::Trained`]).
//!
//! Training only ever needs a few positions' logits (the answer tokens), so
//! the head is applied to gathered hidden rows ([`Llama::logits`]) rather
//! than to every position.

use std::collections::HashMap;
use std::io::{Read, Seek};

use candle_core::quantized::{QTensor, gguf_file};
use candle_core::{Device, IndexOp, Tensor, Var};

pub mod lora;
pub mod ops;
pub mod tokenizer;

use lora::LoraAdapter;

/// Errors reading or running a Llama.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// Settings that cannot be used, with what to fix.
    #[error("{0}")]
    Invalid(String),
    /// A model this code cannot run.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A tensor operation failed.
    #[error("tensor operation failed")]
    Tensor(#[from] candle_core::Error),
}

fn gguf_err(e: candle_core::Error) -> LlamaError {
    LlamaError::Tensor(e)
}

/// Longest sequence the rotary tables cover. Router prompts are tens of
/// tokens; the label plans add a handful.
pub const MAX_POSITIONS: usize = 2048;

/// The linear layers of a block, in GGUF order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

impl Target {
    /// All targets, in block order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// Tensor name inside a GGUF block (`blk.N.<name>.weight`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }

    /// Module path inside a Hugging Face Llama layer (PEFT naming).
    pub fn hf_module(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// Short name used on the command line and in PEFT's `target_modules`.
    pub fn short(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// Parse `q`, `q_proj`, `gate`, ...
    pub fn parse(s: &str) -> Option<Target> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_suffix("_proj").unwrap_or(&s);
        Some(match s {
            "q" => Target::Q,
            "k" => Target::K,
            "v" => Target::V,
            "o" => Target::O,
            "gate" => Target::Gate,
            "up" => Target::Up,
            "down" => Target::Down,
            _ => return None,
        })
    }
}

/// Shape of a Llama model, from the GGUF metadata.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// MLP inner size.
    pub n_ff: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RMS norm epsilon.
    pub rms_eps: f64,
    /// Rotary base frequency.
    pub rope_base: f32,
}

impl LlamaConfig {
    /// The blocks left after keeping the first `keep_layers` (all when `None`).
    ///
    /// # Errors
    /// `keep_layers` outside 1..=the base's block count.
    pub fn kept_blocks(&self, keep_layers: Option<usize>) -> Result<usize, LlamaError> {
        let n = self.n_layer;
        match keep_layers {
            Some(k) if k == 0 || k > n => Err(LlamaError::Invalid(format!(
                "--keep-layers {k}: the base has {n} blocks; keep between 1 and {n}"
            ))),
            Some(k) => Ok(k),
            None => Ok(n),
        }
    }

    /// Per-head size.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Read the shape from GGUF metadata (architecture `llama`).
    ///
    /// # Errors
    /// Another architecture, or a missing key.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, LlamaError> {
        let arch = metadata_string(content, "general.architecture");
        if arch != "llama" {
            return Err(LlamaError::Unsupported(format!(
                "architecture `{arch}`: fine-tuning supports Llama-architecture GGUF models (SmolLM2 is one)"
            )));
        }
        let get = |key: &str| -> Result<&gguf_file::Value, LlamaError> {
            content
                .metadata
                .get(key)
                .ok_or_else(|| LlamaError::Unsupported(format!("GGUF metadata has no `{key}`")))
        };
        let u = |key: &str| -> Result<usize, LlamaError> { Ok(get(key)?.to_u32().map_err(gguf_err)? as usize) };
        let n_embd = u("llama.embedding_length")?;
        let vocab = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| LlamaError::Unsupported("GGUF has no token_embd.weight".into()))?;
        Ok(Self {
            n_layer: u("llama.block_count")?,
            n_embd,
            n_head: u("llama.attention.head_count")?,
            n_kv_head: u("llama.attention.head_count_kv")?,
            n_ff: u("llama.feed_forward_length")?,
            vocab,
            rms_eps: f64::from(
                get("llama.attention.layer_norm_rms_epsilon")?
                    .to_f32()
                    .map_err(gguf_err)?,
            ),
            rope_base: get("llama.rope.freq_base")
                .and_then(|v| v.to_f32().map_err(gguf_err))
                .unwrap_or(10_000.0),
        })
    }
}

/// A weight matrix: a constant, or a parameter under full fine-tuning.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Not trained.
    Frozen(Tensor),
    /// Trained (full fine-tuning).
    Trained(Var),
}

impl Weight {
    /// The current value.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Weight::Frozen(t) => t,
            Weight::Trained(v) => v.as_tensor(),
        }
    }
}

/// A linear layer `y = x Wᵀ` (+ LoRA).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Weight,
    /// Low-rank adapter, if any.
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Apply to `x` of shape `[n, in]`; `dropout` masks the adapter's input.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward(&self, x: &Tensor, dropout: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            Weight::Frozen(w) => ops::frozen_matmul(x, w)?,
            Weight::Trained(w) => x.matmul(&w.as_tensor().t()?)?,
        };
        match &self.lora {
            None => Ok(y),
            Some(lora) => {
                let xin = match dropout {
                    Some(mask) => x.mul(mask)?,
                    None => x.clone(),
                };
                y + lora.delta(&xin)?
            }
        }
    }
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Norm before attention.
    pub attn_norm: Weight,
    /// Norm before the MLP.
    pub ffn_norm: Weight,
    /// q, k, v, o, gate, up, down in [`Target::ALL`] order.
    pub linears: Vec<Linear>,
}

impl Block {
    /// The linear layer for `target`.
    pub fn linear(&self, target: Target) -> &Linear {
        &self.linears[target as usize]
    }

    /// Mutable access to the linear layer for `target`.
    pub fn linear_mut(&mut self, target: Target) -> &mut Linear {
        &mut self.linears[target as usize]
    }
}

/// The model: embedding, blocks, final norm and head.
#[derive(Debug)]
pub struct Llama {
    /// Shape.
    pub cfg: LlamaConfig,
    /// `[vocab, n_embd]`, also the head when the model ties them.
    pub embed: Tensor,
    /// Blocks, bottom first.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: Tensor,
    /// Separate output head `[vocab, n_embd]`, `None` when tied to the embedding.
    pub output: Option<Tensor>,
    /// Rotary tables `[MAX_POSITIONS, head_dim]`, see [`rope_tables`].
    cos: Tensor,
    sin: Tensor,
    /// The same, times the attention scale `1/sqrt(head_dim)`, for the
    /// queries: one product on q instead of one on the attention scores.
    cos_q: Tensor,
    sin_q: Tensor,
    /// `[1, 0, 3, 2, ...]`: swaps the two halves of each rotated pair.
    pair_swap: Tensor,
}

/// The quantized tensors of a GGUF file, kept to write untouched tensors back
/// bit for bit.
pub type Originals = HashMap<String, QTensor>;

impl Llama {
    /// Read a GGUF Llama, keeping its first `keep_layers` blocks (all when
    /// `None`), its weights dequantized on `device` (the quantized originals
    /// stay in host memory for the export).
    ///
    /// # Errors
    /// Unsupported architecture, unreadable tensors, `keep_layers` out of range.
    pub fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        keep_layers: Option<usize>,
        device: &Device,
    ) -> Result<(Self, Originals), LlamaError> {
        let mut cfg = LlamaConfig::from_gguf(content)?;
        cfg.n_layer = cfg.kept_blocks(keep_layers)?;
        let dev = Device::Cpu;
        let mut originals = Originals::new();
        for name in content.tensor_infos.keys() {
            if let Some(layer) = block_index(name)
                && layer >= cfg.n_layer
            {
                continue;
            }
            let q = content.tensor(reader, name, &dev).map_err(gguf_err)?;
            originals.insert(name.clone(), q);
        }
        let deq = |name: &str| -> Result<Tensor, LlamaError> {
            originals
                .get(name)
                .ok_or_else(|| LlamaError::Unsupported(format!("GGUF has no tensor `{name}`")))?
                .dequantize(&dev)
                .and_then(|t| t.to_device(device))
                .map_err(gguf_err)
        };
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let linears = Target::ALL
                .iter()
                .map(|t| {
                    Ok(Linear {
                        weight: Weight::Frozen(deq(&format!("blk.{i}.{}.weight", t.gguf_name()))?),
                        lora: None,
                    })
                })
                .collect::<Result<Vec<_>, LlamaError>>()?;
            blocks.push(Block {
                attn_norm: Weight::Frozen(deq(&format!("blk.{i}.attn_norm.weight"))?),
                ffn_norm: Weight::Frozen(deq(&format!("blk.{i}.ffn_norm.weight"))?),
                linears,
            });
        }
        let output = if originals.contains_key("output.weight") {
            Some(deq("output.weight")?)
        } else {
            None
        };
        let embed = deq("token_embd.weight")?;
        let norm = deq("output_norm.weight")?;
        Ok((Self::assemble(cfg, embed, blocks, norm, output)?, originals))
    }

    /// A model from parts (tests build tiny random models this way).
    ///
    /// # Errors
    /// Tensor creation failures.
    pub fn assemble(
        cfg: LlamaConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        norm: Tensor,
        output: Option<Tensor>,
    ) -> Result<Self, LlamaError> {
        let (cos, sin) = rope_tables(cfg.head_dim(), cfg.rope_base, embed.device()).map_err(gguf_err)?;
        let swap: Vec<u32> = (0..cfg.head_dim() as u32).map(|i| i ^ 1).collect();
        let pair_swap = Tensor::new(swap.as_slice(), embed.device()).map_err(gguf_err)?;
        let scale = 1.0 / (cfg.head_dim() as f64).sqrt();
        let cos_q = (&cos * scale).map_err(gguf_err)?;
        let sin_q = (&sin * scale).map_err(gguf_err)?;
        Ok(Self {
            cfg,
            embed,
            blocks,
            norm,
            output,
            cos,
            sin,
            cos_q,
            sin_q,
            pair_swap,
        })
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Rotary position embedding of `x` (`[b, heads, t, head_dim]`,
    /// interleaved pairs as in GGUF Llama weights) at positions `0..t`:
    /// `x·cos + swap(x)·sin`, four operations forward and four backward
    /// ([`ops::rope`]; candle's differentiable `rope_i_slow` takes
    /// about ten, and twice that backwards). `scaled` also multiplies by the
    /// attention scale (for the queries).
    fn rope(&self, x: &Tensor, t: usize, scaled: bool) -> candle_core::Result<Tensor> {
        let (cos, sin) = if scaled {
            (&self.cos_q, &self.sin_q)
        } else {
            (&self.cos, &self.sin)
        };
        ops::rope(x, &cos.narrow(0, 0, t)?, &sin.narrow(0, 0, t)?, &self.pair_swap)
    }

    /// Token embeddings of `tokens` (`[b, t]` u32) → `[b, t, d]`.
    ///
    /// # Errors
    /// Out-of-vocabulary ids.
    pub fn embed(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        self.embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.n_embd))
    }

    /// Run blocks `range` over hidden states `x` (`[b, t, d]`, causal).
    /// `dropout` gives, per call, a keep-mask for an adapter input (`None`: no dropout).
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn blocks_forward(
        &self,
        x: &Tensor,
        range: std::ops::Range<usize>,
        dropout: &mut dyn FnMut(&[usize]) -> candle_core::Result<Option<Tensor>>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let mask = causal_mask(t, self.cfg.n_head / self.cfg.n_kv_head, x.device())?;
        let mut x = x.clone();
        for block in &self.blocks[range] {
            x = self.block_forward(block, &x, b, t, &mask, dropout)?;
        }
        Ok(x)
    }

    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        b: usize,
        t: usize,
        mask: &Tensor,
        dropout: &mut dyn FnMut(&[usize]) -> candle_core::Result<Option<Tensor>>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let (d, hd) = (cfg.n_embd, cfg.head_dim());
        let x2 = x.reshape((b * t, d))?;
        let h = ops::rms_norm(&x2, block.attn_norm.tensor(), cfg.rms_eps as f32)?;
        let lin =
            |target: Target, input: &Tensor, drop: &mut dyn FnMut(&[usize]) -> candle_core::Result<Option<Tensor>>| {
                let l = block.linear(target);
                let mask = if l.lora.is_some() { drop(input.dims())? } else { None };
                l.forward(input, mask.as_ref())
            };
        let q = lin(Target::Q, &h, dropout)?;
        let k = lin(Target::K, &h, dropout)?;
        let v = lin(Target::V, &h, dropout)?;
        let heads = |x: Tensor, n: usize| -> candle_core::Result<Tensor> {
            x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(q, cfg.n_head)?;
        let k = heads(k, cfg.n_kv_head)?;
        let v = heads(v, cfg.n_kv_head)?;
        let q = self.rope(&q, t, true)?;
        let k = self.rope(&k, t, false)?;
        // Grouped-query attention without repeating K and V: the query heads
        // that share a KV head are stacked along the position axis
        // (`[b, kv, rep·t, hd]`, a free reshape of `[b, heads, t, hd]`), so
        // one batched product per KV head covers them all; the mask is
        // stacked the same way.
        let rep = cfg.n_head / cfg.n_kv_head;
        let q = q.reshape((b, cfg.n_kv_head, rep * t, hd))?;
        let att = ops::softmax_last_dim(&q.matmul(&k.t()?)?, Some(mask))?;
        let y = att
            .matmul(&v)?
            .reshape((b, cfg.n_head, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, d))?;
        let x2 = (x2 + lin(Target::O, &y, dropout)?)?;
        let h = ops::rms_norm(&x2, block.ffn_norm.tensor(), cfg.rms_eps as f32)?;
        let gate = lin(Target::Gate, &h, dropout)?.silu()?;
        let up = lin(Target::Up, &h, dropout)?;
        let down = lin(Target::Down, &(gate * up)?, dropout)?;
        (x2 + down)?.reshape((b, t, d))
    }

    /// Logits of hidden rows `h` (`[n, d]`, after the last block): final norm and head.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn logits(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let h = ops::rms_norm(h, &self.norm, self.cfg.rms_eps as f32)?;
        ops::frozen_matmul(&h, self.output.as_ref().unwrap_or(&self.embed))
    }

    /// Logits at the last position of `tokens` (`[b, t]`): the next-token
    /// distribution, as the serving engine computes it.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn next_token_logits(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        let x = self.embed(tokens)?;
        let h = self.blocks_forward(&x, 0..self.blocks.len(), &mut |_| Ok(None))?;
        self.logits(&h.i((.., t - 1, ..))?)
    }

    /// Sentence features of right-padded prompts `tokens` (`[b, t]`, row `i`
    /// holding `lengths[i]` real tokens): the final-norm hidden state at each
    /// row's last real token (`[b, d]`). Attention is
    /// causal, so the padding after a row's last token never reaches it: a
    /// row's features do not depend on what it is batched with. The decoder
    /// classifier's training and serving both call this.
    ///
    /// # Errors
    /// Shape mismatches, a length of 0 or beyond `t`.
    pub fn last_token_features(
        &self,
        tokens: &Tensor,
        lengths: &[usize],
        dropout: &mut dyn FnMut(&[usize]) -> candle_core::Result<Option<Tensor>>,
    ) -> candle_core::Result<Tensor> {
        let x = self.embed(tokens)?;
        self.last_token_features_from(&x, 0, lengths, dropout)
    }

    /// [`Llama::last_token_features`] from the hidden states `x` (`[b, t,
    /// d]`) entering block `first` (a trainer computes the frozen blocks below
    /// it once).
    ///
    /// # Errors
    /// As [`Llama::last_token_features`].
    pub fn last_token_features_from(
        &self,
        x: &Tensor,
        first: usize,
        lengths: &[usize],
        dropout: &mut dyn FnMut(&[usize]) -> candle_core::Result<Option<Tensor>>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if lengths.len() != b || lengths.iter().any(|&l| l == 0 || l > t) {
            candle_core::bail!("{} lengths for {b} rows of {t} tokens: {lengths:?}", lengths.len());
        }
        let h = self.blocks_forward(x, first..self.blocks.len(), dropout)?;
        let last: Vec<u32> = lengths
            .iter()
            .enumerate()
            .map(|(i, &l)| (i * t + l - 1) as u32)
            .collect();
        let rows = h
            .reshape((b * t, self.cfg.n_embd))?
            .index_select(&Tensor::new(last.as_slice(), h.device())?, 0)?;
        ops::rms_norm(&rows, &self.norm, self.cfg.rms_eps as f32)
    }

    /// Every trainable variable, in a stable order (block, target, A then B).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            for (name, w) in [("attn_norm", &block.attn_norm), ("ffn_norm", &block.ffn_norm)] {
                if let Weight::Trained(v) = w {
                    out.push((format!("blk.{i}.{name}.weight"), v.clone()));
                }
            }
            for target in Target::ALL {
                let l = block.linear(target);
                if let Weight::Trained(v) = &l.weight {
                    out.push((format!("blk.{i}.{}.weight", target.gguf_name()), v.clone()));
                }
                if let Some(lora) = &l.lora {
                    out.push((format!("blk.{i}.{}.lora_a", target.gguf_name()), lora.a.clone()));
                    out.push((format!("blk.{i}.{}.lora_b", target.gguf_name()), lora.b.clone()));
                }
            }
        }
        out
    }
}

/// The string value of GGUF metadata `key` (empty when absent or not a string).
pub(crate) fn metadata_string(content: &gguf_file::Content, key: &str) -> String {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default()
}

/// Block index of a GGUF tensor name (`blk.N.…`).
pub fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Rotary tables for interleaved pairs `(x[2i], x[2i+1])` rotated by
/// `pos·θ_i`: `cos` holds `cos(pos·θ_i)` at both `2i` and `2i+1`, `sin` holds
/// `-sin(pos·θ_i)` at `2i` and `+sin(pos·θ_i)` at `2i+1`, so that
/// `rope(x) = x·cos + swap(x)·sin` (see [`Llama::rope`]).
fn rope_tables(head_dim: usize, base: f32, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(MAX_POSITIONS * head_dim);
    let mut sin = Vec::with_capacity(MAX_POSITIONS * head_dim);
    for pos in 0..MAX_POSITIONS {
        for &th in &theta {
            // Same f32 product as the position x frequency table it replaces.
            let angle = pos as f32 * th;
            let (s, c) = angle.sin_cos();
            cos.extend([c, c]);
            sin.extend([-s, s]);
        }
    }
    Ok((
        Tensor::from_vec(cos, (MAX_POSITIONS, head_dim), device)?,
        Tensor::from_vec(sin, (MAX_POSITIONS, head_dim), device)?,
    ))
}

/// Additive causal mask `[rep·t, t]` (`rep` copies of the `[t, t]` mask, one
/// per query head of a KV group): 0 on and below the diagonal, a large
/// negative number above (not -inf, so masked rows never produce NaN gradients).
fn causal_mask(t: usize, rep: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..rep * t)
        .flat_map(|row| {
            let i = row % t;
            (0..t).map(move |j| if j > i { -1e9 } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(v, (rep * t, t), dev)
}
