//! gRPC transport: thin handlers that convert messages, call the pipeline and
//! map errors in one place ([`status::to_status`]).

pub mod admin;
pub mod chat;
pub mod convert;
pub mod feedback;
pub mod route;
pub mod status;
