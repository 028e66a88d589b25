//! What the gRPC benchmarks share: a connected channel, and requests
//! carrying the admin token.

use anyhow::Context;
use tonic::transport::Channel;

/// Connect to the server at `addr`.
///
/// # Errors
/// The server cannot be reached.
pub async fn connect(addr: &str) -> anyhow::Result<Channel> {
    tonic::transport::Endpoint::from_shared(addr.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// `message` with the metadata `authorization: Bearer <token>`.
///
/// # Errors
/// A token that is not valid header text.
pub fn authorized<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().context("token")?);
    Ok(r)
}
