//! What the gRPC benchmarks share: a connected channel, and requests
//! carrying the admin token.

use anyhow::Context;
use tonic::codegen::http;
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

/// One HTTP/2 connection for load generation, used through the generated
/// clients like a [`Channel`] (`RouterClient::new(load_channel)`).
///
/// Two things keep the generator's own cost, on the CPU it shares with the
/// server it measures, low: the socket's writes are coalesced
/// ([`flywheel_proto::coalesce`]), so requests sent together leave in one
/// syscall instead of one each; and requests go from the calling task
/// straight to hyper's connection task, whereas a [`Channel`] first queues
/// them for a buffer task of its own (one more task hop and wake-up per
/// request).
#[derive(Clone)]
pub struct LoadChannel {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
}

type ResponseFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send>,
>;

impl tower::Service<http::Request<tonic::body::Body>> for LoadChannel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), hyper::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> ResponseFuture {
        // The generated clients send the path only (always one: the
        // method's); HTTP/2 wants the scheme and authority too.
        let mut uri = std::mem::take(request.uri_mut()).into_parts();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        *request.uri_mut() = http::Uri::from_parts(uri).unwrap_or_default();
        Box::pin(self.send.send_request(request))
    }
}

/// Connect to the server at `addr` (`http://host:port`) for load generation.
///
/// # Errors
/// A malformed address, or the server cannot be reached or does not speak HTTP/2.
pub async fn connect_for_load(addr: &str) -> anyhow::Result<LoadChannel> {
    let uri: http::Uri = addr.parse().with_context(|| format!("`{addr}` is not a URL"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
        anyhow::bail!("`{addr}` needs a scheme and a host, like http://127.0.0.1:50051");
    };
    anyhow::ensure!(
        scheme == http::uri::Scheme::HTTP,
        "`{addr}`: load runs over plain http://"
    );
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let stream = tokio::net::TcpStream::connect((host, authority.port_u16().unwrap_or(80)))
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let io = hyper_util::rt::TokioIo::new(flywheel_proto::coalesce::CoalescedIo::new(stream));
    let (send, connection) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .with_context(|| format!("HTTP/2 handshake with {addr}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "load connection closed");
        }
    });
    Ok(LoadChannel {
        send,
        scheme,
        authority,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn load_addresses_must_be_plain_http_urls() {
        for (addr, says) in [
            ("127.0.0.1:50051", "needs a scheme"),
            ("https://127.0.0.1:50051", "plain http://"),
            ("http://", "not a URL"),
        ] {
            let err = connect_for_load(addr).await.err().expect(addr).to_string();
            assert!(err.contains(says), "{addr}: {err}");
        }
        // Nothing listens on a port just released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("http://127.0.0.1:{port}");
        let err = connect_for_load(&addr).await.err().expect("refused");
        assert!(err.to_string().contains("connecting to"), "{err}");
    }
}
