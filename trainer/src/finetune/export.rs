//! Training outputs: the merged model as GGUF, the adapter in PEFT format.
//!
//! The merged GGUF is what the server loads: every tensor the run did not
//! touch is copied bit for bit from the base, trained weights (base + merged
//! adapter, or fully trained ones) are quantized to Q8_0 (candle's fastest
//! CPU format), and all metadata (tokenizer, chat template) is kept, with
//! `llama.block_count` rewritten for a pruned model and the task written
//! under `flywheel.task.*` so the server knows the prompt and labels the
//! model was trained on.
//!
//! The PEFT adapter uses Hugging Face's names and layout. GGUF stores the
//! query and key projections with their rows permuted for the interleaved
//! rotary embedding; the exported `lora_B` of those projections is permuted
//! back so the adapter applies to the Hugging Face checkpoint.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use flywheel_router::model_prep::write_gguf;
use flywheel_router::models::task::{LABELS_KEY, SYSTEM_PROMPT_KEY};

use super::llama::{Llama, Originals, Target, Weight};
use super::train::Hyper;
use super::{FinetuneError, gguf_err};

/// llama.cpp's `general.file_type` for a mostly-Q8_0 file.
const FILE_TYPE_Q8_0: u32 = 7;

/// Storage type of trained weights in the merged model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutDType {
    /// 8-bit blocks: candle's fastest CPU matmul, ~0.1% relative error.
    Q8_0,
    /// Exact f32 (4x larger, slower).
    F32,
}

/// The task a merged model was trained for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMeta {
    /// System prompt of the training prompts.
    pub system_prompt: String,
    /// Labels, in order.
    pub labels: Vec<String>,
}

/// Write the merged model to `path`.
///
/// # Errors
/// Tensor and I/O failures.
pub fn write_merged_gguf(
    path: &Path,
    content: &gguf_file::Content,
    model: &Llama,
    originals: &Originals,
    task: Option<&TaskMeta>,
    dtype: OutDType,
) -> Result<(), FinetuneError> {
    let mut replaced: HashMap<String, QTensor> = HashMap::new();
    for (i, block) in model.blocks.iter().enumerate() {
        for (name, w) in [("attn_norm", &block.attn_norm), ("ffn_norm", &block.ffn_norm)] {
            if let Weight::Trained(v) = w {
                let host = v.as_tensor().to_device(&Device::Cpu).map_err(gguf_err)?;
                let q = QTensor::quantize(&host, GgmlDType::F32).map_err(gguf_err)?;
                replaced.insert(format!("blk.{i}.{name}.weight"), q);
            }
        }
        for t in Target::ALL {
            let l = block.linear(t);
            let merged = match (&l.weight, &l.lora) {
                (Weight::Frozen(_), None) => continue,
                (w, Some(lora)) => lora.merge(w.tensor()).map_err(gguf_err)?,
                (Weight::Trained(v), None) => v.as_tensor().clone(),
            };
            replaced.insert(format!("blk.{i}.{}.weight", t.gguf_name()), quantize(&merged, dtype)?);
        }
    }
    let mut names: Vec<&String> = originals.keys().collect();
    names.sort_by_key(|n| content.tensor_infos.get(*n).map(|t| t.offset).unwrap_or(u64::MAX));
    let tensors: Vec<(&str, &QTensor)> = names
        .iter()
        .map(|n| (n.as_str(), replaced.get(*n).unwrap_or(&originals[*n])))
        .collect();
    let block_count = gguf_file::Value::U32(model.blocks.len() as u32);
    let file_type = gguf_file::Value::U32(FILE_TYPE_Q8_0);
    let task_values = task.map(|t| {
        (
            gguf_file::Value::String(t.system_prompt.clone()),
            gguf_file::Value::Array(t.labels.iter().cloned().map(gguf_file::Value::String).collect()),
        )
    });
    let mut overrides: Vec<(&str, &gguf_file::Value)> = vec![("llama.block_count", &block_count)];
    if dtype == OutDType::Q8_0 {
        overrides.push(("general.file_type", &file_type));
    }
    if let Some((prompt, labels)) = &task_values {
        overrides.push((SYSTEM_PROMPT_KEY, prompt));
        overrides.push((LABELS_KEY, labels));
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.extend(overrides);
    metadata.sort_by_key(|(k, _)| *k);
    write_gguf(path, &metadata, &tensors).map_err(|e| FinetuneError::Write(e.into()))
}

fn quantize(t: &Tensor, dtype: OutDType) -> Result<QTensor, FinetuneError> {
    let last = t.dims().last().copied().unwrap_or(0);
    let d = match dtype {
        OutDType::Q8_0 if last % GgmlDType::Q8_0.block_size() == 0 => GgmlDType::Q8_0,
        _ => GgmlDType::F32,
    };
    // Quantized on the host: the file is written from host memory.
    let host = t.to_device(&Device::Cpu).map_err(gguf_err)?;
    QTensor::quantize(&host, d).map_err(gguf_err)
}

/// Undo GGUF's Q/K row permutation on a `[n_head * head_dim, cols]` matrix.
///
/// # Errors
/// Shape mismatches.
pub fn unpermute_rows(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let hd = rows / n_head;
    t.reshape((n_head, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Write the adapters as a PEFT LoRA adapter (`adapter_config.json` +
/// `adapter_model.safetensors`) into `dir`; `base_name` goes into
/// `base_model_name_or_path`.
///
/// # Errors
/// Full fine-tuning (no adapter to write), tensor and I/O failures.
pub fn write_peft(dir: &Path, model: &Llama, hyper: &Hyper, base_name: &str) -> Result<(), FinetuneError> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut layers = Vec::new();
    for (i, block) in model.blocks.iter().enumerate() {
        let mut any = false;
        for t in Target::ALL {
            let Some(lora) = &block.linear(t).lora else { continue };
            any = true;
            let b = match t {
                Target::Q => unpermute_rows(lora.b.as_tensor(), model.cfg.n_head),
                Target::K => unpermute_rows(lora.b.as_tensor(), model.cfg.n_kv_head),
                _ => Ok(lora.b.as_tensor().clone()),
            }
            .map_err(gguf_err)?;
            let prefix = format!("base_model.model.model.layers.{i}.{}", t.hf_module());
            tensors.insert(format!("{prefix}.lora_A.weight"), lora.a.as_tensor().clone());
            tensors.insert(format!("{prefix}.lora_B.weight"), b);
        }
        if any {
            layers.push(i);
        }
    }
    if tensors.is_empty() {
        return Err(FinetuneError::Invalid(
            "full fine-tuning has no adapter to export".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| FinetuneError::Write(e.into()))?;
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).map_err(gguf_err)?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": hyper.rank,
        "lora_alpha": hyper.alpha,
        "lora_dropout": hyper.dropout,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "target_modules": hyper.targets.iter().map(|t| t.short()).collect::<Vec<_>>(),
        "layers_to_transform": layers,
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| FinetuneError::Write(e.into()))?;
    std::fs::write(dir.join("adapter_config.json"), text).map_err(|e| FinetuneError::Write(e.into()))?;
    Ok(())
}

/// Read a tensor of a written GGUF back as f32 (tests, checks).
///
/// # Errors
/// I/O and parse failures.
pub fn read_tensor(path: &Path, name: &str) -> Result<Tensor, FinetuneError> {
    let mut r = std::io::BufReader::new(std::fs::File::open(path).map_err(|e| FinetuneError::Write(e.into()))?);
    let c = gguf_file::Content::read(&mut r).map_err(gguf_err)?;
    c.tensor(&mut r, name, &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .map_err(gguf_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_the_gguf_permutation() {
        // llama.cpp: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(w.shape)
        let (n_head, hd, cols) = (2, 4, 3);
        let hf = Tensor::arange(0f32, (n_head * hd * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((n_head * hd, cols))
            .unwrap();
        let gguf = hf
            .reshape((n_head, 2, hd / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((n_head * hd, cols))
            .unwrap();
        assert_ne!(gguf.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        let back = unpermute_rows(&gguf, n_head).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }
}
