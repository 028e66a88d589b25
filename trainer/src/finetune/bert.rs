//! A BERT encoder (all-MiniLM-L6-v2's architecture) whose transformer
//! weights are trained variables: the forward pass of end-to-end encoder
//! fine-tuning.
//!
//! It computes what the server's embedder computes (candle-transformers'
//! `BertModel`, mean pooling, L2 normalisation; the test holds the two to
//! 1e-4), but from differentiable operations: candle's fused layer norm has
//! no backward pass. The token, position and type embeddings stay frozen
//! (half the parameters, and rows of words the training data never uses);
//! every attention and feed-forward weight and layer norm trains. [`Bert::save`]
//! writes the weights back under their own names, so the server's embedder
//! loads the result like the original.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_transformers::models::bert::Config;

/// Errors: candle's, or a file that is not a BERT of this shape.
pub type Result<T> = std::result::Result<T, anyhow::Error>;

/// Names of a layer's trained tensors (after `encoder.layer.<i>.`).
const LAYER_TENSORS: [&str; 16] = [
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
];

/// The encoder: frozen embeddings, trained layers.
pub struct Bert {
    config: Config,
    /// Every tensor of the file, by name (trained ones are the vars' tensors).
    tensors: HashMap<String, Tensor>,
    /// The trained variables, by name.
    vars: Vec<(String, Var)>,
}

impl Bert {
    /// Load `config.json` and `model.safetensors` from `dir`.
    ///
    /// # Errors
    /// Missing or malformed files.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config: Config = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
        let mut tensors = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
        let mut vars = Vec::new();
        for layer in 0..config.num_hidden_layers {
            for name in LAYER_TENSORS {
                let key = format!("encoder.layer.{layer}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("model.safetensors has no {key}"))?
                    .to_dtype(DType::F32)?;
                let var = Var::from_tensor(&t)?;
                tensors.insert(key.clone(), var.as_tensor().clone());
                vars.push((key, var));
            }
        }
        for key in [
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
        ] {
            if !tensors.contains_key(key) {
                anyhow::bail!("model.safetensors has no {key}");
            }
        }
        Ok(Self { config, tensors, vars })
    }

    /// The trained variables, by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }

    fn t(&self, name: &str) -> &Tensor {
        // Every name asked for was checked at load.
        &self.tensors[name]
    }

    fn linear(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let w = self.t(&format!("{prefix}.weight"));
        let b = self.t(&format!("{prefix}.bias"));
        Ok(x.broadcast_matmul(&w.t()?)?.broadcast_add(b)?)
    }

    fn layer_norm(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.config.layer_norm_eps)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(self.t(&format!("{prefix}.weight")))?
            .broadcast_add(self.t(&format!("{prefix}.bias")))?)
    }

    /// Last hidden states `[n, len, hidden]` of padded token ids `[n, len]`
    /// with `mask` (`[n, len]`, 1 for tokens, 0 for padding).
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (n, len) = ids.dims2()?;
        let hidden = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let head_dim = hidden / heads;
        let words = self
            .t("embeddings.word_embeddings.weight")
            .embedding(&ids.flatten_all()?)?;
        let positions = self.t("embeddings.position_embeddings.weight").narrow(0, 0, len)?;
        let types = self.t("embeddings.token_type_embeddings.weight").narrow(0, 0, 1)?;
        let x = words
            .reshape((n, len, hidden))?
            .broadcast_add(&positions)?
            .broadcast_add(&types)?;
        let mut x = self.layer_norm(&x, "embeddings.LayerNorm")?;
        // Padding gets a large negative score before the softmax.
        let additive = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((n, 1, 1, len))?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let split =
            |t: Tensor| -> Result<Tensor> { Ok(t.reshape((n, len, heads, head_dim))?.transpose(1, 2)?.contiguous()?) };
        for layer in 0..self.config.num_hidden_layers {
            let p = format!("encoder.layer.{layer}");
            let q = split(self.linear(&x, &format!("{p}.attention.self.query"))?)?;
            let k = split(self.linear(&x, &format!("{p}.attention.self.key"))?)?;
            let v = split(self.linear(&x, &format!("{p}.attention.self.value"))?)?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&additive)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((n, len, hidden))?;
            let attended = self.linear(&context, &format!("{p}.attention.output.dense"))?;
            x = self.layer_norm(&(attended + &x)?, &format!("{p}.attention.output.LayerNorm"))?;
            let inner = self.linear(&x, &format!("{p}.intermediate.dense"))?.gelu_erf()?;
            let out = self.linear(&inner, &format!("{p}.output.dense"))?;
            x = self.layer_norm(&(out + &x)?, &format!("{p}.output.LayerNorm"))?;
        }
        Ok(x)
    }

    /// Mean-pooled, L2-normalised sentence embeddings `[n, hidden]`, as the
    /// server's embedder computes them.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn embed(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden = self.forward(ids, mask)?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let mean = hidden.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?)
    }

    /// Write every tensor (trained ones with their current values) to
    /// `path` as safetensors under the original names.
    ///
    /// # Errors
    /// I/O failures.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self.tensors.iter().map(|(k, t)| (k.clone(), t.detach())).collect();
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use flywheel_router::embed::{Embedder, cosine, padded};

    #[test]
    fn it_computes_what_the_servers_embedder_computes_and_saves_what_it_loads() {
        let dir = crate::finetune::tests::encoder_dir();
        let served = Embedder::load(&dir).unwrap();
        let bert = Bert::load(&dir, &Device::Cpu).unwrap();
        let texts = [
            "book a table for two",
            "Why was my card declined at the shop yesterday evening?",
            "hi",
        ];
        let windows: Vec<Vec<u32>> = texts.iter().map(|t| served.windows(t).unwrap().remove(0)).collect();
        let (ids, mask) = padded(&windows, &Device::Cpu).unwrap();
        let ours = bert.embed(&ids, &mask).unwrap().to_vec2::<f32>().unwrap();
        for (t, v) in texts.iter().zip(&ours) {
            let theirs = served.embed(t).unwrap();
            let diff = v.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "{t}: {diff}");
        }
        // A changed weight is saved and loaded by the server's embedder.
        let out = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(dir.join(f), out.path().join(f)).unwrap();
        }
        let (_, var) = &bert.vars()[0];
        var.set(&(var.as_tensor() * 0.5).unwrap()).unwrap();
        bert.save(&out.path().join("model.safetensors")).unwrap();
        let changed = Embedder::load(out.path()).unwrap();
        let before = served.embed(texts[1]).unwrap();
        let after = changed.embed(texts[1]).unwrap();
        let ours = bert.embed(&ids, &mask).unwrap().to_vec2::<f32>().unwrap();
        assert!(cosine(&before, &after) < 0.9999);
        let diff = ours[1]
            .iter()
            .zip(&after)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{diff}");
    }
}
