//! flywheel's domain core: everything between a query and its answer, and
//! everything that changes what is served, with no transport code.
//!
//! - [`serving`]: the request path (data plane): admit, input rails, route,
//!   topic rail, retrieve, generate, output rail, record; a request is a
//!   `Ticket` finished in one place, so every request leaves one record.
//! - [`control`]: the control plane: promotion and rollback, shadows, A/B
//!   splits, rails and index replacement, feedback, the cycle journal.
//! - [`engine`]: the [`engine::Engine`] trait (streaming generation, label
//!   scoring), its mistral.rs and stub implementations and their loaders.
//! - [`models`]: named model slots (atomically swappable snapshots), the
//!   registry on disk, the task a fine-tuned model carries.
//! - [`agents`]: the router agent (picks an expert by label scoring) and the
//!   expert agents (answer with streaming generation).
//! - [`guardrails`]: limits, PII (input and streamed output), jailbreak
//!   (sentence embedding [`embed`] + trained head) and topic rails;
//!   [`retrieval`]: the experts' corpora, BM25 + dense + RRF.
//! - [`trials`]: candidates on live traffic (shadow runs, A/B splits).
//! - [`data`]: the request log (SQLite, batched writer), feedback and implicit
//!   signals, the cycle journal, text similarity.
//! - [`observe`]: hooks through which the server's metrics see every
//!   finished request and every inter-token gap.
//! - [`config`]: typed, validated settings (the leaf every module may use);
//!   [`error`]: the errors and their transport-free kinds; [`text`]: limits on
//!   ids and free text, bounded quotes of user input; [`clock`];
//!   [`device`]: CPU or CUDA GPU; [`model_prep`]: GGUF conversion and the
//!   model wheels.
//!
//! The server (`flywheel-server`) wraps [`serving::Pipeline`] and
//! [`control::ControlPlane`] in gRPC and HTTP.

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
pub mod llama;
pub mod model_prep;
pub mod models;
pub mod observe;
pub mod retrieval;
pub mod serving;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod text;
pub mod trials;

pub use control::ControlPlane;
pub use error::{Classified, ControlError, ErrorKind, PipelineError};
pub use serving::{ChatEvent, ChatOutcome, ChatStream, Pipeline, Query, RouteOutcome, Timings};
