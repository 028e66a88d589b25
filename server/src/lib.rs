//! flywheel-server: the gRPC face of the flywheel pipeline.
//!
//! [`config`] reads the one configuration struct (TOML + env + flags),
//! [`app`] builds the pipeline and serves it (health, reflection, Chat,
//! Router, Admin) with graceful shutdown, [`grpc`] holds the thin handlers
//! and the single error-to-status mapping, [`metrics`] serves Prometheus
//! metrics over HTTP, [`telemetry`] sets up tracing.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod app;
pub mod config;
pub mod grpc;
pub mod metrics;
pub mod telemetry;

pub use app::{App, ServerError, shutdown_signal};
pub use config::{Config, Flags};
