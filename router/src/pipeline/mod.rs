//! The request pipeline: admission, validation, input rails, routing,
//! retrieval, expert generation, output rails, request log.
//!
//! Every entry point ([`Pipeline::route`], [`Pipeline::complete`],
//! [`Pipeline::stream`]) leaves exactly one [`RequestRecord`], whether the
//! request succeeded, was rejected, failed or was cancelled. Answers are
//! produced by one producer task per request writing into a bounded channel;
//! `complete` collects the same stream, so both paths share one code path.
//! The producer owns the admission permit and the model snapshots (`Arc`s
//! taken once), so a hot-swap never changes a request mid-flight.
//!
//! Feedback enters here too ([`Pipeline::submit_feedback`]), and the
//! pipeline records two implicit signals itself: a near-duplicate query from
//! the same session soon after an answer (rephrase), and an answer the
//! client cancelled (abandoned).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::Instrument;

use crate::agents::expert::Overrides;
use crate::agents::{ExpertAgent, RouteDecision, RouterAgent};
use crate::config::{EngineSettings, LimitsSpec};
use crate::engine::{ChatMessage, EngineError, FinishReason, GenerationEvent, Usage};
use crate::error::PipelineError;
use crate::data::feedback::{FeedbackInput, FeedbackKind, FeedbackRecord, FeedbackSpec, Rating, SessionTracker};
use crate::guardrails::rails::{RailSet, RailsSpec, TopicPolicy};
use crate::guardrails::{RailRejection, RailVerdict, Rails};
use crate::clock::unix_ms;
use crate::data::log::{RequestLog, RequestRecord, RetrievedRef};
use crate::observe::{NoObserver, Observer};
use crate::models::slots::{ModelRegistry, ROUTER_SLOT, expert_slot};
use crate::retrieval::{IndexStats, NoRetrieval, Passage, Retriever};
use live::{LiveGuard, LiveRequests};

mod live;
mod promotion;
mod shadowing;
mod splitting;
pub use promotion::SwapReport;

/// Answer events buffered between the producer and the caller.
const EVENT_BUFFER: usize = 32;

/// How long a feedback history read waits for a request still being
/// answered: a cancelled or finished answer is logged within milliseconds,
/// and a history call should not hold for a whole answer.
pub const IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Longest session or user id a request may carry (characters); each one is
/// stored with every request in the log.
pub const MAX_ID_CHARS: usize = 256;

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
}

impl Stream for ChatStream {
    type Item = Result<ChatEvent, PipelineError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// A snapshot of the pipeline's state for status endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineStatus {
    /// Requests admitted now.
    pub in_flight: usize,
    /// Admission limit.
    pub max_in_flight: usize,
}

/// The guardrailed router + experts pipeline.
pub struct Pipeline {
    router: Arc<RouterAgent>,
    experts: BTreeMap<String, ExpertAgent>,
    expert_order: Vec<String>,
    rails: arc_swap::ArcSwap<Rails>,
    retriever: Arc<dyn Retriever>,
    log: RequestLog,
    registry: Arc<ModelRegistry>,
    admission: Arc<Semaphore>,
    limits: LimitsSpec,
    feedback: FeedbackSpec,
    sessions: Arc<SessionTracker>,
    observer: Arc<dyn Observer>,
    promotion: promotion::Promotion,
    shadows: arc_swap::ArcSwap<BTreeMap<String, Arc<crate::trials::shadow::Shadow>>>,
    splits: arc_swap::ArcSwap<BTreeMap<String, Arc<crate::trials::split::Split>>>,
    live: LiveRequests,
}

struct Admitted {
    permit: OwnedSemaphorePermit,
    record: RequestRecord,
    start: Instant,
    query: String,
    /// The conversation's earlier turns as the rails left them.
    history: Vec<ChatMessage>,
    /// Held until the record is handed to the log.
    live: LiveGuard,
}

impl Pipeline {
    /// Build the pipeline over loaded models, with pass-through rails and no retrieval.
    ///
    /// # Errors
    /// When a slot is missing or the expert names are not a valid label set.
    pub fn new(
        settings: &EngineSettings,
        registry: Arc<ModelRegistry>,
        log: RequestLog,
    ) -> Result<Self, PipelineError> {
        let missing = |slot: &str| EngineError::ModelNotFound {
            path: format!("slot {slot}"),
        };
        let router_slot = registry.slot(ROUTER_SLOT).ok_or_else(|| missing(ROUTER_SLOT))?.clone();
        let router = Arc::new(RouterAgent::new(&settings.router, &settings.experts, router_slot)?);
        let mut experts = BTreeMap::new();
        for e in &settings.experts {
            let name = expert_slot(&e.name);
            let slot = registry.slot(&name).ok_or_else(|| missing(&name))?.clone();
            experts.insert(e.name.clone(), ExpertAgent::new(e.clone(), slot));
        }
        Ok(Self {
            router,
            experts,
            expert_order: settings.experts.iter().map(|e| e.name.clone()).collect(),
            rails: arc_swap::ArcSwap::from_pointee(Rails::pass_through()),
            retriever: Arc::new(NoRetrieval),
            log,
            registry,
            admission: Arc::new(Semaphore::new(settings.limits.max_in_flight)),
            limits: settings.limits.clone(),
            feedback: settings.feedback.clone(),
            sessions: Arc::new(SessionTracker::new(&settings.feedback)),
            observer: Arc::new(NoObserver),
            promotion: promotion::Promotion::default(),
            shadows: arc_swap::ArcSwap::from_pointee(BTreeMap::new()),
            splits: arc_swap::ArcSwap::from_pointee(BTreeMap::new()),
            live: LiveRequests::default(),
        })
    }

    /// Report finished requests and inter-token gaps to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// Use these rails.
    pub fn with_rails(self, rails: Rails) -> Self {
        self.rails.store(Arc::new(rails));
        self
    }

    /// Replace the rails while serving: requests already past their rails
    /// keep the snapshot they took; new requests get these.
    pub fn set_rails(&self, rails: Rails) {
        self.rails.store(Arc::new(rails));
    }

    /// The rails in force now.
    pub fn rails(&self) -> Arc<Rails> {
        self.rails.load_full()
    }

    /// Replace the rails with the settings of a `[rails]` TOML table,
    /// reusing the loaded embedder; returns the settings now in force.
    ///
    /// # Errors
    /// [`PipelineError::Rails`]: malformed settings, or an embedder that
    /// cannot be loaded. The old rails stay in force.
    pub async fn reconfigure_rails(&self, toml_text: &str) -> Result<RailsSpec, PipelineError> {
        let spec = RailSet::parse_spec(toml_text)?;
        let embedder = self.rails().set.as_ref().and_then(|s| s.embedder());
        let load = spec.clone();
        let set = tokio::task::spawn_blocking(move || RailSet::load(load, embedder))
            .await
            .map_err(|_| PipelineError::Engine(EngineError::Disconnected))??;
        self.set_rails(Rails::configured(Arc::new(set)));
        tracing::info!("rails reconfigured");
        Ok(spec)
    }

    /// Use this retriever.
    pub fn with_retriever(mut self, retriever: Arc<dyn Retriever>) -> Self {
        self.retriever = retriever;
        self
    }

    /// What the retrieval index in use holds (`None`: no corpora).
    pub fn retrieval_stats(&self) -> Option<IndexStats> {
        self.retriever.stats()
    }

    /// Rebuild the retrieval index from the corpora aside and swap it in.
    ///
    /// # Errors
    /// [`PipelineError::NoCorpus`] without corpora; build failures (the old
    /// index stays in use).
    pub async fn reindex(&self) -> Result<IndexStats, PipelineError> {
        if self.retriever.stats().is_none() {
            return Err(PipelineError::NoCorpus);
        }
        Ok(self.retriever.reindex().await?)
    }

    /// Warm every model and prime the router's prompt prefix.
    ///
    /// # Errors
    /// The first model that fails: it is not fit to serve.
    pub async fn warm_up(&self) -> Result<(), EngineError> {
        self.router.warm_up(&self.router.model()).await?;
        // One warm-up per loaded engine: experts sharing a model share its costs.
        let mut warmed: Vec<*const ()> = Vec::new();
        for e in self.experts.values() {
            let model = e.model();
            let id = Arc::as_ptr(&model.engine).cast::<()>();
            if !warmed.contains(&id) {
                model.engine.warm_up(&e.prompt("hello", &[])).await?;
                warmed.push(id);
            }
        }
        Ok(())
    }

    /// Expert names in configured order.
    pub fn experts(&self) -> &[String] {
        &self.expert_order
    }

    /// The model registry.
    pub fn registry(&self) -> &Arc<ModelRegistry> {
        &self.registry
    }

    /// The request log.
    pub fn log(&self) -> &RequestLog {
        &self.log
    }

    /// Admission state.
    pub fn status(&self) -> PipelineStatus {
        let max = self.limits.max_in_flight;
        PipelineStatus {
            in_flight: max - self.admission.available_permits().min(max),
            max_in_flight: max,
        }
    }

    fn fail(&self, mut record: RequestRecord, start: Instant, error: PipelineError) -> PipelineError {
        record.status = error.status_name().to_string();
        record.error = Some(error.to_string());
        record.total_ms = Some(start.elapsed().as_secs_f64() * 1e3);
        record.finished_at_ms = unix_ms(SystemTime::now());
        tracing::debug!(request_id = %record.request_id, status = %record.status, "request rejected");
        self.observer.request_finished(&record);
        self.log.submit(record);
        error
    }

    /// Admission, validation and input rails, common to every entry point.
    async fn admit(&self, kind: &str, query: &Query, rails: &Rails) -> Result<Admitted, PipelineError> {
        let start = Instant::now();
        let record = RequestRecord {
            request_id: uuid::Uuid::now_v7().to_string(),
            kind: kind.to_string(),
            session_id: query.session_id.clone(),
            user_id: query.user_id.clone(),
            api_key_id: query.api_key_id.clone(),
            received_at_ms: unix_ms(SystemTime::now()),
            query: query.text.clone(),
            ..RequestRecord::default()
        };
        // A query refused before the rails ran is logged as the PII rail
        // would have left it, and at most `max_query_chars` long.
        let refuse = |mut record: RequestRecord, error: PipelineError| {
            let max = self.limits.max_query_chars;
            let cut: String = query.text.chars().take(max).collect();
            record.query = rails.redact_for_log(&cut);
            self.fail(record, start, error)
        };
        let permit = match self.admission.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let max = self.limits.max_in_flight;
                return Err(refuse(record, PipelineError::Overloaded { max }));
            }
        };
        if query.text.trim().is_empty() {
            return Err(self.fail(record, start, PipelineError::EmptyQuery));
        }
        let len = query.text.chars().count();
        if len > self.limits.max_query_chars {
            let max = self.limits.max_query_chars;
            return Err(refuse(record, PipelineError::QueryTooLong { len, max }));
        }
        let mut record = record;
        let overlong = |id: &Option<String>| id.as_ref().map(|v| v.chars().count()).filter(|&n| n > MAX_ID_CHARS);
        let bad_id = [("session_id", &record.session_id), ("user_id", &record.user_id)]
            .into_iter()
            .find_map(|(field, id)| overlong(id).map(|len| (field, len)));
        if let Some((field, len)) = bad_id {
            // Logged cut to the limit: the rejection, not the payload.
            for id in [&mut record.session_id, &mut record.user_id] {
                *id = id.take().map(|v| v.chars().take(MAX_ID_CHARS).collect());
            }
            let reason = format!("is {len} characters long; the limit is {MAX_ID_CHARS} characters");
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
            return Err(refuse(
                record,
                PipelineError::InvalidRequest {
                    field: "history",
                    reason,
                },
            ));
        }
        let text = match rails
            .input
            .check(&query.text)
            .instrument(tracing::info_span!("rails", request_id = %record.request_id))
            .await
        {
            Ok(check) => {
                record.guardrails = check.verdicts;
                check.rewritten.unwrap_or_else(|| query.text.clone())
            }
            Err(rejection) => {
                record.guardrails = rejection.verdicts().to_vec();
                let error = match rejection {
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
                };
                return Err(self.fail(record, start, error));
            }
        };
        let history = match check_history(&query.history, rails).await {
            Ok(h) => h,
            Err(rejection) => {
                // The log keeps the query as the rails left it, and the
                // verdicts on the earlier message that was refused.
                record.query = text;
                record.guardrails.extend(rejection.verdicts().iter().cloned());
                let error = match rejection {
                    RailRejection::Blocked(blocked) => PipelineError::Blocked(blocked),
                    RailRejection::Invalid { rail, reason, .. } => PipelineError::InvalidInput {
                        rail,
                        reason: format!("in an earlier message of the conversation: {reason}"),
                    },
                };
                return Err(self.fail(record, start, error));
            }
        };
        // The log keeps the query as the model saw it (redacted by rails).
        record.query = text.clone();
        if let Some(session) = &record.session_id
            && let Some(hit) = self.sessions.check(session, &text, Instant::now())
        {
            let mut signal = FeedbackRecord::new(hit.previous_request_id, FeedbackKind::Rephrase);
            signal.detail =
                Some(serde_json::json!({"by_request_id": record.request_id, "similarity": hit.similarity}).to_string());
            self.log.submit_feedback(signal);
        }
        let live = self.live.enter(&record.request_id);
        Ok(Admitted {
            permit,
            record,
            start,
            query: text,
            history,
            live,
        })
    }

    async fn decide(&self, query: &Query, text: &str, request_id: &str) -> Result<RouteDecision, PipelineError> {
        match &query.expert {
            Some(name) if !name.is_empty() => {
                if self.experts.contains_key(name) {
                    Ok(RouteDecision::forced(name))
                } else {
                    Err(PipelineError::UnknownExpert {
                        name: name.clone(),
                        known: self.expert_order.join(", "),
                    })
                }
            }
            _ => match self.split_model(
                ROUTER_SLOT,
                query.session_id.as_deref(),
                query.user_id.as_deref(),
                request_id,
            ) {
                Some(model) => Ok(self.router.decide_with(&model, text).await?),
                None => Ok(self.router.decide(text).await?),
            },
        }
    }

    /// Route a query without answering it.
    ///
    /// # Errors
    /// Invalid input, overload, a blocking rail, or an engine failure.
    pub async fn route(&self, query: Query) -> Result<RouteOutcome, PipelineError> {
        let rails = self.rails.load_full();
        // `_live` lives to the end: after the record is handed to the log.
        let Admitted {
            permit,
            mut record,
            start,
            query: text,
            history: _,
            live: _live,
        } = self.admit("route", &query, &rails).await?;
        let span = route_span(&record.request_id);
        let result = self
            .decide(&Query { expert: None, ..query }, &text, &record.request_id)
            .instrument(span.clone())
            .await;
        record_route(&span, result.as_ref().ok());
        drop(permit);
        match result {
            Ok(route) => {
                self.mirror_route(&record.request_id, &text, &route);
                if let Some(v) = topic_verdict(&rails, &route) {
                    record.guardrails.push(v);
                }
                record.status = "ok".into();
                record.route = Some(route.clone());
                record.total_ms = Some(start.elapsed().as_secs_f64() * 1e3);
                record.finished_at_ms = unix_ms(SystemTime::now());
                let request_id = record.request_id.clone();
                self.observer.request_finished(&record);
                self.log.submit(record);
                Ok(RouteOutcome { request_id, route })
            }
            Err(e) => Err(self.fail(record, start, e)),
        }
    }

    /// Route and answer, returning the whole answer.
    ///
    /// # Errors
    /// As [`Pipeline::stream`], plus failures during generation.
    pub async fn complete(&self, query: Query) -> Result<ChatOutcome, PipelineError> {
        let mut stream = self.start_answer("complete", query).await?;
        let mut outcome = ChatOutcome {
            request_id: String::new(),
            route: RouteDecision::forced(""),
            expert_model_version: String::new(),
            citations: Vec::new(),
            answer: String::new(),
            usage: Usage::default(),
            timings: Timings::default(),
            finish_reason: String::new(),
        };
        while let Some(event) = stream.next().await {
            match event? {
                ChatEvent::Start {
                    request_id,
                    route,
                    expert_model_version,
                    citations,
                } => {
                    outcome.request_id = request_id;
                    outcome.route = route;
                    outcome.expert_model_version = expert_model_version;
                    outcome.citations = citations;
                }
                ChatEvent::Delta(text) => outcome.answer.push_str(&text),
                ChatEvent::End {
                    usage,
                    timings,
                    finish_reason,
                } => {
                    outcome.usage = usage;
                    outcome.timings = timings;
                    outcome.finish_reason = finish_reason;
                }
            }
        }
        Ok(outcome)
    }

    /// Route and stream the answer: `Start`, then `Delta`s, then `End`.
    ///
    /// # Errors
    /// Invalid input, overload, a blocking rail, an unknown forced expert or
    /// a routing failure are returned here; failures during generation arrive
    /// on the stream.
    ///
    /// # Cancel safety
    /// Dropping the stream stops generation; the request is logged as cancelled.
    pub async fn stream(&self, query: Query) -> Result<ChatStream, PipelineError> {
        self.start_answer("stream", query).await
    }

    /// Record feedback on a request and return the stored row once it is
    /// committed to the log. A request still being answered (a client rating
    /// a stream, or stopping it and rating at once) takes feedback too: the
    /// row joins the request's record, logged when the answer ends.
    ///
    /// # Errors
    /// [`PipelineError::InvalidFeedback`] for a missing rating, a rating out
    /// of range, an unknown corrected expert or an oversized comment;
    /// [`PipelineError::UnknownRequest`] for an id that is neither being
    /// answered nor in the log.
    pub async fn submit_feedback(&self, input: FeedbackInput) -> Result<FeedbackRecord, PipelineError> {
        let invalid = |reason: String| PipelineError::InvalidFeedback { reason };
        if input.request_id.trim().is_empty() {
            return Err(invalid("request_id is required".into()));
        }
        match input.rating {
            Some(Rating::Stars(s)) if !(1..=5).contains(&s) => {
                return Err(invalid(format!("stars must be between 1 and 5, got {s}")));
            }
            None if input.corrected_expert.is_none() => {
                return Err(invalid(
                    "give a rating (thumb up/down or 1-5 stars), a corrected expert, or both".into(),
                ));
            }
            _ => {}
        }
        if let Some(expert) = &input.corrected_expert
            && !self.experts.contains_key(expert)
        {
            return Err(invalid(format!(
                "corrected_expert `{expert}` is not a configured expert; configured experts: {}",
                self.expert_order.join(", ")
            )));
        }
        if let Some(comment) = &input.comment {
            let len = comment.chars().count();
            if len > self.feedback.max_comment_chars {
                return Err(invalid(format!(
                    "comment is {len} characters long; the limit is {}",
                    self.feedback.max_comment_chars
                )));
            }
        }
        if !self.live.contains(&input.request_id) && !self.request_logged(&input.request_id).await? {
            // The record may still be queued (its request just ended).
            self.log.flush().await?;
            if !self.request_logged(&input.request_id).await? {
                return Err(PipelineError::UnknownRequest {
                    request_id: input.request_id,
                });
            }
        }
        let mut row = FeedbackRecord::new(input.request_id, FeedbackKind::Explicit);
        row.rating = input.rating;
        row.corrected_expert = input.corrected_expert;
        row.comment = input.comment;
        row.reviewer_id = input.reviewer_id;
        self.log.submit_feedback(row.clone());
        self.log.flush().await?;
        Ok(row)
    }

    /// A logged request and its feedback rows, oldest first. For a request
    /// still being answered, waits up to [`IN_FLIGHT_WAIT`] for its record.
    ///
    /// # Errors
    /// [`PipelineError::RequestInFlight`] when the request is still being
    /// answered after that wait; [`PipelineError::UnknownRequest`] when the
    /// log holds no such request.
    pub async fn feedback_history(
        &self,
        request_id: &str,
    ) -> Result<(RequestRecord, Vec<FeedbackRecord>), PipelineError> {
        if request_id.trim().is_empty() {
            return Err(PipelineError::InvalidRequest {
                field: "request_id",
                reason: "is required".into(),
            });
        }
        if !self.live.ended_within(request_id, IN_FLIGHT_WAIT).await {
            return Err(PipelineError::RequestInFlight {
                request_id: request_id.to_string(),
            });
        }
        self.log.flush().await?;
        let log = self.log.clone();
        let id = request_id.to_string();
        let read = tokio::task::spawn_blocking(move || -> Result<_, crate::data::log::LogError> {
            let reader = log.reader()?;
            Ok(match reader.get(&id)? {
                Some(record) => Some((record, reader.feedback_for(&id)?)),
                None => None,
            })
        })
        .await
        .map_err(|_| crate::data::log::LogError::Closed)??;
        read.ok_or_else(|| PipelineError::UnknownRequest {
            request_id: request_id.to_string(),
        })
    }

    async fn request_logged(&self, request_id: &str) -> Result<bool, PipelineError> {
        let log = self.log.clone();
        let id = request_id.to_string();
        let found = tokio::task::spawn_blocking(move || -> Result<bool, crate::data::log::LogError> {
            Ok(log.reader()?.get(&id)?.is_some())
        })
        .await
        .map_err(|_| crate::data::log::LogError::Closed)??;
        Ok(found)
    }

    async fn start_answer(&self, kind: &str, query: Query) -> Result<ChatStream, PipelineError> {
        let rails = self.rails.load_full();
        let Admitted {
            permit,
            mut record,
            start,
            query: text,
            history,
            live,
        } = self.admit(kind, &query, &rails).await?;
        let span = route_span(&record.request_id);
        let decided = self
            .decide(&query, &text, &record.request_id)
            .instrument(span.clone())
            .await;
        record_route(&span, decided.as_ref().ok());
        let route = match decided {
            Ok(r) => r,
            Err(e) => return Err(self.fail(record, start, e)),
        };
        self.mirror_route(&record.request_id, &text, &route);
        record.route = Some(route.clone());
        if let Some(v) = topic_verdict(&rails, &route) {
            let refuse = v.decision == "refuse";
            record.guardrails.push(v);
            if refuse {
                return Ok(self.refuse(record, start, route, &rails.topic.refusal, permit, live));
            }
        }
        let expert = self.experts.get(&route.expert).expect("routes name configured experts");
        let model = self
            .split_model(
                &expert_slot(&route.expert),
                query.session_id.as_deref(),
                query.user_id.as_deref(),
                &record.request_id,
            )
            .unwrap_or_else(|| expert.model());
        record.expert = Some(route.expert.clone());
        record.expert_model_version = Some(model.version.clone());
        let retrieval_started = Instant::now();
        let passages = match self
            .retriever
            .retrieve(&route.expert, &text)
            .instrument(tracing::info_span!("retrieval", request_id = %record.request_id, expert = %route.expert))
            .await
        {
            Ok(p) => p,
            Err(e) => return Err(self.fail(record, start, e.into())),
        };
        if self.retriever.stats().is_some() {
            self.observer
                .retrieval(&route.expert, retrieval_started.elapsed().as_secs_f64(), passages.len());
        }
        record.retrieved = passages.iter().map(RetrievedRef::from).collect();
        let prompt = expert.conversation_prompt(&history, &text, &passages);
        let params = expert.params(&query.overrides);
        self.mirror_answer(&record.request_id, &route.expert, &model.version, &prompt, &params);
        let tokens = match model.engine.generate(prompt, params).await {
            Ok(t) => t,
            Err(e) => return Err(self.fail(record, start, e.into())),
        };
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let start_event = ChatEvent::Start {
            request_id: record.request_id.clone(),
            route: route.clone(),
            expert_model_version: model.version.clone(),
            citations: passages,
        };
        let producer = Producer {
            tx,
            record,
            start,
            route_ms: route.latency_ms,
            filter: rails.output.filter(),
            log: self.log.clone(),
            sessions: self.sessions.clone(),
            observer: self.observer.clone(),
            last_delta: None,
            answer: String::new(),
            ttft_ms: None,
            live,
        };
        let span = tracing::info_span!(
            "generation",
            request_id = %producer.record.request_id,
            expert = %route.expert,
            model_version = %model.version
        );
        tokio::spawn(producer.run(start_event, tokens, permit, model).instrument(span));
        Ok(ChatStream { rx })
    }
}

impl Pipeline {
    /// Answer with the topic rail's refusal: no model runs.
    fn refuse(
        &self,
        mut record: RequestRecord,
        start: Instant,
        route: RouteDecision,
        refusal: &str,
        permit: OwnedSemaphorePermit,
        live: LiveGuard,
    ) -> ChatStream {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let total_ms = start.elapsed().as_secs_f64() * 1e3;
        let events = [
            ChatEvent::Start {
                request_id: record.request_id.clone(),
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
        drop(permit);
        record.expert = None;
        record.expert_model_version = Some(REFUSAL_VERSION.into());
        record.answer = Some(refusal.to_string());
        record.finish_reason = Some("refused".into());
        record.status = "ok".into();
        record.ttft_ms = Some(total_ms);
        record.total_ms = Some(total_ms);
        record.finished_at_ms = unix_ms(SystemTime::now());
        self.observer.request_finished(&record);
        self.log.submit(record);
        drop(live);
        ChatStream { rx }
    }
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

/// The `route` stage's span; [`record_route`] fills in the decision.
fn route_span(request_id: &str) -> tracing::Span {
    tracing::info_span!(
        "route",
        request_id,
        expert = tracing::field::Empty,
        confidence = tracing::field::Empty,
        forced = tracing::field::Empty,
        fallback = tracing::field::Empty
    )
}

fn record_route(span: &tracing::Span, route: Option<&RouteDecision>) {
    if let Some(r) = route {
        span.record("expert", r.expert.as_str());
        span.record("confidence", r.confidence);
        span.record("forced", r.forced);
        span.record("fallback", r.fallback);
    }
}

/// Model version recorded for answers the topic rail gave instead of an expert.
pub const REFUSAL_VERSION: &str = "topic-refusal";

/// The topic rail's verdict on a routed query: only low-confidence
/// (fallback) decisions are out of scope; forced experts never are.
fn topic_verdict(rails: &Rails, route: &RouteDecision) -> Option<RailVerdict> {
    if !rails.topic.enabled || !route.fallback || route.forced {
        return None;
    }
    let decision = match rails.topic.policy {
        TopicPolicy::Fallback => "fallback",
        TopicPolicy::Refuse => "refuse",
    };
    Some(RailVerdict {
        rail: "topic".into(),
        decision: decision.into(),
        score: Some(route.confidence),
        latency_ms: 0.0,
    })
}

/// Writes one answer's events and closes its record.
struct Producer {
    tx: mpsc::Sender<Result<ChatEvent, PipelineError>>,
    record: RequestRecord,
    start: Instant,
    route_ms: f64,
    filter: Box<dyn crate::guardrails::OutputFilter>,
    log: RequestLog,
    sessions: Arc<SessionTracker>,
    observer: Arc<dyn Observer>,
    last_delta: Option<Instant>,
    answer: String,
    ttft_ms: Option<f64>,
    /// Dropped by `close`, after the record is handed to the log.
    live: LiveGuard,
}

impl Producer {
    async fn run(
        mut self,
        start_event: ChatEvent,
        mut tokens: crate::engine::TokenStream,
        _permit: OwnedSemaphorePermit,
        _model: Arc<crate::models::slots::ServedModel>,
    ) {
        // `_permit` and `_model` live until the answer ends: admission counts
        // the request, and a hot-swap cannot free the model under it.
        if self.tx.send(Ok(start_event)).await.is_err() {
            return self.finish_cancelled();
        }
        loop {
            let next = tokio::select! {
                n = tokens.next() => n,
                () = self.tx.closed() => return self.finish_cancelled(),
            };
            match next {
                Some(Ok(GenerationEvent::Delta(text))) => {
                    let released = self.filter.push(&text);
                    if !released.is_empty() && !self.emit(released).await {
                        return self.finish_cancelled();
                    }
                }
                Some(Ok(GenerationEvent::Done(summary))) => {
                    let tail = self.filter.finish();
                    if !tail.is_empty() && !self.emit(tail).await {
                        return self.finish_cancelled();
                    }
                    let total_ms = self.elapsed_ms();
                    let timings = Timings {
                        ttft_ms: self.ttft_ms.unwrap_or(total_ms),
                        total_ms,
                        route_ms: self.route_ms,
                        prefill_tokens_per_second: summary.prefill_tokens_per_second,
                        decode_tokens_per_second: summary.decode_tokens_per_second,
                    };
                    let end = ChatEvent::End {
                        usage: summary.usage,
                        timings,
                        finish_reason: summary.finish_reason.as_str().to_string(),
                    };
                    self.record.prompt_tokens = Some(summary.usage.prompt_tokens);
                    self.record.completion_tokens = Some(summary.usage.completion_tokens);
                    self.record.finish_reason = Some(summary.finish_reason.as_str().to_string());
                    let delivered = self.tx.send(Ok(end)).await.is_ok();
                    if !delivered {
                        return self.finish_cancelled();
                    }
                    return self.close("ok", None, None);
                }
                Some(Err(e)) => {
                    let error = PipelineError::Engine(e);
                    let status = error.status_name();
                    let message = error.to_string();
                    tracing::error!(request_id = %self.record.request_id, error = %message, "generation failed");
                    let _ = self.tx.send(Err(error)).await;
                    return self.close(status, Some(message), None);
                }
                None => {
                    let error = PipelineError::Engine(EngineError::Disconnected);
                    let status = error.status_name();
                    let message = error.to_string();
                    let _ = self.tx.send(Err(error)).await;
                    return self.close(status, Some(message), None);
                }
            }
        }
    }

    fn elapsed_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    async fn emit(&mut self, text: String) -> bool {
        if self.ttft_ms.is_none() {
            self.ttft_ms = Some(self.elapsed_ms());
        }
        let now = Instant::now();
        if let Some(last) = self.last_delta.replace(now) {
            let expert = self.record.expert.as_deref().unwrap_or_default();
            self.observer
                .inter_token(expert, now.duration_since(last).as_secs_f64());
        }
        self.answer.push_str(&text);
        self.tx.send(Ok(ChatEvent::Delta(text))).await.is_ok()
    }

    fn finish_cancelled(self) {
        let reason = FinishReason::Other("cancelled".into());
        let message = PipelineError::Cancelled.to_string();
        let mut this = self;
        this.record.finish_reason = Some(reason.as_str().to_string());
        let mut signal = FeedbackRecord::new(this.record.request_id.clone(), FeedbackKind::Abandoned);
        signal.detail = Some(
            serde_json::json!({
                "kind": this.record.kind,
                "answer_chars": this.answer.chars().count(),
                "elapsed_ms": this.elapsed_ms(),
            })
            .to_string(),
        );
        this.close("cancelled", Some(message), Some(signal));
    }

    /// Hand the record (then `signal`, through the same ordered queue) to
    /// the log; the request stops being live after both.
    fn close(mut self, status: &str, error: Option<String>, signal: Option<FeedbackRecord>) {
        let mut verdicts = std::mem::take(&mut self.record.guardrails);
        verdicts.extend(self.filter.verdicts());
        self.record.guardrails = verdicts;
        self.record.status = status.to_string();
        self.record.error = error;
        self.record.answer = Some(std::mem::take(&mut self.answer));
        self.record.ttft_ms = self.ttft_ms;
        self.record.total_ms = Some(self.elapsed_ms());
        self.record.finished_at_ms = unix_ms(SystemTime::now());
        if status == "ok"
            && let Some(session) = &self.record.session_id
        {
            self.sessions
                .answered(session, &self.record.request_id, &self.record.query, Instant::now());
        }
        self.observer.request_finished(&self.record);
        tracing::debug!(
            request_id = %self.record.request_id,
            status = %self.record.status,
            completion_tokens = self.record.completion_tokens,
            ttft_ms = self.record.ttft_ms,
            "answer finished; record handed to the log"
        );
        self.log.submit(self.record);
        if let Some(signal) = signal {
            self.log.submit_feedback(signal);
        }
        drop(self.live);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::stub::StubEngine;
    use crate::testing::stub_pipeline;

    fn query(text: &str) -> Query {
        Query {
            text: text.into(),
            ..Query::default()
        }
    }

    async fn records(p: &Pipeline) -> Vec<RequestRecord> {
        p.log().flush().await.unwrap();
        p.log().reader().unwrap().recent(1000).unwrap()
    }

    #[tokio::test]
    async fn routes_to_the_scored_expert_and_logs_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = stub_pipeline(&mut EngineSettings::default(), dir.path(), StubEngine::default());
        let out = p.route(query("a finance question")).await.unwrap();
        assert_eq!(out.route.expert, "finance");
        assert!(!out.route.fallback);
        let recs = records(&p).await;
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].request_id, out.request_id);
        assert_eq!(recs[0].status, "ok");
    }

    #[tokio::test]
    async fn unclear_query_goes_to_the_fallback_expert() {
        let dir = tempfile::tempdir().unwrap();
        let p = stub_pipeline(&mut EngineSettings::default(), dir.path(), StubEngine::default());
        let out = p.complete(query("nothing specific here")).await.unwrap();
        assert!(out.route.fallback);
        assert_eq!(out.route.expert, "general");
        assert!(out.answer.starts_with("This is a fixed answer"));
    }

    #[tokio::test]
    async fn every_rejection_is_logged_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = EngineSettings::default();
        settings.limits.max_query_chars = 10;
        let p = stub_pipeline(&mut settings, dir.path(), StubEngine::default());
        assert!(matches!(p.route(query("")).await, Err(PipelineError::EmptyQuery)));
        assert!(matches!(
            p.complete(query("0123456789a")).await,
            Err(PipelineError::QueryTooLong { len: 11, max: 10 })
        ));
        let forced = Query {
            expert: Some("legal".into()),
            ..query("contract")
        };
        assert!(matches!(
            p.stream(forced).await,
            Err(PipelineError::UnknownExpert { .. })
        ));
        let mut statuses: Vec<String> = records(&p).await.into_iter().map(|r| r.status).collect();
        statuses.sort();
        assert_eq!(statuses, ["invalid_argument", "invalid_argument", "not_found"]);
    }

    #[tokio::test]
    async fn unusable_ids_and_generation_options_are_refused_and_logged() {
        let dir = tempfile::tempdir().unwrap();
        let p = stub_pipeline(&mut EngineSettings::default(), dir.path(), StubEngine::default());
        let long_user = "u".repeat(MAX_ID_CHARS + 1);
        let Err(PipelineError::InvalidRequest { field, reason }) = p
            .route(Query {
                user_id: Some(long_user.clone()),
                ..session_query("vpn broken", "s-1")
            })
            .await
        else {
            panic!("an overlong user id must be refused")
        };
        assert_eq!(field, "user_id");
        assert!(reason.contains("257") && reason.contains("256"), "{reason}");
        let with = |max_tokens: Option<u32>, temperature: Option<f32>| Query {
            overrides: Overrides {
                max_tokens,
                temperature,
                ..Overrides::default()
            },
            ..query("vpn broken")
        };
        for (q, bad) in [
            (with(Some(0), None), "max_tokens"),
            (with(None, Some(-0.5)), "temperature"),
            (with(None, Some(f32::NAN)), "temperature"),
            (with(None, Some(f32::INFINITY)), "temperature"),
        ] {
            match p.complete(q).await {
                Err(PipelineError::InvalidRequest { field, .. }) => assert_eq!(field, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
        for q in [
            with(Some(1), Some(0.0)),
            with(Some(100_000), Some(1.5)),
            with(None, None),
        ] {
            p.complete(q).await.unwrap();
        }
        let recs = records(&p).await;
        let refused: Vec<&RequestRecord> = recs.iter().filter(|r| r.status == "invalid_argument").collect();
        assert_eq!(refused.len(), 5);
        let logged = refused.iter().find(|r| r.user_id.is_some()).unwrap();
        // Logged with the ids cut to the limit, the session id as given.
        assert_eq!(logged.user_id.as_deref(), Some(&long_user[..MAX_ID_CHARS]));
        assert_eq!(logged.session_id.as_deref(), Some("s-1"));
        assert!(logged.error.as_deref().unwrap().contains("user_id"));
    }

    #[tokio::test]
    async fn queries_refused_before_the_rails_are_logged_redacted_and_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = EngineSettings::default();
        settings.limits.max_query_chars = 40;
        let mut spec = RailsSpec::default();
        spec.jailbreak.enabled = false;
        let p = stub_pipeline(&mut settings, dir.path(), StubEngine::default())
            .with_rails(Rails::configured(Arc::new(RailSet::new(spec, None))));
        let too_long = "mail jane.doe@example.com about the offsite plans for next week";
        assert!(matches!(
            p.route(query(too_long)).await,
            Err(PipelineError::QueryTooLong { .. })
        ));
        let control = "mail jane.doe@example.com\u{0007}";
        assert!(matches!(
            p.route(query(control)).await,
            Err(PipelineError::InvalidInput { .. })
        ));
        let long_session = Query {
            session_id: Some("s".repeat(MAX_ID_CHARS + 1)),
            ..query("call jane.doe@example.com")
        };
        assert!(matches!(
            p.route(long_session).await,
            Err(PipelineError::InvalidRequest { .. })
        ));
        let mut logged: Vec<String> = records(&p).await.into_iter().map(|r| r.query).collect();
        logged.sort();
        assert_eq!(
            logged,
            [
                "call <EMAIL_1>",
                "mail <EMAIL_1>\u{0007}",
                "mail <EMAIL_1> about the offs"
            ]
        );
    }

    #[tokio::test]
    async fn a_conversations_earlier_turns_reach_the_expert_through_the_input_rails() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = EngineSettings::default();
        settings.limits.max_history_chars = 100;
        let mut spec = RailsSpec::default();
        spec.jailbreak.enabled = false;
        let p = stub_pipeline(&mut settings, dir.path(), StubEngine::default())
            .with_rails(Rails::configured(Arc::new(RailSet::new(spec, None))));
        let with_history = |history: Vec<ChatMessage>| Query {
            history,
            ..query("and then, hr?")
        };
        let alone = p.complete(query("and then, hr?")).await.unwrap();
        let turns = vec![
            ChatMessage::system("Answer briefly."),
            ChatMessage::user("how do I book leave?"),
            ChatMessage::assistant("In the HR portal."),
        ];
        let after = p.complete(with_history(turns)).await.unwrap();
        // The expert's prompt holds the earlier turns; the router saw the query alone.
        assert!(after.usage.prompt_tokens > alone.usage.prompt_tokens + 5, "{after:?}");
        assert_eq!(after.route.expert, alone.route.expert);
        // An earlier turn a rail refuses refuses the request, logged under its query.
        let bad = vec![ChatMessage::user("ring the bell\u{0007}")];
        let Err(PipelineError::InvalidInput { reason, .. }) = p.complete(with_history(bad)).await else {
            panic!("a control character in an earlier turn must be refused")
        };
        assert!(reason.contains("earlier message"), "{reason}");
        let long = vec![ChatMessage::user("x".repeat(101))];
        let Err(PipelineError::InvalidRequest { field, .. }) = p.complete(with_history(long)).await else {
            panic!("a history over the limit must be refused")
        };
        assert_eq!(field, "history");
        let statuses: Vec<String> = records(&p)
            .await
            .into_iter()
            .filter(|r| r.query == "and then, hr?")
            .map(|r| r.status)
            .collect();
        assert_eq!(statuses.len(), 4);
        assert_eq!(statuses.iter().filter(|s| *s == "invalid_argument").count(), 2);
    }

    fn session_query(text: &str, session: &str) -> Query {
        Query {
            text: text.into(),
            session_id: Some(session.into()),
            ..Query::default()
        }
    }

    #[tokio::test]
    async fn feedback_is_validated_and_kept_with_history() {
        let dir = tempfile::tempdir().unwrap();
        let p = stub_pipeline(&mut EngineSettings::default(), dir.path(), StubEngine::default());
        let out = p.complete(query("an hr question")).await.unwrap();
        let id = out.request_id.clone();
        let fb = |rating, corrected: Option<&str>| FeedbackInput {
            request_id: id.clone(),
            rating,
            corrected_expert: corrected.map(str::to_string),
            ..FeedbackInput::default()
        };
        let err = p.submit_feedback(fb(None, None)).await.unwrap_err();
        assert!(matches!(err, PipelineError::InvalidFeedback { .. }), "{err}");
        let err = p.submit_feedback(fb(Some(Rating::Stars(6)), None)).await.unwrap_err();
        assert!(err.to_string().contains("between 1 and 5"), "{err}");
        let err = p.submit_feedback(fb(None, Some("legal"))).await.unwrap_err();
        assert!(err.to_string().contains("configured experts: hr"), "{err}");
        let unknown = FeedbackInput {
            request_id: "nope".into(),
            rating: Some(Rating::Thumb(true)),
            ..FeedbackInput::default()
        };
        assert!(matches!(
            p.submit_feedback(unknown).await,
            Err(PipelineError::UnknownRequest { .. })
        ));
        p.submit_feedback(fb(Some(Rating::Thumb(false)), None)).await.unwrap();
        let last = p.submit_feedback(fb(Some(Rating::Stars(1)), Some("it"))).await.unwrap();
        let (record, rows) = p.feedback_history(&id).await.unwrap();
        assert_eq!(record.request_id, id);
        assert_eq!(rows.len(), 2);
        assert!(matches!(
            p.feedback_history(" ").await,
            Err(PipelineError::InvalidRequest {
                field: "request_id",
                ..
            })
        ));
        assert_eq!(crate::data::feedback::latest_explicit(&rows), Some(&last));
    }

    #[tokio::test]
    async fn feedback_on_a_just_finished_request_is_accepted() {
        // The record may still sit in the writer's queue: no false NotFound.
        let dir = tempfile::tempdir().unwrap();
        let mut settings = EngineSettings::default();
        settings.log.flush_interval_ms = 100;
        let p = stub_pipeline(&mut settings, dir.path(), StubEngine::default());
        let out = p.route(query("a finance question")).await.unwrap();
        let input = FeedbackInput {
            request_id: out.request_id,
            rating: Some(Rating::Thumb(true)),
            ..FeedbackInput::default()
        };
        p.submit_feedback(input).await.unwrap();
    }

    #[tokio::test]
    async fn a_rephrased_query_marks_the_previous_answer() {
        let dir = tempfile::tempdir().unwrap();
        let p = stub_pipeline(&mut EngineSettings::default(), dir.path(), StubEngine::default());
        let first = p
            .complete(session_query("How do I reset my VPN password?", "s1"))
            .await
            .unwrap();
        // Another session asking the same thing is not a rephrase.
        p.complete(session_query("How can I reset my VPN password", "s2"))
            .await
            .unwrap();
        let second = p
            .complete(session_query("how can i reset my vpn password", "s1"))
            .await
            .unwrap();
        let (_, rows) = p.feedback_history(&first.request_id).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].kind, FeedbackKind::Rephrase);
        assert!(rows[0].detail.as_deref().unwrap().contains(&second.request_id));
        let (_, rows) = p.feedback_history(&second.request_id).await.unwrap();
        assert!(rows.is_empty());
    }

    /// A pipeline on a stub streaming a word per `per_token`, and a stream
    /// past its `Start` event, with the request id that event gave.
    async fn started_stream(dir: &std::path::Path, per_token: Duration) -> (Pipeline, ChatStream, String) {
        let p = stub_pipeline(&mut EngineSettings::default(), dir, StubEngine::new(per_token));
        let mut s = p.stream(query("an hr question")).await.unwrap();
        let Some(Ok(ChatEvent::Start { request_id, .. })) = s.next().await else {
            panic!("no start event")
        };
        (p, s, request_id)
    }

    #[tokio::test]
    async fn a_cancelled_stream_is_recorded_as_abandoned_and_readable_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (p, s, request_id) = started_stream(dir.path(), Duration::from_millis(50)).await;
        drop(s);
        // Read at once: the history waits for the producer to log the
        // cancelled record and its signal (no "unknown request").
        let (record, rows) = p.feedback_history(&request_id).await.unwrap();
        assert_eq!(record.status, "cancelled");
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].kind, FeedbackKind::Abandoned);
    }

    fn thumb(request_id: &str, up: bool) -> FeedbackInput {
        FeedbackInput {
            request_id: request_id.into(),
            rating: Some(Rating::Thumb(up)),
            ..FeedbackInput::default()
        }
    }

    #[tokio::test]
    async fn feedback_during_an_answer_is_kept_and_joins_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let (p, mut s, request_id) = started_stream(dir.path(), Duration::from_millis(20)).await;
        // Rated while the answer streams: the record is not in the log yet.
        p.submit_feedback(thumb(&request_id, false)).await.unwrap();
        let mut ended = false;
        while let Some(event) = s.next().await {
            ended |= matches!(event.unwrap(), ChatEvent::End { .. });
        }
        assert!(ended);
        let (record, rows) = p.feedback_history(&request_id).await.unwrap();
        assert_eq!(record.status, "ok");
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].kind, FeedbackKind::Explicit);
        assert_eq!(rows[0].rating, Some(Rating::Thumb(false)));
        // Ids the server never issued are still unknown.
        assert!(matches!(
            p.submit_feedback(thumb("not-an-issued-id", true)).await,
            Err(PipelineError::UnknownRequest { .. })
        ));
    }

    #[tokio::test]
    async fn history_of_an_answer_still_streaming_is_in_flight_not_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let (p, s, request_id) = started_stream(dir.path(), Duration::from_secs(60)).await;
        let asked = Instant::now();
        let err = p.feedback_history(&request_id).await.unwrap_err();
        assert!(
            matches!(&err, PipelineError::RequestInFlight { request_id: id } if *id == request_id),
            "{err:?}"
        );
        assert!(asked.elapsed() >= IN_FLIGHT_WAIT, "answered before waiting");
        drop(s);
        let (record, _) = p.feedback_history(&request_id).await.unwrap();
        assert_eq!(record.status, "cancelled");
    }

    #[tokio::test]
    async fn dropping_a_stream_cancels_and_frees_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = EngineSettings::default();
        settings.limits.max_in_flight = 1;
        let p = stub_pipeline(&mut settings, dir.path(), StubEngine::new(Duration::from_millis(50)));
        let mut s = p.stream(query("an hr question")).await.unwrap();
        assert!(matches!(s.next().await, Some(Ok(ChatEvent::Start { .. }))));
        assert!(matches!(
            p.route(query("hr again")).await,
            Err(PipelineError::Overloaded { max: 1 })
        ));
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.status().in_flight > 0 {
            assert!(Instant::now() < deadline, "permit never released");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let recs = records(&p).await;
        let cancelled = recs.iter().find(|r| r.kind == "stream").unwrap();
        assert_eq!(cancelled.status, "cancelled");
        assert!(recs.iter().any(|r| r.status == "resource_exhausted"));
    }
}
