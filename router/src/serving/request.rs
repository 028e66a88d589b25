//! What a client asks and what it gets back: the [`Query`], the events of an
//! answer stream and the outcomes of whole requests.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use crate::agents::RouteDecision;
use crate::agents::expert::Overrides;
use crate::engine::{ChatMessage, Usage};
use crate::error::PipelineError;
use crate::retrieval::Passage;

/// A query and its options.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    /// The user's text.
    pub text: String,
    /// Caller session id.
    pub session_id: Option<String>,
    /// Caller user id.
    pub user_id: Option<String>,
    /// Force this expert instead of routing.
    pub expert: Option<String>,
    /// Generation overrides.
    pub overrides: Overrides,
    /// Earlier turns of the conversation, oldest first, the client's system
    /// messages among them: the router decides on `text` alone, the expert
    /// answers after these turns. They pass the input rails like the query.
    pub history: Vec<ChatMessage>,
    /// Id of the client API key the request came with (never the key).
    pub api_key_id: Option<String>,
}

/// Timings of an answered request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Arrival to first answer token (ms).
    pub ttft_ms: f64,
    /// Arrival to last token (ms).
    pub total_ms: f64,
    /// Router decision (ms).
    pub route_ms: f64,
    /// Engine prefill speed (tokens/s).
    pub prefill_tokens_per_second: f64,
    /// Engine decode speed (tokens/s).
    pub decode_tokens_per_second: f64,
}

/// One event of an answer stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// First event: who answers.
    Start {
        /// Request id.
        request_id: String,
        /// The route decision.
        route: RouteDecision,
        /// Model version of the answering expert.
        expert_model_version: String,
        /// Passages the expert answers from (its citations), best first.
        citations: Vec<Passage>,
    },
    /// Answer text.
    Delta(String),
    /// Last event of a successful answer.
    End {
        /// Token counts.
        usage: Usage,
        /// Timings.
        timings: Timings,
        /// Why generation stopped.
        finish_reason: String,
    },
}

/// The result of a route-only request.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteOutcome {
    /// Request id.
    pub request_id: String,
    /// The decision.
    pub route: RouteDecision,
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatOutcome {
    /// Request id.
    pub request_id: String,
    /// The route decision.
    pub route: RouteDecision,
    /// Model version of the answering expert.
    pub expert_model_version: String,
    /// Passages the expert answered from.
    pub citations: Vec<Passage>,
    /// The answer.
    pub answer: String,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
    /// Why generation stopped.
    pub finish_reason: String,
}

/// A stream of answer events; dropping it cancels the generation.
pub struct ChatStream {
    rx: mpsc::Receiver<Result<ChatEvent, PipelineError>>,
    /// Why the producer cut the stream, read after the last event it queued.
    cut: Option<oneshot::Receiver<PipelineError>>,
}

impl ChatStream {
    pub(super) fn new(
        rx: mpsc::Receiver<Result<ChatEvent, PipelineError>>,
        cut: Option<oneshot::Receiver<PipelineError>>,
    ) -> Self {
        Self { rx, cut }
    }
}

impl Stream for ChatStream {
    type Item = Result<ChatEvent, PipelineError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) => {
                // The producer is gone: its cut (sent before it let go of
                // the channel) is the stream's last item.
                let cut = self.cut.take().and_then(|mut c| c.try_recv().ok());
                Poll::Ready(cut.map(Err))
            }
            other => other,
        }
    }
}
