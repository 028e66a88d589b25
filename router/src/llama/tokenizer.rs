//! The tokenizer a GGUF file carries (`tokenizer.ggml.*`), as a `tokenizers`
//! tokenizer.
//!
//! GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`: SmolLM2,
//! Llama 3, Qwen) is built from the file's vocabulary and merges with the
//! pre-tokenizer mistral.rs applies to the same files, so a text becomes the
//! same ids here as in the serving engine (tested on the real model).
//! Control tokens (`token_type` other than normal) are special tokens.

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::LlamaError;

/// The pre-tokenizer split of byte-level BPE models (GPT-2's rule with
/// single digits).
const SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings(content: &gguf_file::Content, key: &str) -> Result<Vec<String>, LlamaError> {
    let value = content
        .metadata
        .get(key)
        .ok_or_else(|| LlamaError::Unsupported(format!("GGUF metadata has no `{key}`")))?;
    value
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned().map_err(LlamaError::from))
        .collect()
}

/// The tokenizer of a GGUF file.
///
/// # Errors
/// A tokenizer model other than byte-level BPE, or missing metadata.
pub fn from_gguf(content: &gguf_file::Content) -> Result<Tokenizer, LlamaError> {
    let model = super::metadata_string(content, "tokenizer.ggml.model");
    if model != "gpt2" {
        return Err(LlamaError::Unsupported(format!(
            "tokenizer `{model}`: decoder classifiers read byte-level BPE (`gpt2`) tokenizers, as SmolLM2 and Llama 3 have"
        )));
    }
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges = strings(content, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| LlamaError::Unsupported(format!("BPE merge `{m}` is not two tokens")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| LlamaError::Unsupported(format!("the GGUF's BPE vocabulary: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| LlamaError::Unsupported(format!("pre-tokenizer: {e}")))?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
    let types: Vec<i32> = content
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().filter_map(|t| t.to_i32().ok()).collect())
        .unwrap_or_default();
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| **t != 1)
        .map(|(tok, _)| AddedToken::from(tok.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}
