//! The server's tests through its real APIs: a real server on `127.0.0.1:0`
//! (or the `flywheel-server` binary as a process), real gRPC and HTTP clients.
//! One test binary: one link of the whole server for every API surface.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

mod classifier_api;
mod grpc_api;
mod http_api;
mod limits_api;
mod metrics_api;
mod openai_api;
mod process;
mod promotion_api;
mod rag_api;
mod rails_api;
mod reliability;
mod replicas_api;
mod shadow_api;
mod split_api;
