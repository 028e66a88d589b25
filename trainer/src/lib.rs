//! flywheel-trainer: the flywheel's offline jobs. It reads the server's
//! config file for the domain settings only and talks to a live server over
//! gRPC; it does not link the server (the one-command demo, which runs the
//! server in process, is `flywheel-demo`).
//!
//! - [`curate`]: from the request log and feedback to a clean, leak-free,
//!   reproducible ground-truth dataset (judge, review queue, dedup, split).
//! - [`rails`]: guardrail datasets, jailbreak-head training, rail evaluation.
//! - [`eval`]: a model file measured through the router's own code (accuracy,
//!   per-class metrics, latency, McNemar between two models).
//! - [`compare`]: several models and the incumbent on one test set, the
//!   Pareto gate's choice, ratios and the accuracy-versus-latency plot.
//! - [`plot`]: PNG figures (the confusion matrix, latency CDFs, the Pareto plot).
//! - [`pareto`]: the gate over several candidates (the cheapest that holds
//!   the best model's accuracy within a tolerance).
//! - [`promote`]: the gate (candidate vs incumbent on a frozen test set) and
//!   `Admin.Promote` / `Admin.Rollback` on the live server.
//! - [`distill`]: a classifier router trained on gold labels plus a teacher
//!   router's distributions over unlabelled queries.
//! - [`finetune`]: LoRA / full fine-tuning in candle, merged GGUF and PEFT outputs.
//! - Model fetching and preparation live in [`flywheel_router::model_prep`];
//!   the binary exposes them as `fetch-model` and `prepare-model`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cli;
pub mod compare;
pub mod curate;
pub mod cycle;
pub mod distill;
pub mod eval;
pub mod finetune;
pub mod pareto;
pub mod plot;
pub mod promote;
pub mod rag;
pub mod rails;
