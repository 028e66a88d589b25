//! The request path (the data plane): a request is admitted, passes the
//! input rails, is routed, passes the topic rail, retrieves its expert's
//! passages, is answered through the output rail and recorded. Each stage
//! reads snapshots (rails, models, shadows, splits) that the control plane
//! (the `control` module) replaces; nothing here changes them.
//!
//! | stage | where |
//! |---|---|
//! | admit, validate, input rails | [`admit`] |
//! | route (beside the input rails when it may) | [`decide`] |
//! | mirror to a shadow, topic rail | [`Pipeline::route`], `start_answer` here; [`trials`] |
//! | retrieve, generate | `start_answer` here |
//! | output rail, stream | [`answer`] |
//! | record | [`ticket`]: every request, whatever its end, leaves one record |
//!
//! Answers are produced by one producer task per request writing into a
//! bounded channel; `complete` collects the same stream, so both paths share
//! one code path. The producer owns the request's ticket (admission permit
//! included) and the model snapshots (`Arc`s taken once), so a hot-swap
//! never changes a request mid-flight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument;

use crate::agents::{ExpertAgent, RouteDecision, RouterAgent};
use crate::config::{EngineSettings, LimitsSpec};
use crate::data::feedback::{FeedbackSpec, SessionTracker};
use crate::data::log::{RequestLog, RetrievedRef};
use crate::engine::{EngineError, Usage};
use crate::error::PipelineError;
use crate::guardrails::rails::TopicPolicy;
use crate::guardrails::{RailDecision, RailVerdict, Rails};
use crate::models::slots::{ModelRegistry, ROUTER_SLOT, expert_slot};
use crate::observe::{NoObserver, Observer};
use crate::retrieval::{IndexStats, NoRetrieval, Retriever};
use crate::trials::shadow::Shadow;
use crate::trials::split::Split;

mod admit;
mod answer;
mod decide;
pub(crate) mod live;
mod request;
pub(crate) mod ticket;
mod trials;

use answer::Producer;
use live::LiveRequests;
pub use request::{ChatEvent, ChatOutcome, ChatStream, Query, RouteOutcome, Timings};
use ticket::{Books, Outcome};

/// Answer events buffered between the producer and the caller.
const EVENT_BUFFER: usize = 32;

/// A snapshot of the pipeline's state for status endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineStatus {
    /// Requests admitted now.
    pub in_flight: usize,
    /// Admission limit.
    pub max_in_flight: usize,
}

/// The guardrailed router + experts request path. The control plane
/// (`control::ControlPlane`) replaces what it reads.
pub struct Pipeline {
    pub(crate) router: Arc<RouterAgent>,
    pub(crate) experts: BTreeMap<String, ExpertAgent>,
    pub(crate) expert_order: Vec<String>,
    pub(crate) rails: arc_swap::ArcSwap<Rails>,
    pub(crate) retriever: Arc<dyn Retriever>,
    pub(crate) books: Arc<Books>,
    pub(crate) registry: Arc<ModelRegistry>,
    admission: Arc<Semaphore>,
    /// CPU cores: with fewer requests in flight, a core is idle.
    cores: usize,
    limits: LimitsSpec,
    pub(crate) feedback: FeedbackSpec,
    pub(crate) shadows: arc_swap::ArcSwap<BTreeMap<String, Arc<Shadow>>>,
    pub(crate) splits: arc_swap::ArcSwap<BTreeMap<String, Arc<Split>>>,
    pub(crate) live: LiveRequests,
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
            books: Arc::new(Books {
                log,
                observer: Arc::new(NoObserver),
                sessions: Arc::new(SessionTracker::new(&settings.feedback)),
            }),
            registry,
            admission: Arc::new(Semaphore::new(settings.limits.max_in_flight)),
            cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            limits: settings.limits.clone(),
            feedback: settings.feedback.clone(),
            shadows: arc_swap::ArcSwap::from_pointee(BTreeMap::new()),
            splits: arc_swap::ArcSwap::from_pointee(BTreeMap::new()),
            live: LiveRequests::default(),
        })
    }

    /// Report finished requests and inter-token gaps to `observer`.
    ///
    /// # Panics
    /// Once requests have been served (the books are shared with them).
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        Arc::get_mut(&mut self.books)
            .expect("observer set before serving")
            .observer = observer;
        self
    }

    /// Use these rails.
    pub fn with_rails(self, rails: Rails) -> Self {
        self.rails.store(Arc::new(rails));
        self
    }

    /// The rails in force now.
    pub fn rails(&self) -> Arc<Rails> {
        self.rails.load_full()
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
        &self.books.log
    }

    /// The observer finished requests are reported to.
    pub(crate) fn observer(&self) -> &Arc<dyn Observer> {
        &self.books.observer
    }

    /// Admission state.
    pub fn status(&self) -> PipelineStatus {
        let max = self.limits.max_in_flight;
        PipelineStatus {
            in_flight: max - self.admission.available_permits().min(max),
            max_in_flight: max,
        }
    }

    /// Route a query without answering it.
    ///
    /// # Errors
    /// Invalid input, overload, a blocking rail, or an engine failure.
    pub async fn route(&self, query: Query) -> Result<RouteOutcome, PipelineError> {
        let rails = self.rails.load_full();
        let query = Query { expert: None, ..query };
        let (admit::Admitted { mut ticket, text, .. }, result) = self.admit_and_decide("route", &query, &rails).await?;
        let route = match result {
            Ok(route) => route,
            Err(e) => return Err(admit::fail(ticket, e)),
        };
        self.mirror_route(&ticket.record.request_id, &text, &route);
        if let Some(v) = topic_verdict(&rails, &route) {
            ticket.record.guardrails.push(v);
        }
        ticket.record.route = Some(route.clone());
        let request_id = ticket.record.request_id.clone();
        ticket.finish(Outcome::Ok);
        Ok(RouteOutcome { request_id, route })
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

    async fn start_answer(&self, kind: &str, query: Query) -> Result<ChatStream, PipelineError> {
        let rails = self.rails.load_full();
        let (
            admit::Admitted {
                mut ticket,
                text,
                history,
                ..
            },
            decided,
        ) = self.admit_and_decide(kind, &query, &rails).await?;
        let request_id = ticket.record.request_id.clone();
        let route = match decided {
            Ok(r) => r,
            Err(e) => return Err(admit::fail(ticket, e)),
        };
        self.mirror_route(&request_id, &text, &route);
        ticket.record.route = Some(route.clone());
        // Topic rail.
        if let Some(v) = topic_verdict(&rails, &route) {
            let refuse = rails.topic.policy == TopicPolicy::Refuse;
            ticket.record.guardrails.push(v);
            if refuse {
                return Ok(answer::refuse(ticket, route, &rails.topic.refusal));
            }
        }
        // Retrieve.
        let expert = self.experts.get(&route.expert).expect("routes name configured experts");
        let model = self
            .split_model(
                &expert_slot(&route.expert),
                query.session_id.as_deref(),
                query.user_id.as_deref(),
                &request_id,
            )
            .unwrap_or_else(|| expert.model());
        ticket.record.expert = Some(route.expert.clone());
        ticket.record.expert_model_version = Some(model.version.clone());
        let retrieval_started = Instant::now();
        let passages = match self
            .retriever
            .retrieve(&route.expert, &text)
            .instrument(tracing::info_span!("retrieval", request_id = %request_id, expert = %route.expert))
            .await
        {
            Ok(p) => p,
            Err(e) => return Err(admit::fail(ticket, e.into())),
        };
        if self.retriever.stats().is_some() {
            self.observer()
                .retrieval(&route.expert, retrieval_started.elapsed().as_secs_f64(), passages.len());
        }
        ticket.record.retrieved = passages.iter().map(RetrievedRef::from).collect();
        // Generate.
        let prompt = expert.conversation_prompt(&history, &text, &passages);
        let params = expert.params(&query.overrides);
        self.mirror_answer(&request_id, &route.expert, &model.version, &prompt, &params);
        let tokens = match model.engine.generate(prompt, params).await {
            Ok(t) => t,
            Err(e) => return Err(admit::fail(ticket, e.into())),
        };
        // Output rail and stream, in the producer task.
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let (cut, cut_rx) = tokio::sync::oneshot::channel();
        let start_event = ChatEvent::Start {
            request_id: request_id.clone(),
            route: route.clone(),
            expert_model_version: model.version.clone(),
            citations: passages,
        };
        let span = tracing::info_span!(
            "generation",
            request_id = %request_id,
            expert = %route.expert,
            model_version = %model.version
        );
        let producer = Producer {
            tx,
            cut: Some(cut),
            ticket,
            route_ms: route.latency_ms,
            filter: rails.output.filter(),
            write_timeout: Duration::from_millis(self.limits.stream_write_timeout_ms),
            last_delta: None,
            answer: String::new(),
            ttft_ms: None,
        };
        tokio::spawn(producer.run(start_event, tokens, model).instrument(span));
        Ok(ChatStream::new(rx, Some(cut_rx)))
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
        TopicPolicy::Fallback => RailDecision::Fallback,
        TopicPolicy::Refuse => RailDecision::Refuse,
    };
    Some(RailVerdict {
        rail: "topic".into(),
        decision,
        score: Some(route.confidence),
        latency_ms: 0.0,
    })
}

#[cfg(test)]
mod tests;
