//! The gRPC API end to end: the real server on `127.0.0.1:0`, the real
//! SmolLM2 model, the generated tonic clients, and the request log on disk.

use crate::common;

use std::time::{Duration, Instant};

use flywheel_proto::v1::chat_stream_message::Event;
use flywheel_proto::v1::feedback_request::Rating;
use flywheel_proto::v1::{
    ChatRequest, FeedbackHistoryRequest, FeedbackRequest, GenerationOptions, ListModelsRequest, RouteRequest,
    StatusRequest, Thumb,
};
use tonic::Code;

fn chat(query: &str, max_tokens: u32) -> ChatRequest {
    ChatRequest {
        query: query.into(),
        session_id: Some("s-1".into()),
        user_id: Some("u-1".into()),
        options: Some(GenerationOptions {
            max_tokens: Some(max_tokens),
            temperature: None,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn complete_returns_an_answer_and_a_route_and_logs_one_full_record() {
    let server = common::real_server();
    let query = "How many vacation days do I get per year?";
    let r = server
        .chat()
        .await
        .complete(chat(query, 24))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.answer.trim().is_empty(), "empty answer");
    let route = r.route.clone().unwrap();
    assert!(server.pipeline.experts().contains(&route.expert));
    assert_eq!(route.scores.len(), 5);
    let usage = r.usage.unwrap();
    assert!(usage.prompt_tokens > 10 && usage.completion_tokens > 0 && usage.completion_tokens <= 24);
    let timings = r.timings.unwrap();
    assert!(timings.ttft_ms > 0.0 && timings.ttft_ms <= timings.total_ms);

    let rec = server.record(&r.request_id).await;
    assert_eq!(rec.status, "ok");
    assert_eq!(rec.kind, "complete");
    assert_eq!(rec.query, query);
    assert_eq!(rec.session_id.as_deref(), Some("s-1"));
    assert_eq!(rec.user_id.as_deref(), Some("u-1"));
    assert_eq!(rec.answer.as_deref(), Some(r.answer.as_str()));
    assert_eq!(rec.expert.as_deref(), Some(route.expert.as_str()));
    assert_eq!(rec.expert_model_version.as_deref(), Some("smollm2-135m-instruct-q8_0"));
    let logged_route = rec.route.unwrap();
    assert_eq!(logged_route.router_model_version, "smollm2-135m-instruct-q8_0");
    assert_eq!(logged_route.scores.len(), 5);
    assert_eq!(rec.prompt_tokens, Some(usage.prompt_tokens));
    assert_eq!(rec.completion_tokens, Some(usage.completion_tokens));
    assert!(rec.ttft_ms.is_some() && rec.total_ms.is_some() && rec.finish_reason.is_some());
    assert_eq!(
        server.records_with_query(query).await.len(),
        1,
        "exactly one record per request"
    );
}

#[tokio::test]
async fn stream_sends_route_first_then_tokens_incrementally_then_usage() {
    let server = common::real_server();
    let query = "My laptop will not connect to the VPN. What should I try?";
    let mut stream = server.chat().await.stream(chat(query, 32)).await.unwrap().into_inner();
    let mut events = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        events.push((Instant::now(), msg.event.unwrap()));
    }
    let Event::Start(start) = &events[0].1 else {
        panic!("first message must be the start: {:?}", events[0].1)
    };
    assert!(start.route.as_ref().is_some_and(|r| r.scores.len() == 5));
    let Event::End(end) = &events.last().unwrap().1 else {
        panic!("last message must be the end")
    };
    let deltas: Vec<&(Instant, Event)> = events.iter().filter(|(_, e)| matches!(e, Event::Delta(_))).collect();
    assert!(deltas.len() >= 2, "expected several deltas, got {}", deltas.len());
    assert!(
        deltas[0].0 < deltas.last().unwrap().0,
        "tokens must arrive incrementally, not at once"
    );
    let usage = end.usage.unwrap();
    assert!(usage.completion_tokens as usize >= deltas.len() - 1);
    assert!(end.timings.unwrap().ttft_ms > 0.0);

    let rec = server.record(&start.request_id).await;
    assert_eq!((rec.kind.as_str(), rec.status.as_str()), ("stream", "ok"));
    let text: String = deltas
        .iter()
        .map(|(_, e)| if let Event::Delta(d) = e { d.text.as_str() } else { "" })
        .collect();
    assert_eq!(rec.answer.as_deref(), Some(text.as_str()));
}

#[tokio::test]
async fn route_scores_every_expert_and_logs_the_decision() {
    let server = common::real_server();
    let query = "How do I submit an expense report for a client dinner?";
    let r = server
        .router()
        .await
        .route(RouteRequest {
            query: query.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let route = r.route.unwrap();
    let mut names: Vec<&str> = route.scores.iter().map(|s| s.expert.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["finance", "general", "hr", "it", "product"]);
    let total: f32 = route.scores.iter().map(|s| s.probability).sum();
    assert!((total - 1.0).abs() < 1e-3, "probabilities sum to {total}");
    assert!(
        route.scores.windows(2).all(|w| w[0].probability >= w[1].probability),
        "scores best first"
    );
    assert!(route.scores.iter().all(|s| s.logprob <= 0.0));
    assert_eq!(route.top_expert, route.scores[0].expert);
    assert!(route.latency_ms > 0.0);
    let rec = server.record(&r.request_id).await;
    assert_eq!((rec.kind.as_str(), rec.status.as_str()), ("route", "ok"));
    assert_eq!(rec.route.unwrap().expert, route.expert);
    assert!(rec.answer.is_none());
}

#[tokio::test]
async fn forced_expert_answers_without_routing() {
    let server = common::real_server();
    let mut request = chat("Tell me about the Widget Mini.", 8);
    request.expert = Some("product".into());
    let r = server.chat().await.complete(request).await.unwrap().into_inner();
    let route = r.route.unwrap();
    assert!(route.forced);
    assert_eq!(route.expert, "product");
    assert!(route.scores.is_empty());
    assert_eq!(server.record(&r.request_id).await.expert.as_deref(), Some("product"));
}

#[tokio::test]
async fn bad_requests_get_their_status_and_still_leave_a_record() {
    let server = common::real_server();
    let mut client = server.chat().await;

    let err = client.complete(chat("   ", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("empty"), "{}", err.message());
    assert_eq!(server.records_with_query("   ").await[0].status, "invalid_argument");

    // Refused before the rails: logged with PII redacted, then cut to the limit.
    let long = format!("write to jane.doe@example.com {}", "x".repeat(480));
    let err = client.stream(chat(&long, 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limit is 500"), "{}", err.message());
    let logged = format!("write to <EMAIL_1> {}", "x".repeat(480));
    let rec = &server.records_with_query(&logged).await[0];
    assert_eq!(rec.status, "invalid_argument");
    assert!(rec.error.as_deref().unwrap().contains("510"));

    let mut request = chat("who handles legal contracts?", 8);
    request.expert = Some("legal".into());
    let err = client.complete(request).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("legal") && err.message().contains("hr"),
        "{}",
        err.message()
    );
    assert_eq!(
        server.records_with_query("who handles legal contracts?").await[0].status,
        "not_found"
    );

    let err = server.router().await.route(RouteRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut request = chat("what is the dress code?", 8);
    request.options.as_mut().unwrap().temperature = Some(f32::NAN);
    let err = client.complete(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("`temperature`: is NaN"), "{}", err.message());
    let mut request = chat("what is the dress code?", 0);
    request.session_id = Some("s".repeat(10_000));
    let err = client.stream(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("`session_id`: is 10000 characters long"),
        "{}",
        err.message()
    );
    let refused = server.records_with_query("what is the dress code?").await;
    assert_eq!(refused.len(), 2);
    assert!(refused.iter().all(|r| r.status == "invalid_argument"));
}

#[tokio::test]
async fn admin_lists_slots_and_status() {
    let server = common::real_server();
    let mut admin = server.admin().await;
    let models = admin.list_models(ListModelsRequest {}).await.unwrap().into_inner();
    let names: Vec<&str> = models.slots.iter().map(|s| s.slot.as_str()).collect();
    assert!(names.contains(&"router") && names.contains(&"expert/hr") && names.contains(&"expert/general"));
    assert!(
        models
            .slots
            .iter()
            .all(|s| s.backend == "mistralrs" && s.size_bytes > 50_000_000)
    );
    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.experts, ["hr", "it", "finance", "product", "general"]);
    assert!(status.uptime_seconds > 0.0);
    assert_eq!(status.max_in_flight, 64);
}

#[tokio::test]
async fn health_reports_serving_and_reflection_lists_the_api() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let server = common::real_server();
    let mut health = HealthClient::new(server.channel().await);
    for service in [
        "",
        "flywheel.v1.Chat",
        "flywheel.v1.Router",
        "flywheel.v1.Admin",
        "flywheel.v1.Feedback",
    ] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "service `{service}`");
    }

    // Both reflection versions list the API (grpcurl speaks v1, Python's
    // grpcio-reflection v1alpha).
    macro_rules! services {
        ($v:ident) => {{
            use tonic_reflection::pb::$v::ServerReflectionRequest;
            use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
            let mut reflection = ServerReflectionClient::new(server.channel().await);
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut responses = reflection
                .server_reflection_info(futures::stream::iter([request]))
                .await
                .unwrap()
                .into_inner();
            let response = responses.message().await.unwrap().unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
                panic!("no service list")
            };
            list.service.into_iter().map(|s| s.name).collect::<Vec<String>>()
        }};
    }
    for services in [services!(v1), services!(v1alpha)] {
        for name in [
            "flywheel.v1.Chat",
            "flywheel.v1.Router",
            "flywheel.v1.Admin",
            "flywheel.v1.Feedback",
            "grpc.health.v1.Health",
        ] {
            assert!(services.iter().any(|s| s == name), "{name} missing from {services:?}");
        }
    }
}

#[tokio::test]
async fn cancelling_a_stream_stops_generation_and_logs_it_as_cancelled() {
    let server = common::real_server();
    let query = "Write a very long essay about the history of office printers.";
    let mut stream = server.chat().await.stream(chat(query, 256)).await.unwrap().into_inner();
    let Event::Start(start) = stream.message().await.unwrap().unwrap().event.unwrap() else {
        panic!("start first")
    };
    let _first_delta = stream.message().await.unwrap().unwrap();
    drop(stream);

    // The history waits for the cancelled answer's record (no polling).
    let history = server
        .feedback()
        .await
        .history(FeedbackHistoryRequest {
            request_id: start.request_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.status, "cancelled");
    // The abandoned answer is an implicit feedback signal on the request.
    assert!(history.feedback.iter().any(|f| f.kind == "abandoned"), "{history:?}");
    let rec = server.record(&start.request_id).await;
    assert_eq!(rec.status, "cancelled");
    assert_eq!(rec.finish_reason.as_deref(), Some("cancelled"));
    // Far fewer tokens were produced than the 256 asked for: generation stopped.
    let produced = rec.answer.unwrap_or_default();
    assert!(
        produced.split_whitespace().count() < 100,
        "kept generating after cancel: {produced:?}"
    );
}

#[tokio::test]
async fn an_answer_can_be_rated_while_it_streams_and_its_history_waits_for_its_end() {
    // The stub engine streams one word a minute: the answer is in flight
    // for as long as the test wants.
    let server = common::start(flywheel_server::config::Config {
        engine: flywheel_server::config::EngineKind::Stub,
        stub_token_delay_ms: 60_000,
        ..Default::default()
    });
    let mut stream = server
        .chat()
        .await
        .stream(chat("an hr question", 64))
        .await
        .unwrap()
        .into_inner();
    let Event::Start(start) = stream.message().await.unwrap().unwrap().event.unwrap() else {
        panic!("start first")
    };
    let id = start.request_id;
    let mut client = server.feedback().await;
    client
        .submit(feedback(&id, Some(Rating::Thumb(Thumb::Down.into())), None))
        .await
        .unwrap();
    let asked = Instant::now();
    let err = client
        .history(FeedbackHistoryRequest { request_id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("still being answered"), "{}", err.message());
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "no wait for the answer's end"
    );
    // The user stops the answer: its record, the rating given during the
    // stream and the abandoned signal are all there at once.
    drop(stream);
    let history = client
        .history(FeedbackHistoryRequest { request_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.status, "cancelled");
    let kinds: Vec<&str> = history.feedback.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["explicit", "abandoned"], "{history:?}");
    let err = client
        .submit(feedback("never-issued", Some(Rating::Stars(3)), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

fn feedback(request_id: &str, rating: Option<Rating>, corrected: Option<&str>) -> FeedbackRequest {
    FeedbackRequest {
        request_id: request_id.into(),
        rating,
        corrected_expert: corrected.map(str::to_string),
        comment: Some("checked by a reviewer".into()),
        reviewer_id: Some("sme-7".into()),
    }
}

#[tokio::test]
async fn feedback_joins_requests_by_id_keeps_history_and_rejects_bad_input() {
    let server = common::real_server();
    let routed = server
        .router()
        .await
        .route(RouteRequest {
            query: "My expense report was rejected, who can help?".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = routed.request_id.as_str();
    let mut client = server.feedback().await;

    let missing = client
        .submit(feedback(
            "0190-no-such-request",
            Some(Rating::Thumb(Thumb::Up.into())),
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("0190-no-such-request"));
    for (bad, hint) in [
        (feedback(id, None, None), "give a rating"),
        (feedback(id, Some(Rating::Stars(9)), None), "between 1 and 5"),
        (
            feedback(id, Some(Rating::Thumb(Thumb::Unspecified.into())), None),
            "give a rating",
        ),
        (feedback(id, None, Some("legal")), "configured experts"),
    ] {
        let status = client.submit(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(hint), "{status:?}");
    }

    client
        .submit(feedback(id, Some(Rating::Thumb(Thumb::Down.into())), None))
        .await
        .unwrap();
    let last = client
        .submit(feedback(id, Some(Rating::Stars(2)), Some("finance")))
        .await
        .unwrap()
        .into_inner();
    let history = client
        .history(FeedbackHistoryRequest { request_id: id.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.query, "My expense report was rejected, who can help?");
    assert_eq!(history.routed_expert, routed.route.unwrap().expert);
    assert_eq!(history.feedback.len(), 2);
    let newest = history.feedback.last().unwrap();
    assert_eq!(newest.feedback_id, last.feedback_id);
    assert_eq!(newest.corrected_expert.as_deref(), Some("finance"));
    assert_eq!(newest.reviewer_id.as_deref(), Some("sme-7"));

    // Both live in the log file, joined by request id.
    let reader = flywheel_router::data::log::LogReader::open(&server.log_path).unwrap();
    assert_eq!(reader.feedback_for(id).unwrap().len(), 2);
}

#[tokio::test]
async fn rephrasing_in_a_session_marks_the_earlier_answer_unsatisfactory() {
    let server = common::real_server();
    let mut chat_client = server.chat().await;
    let ask = |q: &str| ChatRequest {
        session_id: Some("rephrase-session".into()),
        ..chat(q, 4)
    };
    let first = chat_client
        .complete(ask("How do I connect to the office wifi?"))
        .await
        .unwrap()
        .into_inner();
    let second = chat_client
        .complete(ask("how can I connect to the office wifi"))
        .await
        .unwrap()
        .into_inner();
    let history = server
        .feedback()
        .await
        .history(FeedbackHistoryRequest {
            request_id: first.request_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.feedback.len(), 1, "{history:?}");
    assert_eq!(history.feedback[0].kind, "rephrase");
    assert!(history.feedback[0].detail().contains(&second.request_id));
}

/// grpcio-tools pinned for the Python client test (it brings grpcio and
/// protobuf; its `grpc_tools.protoc` is the official protoc).
const GRPCIO_TOOLS: &str = "1.85.1";

fn python_grpc() -> std::path::PathBuf {
    common::python_package("grpcio-tools", GRPCIO_TOOLS, "grpc_tools")
}

fn python(args: &[&str], cwd: &std::path::Path, pythonpath: &str) -> String {
    common::python(args, cwd, pythonpath, Duration::from_secs(120))
}

/// The README's Python client, as written there: stubs generated with its
/// `grpc_tools.protoc` command from the proto file, then its example run
/// against the real server (stream an answer, route, correct the route).
#[tokio::test]
async fn the_readme_python_client_works_against_the_server() {
    let server = common::real_server();
    let root = common::workspace_root();
    let example = common::readme_python_block("import grpc");
    let protoc: Vec<&str> = example
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# python "))
        .expect("the block opens with the protoc command")
        .split_whitespace()
        .collect();
    assert!(protoc.starts_with(&["-m", "grpc_tools.protoc"]), "{protoc:?}");
    assert!(example.contains("127.0.0.1:50051"), "the example's address changed");

    let stubs = tempfile::tempdir().unwrap();
    let out_dir = stubs.path().to_str().unwrap();
    let args: Vec<String> = protoc
        .iter()
        .map(|a| match a.split_once('=') {
            Some((flag, ".")) => format!("{flag}={out_dir}"),
            _ => (*a).to_string(),
        })
        .collect();
    let grpc = python_grpc();
    let grpc_path = grpc.to_str().unwrap();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    python(&arg_refs, &root, grpc_path);

    let script = stubs.path().join("example.py");
    std::fs::write(&script, example.replace("127.0.0.1:50051", &server.addr.to_string())).unwrap();
    let stdout = python(
        &[script.to_str().unwrap()],
        stubs.path(),
        &format!("{grpc_path}:{out_dir}"),
    );

    // "[<request id>] -> <expert> (<confidence>)", the answer, "<n> tokens,
    // TTFT <t> ms", then every expert's probability.
    let lines: Vec<&str> = stdout.lines().collect();
    let (id, expert) = lines[0]
        .strip_prefix('[')
        .and_then(|l| l.split_once("] -> "))
        .unwrap_or_else(|| panic!("first line: {stdout}"));
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{stdout}");
    let expert = expert.split(" (").next().unwrap();
    assert!(server.pipeline.experts().contains(&expert.to_string()), "{stdout}");
    let tokens_line = lines
        .iter()
        .find(|l| l.contains(" tokens, TTFT "))
        .unwrap_or_else(|| panic!("no usage line: {stdout}"));
    let tokens: u32 = tokens_line.split(' ').next().unwrap().parse().unwrap();
    assert!(tokens > 0, "{stdout}");
    let scores = lines.last().unwrap();
    for e in server.pipeline.experts() {
        assert!(scores.contains(&format!("'{e}': ")), "{e} missing: {stdout}");
    }

    // The streamed request and the correction reached the log.
    assert_eq!(server.record(id).await.kind, "stream");
    let routed = server.records_with_query("reset my password").await;
    assert_eq!(routed.len(), 1, "{routed:?}");
    let history = server
        .feedback()
        .await
        .history(FeedbackHistoryRequest {
            request_id: routed[0].request_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.feedback.len(), 1, "{history:?}");
    let entry = &history.feedback[0];
    assert_eq!(entry.corrected_expert.as_deref(), Some("it"));
    assert_eq!(entry.reviewer_id.as_deref(), Some("sme-7"));
    assert_eq!(
        entry.rating,
        Some(flywheel_proto::v1::feedback_entry::Rating::Thumb(Thumb::Down.into()))
    );
}
