//! The first stages of every request: admission, validation, input rails
//! (the query and the conversation's earlier turns), with an early route
//! decision running beside the query's rails when the caller has one.

use std::sync::Arc;

use tracing::Instrument;

use super::ticket::{Outcome, Ticket};
use super::{Pipeline, Query};
use crate::agents::RouteDecision;
use crate::clock::unix_ms;
use crate::data::log::RequestRecord;
use crate::engine::ChatMessage;
use crate::error::PipelineError;
use crate::guardrails::{RailRejection, Rails};
use crate::text::{self, MAX_ID_CHARS};

/// Characters past the cut that a refused query's redaction still reads:
/// more than the longest entity the PII rail finds (an e-mail address may
/// take 254).
const REDACT_PAST_CUT: usize = 256;

/// A request past its input rails.
pub(super) struct Admitted {
    pub(super) ticket: Ticket,
    /// The query as the rails left it (redacted).
    pub(super) text: String,
    /// The conversation's earlier turns as the rails left them.
    pub(super) history: Vec<ChatMessage>,
    /// The early route decision, when one ran and the rails left the query
    /// as it was (it decided on the very text the request goes on with).
    pub(super) early_route: Option<Result<RouteDecision, PipelineError>>,
}

/// A route decision begun before the input rails finished.
pub(super) type EarlyRoute<'a> = futures::future::BoxFuture<'a, Result<RouteDecision, PipelineError>>;

/// A new request id (UUIDv7: ids sort by arrival).
pub(super) fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl Pipeline {
    /// Admission, validation and input rails, common to every entry point;
    /// `early` runs beside the query's input rails once the request is
    /// admitted and valid. A refusal finishes the request's ticket (its
    /// record is logged) and returns the error.
    pub(super) async fn admit(
        &self,
        kind: &str,
        request_id: String,
        query: &Query,
        rails: &Arc<Rails>,
        early: Option<EarlyRoute<'_>>,
    ) -> Result<Admitted, PipelineError> {
        let record = RequestRecord {
            request_id,
            kind: kind.to_string(),
            session_id: query.session_id.clone(),
            user_id: query.user_id.clone(),
            api_key_id: query.api_key_id.clone(),
            received_at_ms: unix_ms(std::time::SystemTime::now()),
            query: query.text.clone(),
            ..RequestRecord::default()
        };
        let mut ticket = Ticket::new(record, self.books.clone(), rails.clone());
        match self.check(&mut ticket, query, rails, early).await {
            Ok((text, history, early_route)) => Ok(Admitted {
                ticket,
                text,
                history,
                early_route,
            }),
            Err(e) => Err(fail(ticket, e)),
        }
    }

    async fn check(
        &self,
        ticket: &mut Ticket,
        query: &Query,
        rails: &Rails,
        early: Option<EarlyRoute<'_>>,
    ) -> Result<(String, Vec<ChatMessage>, Option<Result<RouteDecision, PipelineError>>), PipelineError> {
        // A query refused before the rails ran is logged as the PII rail
        // would have left it, then cut to `max_query_chars`: redacted first,
        // so no entity straddling the cut leaves digits behind (only a
        // stretch past the cut, longer than any entity, is redacted).
        let max = self.limits.max_query_chars;
        let refuse = |record: &mut RequestRecord, error: PipelineError| {
            let stretch: String = query.text.chars().take(max + REDACT_PAST_CUT).collect();
            record.query = rails.redact_for_log(&stretch).chars().take(max).collect();
            error
        };
        let record = &mut ticket.record;
        let Ok(permit) = self.admission.clone().try_acquire_owned() else {
            let max = self.limits.max_in_flight;
            return Err(refuse(record, PipelineError::Overloaded { max }));
        };
        ticket.admitted(permit);
        let record = &mut ticket.record;
        if query.text.trim().is_empty() {
            return Err(PipelineError::EmptyQuery);
        }
        let len = query.text.chars().count();
        if len > max {
            return Err(refuse(record, PipelineError::QueryTooLong { len, max }));
        }
        let bad_id = [("session_id", &record.session_id), ("user_id", &record.user_id)]
            .into_iter()
            .find_map(|(field, id)| {
                id.as_deref()
                    .and_then(|v| text::check_id(v).err())
                    .map(|reason| (field, reason))
            });
        if let Some((field, reason)) = bad_id {
            // Logged cut to the limit and escaped: the rejection, not the payload.
            for id in [&mut record.session_id, &mut record.user_id] {
                *id = id
                    .take()
                    .map(|v| text::escaped(&v.chars().take(MAX_ID_CHARS).collect::<String>()));
            }
            return Err(refuse(record, PipelineError::InvalidRequest { field, reason }));
        }
        if let Err((field, reason)) = query.overrides.check() {
            return Err(refuse(record, PipelineError::InvalidRequest { field, reason }));
        }
        let history_chars: usize = query.history.iter().map(|m| m.content.chars().count()).sum();
        if history_chars > self.limits.max_history_chars {
            let reason = format!(
                "the conversation's earlier messages hold {history_chars} characters; the limit is {} \
                 (limits.max_history_chars): send fewer or shorter turns",
                self.limits.max_history_chars
            );
            let field = "history";
            return Err(refuse(record, PipelineError::InvalidRequest { field, reason }));
        }
        let checking = rails
            .input
            .check(&query.text)
            .instrument(tracing::info_span!("rails", request_id = %record.request_id));
        let (checked, early_route) = match early {
            Some(route) => {
                let (checked, decided) = tokio::join!(checking, route);
                (checked, Some(decided))
            }
            None => (checking.await, None),
        };
        let text = match checked {
            Ok(check) => {
                record.guardrails = check.verdicts;
                check.rewritten.unwrap_or_else(|| query.text.clone())
            }
            Err(rejection) => {
                record.guardrails = rejection.verdicts().to_vec();
                return Err(match rejection {
                    RailRejection::Blocked(blocked) => {
                        if let Some(q) = &blocked.logged_query {
                            record.query = q.clone();
                        }
                        PipelineError::Blocked(blocked)
                    }
                    RailRejection::Invalid { rail, reason, .. } => {
                        // The limits rail runs before the PII rail.
                        record.query = rails.redact_for_log(&query.text);
                        PipelineError::InvalidInput { rail, reason }
                    }
                });
            }
        };
        let history = match check_history(&query.history, rails).await {
            Ok(h) => h,
            Err(rejection) => {
                // The log keeps the query as the rails left it, and the
                // verdicts on the earlier message that was refused.
                record.query = text;
                record.guardrails.extend(rejection.verdicts().iter().cloned());
                return Err(match rejection {
                    RailRejection::Blocked(blocked) => PipelineError::Blocked(blocked),
                    RailRejection::Invalid { rail, reason, .. } => PipelineError::InvalidInput {
                        rail,
                        reason: format!("in an earlier message of the conversation: {reason}"),
                    },
                });
            }
        };
        // The log keeps the query as the model saw it (redacted by rails).
        record.query = text.clone();
        let live = self.live.enter(&record.request_id);
        ticket.passed_rails(text.clone(), live);
        let early_route = early_route.filter(|_| text == query.text);
        Ok((text, history, early_route))
    }
}

/// Finish `ticket` as failed with `error` and return the error.
pub(super) fn fail(ticket: Ticket, error: PipelineError) -> PipelineError {
    tracing::debug!(request_id = %ticket.record.request_id, error = %error, "request refused");
    ticket.finish(Outcome::from(&error));
    error
}

/// The conversation's earlier turns through the input rails (concurrently):
/// each as the rails left it (redacted), or the first rejection in order.
async fn check_history(history: &[ChatMessage], rails: &Rails) -> Result<Vec<ChatMessage>, RailRejection> {
    let checks = futures::future::join_all(history.iter().map(|m| rails.input.check(&m.content))).await;
    history
        .iter()
        .zip(checks)
        .map(|(m, check)| {
            Ok(ChatMessage {
                role: m.role,
                content: check?.rewritten.unwrap_or_else(|| m.content.clone()),
            })
        })
        .collect()
}
