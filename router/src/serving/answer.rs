//! The last stages of an answered request: the expert's tokens through the
//! output rail to the client, and the topic rail's refusal in their place.
//! One producer task per answer writes into a bounded channel; the ticket it
//! owns is finished when the answer ends, fails, its client goes away or
//! stops reading.
//!
//! Generation never waits for the client: the producer keeps taking the
//! engine's tokens and holds the text the channel has no room for (one
//! delta, growing), so a slow or stalled reader never holds the engine. A
//! client that takes nothing for `limits.stream_write_timeout_ms` is cut:
//! the stream ends with [`PipelineError::StalledReader`] after what it
//! already holds, and the admission slot is freed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::request::{ChatEvent, ChatStream, Timings};
use super::ticket::{Outcome, Ticket};
use super::{EVENT_BUFFER, REFUSAL_VERSION};
use crate::agents::RouteDecision;
use crate::engine::{EngineError, GenerationEvent, TokenStream, Usage};
use crate::error::PipelineError;
use crate::guardrails::OutputFilter;
use crate::models::slots::ServedModel;

type Event = Result<ChatEvent, PipelineError>;

/// Writes one answer's events and finishes its ticket.
pub(super) struct Producer {
    pub(super) tx: mpsc::Sender<Event>,
    /// Where a cut stream's last word goes (the channel may be full).
    pub(super) cut: Option<oneshot::Sender<PipelineError>>,
    pub(super) ticket: Ticket,
    pub(super) route_ms: f64,
    pub(super) filter: Box<dyn OutputFilter>,
    pub(super) write_timeout: Duration,
    pub(super) last_delta: Option<Instant>,
    pub(super) answer: String,
    pub(super) ttft_ms: Option<f64>,
}

/// The events the channel had no room for yet, oldest first; consecutive
/// text is merged into one delta.
#[derive(Default)]
struct Backlog(VecDeque<Event>);

impl Backlog {
    fn push(&mut self, event: Event) {
        if let (Ok(ChatEvent::Delta(text)), Some(Ok(ChatEvent::Delta(last)))) = (&event, self.0.back_mut()) {
            last.push_str(text);
            return;
        }
        self.0.push_back(event);
    }
}

/// What the producer's wait ended with.
enum Step {
    /// An event went to the client.
    Sent,
    /// The client went away.
    Gone,
    /// The engine's next event (`None`: its stream ended).
    Engine(Option<Result<GenerationEvent, EngineError>>),
    /// The client took nothing for the write timeout.
    Stalled,
}

impl Producer {
    /// Stream the answer; `_model` lives until it ends, so a hot-swap
    /// cannot free the model under it.
    pub(super) async fn run(mut self, start_event: ChatEvent, mut tokens: TokenStream, _model: Arc<ServedModel>) {
        let mut backlog = Backlog::default();
        backlog.push(Ok(start_event));
        // Set once the last event is in the backlog: how the request ends.
        let mut ending: Option<Outcome> = None;
        // Since when the client has taken nothing while events wait.
        let mut stalled_since: Option<Instant> = None;
        loop {
            if ending.is_some() && backlog.0.is_empty() {
                let outcome = ending.take().unwrap_or(Outcome::Answered);
                return self.close(outcome);
            }
            let waiting = !backlog.0.is_empty();
            stalled_since = match (waiting && self.tx.capacity() == 0, stalled_since) {
                (true, since) => Some(since.unwrap_or_else(Instant::now)),
                (false, _) => None,
            };
            let deadline =
                tokio::time::Instant::from_std(stalled_since.unwrap_or_else(Instant::now) + self.write_timeout);
            let step = tokio::select! {
                biased;
                permit = self.tx.reserve(), if waiting => match permit {
                    Ok(permit) => {
                        if let Some(event) = backlog.0.pop_front() {
                            permit.send(event);
                        }
                        Step::Sent
                    }
                    Err(_) => Step::Gone,
                },
                () = self.tx.closed(), if !waiting => Step::Gone,
                next = tokens.next(), if ending.is_none() => Step::Engine(next),
                () = tokio::time::sleep_until(deadline), if stalled_since.is_some() => Step::Stalled,
            };
            match step {
                Step::Sent => {}
                Step::Gone => return self.close(Outcome::Cancelled),
                Step::Engine(next) => ending = self.take(next, &mut backlog),
                Step::Stalled => {
                    let waited_ms = u64::try_from(self.write_timeout.as_millis()).unwrap_or(u64::MAX);
                    return self.cut(PipelineError::StalledReader { waited_ms });
                }
            }
        }
    }

    /// Take one engine event into the backlog; `Some` once it was the last.
    fn take(&mut self, next: Option<Result<GenerationEvent, EngineError>>, backlog: &mut Backlog) -> Option<Outcome> {
        match next {
            Some(Ok(GenerationEvent::Delta(text))) => {
                let released = self.filter.push(&text);
                if !released.is_empty() {
                    self.released(released, backlog);
                }
                None
            }
            Some(Ok(GenerationEvent::Done(summary))) => {
                let tail = self.filter.finish();
                if !tail.is_empty() {
                    self.released(tail, backlog);
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
                backlog.push(Ok(ChatEvent::End {
                    usage: summary.usage,
                    timings,
                    finish_reason,
                }));
                Some(Outcome::Answered)
            }
            Some(Err(e)) => {
                let error = PipelineError::Engine(e);
                tracing::error!(request_id = %self.ticket.record.request_id, error = %error, "generation failed");
                let outcome = Outcome::from(&error);
                backlog.push(Err(error));
                Some(outcome)
            }
            None => {
                let error = PipelineError::Engine(EngineError::Disconnected);
                let outcome = Outcome::from(&error);
                backlog.push(Err(error));
                Some(outcome)
            }
        }
    }

    /// Text the output rail released: timed as the answer's tokens.
    fn released(&mut self, text: String, backlog: &mut Backlog) {
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
        backlog.push(Ok(ChatEvent::Delta(text)));
    }

    /// End a stream whose client stopped reading: it gets what the channel
    /// holds, then `error`; generation (if still running) stops with it.
    fn cut(mut self, error: PipelineError) {
        tracing::warn!(request_id = %self.ticket.record.request_id, error = %error, "stalled stream cut");
        let outcome = Outcome::from(&error);
        if let Some(cut) = self.cut.take() {
            let _ = cut.send(error);
        }
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
    ChatStream::new(rx, None)
}
