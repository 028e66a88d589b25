//! Generated gRPC code for the `flywheel.v1` API (see `flywheel/v1/flywheel.proto`).
//!
//! Both the server and the clients (tests, `flywheel-bench`) use these types,
//! and the connection adapter both sides put under HTTP/2 ([`coalesce`]).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod coalesce;

/// Messages, clients and servers of package `flywheel.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("flywheel.v1");
}

/// Encoded file descriptor set of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flywheel_descriptor");
