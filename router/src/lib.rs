//! flywheel's domain core: everything between a query and its answer, with no
//! transport code.
//!
//! - [`engine`]: the [`engine::Engine`] trait (streaming generation, label
//!   scoring) and its mistral.rs and stub implementations.
//! - [`registry`]: named model slots, each an atomically swappable snapshot;
//!   [`store`]: the registry on disk (model versions, what each slot serves);
//!   [`shadow`]: candidate models mirrored on a sample of live requests;
//!   [`split`]: A/B splits of live traffic between versions.
//! - [`agents`]: the router agent (picks an expert by label scoring) and the
//!   expert agents (answer with streaming generation).
//! - [`guardrails`]: limits, PII (input and streamed output), jailbreak
//!   (sentence embedding [`embed`] + trained head) and topic rails;
//!   [`retrieval`]: the seam for retrieved passages.
//! - [`pipeline`]: admission, validation, rails, routing, answering; every
//!   request leaves one record in the [`log`] (SQLite, batched writer).
//! - [`feedback`]: explicit ratings and corrections, reviewer labels and
//!   implicit signals (rephrase, abandoned stream), joined to the log by
//!   request id; [`similarity`]: shingles, Jaccard and MinHash near-duplicates.
//! - [`observe`]: hooks through which the server's metrics see every
//!   finished request and every inter-token gap.
//! - [`config`]: typed, validated settings; [`device`]: CPU or CUDA GPU; [`model_prep`]: converts GGUF
//!   weights to the fastest CPU format; [`task`]: the prompt and labels a
//!   fine-tuned model carries in its metadata.
//!
//! The server (`flywheel-server`) wraps [`pipeline::Pipeline`] in gRPC.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agents;
pub mod clock;
pub mod config;
pub mod control;
pub mod data;
pub mod device;
pub mod embed;
pub mod engine;
pub mod error;
pub mod guardrails;
pub mod model_prep;
pub mod models;
pub mod observe;
pub mod retrieval;
pub mod serving;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod trials;

pub use control::ControlPlane;
pub use error::{ErrorKind, PipelineError};
pub use serving::{ChatEvent, ChatOutcome, ChatStream, Pipeline, Query, RouteOutcome, Timings};
