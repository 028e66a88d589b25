//! The load generator's HTTP side: streamed chat completions over the
//! server's OpenAI-compatible API, on a pool of HTTP/1.1 keep-alive
//! connections (one request at a time each, as HTTP/1.1 clients such as
//! `httpx` or `requests` sessions work).
//!
//! It reads the server-sent events as they arrive and reports each answer
//! delta, so the HTTP path is measured as the gRPC path is (TTFT, ITL,
//! latency). To keep the generator's own cost low on the CPU it shares with
//! the server, an event is classified by a substring test, not parsed as JSON.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use tonic::codegen::http;

/// What one server-sent event of an answer was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseEvent {
    /// A chunk carrying answer text.
    Delta,
    /// A chunk without text (the opening role chunk, the finish, usage).
    Other,
    /// An error event.
    Error,
    /// `[DONE]`: the answer ended.
    Done,
}

/// Kept-alive connections to one server.
pub struct HttpPool {
    addr: String,
    authority: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl HttpPool {
    /// A pool for `addr` (`http://host:port`); connections open on demand.
    ///
    /// # Errors
    /// An address that is not a plain `http://` URL.
    pub fn new(addr: &str) -> anyhow::Result<Arc<Self>> {
        let uri: http::Uri = addr.parse().with_context(|| format!("`{addr}` is not a URL"))?;
        anyhow::ensure!(
            uri.scheme_str() == Some("http"),
            "`{addr}`: load runs over plain http://"
        );
        let authority = uri
            .authority()
            .with_context(|| format!("`{addr}` names no host"))?
            .to_string();
        Ok(Arc::new(Self {
            addr: addr.to_string(),
            authority,
            idle: Mutex::new(Vec::new()),
        }))
    }

    async fn connection(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        loop {
            let idle = self
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            let Some(mut c) = idle else { break };
            // A connection the server closed while idle is dropped.
            if c.ready().await.is_ok() {
                return Ok(c);
            }
        }
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (send, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP/1.1 handshake with {}", self.addr))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "load connection closed");
            }
        });
        Ok(send)
    }

    /// Open one connection and keep it idle (warm-up).
    ///
    /// # Errors
    /// The server cannot be reached.
    pub async fn open(&self) -> anyhow::Result<()> {
        let c = self.connection().await?;
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(c);
        Ok(())
    }

    /// Stream one answer to `query`, calling `on_event` for each event as it
    /// arrives; the HTTP status. A connection whose answer was read to its
    /// end goes back to the pool; one dropped mid-answer (the caller's
    /// deadline) is closed, which cancels the answer on the server.
    ///
    /// # Errors
    /// Connection failures.
    pub async fn stream_chat(
        &self,
        query: &str,
        max_tokens: u32,
        mut on_event: impl FnMut(SseEvent),
    ) -> anyhow::Result<u16> {
        let body = serde_json::json!({
            "model": "flywheel",
            "messages": [{"role": "user", "content": query}],
            "max_tokens": max_tokens,
            "stream": true,
        })
        .to_string();
        let request = http::Request::post("/v1/chat/completions")
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let mut conn = self.connection().await?;
        let response = conn.send_request(request).await?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            // Every whole event in the buffer, then drop them in one go.
            let mut at = 0;
            while let Some(end) = find(&pending[at..], b"\n\n") {
                on_event(classify(&pending[at..at + end]));
                at += end + 2;
            }
            pending.drain(..at);
        }
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(conn);
        Ok(status)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// An event by its text: answer text is `"delta":{"content":"<non-empty>`.
fn classify(event: &[u8]) -> SseEvent {
    const DELTA: &[u8] = br#""delta":{"content":""#;
    if let Some(at) = find(event, DELTA) {
        if event.get(at + DELTA.len()).is_some_and(|&c| c != b'"') {
            SseEvent::Delta
        } else {
            SseEvent::Other
        }
    } else if event.starts_with(b"data: [DONE]") {
        SseEvent::Done
    } else if find(event, br#""error":{"#).is_some() {
        SseEvent::Error
    } else {
        SseEvent::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_told_apart_by_their_text() {
        assert_eq!(classify(b"data: [DONE]\n\n"), SseEvent::Done);
        assert_eq!(
            classify(br#"data: {"choices":[{"delta":{"content":" the"},"finish_reason":null}]}"#),
            SseEvent::Delta
        );
        assert_eq!(
            classify(br#"data: {"choices":[{"delta":{"content":"","role":"assistant"}}]}"#),
            SseEvent::Other
        );
        assert_eq!(classify(br#"data: {"error":{"message":"x"}}"#), SseEvent::Error);
    }
}
