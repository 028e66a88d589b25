//! The request path (the data plane): a request is admitted, passes the
//! input rails, is routed, passes the topic rail, retrieves its expert's
//! passages, is answered through the output rail and recorded. Each stage
//! reads snapshots (rails, models, shadows, splits) that the control plane
//! (the `control` module) replaces; nothing here changes them.
//!
//! | stage | where |
//! |---|---|
//! | admit, validate, input rails | [`admit`] |
//! | route (and mirror to a shadow), topic rail | [`Pipeline::route`], `start_answer` here; [`trials`] |
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
        let admit::Admitted { mut ticket, text, .. } = self.admit("route", &query, &rails).await?;
        let span = route_span(&ticket.record.request_id);
        let result = self
            .decide(&Query { expert: None, ..query }, &text, &ticket.record.request_id)
            .instrument(span.clone())
            .await;
        record_route(&span, result.as_ref().ok());
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
        let admit::Admitted {
            mut ticket,
            text,
            history,
        } = self.admit(kind, &query, &rails).await?;
        let request_id = ticket.record.request_id.clone();
        // Route.
        let span = route_span(&request_id);
        let decided = self.decide(&query, &text, &request_id).instrument(span.clone()).await;
        record_route(&span, decided.as_ref().ok());
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
            cut,
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

    async fn decide(&self, query: &Query, text: &str, request_id: &str) -> Result<RouteDecision, PipelineError> {
        match &query.expert {
            Some(name) if !name.is_empty() => {
                if self.experts.contains_key(name) {
                    Ok(RouteDecision::forced(name))
                } else {
                    Err(PipelineError::UnknownExpert {
                        name: crate::text::quote(name),
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
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::agents::expert::Overrides;
    use crate::data::feedback::FeedbackKind;
    use crate::data::log::RequestRecord;
    use crate::engine::ChatMessage;
    use crate::engine::stub::StubEngine;
    use crate::guardrails::rails::{RailSet, RailsSpec};
    use crate::testing::{query, records, session_query, stub_pipeline};
    use crate::text::MAX_ID_CHARS;

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
        // A card number straddling the cut: redacted whole, then cut.
        let straddling = format!("{} 4111 1111 1111 1111 thanks", "x".repeat(30));
        assert!(matches!(
            p.route(query(&straddling)).await,
            Err(PipelineError::QueryTooLong { .. })
        ));
        let mut logged: Vec<String> = records(&p).await.into_iter().map(|r| r.query).collect();
        logged.sort();
        assert_eq!(
            logged,
            [
                "call <EMAIL_1>",
                "mail <EMAIL_1>\u{0007}",
                "mail <EMAIL_1> about the offsite plans f",
                &format!("{} <CREDIT_C", "x".repeat(30)),
            ]
        );
    }

    #[tokio::test]
    async fn no_column_keeps_pii_that_the_rail_redacts_and_ids_still_join() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = RailsSpec::default();
        spec.jailbreak.enabled = false;
        let p = stub_pipeline(&mut EngineSettings::default(), dir.path(), StubEngine::default())
            .with_rails(Rails::configured(Arc::new(RailSet::new(spec, None))));
        let with_ids = |text: &str, expert: Option<&str>| Query {
            session_id: Some("jane.doe@example.com".into()),
            user_id: Some("+1 415 555 0100".into()),
            expert: expert.map(str::to_string),
            ..query(text)
        };
        p.route(with_ids("an hr question", None)).await.unwrap();
        let unknown = with_ids("a question", Some("ask bob@corp.example"));
        let refused = p.complete(unknown).await;
        assert!(
            matches!(refused, Err(PipelineError::UnknownExpert { .. })),
            "{refused:?}"
        );
        let recs = records(&p).await;
        assert_eq!(recs.len(), 2);
        let stored = format!("{recs:?}");
        for raw in ["jane.doe", "415", "bob@"] {
            assert!(!stored.contains(raw), "{raw} stored: {stored}");
        }
        let failed = recs.iter().find(|r| r.status == "not_found").unwrap();
        assert!(failed.error.as_deref().unwrap().contains("<EMAIL_1>"), "{failed:?}");
        // One pseudonym per id: records still join by session and user.
        assert!(recs[0].session_id.as_deref().unwrap().starts_with("pii-"));
        assert_eq!(recs[0].session_id, recs[1].session_id);
        assert_eq!(recs[0].user_id, recs[1].user_id);
        assert_ne!(recs[0].session_id, recs[0].user_id);
        // Ids without PII are kept as they are.
        p.route(session_query("an it question", "s-42")).await.unwrap();
        let recs = records(&p).await;
        assert!(recs.iter().any(|r| r.session_id.as_deref() == Some("s-42")));
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

    /// A query the stub answers with `n` words, one delta each.
    fn long_answer(n: usize) -> Query {
        let words: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
        query(&format!("{} {}", crate::engine::stub::ECHO_MARKER, words.join(" ")))
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_without_holding_the_engine_or_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = EngineSettings::default();
        settings.limits.max_in_flight = 1;
        settings.limits.stream_write_timeout_ms = 300;
        let p = stub_pipeline(&mut settings, dir.path(), StubEngine::default());
        let mut s = p.stream(long_answer(200)).await.unwrap();
        assert!(matches!(s.next().await, Some(Ok(ChatEvent::Start { .. }))));
        // The client reads nothing more: the slot is freed at the timeout.
        let started = Instant::now();
        while p.status().in_flight > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the stalled stream kept its slot"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "cut before the timeout"
        );
        p.route(query("an hr question")).await.unwrap();
        // Generation ran to its end without the reader; the record says why it was cut.
        let recs = records(&p).await;
        let cut = recs.iter().find(|r| r.kind == "stream").unwrap();
        assert_eq!(cut.status, "deadline_exceeded");
        assert!(
            cut.error.as_deref().unwrap().contains("read nothing for 300 ms"),
            "{cut:?}"
        );
        assert!(cut.answer.as_deref().unwrap().ends_with("w199"), "{cut:?}");
        // Reading now: what the channel held (no `End`), then the cut's status.
        let mut text = String::new();
        let mut last = None;
        while let Some(event) = s.next().await {
            match event {
                Ok(ChatEvent::Delta(t)) => text.push_str(&t),
                other => last = Some(other),
            }
        }
        assert!(
            matches!(last, Some(Err(PipelineError::StalledReader { waited_ms: 300 }))),
            "{last:?}"
        );
        assert!(
            cut.answer.as_deref().unwrap().starts_with(&text) && text.starts_with("w0 w1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_slow_reader_gets_the_whole_answer_with_merged_deltas() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = EngineSettings::default();
        settings.limits.stream_write_timeout_ms = 200;
        let p = stub_pipeline(&mut settings, dir.path(), StubEngine::default());
        let mut s = p.stream(long_answer(200)).await.unwrap();
        let (mut text, mut events, mut ended) = (String::new(), 0, false);
        while let Some(event) = s.next().await {
            events += 1;
            match event.unwrap() {
                ChatEvent::Delta(t) => text.push_str(&t),
                ChatEvent::End { .. } => ended = true,
                ChatEvent::Start { .. } => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let expected: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
        assert!(ended);
        assert_eq!(text, expected.join(" "));
        // The text the channel had no room for came as fewer, longer deltas.
        assert!(events < 200, "{events} events");
        assert_eq!(records(&p).await[0].status, "ok");
    }

    #[tokio::test]
    async fn a_request_dropped_at_any_stage_is_recorded_as_cancelled() {
        use crate::engine::stub::Misbehaviour;
        let dir = tempfile::tempdir().unwrap();
        // The router hangs: the request is dropped while it is being routed.
        let engine = StubEngine::default().misbehaving(Misbehaviour::HangAfter(0));
        let p = stub_pipeline(&mut EngineSettings::default(), dir.path(), engine);
        let query = Query {
            session_id: Some("s-cancel".into()),
            ..query("a finance question")
        };
        let routed = tokio::time::timeout(Duration::from_millis(100), p.route(query.clone())).await;
        assert!(routed.is_err(), "the hanging router answered");
        let streamed = tokio::time::timeout(Duration::from_millis(100), p.stream(query)).await;
        assert!(streamed.is_err(), "the hanging router answered");
        let recs = records(&p).await;
        assert_eq!(recs.len(), 2, "one record per request: {recs:?}");
        for r in &recs {
            assert_eq!(r.status, "cancelled");
            assert_eq!(r.error.as_deref(), Some("request cancelled by the client"));
            assert!(r.route.is_none() && r.total_ms.is_some());
            // Past the rails: the query is logged as they left it.
            assert_eq!(r.query, "a finance question");
            let rows = p.log().reader().unwrap().feedback_for(&r.request_id).unwrap();
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].kind, FeedbackKind::Abandoned);
        }
        assert_eq!(p.status().in_flight, 0, "a dropped request keeps no permit");
    }
}
