//! Decoder classifier routers: a Llama-family GGUF backbone (optionally
//! pruned to its first blocks, LoRA merged) and a linear head over the
//! experts, read from the final hidden state of the prompt's last token.
//!
//! One forward pass per decision whatever the labels, and no language-model
//! head at all. A decoder's final states share a few very large dimensions,
//! so every prompt's state points almost the same way; the features are the
//! state minus the training prompts' mean state, scaled to unit length
//! ([`unit_features`]), which is what the head and the out-of-scope rule's
//! cosine similarities read. The forward pass is [`crate::llama`], the one the trainer
//! differentiates, on the file's weights dequantized to f32.
//!
//! The artifact is one GGUF file: the backbone's tensors and metadata
//! (tokenizer included) as llama.cpp writes them, plus the head
//! (`cls.weight` `[labels, dim]`, `cls.bias` `[labels]`, `cls.center`
//! `[dim]`, and for the out-of-scope rule `cls.neighbours` `[examples,
//! dim]`), the labels
//! (`flywheel.classifier.labels`) and the card (`flywheel.classifier.card`,
//! JSON: the same [`ClassifierCard`] an encoder classifier has, with the
//! prompt template).

use std::io::{BufReader, Read, Seek};
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::{ClassifierCard, Featurizer, Head, Neighbours, load_err};
use crate::engine::EngineError;
use crate::llama::{Llama, LlamaError};

/// Value of the card's `format` for a decoder classifier.
pub const FORMAT: &str = "flywheel-decoder-classifier/1";
/// GGUF metadata key of the card (JSON).
pub const CARD_KEY: &str = "flywheel.classifier.card";
/// GGUF metadata key of the labels, in the head's row order (string array).
pub const LABELS_KEY: &str = "flywheel.classifier.labels";
/// The head's weight tensor.
pub const HEAD_WEIGHT: &str = "cls.weight";
/// The head's bias tensor.
pub const HEAD_BIAS: &str = "cls.bias";
/// The out-of-scope rule's reference features.
pub const NEIGHBOURS: &str = "cls.neighbours";
/// The mean final state of the training prompts, subtracted before the
/// features are scaled to unit length (`[dim]`; absent: zero).
pub const CENTER: &str = "cls.center";
/// Query tokens read at most: the first and last half of this many of a
/// longer query (the template's tokens come on top).
pub const MAX_QUERY_TOKENS: usize = 192;

/// What the backbone reads: `prefix`, the query, `suffix`. The last token
/// of the suffix is the one whose hidden state is classified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTemplate {
    /// Text before the query.
    pub prefix: String,
    /// Text after the query.
    pub suffix: String,
}

impl Default for PromptTemplate {
    fn default() -> Self {
        Self {
            prefix: "Message: ".into(),
            suffix: "\nTopic:".into(),
        }
    }
}

/// Whether `path` is a decoder classifier: a GGUF file with a classifier card.
pub fn is_decoder_classifier(path: &Path) -> bool {
    path.is_file()
        && std::fs::File::open(path)
            .ok()
            .and_then(|f| gguf_file::Content::read(&mut BufReader::new(f)).ok())
            .is_some_and(|c| c.metadata.contains_key(CARD_KEY))
}

/// The card of a decoder classifier's GGUF metadata.
///
/// # Errors
/// No card, an invalid one, or one of another format.
pub fn card_of(content: &gguf_file::Content, path: &Path) -> Result<ClassifierCard, EngineError> {
    let text = content
        .metadata
        .get(CARD_KEY)
        .ok_or_else(|| {
            load_err(
                path,
                anyhow::anyhow!("no `{CARD_KEY}` metadata: not a decoder classifier"),
            )
        })?
        .to_string()
        .map_err(|e| load_err(path, e))?;
    let card: ClassifierCard = serde_json::from_str(text).map_err(|e| load_err(path, e))?;
    if card.format != FORMAT {
        return Err(load_err(
            path,
            anyhow::anyhow!("format `{}` is not `{FORMAT}`", card.format),
        ));
    }
    crate::engine::LabelSet::new(card.labels.clone()).map_err(|e| load_err(path, e))?;
    Ok(card)
}

/// Read the card of the decoder classifier file `path`.
///
/// # Errors
/// An unreadable file, no card or an invalid one.
pub fn read_card(path: &Path) -> Result<ClassifierCard, EngineError> {
    let file = std::fs::File::open(path).map_err(|e| load_err(path, e))?;
    let content = gguf_file::Content::read(&mut BufReader::new(file)).map_err(|e| load_err(path, e))?;
    card_of(&content, path)
}

/// A decoder backbone with its tokenizer and prompt template.
pub struct DecoderBackbone {
    model: Llama,
    tokenizer: Tokenizer,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    center: Option<Tensor>,
}

impl std::fmt::Debug for DecoderBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderBackbone")
            .field("blocks", &self.model.blocks.len())
            .finish()
    }
}

impl DecoderBackbone {
    /// A backbone from a loaded model, its tokenizer and the template.
    ///
    /// # Errors
    /// The template cannot be tokenized, or its suffix is empty.
    pub fn new(model: Llama, tokenizer: Tokenizer, template: &PromptTemplate) -> Result<Self, LlamaError> {
        let encode = |text: &str| -> Result<Vec<u32>, LlamaError> {
            Ok(tokenizer
                .encode(text, false)
                .map_err(|e| LlamaError::Invalid(format!("tokenizing the prompt template: {e}")))?
                .get_ids()
                .to_vec())
        };
        let (prefix, suffix) = (encode(&template.prefix)?, encode(&template.suffix)?);
        if suffix.is_empty() {
            return Err(LlamaError::Invalid(
                "the prompt template's suffix is empty: the classified token must be the template's".into(),
            ));
        }
        Ok(Self {
            model,
            tokenizer,
            prefix,
            suffix,
            center: None,
        })
    }

    /// Subtract `center` (`[dim]`) from every state before scaling it.
    ///
    /// # Errors
    /// A center of another size.
    pub fn with_center(mut self, center: &[f32]) -> Result<Self, LlamaError> {
        if center.len() != self.model.cfg.n_embd {
            return Err(LlamaError::Invalid(format!(
                "a center of {} values for {}-dimensional states",
                center.len(),
                self.model.cfg.n_embd
            )));
        }
        self.center = Some(Tensor::from_slice(center, center.len(), self.model.device())?);
        Ok(self)
    }

    /// Read the backbone of a GGUF file (all its blocks) onto `device`.
    ///
    /// # Errors
    /// Unsupported architecture or tokenizer, unreadable tensors.
    pub fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        template: &PromptTemplate,
        device: &Device,
    ) -> Result<Self, LlamaError> {
        let tokenizer = crate::llama::tokenizer::from_gguf(content)?;
        let (model, _) = Llama::from_gguf(content, reader, None, device)?;
        Self::new(model, tokenizer, template)
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The model, for training.
    pub fn into_model(self) -> Llama {
        self.model
    }

    /// The prompt tokens for `text`: template around the query, a long query
    /// read by its first and last [`MAX_QUERY_TOKENS`] / 2 tokens.
    ///
    /// # Errors
    /// Tokenizer failures.
    pub fn prompt(&self, text: &str) -> Result<Vec<u32>, LlamaError> {
        let query = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| LlamaError::Invalid(format!("tokenizing the query: {e}")))?;
        let ids = query.get_ids();
        let mut out = Vec::with_capacity(self.prefix.len() + ids.len().min(MAX_QUERY_TOKENS) + self.suffix.len());
        out.extend_from_slice(&self.prefix);
        if ids.len() <= MAX_QUERY_TOKENS {
            out.extend_from_slice(ids);
        } else {
            let half = MAX_QUERY_TOKENS / 2;
            out.extend_from_slice(&ids[..half]);
            out.extend_from_slice(&ids[ids.len() - half..]);
        }
        out.extend_from_slice(&self.suffix);
        Ok(out)
    }

    /// Unit-length features of prompts, right-padded into one forward pass.
    ///
    /// # Errors
    /// Model failures.
    pub fn features_of(&self, prompts: &[&[u32]]) -> Result<Vec<Vec<f32>>, LlamaError> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let (tokens, lengths) = right_padded(prompts, self.model.device())?;
        let states = self.model.last_token_features(&tokens, &lengths, &mut |_| Ok(None))?;
        let f = unit_features(&states, self.center.as_ref())?;
        Ok(f.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
    }

    /// Final states of prompts (`[b, d]`, before centring), one padded pass.
    ///
    /// # Errors
    /// Model failures.
    pub fn states_of(&self, prompts: &[&[u32]]) -> Result<Tensor, LlamaError> {
        let (tokens, lengths) = right_padded(prompts, self.model.device())?;
        Ok(self.model.last_token_features(&tokens, &lengths, &mut |_| Ok(None))?)
    }
}

/// The classifier's features of final states `states` (`[b, d]`): minus
/// `center` (`[d]`), scaled to unit length. Training and serving both call this.
///
/// # Errors
/// Shape mismatches.
pub fn unit_features(states: &Tensor, center: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let x = match center {
        Some(c) => states.broadcast_sub(c)?,
        None => states.clone(),
    };
    x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?)
}

/// `[b, longest]` token ids, each row padded after its end with its own last
/// token, and the real lengths.
///
/// # Errors
/// Tensor creation failures.
pub fn right_padded(prompts: &[&[u32]], device: &Device) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(prompts.len() * longest);
    for p in prompts {
        flat.extend_from_slice(p);
        let pad = p.last().copied().unwrap_or(0);
        flat.extend(std::iter::repeat_n(pad, longest - p.len()));
    }
    let lengths = prompts.iter().map(|p| p.len()).collect();
    Ok((Tensor::from_vec(flat, (prompts.len(), longest), device)?, lengths))
}

impl Featurizer for DecoderBackbone {
    fn windows(&self, text: &str) -> anyhow::Result<Vec<Vec<u32>>> {
        Ok(vec![self.prompt(text)?])
    }

    fn features(&self, texts: &[Vec<Vec<u32>>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let prompts: Vec<&[u32]> = texts.iter().map(|w| w.first().map_or(&[][..], Vec::as_slice)).collect();
        Ok(self.features_of(&prompts)?)
    }
}

/// The parts of a decoder classifier file.
pub struct DecoderParts {
    /// The card.
    pub card: ClassifierCard,
    /// The backbone.
    pub backbone: DecoderBackbone,
    /// The head.
    pub head: Head,
    /// Reference features of the out-of-scope rule.
    pub neighbours: Option<Neighbours>,
}

/// Load the decoder classifier file `path` onto `device`.
///
/// # Errors
/// Missing or inconsistent parts.
pub fn load(path: &Path, device: &Device) -> Result<DecoderParts, EngineError> {
    let file = std::fs::File::open(path).map_err(|e| load_err(path, e))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| load_err(path, e))?;
    let card = card_of(&content, path)?;
    let template = card.prompt.clone().unwrap_or_default();
    let mut backbone =
        DecoderBackbone::from_gguf(&content, &mut reader, &template, device).map_err(|e| load_err(path, e))?;
    let dim = backbone.model.cfg.n_embd;
    let mut read = |name: &str| -> Result<(Vec<f32>, Vec<usize>), EngineError> {
        let t = content
            .tensor(&mut reader, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(|e| load_err(path, anyhow::Error::from(e).context(format!("tensor `{name}`"))))?;
        let dims = t.dims().to_vec();
        let v = t
            .flatten_all()
            .and_then(|f| f.to_vec1::<f32>())
            .map_err(|e| load_err(path, e))?;
        Ok((v, dims))
    };
    if content.tensor_infos.contains_key(CENTER) {
        let (center, _) = read(CENTER)?;
        backbone = backbone.with_center(&center).map_err(|e| load_err(path, e))?;
    }
    let labels = card.labels.len();
    let (weight, wshape) = read(HEAD_WEIGHT)?;
    let (bias, _) = read(HEAD_BIAS)?;
    if wshape != [labels, dim] || bias.len() != labels {
        return Err(load_err(
            path,
            anyhow::anyhow!(
                "the head is {wshape:?} with {} biases; the card has {labels} labels and the backbone {dim} dimensions",
                bias.len()
            ),
        ));
    }
    let neighbours = match &card.out_of_scope {
        Some(_) => {
            let (embeddings, shape) = read(NEIGHBOURS)?;
            if shape.len() != 2 || shape[1] != dim || shape[0] == 0 {
                return Err(load_err(
                    path,
                    anyhow::anyhow!("the reference features are {shape:?}, not [examples, {dim}]"),
                ));
            }
            Some(Neighbours { embeddings, dim })
        }
        None => None,
    };
    Ok(DecoderParts {
        card,
        backbone,
        head: Head { weight, bias, dim },
        neighbours,
    })
}

/// Write a decoder classifier to `path`: the backbone GGUF `content` (its
/// tensors read through `reader`, its metadata kept) with the card, labels,
/// head and `center` (see [`unit_features`]) added. The language-model head
/// (`output.weight`), which a classifier never reads, is left out.
///
/// # Errors
/// Parts that do not fit together, tensor or I/O failures.
pub fn write<R: Read + Seek>(
    path: &Path,
    content: &gguf_file::Content,
    reader: &mut R,
    card: &ClassifierCard,
    head: &Head,
    center: Option<&[f32]>,
    neighbours: Option<&Neighbours>,
) -> Result<(), EngineError> {
    let err = |e: anyhow::Error| load_err(path, e);
    let labels = card.labels.len();
    if head.bias.len() != labels || head.weight.len() != labels * head.dim {
        return Err(err(anyhow::anyhow!(
            "the head does not match the card's {labels} labels"
        )));
    }
    if card.out_of_scope.is_some() != neighbours.is_some() {
        return Err(err(anyhow::anyhow!(
            "an out-of-scope rule needs its reference features, and only a rule does"
        )));
    }
    let cpu = Device::Cpu;
    let f32_tensor = |v: &[f32], shape: &[usize]| -> Result<QTensor, EngineError> {
        Tensor::from_slice(v, shape, &cpu)
            .and_then(|t| QTensor::quantize(&t, GgmlDType::F32))
            .map_err(|e| err(e.into()))
    };
    let mut extra = vec![
        (HEAD_WEIGHT, f32_tensor(&head.weight, &[labels, head.dim])?),
        (HEAD_BIAS, f32_tensor(&head.bias, &[labels])?),
    ];
    if let Some(c) = center {
        if c.len() != head.dim {
            return Err(err(anyhow::anyhow!(
                "a center of {} values for a {}-dimensional head",
                c.len(),
                head.dim
            )));
        }
        extra.push((CENTER, f32_tensor(c, &[c.len()])?));
    }
    if let Some(n) = neighbours {
        extra.push((NEIGHBOURS, f32_tensor(&n.embeddings, &[n.len(), n.dim])?));
    }
    let mut names: Vec<&String> = content
        .tensor_infos
        .keys()
        .filter(|n| *n != "output.weight" && !n.starts_with("cls."))
        .collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let read = names
        .iter()
        .map(|n| content.tensor(reader, n, &cpu).map(|q| (n.as_str(), q)))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(|e| err(e.into()))?;
    let mut tensors: Vec<(&str, &QTensor)> = read.iter().map(|(n, q)| (*n, q)).collect();
    tensors.extend(extra.iter().map(|(n, q)| (*n, q)));
    let card_json = gguf_file::Value::String(serde_json::to_string(card).map_err(|e| err(e.into()))?);
    let label_list = gguf_file::Value::Array(card.labels.iter().cloned().map(gguf_file::Value::String).collect());
    let added = [(CARD_KEY, &card_json), (LABELS_KEY, &label_list)];
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| !added.iter().any(|(a, _)| a == k))
        .map(|(k, v)| (k.as_str(), v))
        .chain(added)
        .collect();
    metadata.sort_by_key(|(k, _)| *k);
    crate::model_prep::write_gguf(path, &metadata, &tensors).map_err(|e| err(e.into()))
}
