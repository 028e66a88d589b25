//! flywheel-server: the gRPC and HTTP faces of the flywheel pipeline.
//!
//! [`config`] reads the one configuration struct (TOML + env + flags),
//! [`app`] builds the pipeline and serves it (health, reflection, Chat,
//! Router, Admin, Feedback; the OpenAI-compatible HTTP API when configured)
//! with graceful shutdown, [`grpc`] and [`http`] hold the thin handlers and
//! each transport's table from error kinds to its codes, [`errors`] what a
//! client is told of an error, [`auth`] the client API keys, [`metrics`]
//! serves Prometheus metrics over HTTP, [`telemetry`] sets up tracing;
//! `testing` (feature `test-util`) starts real servers for integration tests.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod app;
pub mod auth;
pub mod config;
pub mod errors;
pub mod grpc;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod testing;

pub use app::{App, Listeners, ServerError, shutdown_signal};
pub use config::{Config, Flags};
