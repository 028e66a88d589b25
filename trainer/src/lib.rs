//! flywheel-trainer: the flywheel's offline jobs.
//!
//! - [`demo`]: the main job on the embedded defaults (server + sample queries).
//! - Model fetching and preparation live in [`flywheel_router::model_prep`];
//!   the binary exposes them as `fetch-model` and `prepare-model`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod demo;
