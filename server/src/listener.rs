//! Accepting connections without letting clients exhaust the server: at
//! most `max_connections` open at once (past that the listener stops
//! accepting and the kernel's backlog holds the rest), a connection must
//! send its first bytes (the HTTP/2 preface, an HTTP/1 request line) within
//! `handshake_timeout_ms` or it is closed, and accept errors (out of file
//! descriptors) back off instead of spinning a core.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a connection must have sent when its handshake deadline passes:
/// the length of the HTTP/2 client preface (an HTTP/1 request is longer).
pub const HANDSHAKE_BYTES: usize = 24;
/// First pause after an accept error; doubled on each error in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause after accept errors.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What the listener allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time a new connection has to send its first [`HANDSHAKE_BYTES`].
    pub handshake_timeout: Duration,
}

/// A TCP listener under [`ConnectionLimits`]; its limit is shared by
/// everything accepted from it.
pub struct GuardedListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    handshake_timeout: Duration,
    backoff: Duration,
}

impl GuardedListener {
    /// Guard `listener` with `limits`.
    pub fn new(listener: TcpListener, limits: ConnectionLimits) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            handshake_timeout: limits.handshake_timeout,
            backoff: FIRST_BACKOFF,
        }
    }

    /// The next connection, once one is free under the limit. Errors never
    /// end the loop: a connection the peer reset before it was accepted is
    /// skipped, anything else (out of descriptors) is logged and waited out.
    pub async fn accept(&mut self) -> (GuardedIo, SocketAddr) {
        // The semaphore is never closed.
        let slot = self.slots.clone().acquire_owned().await.ok();
        loop {
            match self.listener.accept().await {
                Ok((tcp, addr)) => {
                    self.backoff = FIRST_BACKOFF;
                    // Small frames must not wait for Nagle's algorithm (with
                    // delayed ACKs that stalls a response by ~40 ms).
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "set_nodelay failed");
                    }
                    return (GuardedIo::new(tcp, slot, self.handshake_timeout), addr);
                }
                Err(e) if peer_gone(&e) => tracing::debug!(error = %e, "connection reset before it was accepted"),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        backoff_ms = self.backoff.as_millis() as u64,
                        "accepting a connection failed (out of file descriptors?); pausing the listener"
                    );
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The connections as the stream tonic serves.
    pub fn into_stream(self) -> impl Stream<Item = io::Result<GuardedIo>> {
        futures::stream::unfold(self, |mut listener| async move {
            let (io, _) = listener.accept().await;
            Some((Ok(io), listener))
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// The socket's error.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        GuardedListener::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        GuardedListener::local_addr(self)
    }
}

/// Errors of one connection, not of the listener.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
    )
}

/// An accepted connection: holds its place under the connection limit
/// until it closes, and fails its reads once the handshake deadline passes
/// with fewer than [`HANDSHAKE_BYTES`] received (the server then closes it).
pub struct GuardedIo {
    tcp: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
    /// Set until the handshake bytes arrived.
    deadline: Option<Pin<Box<Sleep>>>,
    received: usize,
}

impl GuardedIo {
    fn new(tcp: TcpStream, slot: Option<OwnedSemaphorePermit>, handshake_timeout: Duration) -> Self {
        Self {
            tcp,
            _slot: slot,
            deadline: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
            received: 0,
        }
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let me = &mut *self;
        match Pin::new(&mut me.tcp).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if me.deadline.is_some() {
                    me.received += buf.filled().len() - before;
                    if me.received >= HANDSHAKE_BYTES {
                        me.deadline = None;
                    }
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if let Some(deadline) = me.deadline.as_mut() {
                    ready!(deadline.as_mut().poll(cx));
                    tracing::debug!(
                        received = me.received,
                        "connection closed: no handshake before the deadline"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no handshake before the deadline",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Connected for GuardedIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn listener(max_connections: usize, handshake_ms: u64) -> (GuardedListener, SocketAddr) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let limits = ConnectionLimits {
            max_connections,
            handshake_timeout: Duration::from_millis(handshake_ms),
        };
        (GuardedListener::new(tcp, limits), addr)
    }

    #[tokio::test]
    async fn a_silent_connection_fails_its_read_at_the_deadline_and_a_talking_one_does_not() {
        let (mut l, addr) = listener(8, 100).await;
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (mut io, _) = l.accept().await;
        let mut buf = [0u8; 64];
        let started = std::time::Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(90));

        let mut talker = TcpStream::connect(addr).await.unwrap();
        let (mut io, _) = l.accept().await;
        talker.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut got = 0;
        while got < HANDSHAKE_BYTES {
            got += io.read(&mut buf).await.unwrap();
        }
        // Past the deadline, an idle but greeted connection stays open.
        tokio::time::sleep(Duration::from_millis(150)).await;
        talker.write_all(b"x").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn the_limit_holds_connections_back_until_one_closes() {
        let (mut l, addr) = listener(1, 10_000).await;
        let _first = TcpStream::connect(addr).await.unwrap();
        let (held, _) = l.accept().await;
        let _second = TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(100), l.accept()).await;
        assert!(waiting.is_err(), "a connection over the limit was accepted");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .expect("the freed place goes to the waiting connection");
    }
}
