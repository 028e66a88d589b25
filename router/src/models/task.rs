//! The task a fine-tuned model was trained for, read from its GGUF metadata.
//!
//! `flywheel-trainer train` writes the system prompt of its training prompts
//! and the label set into the merged model (`flywheel.task.*` keys). A model
//! carrying them is a trained classifier: the router prompts it exactly as it
//! was trained (no expert list, no calibration) and refuses to serve it for a
//! label set it was not trained on. A model without them (the base model) is
//! prompted with instructions and the expert list, zero-shot.

use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::engine::ModelKind;
use crate::engine::classifier;

/// GGUF key of the training prompts' system prompt.
pub const SYSTEM_PROMPT_KEY: &str = "flywheel.task.system_prompt";
/// GGUF key of the label set (array of strings).
pub const LABELS_KEY: &str = "flywheel.task.labels";

/// A fine-tuned model's task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainedTask {
    /// System prompt the model was trained with.
    pub system_prompt: String,
    /// Labels it answers with.
    pub labels: Vec<String>,
    /// How it routes.
    pub kind: ModelKind,
}

/// Errors reading a model's task.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The file could not be opened.
    #[error("cannot open model {path}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An encoder classifier's card is unreadable.
    #[error("cannot read the classifier card of {path}: {reason}")]
    Card {
        /// The folder.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The GGUF header is unreadable or a task key has the wrong type.
    #[error("cannot read the GGUF header of {path}")]
    Gguf {
        /// The file.
        path: String,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
}

/// The task of a classifier, from its card.
fn classifier_task(
    path: &Path,
    card: Result<classifier::ClassifierCard, crate::engine::EngineError>,
    kind: ModelKind,
) -> Result<Option<TrainedTask>, TaskError> {
    let card = card.map_err(|e| TaskError::Card {
        path: path.display().to_string(),
        reason: format!("{:#}", anyhow::Error::from(e)),
    })?;
    Ok(Some(TrainedTask {
        system_prompt: String::new(),
        labels: card.labels,
        kind,
    }))
}

/// Read the task of the model at `path` (a GGUF header, or a classifier's
/// card); `None` for a model that was not fine-tuned by flywheel.
///
/// # Errors
/// Unreadable file or header.
pub fn read_task(path: &Path) -> Result<Option<TrainedTask>, TaskError> {
    if classifier::is_classifier(path) {
        return classifier_task(path, classifier::read_card(path), ModelKind::EncoderClassifier);
    }
    let file = std::fs::File::open(path).map_err(|source| TaskError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let gguf = |source| TaskError::Gguf {
        path: path.display().to_string(),
        source,
    };
    let content = gguf_file::Content::read(&mut std::io::BufReader::new(file)).map_err(gguf)?;
    if content.metadata.contains_key(classifier::decoder::CARD_KEY) {
        let card = classifier::decoder::card_of(&content, path);
        return classifier_task(path, card, ModelKind::DecoderClassifier);
    }
    let (Some(prompt), Some(labels)) = (
        content.metadata.get(SYSTEM_PROMPT_KEY),
        content.metadata.get(LABELS_KEY),
    ) else {
        return Ok(None);
    };
    let system_prompt = prompt.to_string().map_err(gguf)?.clone();
    let labels = labels
        .to_vec()
        .map_err(gguf)?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<Result<Vec<_>, _>>()
        .map_err(gguf)?;
    Ok(Some(TrainedTask {
        system_prompt,
        labels,
        kind: ModelKind::LabelScoring,
    }))
}
