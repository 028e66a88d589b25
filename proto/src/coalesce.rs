//! Write coalescing for HTTP/2 connections (server and client side).
//!
//! hyper runs every HTTP/2 stream as its own task; when a handler finishes,
//! its stream task wakes the connection task, and tokio runs the woken task
//! next (its LIFO slot). Under load the connection therefore wakes once per
//! finished response and writes each one with its own `writev`: ~0.75 write
//! syscalls per route request, ~13% of the server's CPU, while one read picks
//! up a dozen requests.
//!
//! [`CoalescedIo`] holds the bytes of a flush back for one scheduler pass:
//! the first flush that finds data buffered returns at once and wakes its
//! own task, which puts the connection at the back of the run queue behind
//! the handlers that are ready to finish. The connection's next poll (h2
//! always reads before it flushes, so a read marks it) writes everything
//! buffered by then in one syscall. Bytes never wait for anything but that
//! one pass: a self-wake is outstanding whenever data is held back, and the
//! buffer is written through once it holds [`FLUSH_AT`] bytes.
//!
//! The same holds for a client: each request a caller sends wakes hyper's
//! client connection task, so a load generator with many requests in flight
//! wraps its sockets too.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Buffered bytes at which a flush writes without waiting for the next pass
/// (a streamed answer or a large response does not need company).
pub const FLUSH_AT: usize = 64 * 1024;

/// An I/O stream whose writes are gathered and sent once per scheduler pass.
#[derive(Debug)]
pub struct CoalescedIo<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written to `inner`.
    written: usize,
    /// A self-wake is outstanding: data is being held for the next poll.
    held: bool,
    /// A read happened since the data was held, i.e. this is a later poll.
    read_since_held: bool,
}

impl<T> CoalescedIo<T> {
    /// Wrap an accepted connection.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
            held: false,
            read_since_held: false,
        }
    }

    /// Bytes accepted but not yet handed to the inner stream.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> CoalescedIo<T> {
    /// Hand every buffered byte to the inner stream.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        self.held = false;
        self.read_since_held = false;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held {
            this.read_since_held = true;
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending() >= FLUSH_AT {
            ready!(this.poll_drain(cx))?;
        }
        let mut n = 0;
        for b in bufs {
            this.buf.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending() == 0 {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if !this.read_since_held && this.pending() < FLUSH_AT {
            // Hold the bytes until the next poll: waking the running task
            // makes tokio requeue it at the back once this poll returns. h2
            // flushes several times per poll; one wake covers them all.
            if !this.held {
                this.held = true;
                cx.waker().wake_by_ref();
            }
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for CoalescedIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    /// A stream that records each write call; `chunk` caps the bytes one
    /// call takes, and with `stall` every other call returns `Pending`.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        chunk: Option<usize>,
        stall: bool,
        calls: usize,
        flushes: usize,
        shut: bool,
    }

    impl Recorder {
        fn bytes(&self) -> Vec<u8> {
            self.writes.concat()
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            if this.stall && this.calls % 2 == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = this.chunk.map_or(data.len(), |c| c.min(data.len()));
            this.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Harness {
        io: CoalescedIo<Recorder>,
        wakes: Arc<Wakes>,
    }

    impl Harness {
        fn new(inner: Recorder) -> Self {
            Self {
                io: CoalescedIo::new(inner),
                wakes: Arc::default(),
            }
        }

        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::SeqCst)
        }

        fn with_cx<R>(&mut self, f: impl FnOnce(Pin<&mut CoalescedIo<Recorder>>, &mut Context<'_>) -> R) -> R {
            let waker = std::task::Waker::from(self.wakes.clone());
            let mut cx = Context::from_waker(&waker);
            f(Pin::new(&mut self.io), &mut cx)
        }

        fn write(&mut self, data: &[u8]) {
            let r = self.with_cx(|io, cx| io.poll_write_vectored(cx, &[IoSlice::new(data)]));
            assert!(
                matches!(r, Poll::Ready(Ok(n)) if n == data.len()),
                "write not accepted: {r:?}"
            );
        }

        fn flush(&mut self) -> Poll<io::Result<()>> {
            self.with_cx(|io, cx| io.poll_flush(cx))
        }

        /// What h2 does first in every poll of its connection.
        fn read(&mut self) {
            let mut storage = [0u8; 8];
            let mut buf = ReadBuf::new(&mut storage);
            assert!(self.with_cx(|io, cx| io.poll_read(cx, &mut buf)).is_pending());
        }
    }

    #[test]
    fn a_flush_holds_the_bytes_until_the_next_poll_and_wakes_the_task() {
        let mut h = Harness::new(Recorder::default());
        h.write(b"HEADERS");
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert!(
            h.io.inner.writes.is_empty(),
            "nothing goes out in the poll that buffered it"
        );
        assert_eq!(h.wakes(), 1, "the task must be woken to come back for the held bytes");
        // More flushes in the same poll keep holding, without more wake-ups.
        h.write(b"DATA");
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert!(h.io.inner.writes.is_empty());
        assert_eq!(h.wakes(), 1);
        // The next poll reads first, then its flush sends everything at once.
        h.read();
        h.write(b"TRAILERS");
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(
            h.io.inner.writes,
            vec![b"HEADERSDATATRAILERS".to_vec()],
            "one write for the whole batch"
        );
        assert_eq!(h.io.inner.flushes, 1);
        assert_eq!(h.io.pending(), 0);
        // The cycle starts again for the next batch.
        h.write(b"NEXT");
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.io.inner.writes.len(), 1);
        assert_eq!(h.wakes(), 2);
    }

    #[test]
    fn a_flush_with_nothing_held_passes_through() {
        let mut h = Harness::new(Recorder::default());
        h.read();
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.io.inner.flushes, 1);
        assert_eq!(h.wakes(), 0);
    }

    #[test]
    fn a_full_buffer_goes_out_without_waiting() {
        let mut h = Harness::new(Recorder::default());
        let big = vec![7u8; FLUSH_AT];
        h.write(&big);
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert_eq!(h.io.inner.bytes(), big);
        assert_eq!(h.wakes(), 0);
        // Writes past the threshold push out what is held before buffering.
        h.write(b"small");
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        h.write(&big);
        h.write(b"tail");
        assert_eq!(
            h.io.inner.bytes().len(),
            FLUSH_AT + 5 + FLUSH_AT,
            "the held bytes and the large write went out"
        );
        assert_eq!(h.io.pending(), 4);
    }

    #[test]
    fn partial_writes_and_a_stalled_stream_lose_and_reorder_nothing() {
        let mut h = Harness::new(Recorder {
            chunk: Some(3),
            stall: true,
            ..Recorder::default()
        });
        let mut sent = Vec::new();
        for i in 0..50u8 {
            let frame: Vec<u8> = (0..=i % 11).map(|k| i.wrapping_mul(31).wrapping_add(k)).collect();
            h.write(&frame);
            sent.extend_from_slice(&frame);
            let _ = h.flush();
            h.read();
        }
        // Drain: the stalled stream wakes us each time it returns Pending.
        let mut polls = 0;
        while !matches!(h.flush(), Poll::Ready(Ok(()))) || h.io.pending() > 0 {
            h.read();
            polls += 1;
            assert!(polls < 10_000, "drain does not finish");
        }
        assert_eq!(h.io.inner.bytes(), sent);
    }

    #[test]
    fn shutdown_sends_what_is_held_first() {
        let mut h = Harness::new(Recorder::default());
        h.write(b"GOAWAY");
        assert!(matches!(h.flush(), Poll::Ready(Ok(()))));
        assert!(h.io.inner.writes.is_empty());
        assert!(matches!(h.with_cx(|io, cx| io.poll_shutdown(cx)), Poll::Ready(Ok(()))));
        assert_eq!(h.io.inner.bytes(), b"GOAWAY");
        assert!(h.io.inner.shut);
    }
}
