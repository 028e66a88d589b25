//! Checkpoints of a fine-tuning run: progress and optimizer state, written
//! atomically, refused when they belong to another run.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::train::CurvePoint;
use super::{FinetuneError, adamw, gguf_err, io_err};

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Progress {
    pub(super) fingerprint: String,
    pub(super) step: usize,
    pub(super) seconds: f64,
    pub(super) tokens: usize,
    pub(super) curve: Vec<CurvePoint>,
}

pub(super) fn save_checkpoint(dir: &Path, progress: &Progress, opt: &adamw::AdamW) -> Result<(), FinetuneError> {
    // Written beside the old checkpoint and renamed over it, so an
    // interruption leaves either the old or the new one, never a mix.
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::TempDir::new_in(parent).map_err(io_err(parent))?;
    candle_core::safetensors::save(&opt.state(), tmp.path().join("state.safetensors")).map_err(gguf_err)?;
    let text = serde_json::to_string(progress).map_err(|e| FinetuneError::Write(e.into()))?;
    std::fs::write(tmp.path().join("progress.json"), text).map_err(io_err(tmp.path()))?;
    let old = parent.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
    }
    std::fs::rename(tmp.keep(), dir).map_err(io_err(dir))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

pub(super) type Saved = (Progress, std::collections::HashMap<String, candle_core::Tensor>);

/// The checkpoint in `dir`, if any; refused when it belongs to another run.
pub(super) fn load_checkpoint(dir: &Path, fingerprint: &str) -> Result<Option<Saved>, FinetuneError> {
    let progress_path = dir.join("progress.json");
    let Ok(text) = std::fs::read_to_string(&progress_path) else {
        return Ok(None);
    };
    let progress: Progress = serde_json::from_str(&text)
        .map_err(|e| FinetuneError::Invalid(format!("{} is corrupt: {e}", progress_path.display())))?;
    if progress.fingerprint != fingerprint {
        return Err(FinetuneError::Invalid(format!(
            "{} holds a checkpoint of a different run (other data, base or settings); \
             use another --out or delete that folder",
            dir.display()
        )));
    }
    let state =
        candle_core::safetensors::load(dir.join("state.safetensors"), &candle_core::Device::Cpu).map_err(gguf_err)?;
    Ok(Some((progress, state)))
}
