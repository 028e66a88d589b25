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

/// Connect to the server at `addr` for load generation: the socket's writes
/// are coalesced ([`flywheel_proto::coalesce`]), so requests sent together
/// leave in one syscall instead of one each and the generator takes less of
/// the CPU it shares with the server it measures.
///
/// # Errors
/// The server cannot be reached.
pub async fn connect_for_load(addr: &str) -> anyhow::Result<Channel> {
    let connector = tower::service_fn(|uri: tonic::transport::Uri| async move {
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
            flywheel_proto::coalesce::CoalescedIo::new(stream),
        ))
    });
    tonic::transport::Endpoint::from_shared(addr.to_string())?
        .connect_with_connector(connector)
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
