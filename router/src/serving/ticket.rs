//! A request as a value: the [`Ticket`] is issued at admission and owns
//! everything the request holds (its admission permit, the record being
//! built, its start time, its place among the live requests). It is finished
//! in one place, [`Ticket::finish`], with a typed [`Outcome`]; a ticket
//! dropped unfinished (the client went away at any stage) is finished as
//! cancelled. So every request leaves exactly one record.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::OwnedSemaphorePermit;

use super::live::LiveGuard;
use crate::clock::unix_ms;
use crate::data::feedback::{FeedbackKind, FeedbackRecord, SessionTracker};
use crate::data::log::{RequestLog, RequestRecord};
use crate::error::{Classified, ErrorKind, PipelineError};
use crate::guardrails::Rails;
use crate::observe::Observer;

/// Where finished requests go: the log, the metrics, the session memory
/// behind rephrase detection.
pub(crate) struct Books {
    pub(crate) log: RequestLog,
    pub(crate) observer: Arc<dyn Observer>,
    pub(crate) sessions: Arc<SessionTracker>,
}

/// How a request ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// An expert answered: remembered for the session's rephrase detection.
    Answered,
    /// Routed, or refused by the topic rail with its message.
    Ok,
    /// Ended by an error: the record keeps its kind and message.
    Failed(ErrorKind, String),
    /// The client went away.
    Cancelled,
}

impl From<&PipelineError> for Outcome {
    fn from(e: &PipelineError) -> Self {
        Outcome::Failed(e.kind(), e.to_string())
    }
}

impl Outcome {
    /// The status the log writes: `ok` or the error's kind.
    fn status(&self) -> &'static str {
        match self {
            Outcome::Answered | Outcome::Ok => "ok",
            Outcome::Failed(kind, _) => kind.as_str(),
            Outcome::Cancelled => ErrorKind::Cancelled.as_str(),
        }
    }
}

/// One admitted (or refused-at-the-door) request.
pub(crate) struct Ticket {
    /// The record being built; written once, by [`Ticket::finish`].
    pub(crate) record: RequestRecord,
    start: Instant,
    permit: Option<OwnedSemaphorePermit>,
    live: Option<LiveGuard>,
    /// The query as the rails left it, once it passed them: compared with
    /// the session's last answer (rephrase) when the request ends.
    rephrase_probe: Option<String>,
    books: Arc<Books>,
    /// The rails in force at admission: what they redact is redacted in
    /// every free-text field of the record before it is stored.
    rails: Arc<Rails>,
    finished: bool,
}

impl Ticket {
    /// A request arriving now, not admitted yet.
    pub(crate) fn new(record: RequestRecord, books: Arc<Books>, rails: Arc<Rails>) -> Self {
        Self {
            record,
            start: Instant::now(),
            permit: None,
            live: None,
            rephrase_probe: None,
            books,
            rails,
            finished: false,
        }
    }

    /// Hold the admission permit until the request ends.
    pub(crate) fn admitted(&mut self, permit: OwnedSemaphorePermit) {
        self.permit = Some(permit);
    }

    /// The request passed the input rails with `text`: it is live (its id
    /// may get feedback) until its record reaches the log.
    pub(crate) fn passed_rails(&mut self, text: String, live: LiveGuard) {
        self.rephrase_probe = Some(text);
        self.live = Some(live);
    }

    /// Where the request's timings are reported.
    pub(crate) fn observer(&self) -> &dyn Observer {
        self.books.observer.as_ref()
    }

    /// Milliseconds since the request arrived.
    pub(crate) fn elapsed_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    /// Finish the request: stamp its status and times, hand its record to
    /// the log (then any implicit signal it produced), and let it go.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.close(outcome);
    }

    fn close(&mut self, outcome: Outcome) {
        self.finished = true;
        drop(self.permit.take());
        let now = Instant::now();
        let record = &mut self.record;
        record.status = outcome.status().to_string();
        record.total_ms = Some(self.start.elapsed().as_secs_f64() * 1e3);
        record.finished_at_ms = unix_ms(SystemTime::now());
        let mut signals = Vec::new();
        if let (Some(session), Some(text)) = (&record.session_id, &self.rephrase_probe)
            && let Some(hit) = self.books.sessions.check(session, text, now)
        {
            let mut signal = FeedbackRecord::new(hit.previous_request_id, FeedbackKind::Rephrase);
            signal.detail =
                Some(serde_json::json!({"by_request_id": record.request_id, "similarity": hit.similarity}).to_string());
            signals.push(signal);
        }
        match outcome {
            Outcome::Answered => {
                if let Some(session) = &record.session_id {
                    self.books
                        .sessions
                        .answered(session, &record.request_id, &record.query, now);
                }
            }
            Outcome::Ok => {}
            Outcome::Failed(_, message) => record.error = Some(message),
            Outcome::Cancelled => {
                record.error = Some(PipelineError::Cancelled.to_string());
                record.finish_reason = Some("cancelled".into());
                let mut signal = FeedbackRecord::new(record.request_id.clone(), FeedbackKind::Abandoned);
                signal.detail = Some(
                    serde_json::json!({
                        "kind": record.kind,
                        "answer_chars": record.answer.as_deref().map_or(0, |a| a.chars().count()),
                        "elapsed_ms": record.total_ms,
                    })
                    .to_string(),
                );
                signals.push(signal);
            }
        }
        self.books.observer.request_finished(record);
        tracing::debug!(
            request_id = %record.request_id,
            status = %record.status,
            completion_tokens = record.completion_tokens,
            ttft_ms = record.ttft_ms,
            "request finished; record handed to the log"
        );
        // At rest, nothing the PII rail redacts: error messages echo input
        // (an unknown expert's name), ids may be e-mail addresses. The query
        // and the answer were redacted by the rails on their way.
        record.error = record.error.take().map(|e| self.rails.redact_for_log(&e));
        for id in [&mut record.session_id, &mut record.user_id] {
            *id = id.take().map(|v| self.rails.redact_id(&v));
        }
        self.books.log.submit(std::mem::take(record));
        for signal in signals {
            self.books.log.submit_feedback(signal);
        }
        // The request stops being live only once its record is queued.
        drop(self.live.take());
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.finished {
            self.close(Outcome::Cancelled);
        }
    }
}
