//! The request path's tests: every stage and every way a request ends,
//! on the stub engine.

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

/// A stub-engine pipeline whose input rails are the default ones without the
/// jailbreak detector (limits and PII redaction need no model).
fn pii_rails_pipeline(settings: &mut EngineSettings, dir: &std::path::Path) -> Pipeline {
    let mut spec = RailsSpec::default();
    spec.jailbreak.enabled = false;
    stub_pipeline(settings, dir, StubEngine::default())
        .with_rails(Rails::configured(Arc::new(RailSet::new(spec, None))))
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
    let p = pii_rails_pipeline(&mut settings, dir.path());
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
    let p = pii_rails_pipeline(&mut EngineSettings::default(), dir.path());
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
    let p = pii_rails_pipeline(&mut settings, dir.path());
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
async fn a_shadow_answer_is_stored_as_the_output_rail_leaves_a_live_one() {
    use crate::models::slots::ServedModel;
    use crate::trials::shadow::Shadow;
    let dir = tempfile::tempdir().unwrap();
    let p = pii_rails_pipeline(&mut EngineSettings::default(), dir.path());
    // A candidate that writes a card number after every word.
    let candidate = ServedModel {
        engine: Arc::new(StubEngine::signed(Duration::ZERO, " 4111 1111 1111 1111 ")),
        ..crate::testing::stub_model("cand")
    };
    let slot = expert_slot("general");
    let shadow = Arc::new(Shadow::new(&slot, Arc::new(candidate), 1.0, 4));
    p.shadows.store(Arc::new(BTreeMap::from([(slot.clone(), shadow)])));
    p.complete(query("nothing specific here")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let runs = loop {
        p.log().flush().await.unwrap();
        let runs = p.log().reader().unwrap().shadow_records(&slot).unwrap();
        if !runs.is_empty() {
            break runs;
        }
        assert!(Instant::now() < deadline, "the shadow never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let output = runs[0].output.as_deref().unwrap();
    assert!(
        output.contains("<CREDIT_CARD_1>") && !output.contains("4111"),
        "{output}"
    );
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

/// A router engine that records every query it scores, and input rails that
/// wait (at most `wait`) for the router to start scoring before they finish,
/// redacting the word `hr` (an expert's name, so the redaction changes the
/// decision).
mod early_route {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::engine::{Engine, GenerateParams, LabelScores, LabelSet, ModelKind, TokenStream};
    use crate::guardrails::{InputCheck, InputRails, RailRejection};
    use crate::models::slots::{ModelRegistry, ROUTER_SLOT, ServedModel, Slot, expert_slot};
    use crate::models::task::TrainedTask;

    struct Recording {
        queries: Mutex<Vec<String>>,
        /// How many queries it has scored, for waiters.
        scored: tokio::sync::watch::Sender<usize>,
    }

    impl Default for Recording {
        fn default() -> Self {
            Self {
                queries: Mutex::default(),
                scored: tokio::sync::watch::channel(0).0,
            }
        }
    }

    #[async_trait]
    impl Engine for Recording {
        fn backend(&self) -> &'static str {
            "test"
        }
        async fn generate(&self, m: Vec<ChatMessage>, p: GenerateParams) -> Result<TokenStream, EngineError> {
            StubEngine::default().generate(m, p).await
        }
        async fn score_labels(&self, m: &[ChatMessage], labels: &LabelSet) -> Result<LabelScores, EngineError> {
            self.queries.lock().unwrap().push(m.last().unwrap().content.clone());
            self.scored.send_modify(|n| *n += 1);
            StubEngine::default().score_labels(m, labels).await
        }
        async fn warm_up(&self, _: &[ChatMessage]) -> Result<(), EngineError> {
            Ok(())
        }
    }

    struct WaitingRails {
        router: Arc<Recording>,
        wait: Duration,
        /// Whether the router started scoring during each check.
        router_started: Mutex<Vec<bool>>,
    }

    #[async_trait]
    impl InputRails for WaitingRails {
        async fn check(&self, query: &str) -> Result<InputCheck, RailRejection> {
            let mut scored = self.router.scored.subscribe();
            let before = *scored.borrow_and_update();
            let started = tokio::time::timeout(self.wait, scored.wait_for(|&n| n > before))
                .await
                .is_ok();
            self.router_started.lock().unwrap().push(started);
            Ok(InputCheck {
                rewritten: query.contains(" hr").then(|| query.replace(" hr", " [redacted]")),
                verdicts: Vec::new(),
            })
        }
    }

    fn pipeline(
        kind: ModelKind,
        wait: Duration,
        dir: &std::path::Path,
    ) -> (Pipeline, Arc<Recording>, Arc<WaitingRails>) {
        let mut settings = EngineSettings::default();
        settings.log.path = dir.join("requests.db");
        let router = Arc::new(Recording::default());
        let labels = settings.experts.iter().map(|e| e.name.clone()).collect();
        let model = Arc::new(ServedModel {
            engine: router.clone(),
            task: Some(TrainedTask {
                system_prompt: String::new(),
                labels,
                kind,
            }),
            ..crate::testing::stub_model("router-v1")
        });
        let expert = Arc::new(crate::testing::stub_model("expert-v1"));
        let slots = std::iter::once(Arc::new(Slot::new(ROUTER_SLOT, model))).chain(
            settings
                .experts
                .iter()
                .map(|e| Arc::new(Slot::new(expert_slot(&e.name), expert.clone()))),
        );
        let registry = Arc::new(ModelRegistry::from_slots(slots.collect::<Vec<_>>()));
        let rails = Arc::new(WaitingRails {
            router: router.clone(),
            wait,
            router_started: Mutex::new(Vec::new()),
        });
        let log = RequestLog::open(&settings.log).unwrap();
        let p = Pipeline::new(&settings, registry, log).unwrap().with_rails(Rails {
            input: rails.clone(),
            ..Rails::pass_through()
        });
        (p, router, rails)
    }

    #[tokio::test]
    async fn a_classifier_router_decides_while_the_rails_run_and_only_on_the_text_they_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (p, router, rails) = pipeline(ModelKind::EncoderClassifier, Duration::from_secs(10), dir.path());
        // The rails end only once the router has started: it decided beside them.
        let plain = p.complete(query("a finance question")).await.unwrap();
        assert_eq!(plain.route.expert, "finance");
        assert_eq!(*router.queries.lock().unwrap(), ["a finance question"], "decided once");
        // A query the rails rewrite is decided again on what they pass: the
        // raw text names two experts, the redacted one only finance.
        let raw = "a finance question about hr";
        let rewritten = p.route(query(raw)).await.unwrap();
        let redacted = "a finance question about [redacted]";
        assert_eq!(*router.queries.lock().unwrap(), ["a finance question", raw, redacted]);
        assert_eq!(*rails.router_started.lock().unwrap(), [true, true]);
        let alone = p.route(query(redacted)).await.unwrap();
        assert_eq!(rewritten.route.scores, alone.route.scores);
        assert!(rewritten.route.confidence > 0.9, "{:?}", rewritten.route);
        // The log keeps that decision.
        let rec = records(&p)
            .await
            .into_iter()
            .find(|r| r.request_id == rewritten.request_id)
            .unwrap();
        assert_eq!(rec.query, redacted);
        assert_eq!(rec.route.unwrap().scores, rewritten.route.scores);
    }

    #[tokio::test]
    async fn with_a_request_in_flight_per_core_the_router_waits_for_the_rails() {
        let dir = tempfile::tempdir().unwrap();
        let (p, router, rails) = pipeline(ModelKind::EncoderClassifier, Duration::from_millis(300), dir.path());
        // Long answers nobody reads keep their requests in flight, one per core.
        let mut held = Vec::new();
        for _ in 0..p.cores {
            held.push(p.stream(super::long_answer(200)).await.unwrap());
        }
        assert_eq!(p.status().in_flight, p.cores);
        p.route(query("an it question")).await.unwrap();
        assert_eq!(rails.router_started.lock().unwrap().last(), Some(&false));
        assert_eq!(router.queries.lock().unwrap().last().unwrap(), "an it question");
        // Once they end, a core is idle again.
        drop(held);
        tokio::time::timeout(Duration::from_secs(10), async {
            while p.status().in_flight > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        p.route(query("an hr question")).await.unwrap();
        assert_eq!(rails.router_started.lock().unwrap().last(), Some(&true));
    }

    #[tokio::test]
    async fn a_label_scoring_router_decides_once_after_the_rails() {
        let dir = tempfile::tempdir().unwrap();
        let (p, router, rails) = pipeline(ModelKind::LabelScoring, Duration::from_millis(100), dir.path());
        p.route(query("a finance question about hr")).await.unwrap();
        assert_eq!(*rails.router_started.lock().unwrap(), [false]);
        assert_eq!(*router.queries.lock().unwrap(), ["a finance question about [redacted]"]);
    }
}
