//! The last stages of an answered request: the expert's tokens through the
//! output rail to the client, and the topic rail's refusal in their place.
//! One producer task per answer writes into a bounded channel; the ticket it
//! owns is finished when the answer ends, fails or its client goes away.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::mpsc;

use super::request::{ChatEvent, ChatStream, Timings};
use super::ticket::{Outcome, Ticket};
use super::{EVENT_BUFFER, REFUSAL_VERSION};
use crate::agents::RouteDecision;
use crate::engine::{EngineError, GenerationEvent, TokenStream, Usage};
use crate::error::PipelineError;
use crate::guardrails::OutputFilter;
use crate::models::slots::ServedModel;

/// Writes one answer's events and finishes its ticket.
pub(super) struct Producer {
    pub(super) tx: mpsc::Sender<Result<ChatEvent, PipelineError>>,
    pub(super) ticket: Ticket,
    pub(super) route_ms: f64,
    pub(super) filter: Box<dyn OutputFilter>,
    pub(super) last_delta: Option<Instant>,
    pub(super) answer: String,
    pub(super) ttft_ms: Option<f64>,
}

impl Producer {
    /// Stream the answer; `_model` lives until it ends, so a hot-swap
    /// cannot free the model under it.
    pub(super) async fn run(mut self, start_event: ChatEvent, mut tokens: TokenStream, _model: Arc<ServedModel>) {
        if self.tx.send(Ok(start_event)).await.is_err() {
            return self.close(Outcome::Cancelled);
        }
        loop {
            let next = tokio::select! {
                n = tokens.next() => n,
                () = self.tx.closed() => return self.close(Outcome::Cancelled),
            };
            match next {
                Some(Ok(GenerationEvent::Delta(text))) => {
                    let released = self.filter.push(&text);
                    if !released.is_empty() && !self.emit(released).await {
                        return self.close(Outcome::Cancelled);
                    }
                }
                Some(Ok(GenerationEvent::Done(summary))) => {
                    let tail = self.filter.finish();
                    if !tail.is_empty() && !self.emit(tail).await {
                        return self.close(Outcome::Cancelled);
                    }
                    let total_ms = self.ticket.elapsed_ms();
                    let timings = Timings {
                        ttft_ms: self.ttft_ms.unwrap_or(total_ms),
                        total_ms,
                        route_ms: self.route_ms,
                        prefill_tokens_per_second: summary.prefill_tokens_per_second,
                        decode_tokens_per_second: summary.decode_tokens_per_second,
                    };
                    let finish_reason = summary.finish_reason.as_str().to_string();
                    let record = &mut self.ticket.record;
                    record.prompt_tokens = Some(summary.usage.prompt_tokens);
                    record.completion_tokens = Some(summary.usage.completion_tokens);
                    record.finish_reason = Some(finish_reason.clone());
                    let end = ChatEvent::End {
                        usage: summary.usage,
                        timings,
                        finish_reason,
                    };
                    if self.tx.send(Ok(end)).await.is_err() {
                        return self.close(Outcome::Cancelled);
                    }
                    return self.close(Outcome::Answered);
                }
                Some(Err(e)) => {
                    let error = PipelineError::Engine(e);
                    tracing::error!(request_id = %self.ticket.record.request_id, error = %error, "generation failed");
                    return self.fail(error).await;
                }
                None => return self.fail(PipelineError::Engine(EngineError::Disconnected)).await,
            }
        }
    }

    async fn emit(&mut self, text: String) -> bool {
        if self.ttft_ms.is_none() {
            self.ttft_ms = Some(self.ticket.elapsed_ms());
        }
        let now = Instant::now();
        if let Some(last) = self.last_delta.replace(now) {
            let expert = self.ticket.record.expert.as_deref().unwrap_or_default();
            self.ticket
                .observer()
                .inter_token(expert, now.duration_since(last).as_secs_f64());
        }
        self.answer.push_str(&text);
        self.tx.send(Ok(ChatEvent::Delta(text))).await.is_ok()
    }

    /// Tell the client; the record keeps the error's kind and message.
    async fn fail(self, error: PipelineError) {
        let outcome = Outcome::from(&error);
        let _ = self.tx.send(Err(error)).await;
        self.close(outcome);
    }

    fn close(mut self, outcome: Outcome) {
        let verdicts = self.filter.verdicts();
        let record = &mut self.ticket.record;
        record.guardrails.extend(verdicts);
        record.answer = Some(std::mem::take(&mut self.answer));
        record.ttft_ms = self.ttft_ms;
        self.ticket.finish(outcome);
    }
}

/// Answer with the topic rail's refusal: no model runs.
pub(super) fn refuse(mut ticket: Ticket, route: RouteDecision, refusal: &str) -> ChatStream {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let total_ms = ticket.elapsed_ms();
    let events = [
        ChatEvent::Start {
            request_id: ticket.record.request_id.clone(),
            route: route.clone(),
            expert_model_version: REFUSAL_VERSION.into(),
            citations: Vec::new(),
        },
        ChatEvent::Delta(refusal.to_string()),
        ChatEvent::End {
            usage: Usage::default(),
            timings: Timings {
                ttft_ms: total_ms,
                total_ms,
                route_ms: route.latency_ms,
                ..Timings::default()
            },
            finish_reason: "refused".into(),
        },
    ];
    for e in events {
        // The buffer holds all three events, so this never waits.
        let _ = tx.try_send(Ok(e));
    }
    let record = &mut ticket.record;
    record.expert = None;
    record.expert_model_version = Some(REFUSAL_VERSION.into());
    record.answer = Some(refusal.to_string());
    record.finish_reason = Some("refused".into());
    record.ttft_ms = Some(total_ms);
    ticket.finish(Outcome::Ok);
    ChatStream { rx }
}
