//! Several server replicas sharing one PostgreSQL request log (the stub
//! engine, real servers on `127.0.0.1:0`, real gRPC clients): traffic on
//! every replica lands in one store, and feedback works on any replica for
//! a request any other served. Needs the tests' PostgreSQL server
//! (`FLYWHEEL_TEST_POSTGRES_URL`, started by `.ci/run`).

use crate::common;

use flywheel_proto::v1::feedback_request::Rating;
use flywheel_proto::v1::{FeedbackHistoryRequest, FeedbackRequest, RouteRequest, StatusRequest, Thumb};
use flywheel_router::data::log::{LogLocation, LogReader};
use flywheel_server::Config;
use flywheel_server::config::EngineKind;
use tonic::Code;

const TOKEN: &str = "replica-admin";

fn replica(store_url: &str, name: &str) -> common::TestServer {
    let mut config = Config {
        engine: EngineKind::Stub,
        admin_token: Some(TOKEN.into()),
        replica_id: name.into(),
        ..Config::default()
    };
    config.settings.log.store_url = Some(store_url.to_string());
    common::start(config)
}

async fn route(server: &common::TestServer, query: &str) -> String {
    server
        .router()
        .await
        .route(RouteRequest {
            query: query.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .request_id
}

fn thumb_down_to(request_id: &str, expert: &str) -> FeedbackRequest {
    FeedbackRequest {
        request_id: request_id.into(),
        rating: Some(Rating::Thumb(Thumb::Down.into())),
        corrected_expert: Some(expert.into()),
        comment: None,
        reviewer_id: None,
    }
}

#[tokio::test]
async fn replicas_on_one_postgres_log_share_traffic_and_take_feedback_for_each_other() {
    let Some(url) = flywheel_router::testing::postgres_database() else {
        return;
    };
    let replicas: Vec<_> = ["a", "b", "c"].map(|name| replica(&url, name)).into_iter().collect();
    let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);

    // Traffic on every replica.
    let mut served = Vec::new();
    for i in 0..30 {
        let server = &replicas[i % 3];
        served.push((i % 3, route(server, &format!("question {i} about my payslip")).await));
    }

    // Feedback on C for a request A has just answered: A may not have
    // committed its record yet, and C still finds it.
    let from_a = route(a, "who approves my travel expenses?").await;
    let stored = c
        .feedback()
        .await
        .submit(thumb_down_to(&from_a, "finance"))
        .await
        .unwrap()
        .into_inner();
    // B reads the request and that feedback back.
    let history = b
        .feedback()
        .await
        .history(FeedbackHistoryRequest {
            request_id: from_a.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.query, "who approves my travel expenses?");
    assert_eq!(history.feedback.len(), 1);
    assert_eq!(history.feedback[0].feedback_id, stored.feedback_id);
    assert_eq!(history.feedback[0].corrected_expert.as_deref(), Some("finance"));
    // A request no replica served is still unknown, on every replica.
    for server in &replicas {
        let err = server
            .feedback()
            .await
            .submit(thumb_down_to("0190-served-by-nobody", "finance"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }

    // One store holds every replica's records and the feedback.
    for server in &replicas {
        server.pipeline.log().flush().await.unwrap();
    }
    let reader = LogReader::open(LogLocation::Postgres(url.clone())).unwrap();
    assert_eq!(reader.count().unwrap(), 31);
    for (by, id) in &served {
        let record = reader
            .get(id)
            .unwrap()
            .unwrap_or_else(|| panic!("{id} is missing from the shared log"));
        // Each record names the replica that served it.
        assert_eq!(record.replica.as_deref(), Some(["a", "b", "c"][*by]));
    }
    assert_eq!(reader.feedback_for(&from_a).unwrap().len(), 1);

    // Status names the store, never its password; without the admin token
    // only host and database.
    let database = url.rsplit('/').next().unwrap();
    let open = b.admin().await.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(open.log_path.ends_with(database), "{}", open.log_path);
    assert!(!open.log_path.contains("postgres@"), "{}", open.log_path);
    let full = b
        .admin()
        .await
        .status(common::authorized(StatusRequest {}, TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert!(full.log_path.starts_with("postgres://"), "{}", full.log_path);
    // Each replica says who it is.
    for (server, name) in replicas.iter().zip(["a", "b", "c"]) {
        let status = server
            .admin()
            .await
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.replica, name);
    }
}
