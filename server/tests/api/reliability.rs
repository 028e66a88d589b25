//! Reliability through the real server and real clients: connections that
//! never speak cost the others nothing, and a request log that cannot write
//! (full disk) fails visibly, never silently. Clients that stop reading or
//! cancel at once are in the `latency` test binary: those tests compare
//! latencies and need the CPU to themselves.

use crate::common;

use std::time::{Duration, Instant};

use flywheel_proto::v1::ChatRequest;
use flywheel_server::Config;
use tonic::Code;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_at_the_handshake_timeout_and_the_limit_holds() {
    use tokio::io::AsyncReadExt;
    let server = common::start(Config {
        engine: flywheel_server::config::EngineKind::Stub,
        max_connections: 2,
        handshake_timeout_ms: 400,
        ..Config::default()
    });
    // Two connections that never send the HTTP/2 preface fill the limit.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // A real client waits in the backlog until the silent ones are cut (the
    // kernel hands connections to accept in the order they were made).
    let started = Instant::now();
    let mut router = flywheel_proto::v1::router_client::RouterClient::new(server.channel().await);
    let routed = router
        .route(flywheel_proto::v1::RouteRequest {
            query: "an hr question".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(routed.into_inner().route.unwrap().expert, "hr");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "served after {waited:?}: the limit or the timeout did not hold"
    );
    // The silent connections were closed by the server (after its SETTINGS frame).
    for mut conn in silent {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
            "a silent connection stayed open"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_refuses_feedback_visibly_turns_health_off_and_recovers() {
    use flywheel_proto::v1::{FeedbackRequest, RouteRequest, StatusRequest, Thumb, feedback_request};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    const TOKEN: &str = "reliability-admin-token";
    let mut config = Config {
        engine: flywheel_server::config::EngineKind::Stub,
        admin_token: Some(TOKEN.into()),
        ..Config::default()
    };
    // A log capped at 1 MiB fills as a full disk does ("database or disk is full").
    config.settings.log.max_size_mb = 1;
    config.settings.log.unhealthy_after_ms = 300;
    config.settings.rails.jailbreak.enabled = false;
    let (server, metrics) = common::start_with_metrics(config);
    let mut router = server.router().await;
    let mut feedback = server.feedback().await;
    let mut admin = server.admin().await;
    let mut health = HealthClient::new(server.channel().await);
    let serving = |h: &mut HealthClient<tonic::transport::Channel>| {
        let mut h = h.clone();
        async move {
            h.check(HealthCheckRequest { service: String::new() })
                .await
                .unwrap()
                .into_inner()
                .status()
        }
    };
    let route = |r: &mut flywheel_proto::v1::router_client::RouterClient<Channel>, i: usize| {
        let mut r = r.clone();
        async move {
            r.route(RouteRequest {
                query: format!("an hr question {i} {}", "padding ".repeat(450)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .request_id
        }
    };
    let thumb = |id: &str| FeedbackRequest {
        request_id: id.into(),
        rating: Some(feedback_request::Rating::Thumb(Thumb::Up.into())),
        ..Default::default()
    };
    let first = route(&mut router, 0).await;
    feedback.submit(thumb(&first)).await.unwrap();
    assert_eq!(serving(&mut health).await, ServingStatus::Serving);

    // Fill the log until its writes fail.
    let mut i = 1;
    let status = loop {
        for _ in 0..50 {
            route(&mut router, i).await;
            i += 1;
        }
        server.pipeline.log().flush().await.unwrap();
        let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
        if !status.log_write_error.is_empty() {
            break status;
        }
        assert!(i < 5_000, "the log never filled: {status:?}");
    };
    assert!(status.log_write_error.contains("full"), "{}", status.log_write_error);
    assert!(status.log_records_failed > 0);

    // Feedback is acknowledged only once stored: small rows still fit in
    // the pages' free space for a while, then UNAVAILABLE says why.
    let mut acknowledged = 0;
    let refused = loop {
        match feedback.submit(thumb(&first)).await {
            Ok(_) => acknowledged += 1,
            Err(e) => break e,
        }
        assert!(acknowledged < 5_000, "feedback never stopped fitting");
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("disk is full"), "{}", refused.message());
    // A request answered now is not recorded; feedback on it is refused as
    // unavailable, not as an unknown request.
    let lost = route(&mut router, i).await;
    server.pipeline.log().flush().await.unwrap();
    let err = feedback.submit(thumb(&lost)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(status.log_feedback_failed >= 1, "{status:?}");
    let text = common::http(metrics, "GET", "/metrics", &[], "").await.1;
    assert!(text.contains("flywheel_request_log_write_failing 1"), "{text}");
    // Failing past log.unhealthy_after_ms: health says NOT_SERVING.
    let started = Instant::now();
    while serving(&mut health).await != ServingStatus::NotServing {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "health never turned NOT_SERVING"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An operator prunes the log: the next commit succeeds and all is well.
    let pruned = rusqlite::Connection::open(&server.log_path).unwrap();
    pruned.busy_timeout(Duration::from_secs(5)).unwrap();
    pruned
        .execute("DELETE FROM requests WHERE request_id <> ?1", [&first])
        .unwrap();
    drop(pruned);
    let after = route(&mut router, i + 1).await;
    server.pipeline.log().flush().await.unwrap();
    let started = Instant::now();
    while serving(&mut health).await != ServingStatus::Serving {
        assert!(started.elapsed() < Duration::from_secs(5), "health never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        admin
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .log_write_error
            .is_empty()
    );
    feedback.submit(thumb(&after)).await.unwrap();
    // Every acknowledged row is there: the first, and those that fitted.
    let history = feedback
        .history(flywheel_proto::v1::FeedbackHistoryRequest {
            request_id: first.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let explicit = history.feedback.iter().filter(|f| f.kind == "explicit").count();
    assert_eq!(
        explicit,
        1 + acknowledged,
        "{acknowledged} acknowledged after the log filled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_table_keeps_raw_pii_from_requests_feedback_or_errors() {
    use flywheel_proto::v1::{FeedbackRequest, RouteRequest, Thumb, feedback_request};
    const EMAIL: &str = "jane.doe@example.com";
    const PHONE: &str = "+1 415 555 0100";
    const CARD: &str = "4111 1111 1111 1111";
    const IBAN: &str = "DE89 3704 0044 0532 0130 00";
    const IP: &str = "192.168.13.37";
    let mut config = Config {
        engine: flywheel_server::config::EngineKind::Stub,
        ..Config::default()
    };
    config.settings.limits.max_query_chars = 100;
    let server = common::start(config);
    let mut router = server.router().await;
    let mut chat = server.chat().await;
    // PII in the query and as the session and user ids.
    let routed = router
        .route(RouteRequest {
            query: format!("hr: mail {EMAIL} or call {PHONE}"),
            session_id: Some(EMAIL.into()),
            user_id: Some(PHONE.into()),
        })
        .await
        .unwrap()
        .into_inner();
    // An error that echoes input: an unknown forced expert.
    let err = chat
        .complete(ChatRequest {
            query: "a question".into(),
            expert: Some(format!("card {CARD}")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // An over-long query with an IBAN straddling the limit.
    let long = format!("{} {IBAN} end", "x".repeat(90));
    let err = chat.complete(chat_plain(&long)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A query the limits rail refuses, and an answer that repeats PII.
    let err = chat.complete(chat_plain(&format!("ring {IP}\u{7}"))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    chat.complete(chat_plain(&format!("echo: your card {CARD} is on file")))
        .await
        .unwrap();
    // Feedback whose comment and reviewer id hold PII.
    server
        .feedback()
        .await
        .submit(FeedbackRequest {
            request_id: routed.request_id.clone(),
            rating: Some(feedback_request::Rating::Thumb(Thumb::Down.into())),
            comment: Some(format!("wrong: my IBAN is {IBAN}, my box is {IP}")),
            reviewer_id: Some(EMAIL.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    server.pipeline.log().flush().await.unwrap();

    // Every text value of every table.
    let db = rusqlite::Connection::open(&server.log_path).unwrap();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut values = Vec::new();
    for table in &tables {
        let mut stmt = db.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let columns = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for c in 0..columns {
                if let Ok(Some(text)) = row.get::<_, Option<String>>(c) {
                    values.push(text);
                }
            }
        }
    }
    assert!(values.len() > 20, "{values:?}");
    for raw in [EMAIL, "415 555", "4111 1111", "0532 0130", "DE89", IP, "192.168"] {
        let leaked: Vec<&String> = values.iter().filter(|v| v.contains(raw)).collect();
        assert!(leaked.is_empty(), "{raw} stored: {leaked:?}");
    }
    // Redacted, not dropped: the placeholders are there.
    for placeholder in ["<EMAIL_1>", "<CREDIT_CARD_1>", "<IBAN_1>", "<IP_ADDRESS_1>"] {
        assert!(values.iter().any(|v| v.contains(placeholder)), "{placeholder} missing");
    }
}

fn chat_plain(query: &str) -> ChatRequest {
    ChatRequest {
        query: query.into(),
        ..Default::default()
    }
}
