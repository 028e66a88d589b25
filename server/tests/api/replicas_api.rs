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

const SLOT: &str = "expert/hr";
/// How soon a change sent to one replica must be served by all of them.
const REACH: std::time::Duration = std::time::Duration::from_secs(2);

/// A replica promoting from the shared `registry`, its stub signing every
/// word with the version that produced it.
fn replica_of(store_url: &str, registry: &std::path::Path, name: &str) -> common::TestServer {
    let mut config = Config {
        engine: EngineKind::Stub,
        stub_sign_tokens: true,
        registry_dir: Some(registry.to_path_buf()),
        admin_token: Some(TOKEN.into()),
        replica_id: name.into(),
        ..Config::default()
    };
    config.settings.log.store_url = Some(store_url.to_string());
    common::start(config)
}

/// Wait (up to [`REACH`]) until `holds` is true on every one of `servers`;
/// returns how long it took.
async fn on_every<F, Fut>(servers: &[&'static common::TestServer], what: &str, holds: F) -> std::time::Duration
where
    F: Fn(&'static common::TestServer) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    loop {
        let mut all = true;
        for s in servers {
            all &= holds(s).await;
        }
        if all {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < REACH,
            "{what} did not reach every replica within {REACH:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn serves(server: &common::TestServer, version: &str) -> bool {
    common::model_slot(server, SLOT).await.version == version
}

async fn has_shadow(server: &common::TestServer, version: Option<&str>) -> bool {
    let slot = common::model_slot(server, SLOT).await;
    slot.shadow_version == version.unwrap_or_default()
}

async fn has_split(server: &common::TestServer, on: bool) -> bool {
    let slot = common::model_slot(server, SLOT).await;
    slot.split_versions.is_empty() != on
}

#[tokio::test]
async fn a_change_sent_to_any_replica_reaches_all_of_them_and_a_restarted_one() {
    use flywheel_proto::v1 as pb;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let Some(url) = flywheel_router::testing::postgres_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = flywheel_router::models::store::ModelStore::open(dir.path().join("registry")).unwrap();
    for v in ["v2", "v3", "v4"] {
        common::register_stub(&store, dir.path(), v, &[]);
    }
    let replicas: Vec<&'static common::TestServer> = ["a", "b", "c"]
        .map(|name| &*Box::leak(Box::new(replica_of(&url, store.root(), name))))
        .into_iter()
        .collect();
    let (a, b, c) = (replicas[0], replicas[1], replicas[2]);
    let configured = common::model_slot(a, SLOT).await.version;

    // Traffic on all three for the whole test; not one request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for server in &replicas {
        let (stop, answered, failed) = (stop.clone(), answered.clone(), failed.clone());
        let mut chat = server.chat().await;
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let request = pb::ChatRequest {
                    query: "How many vacation days do I get?".into(),
                    expert: Some("hr".into()),
                    ..Default::default()
                };
                match chat.complete(request).await {
                    Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("failed: {e:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

    // A promotion sent to B.
    b.admin()
        .await
        .promote(common::authorized(
            pb::PromoteRequest {
                slot: SLOT.into(),
                version: "v2".into(),
            },
            TOKEN,
        ))
        .await
        .unwrap();
    let took = on_every(&replicas, "the promotion", |s| serves(s, "v2")).await;
    eprintln!("promotion reached every replica in {took:?}");
    // New answers everywhere come from v2.
    for server in &replicas {
        let answer = server
            .chat()
            .await
            .complete(pb::ChatRequest {
                query: "How many vacation days do I get?".into(),
                expert: Some("hr".into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .answer;
        assert!(answer.contains("@v2"), "{answer}");
    }

    // A rollback sent to C.
    c.admin()
        .await
        .rollback(common::authorized(pb::RollbackRequest { slot: SLOT.into() }, TOKEN))
        .await
        .unwrap();
    let took = on_every(&replicas, "the rollback", |s| serves(s, &configured)).await;
    eprintln!("rollback reached every replica in {took:?}");

    // A shadow set on A mirrors on all three, and A's report counts their runs.
    a.admin()
        .await
        .set_shadow(common::authorized(
            pb::SetShadowRequest {
                slot: SLOT.into(),
                version: "v3".into(),
                fraction: 1.0,
                max_concurrency: 64,
            },
            TOKEN,
        ))
        .await
        .unwrap();
    on_every(&replicas, "the shadow", |s| has_shadow(s, Some("v3"))).await;
    // An A/B split set on C, likewise.
    let mut weights = std::collections::HashMap::new();
    weights.insert("v2".to_string(), 0.5);
    weights.insert("v4".to_string(), 0.5);
    c.admin()
        .await
        .set_split(common::authorized(
            pb::SetSplitRequest {
                slot: SLOT.into(),
                weights,
            },
            TOKEN,
        ))
        .await
        .unwrap();
    on_every(&replicas, "the split", |s| has_split(s, true)).await;
    assert_eq!(common::model_slot(a, SLOT).await.split_versions.len(), 2);

    // A replica started now serves what the others serve, shadow and split included.
    let d: &'static common::TestServer = Box::leak(Box::new(replica_of(&url, store.root(), "d")));
    assert!(serves(d, &configured).await);
    assert!(has_shadow(d, Some("v3")).await);
    assert!(has_split(d, true).await);

    let before = answered.load(Ordering::Relaxed);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while answered.load(Ordering::Relaxed) < before + 60 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert!(answered.load(Ordering::Relaxed) > 100);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during the changes");

    // Shadow runs are detached: wait until the last ones are in the log.
    let reader = LogReader::open(LogLocation::Postgres(url.clone())).unwrap();
    let mut runs = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        for server in &replicas {
            server.pipeline.log().flush().await.unwrap();
        }
        let now = reader.shadow_records(SLOT).unwrap();
        if !now.is_empty() && now.len() == runs.len() {
            break;
        }
        runs = now;
        assert!(std::time::Instant::now() < deadline, "shadow runs never settled");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let mut by_replica = std::collections::BTreeMap::<String, usize>::new();
    for run in &runs {
        let record = reader
            .get(&run.request_id)
            .unwrap()
            .expect("the mirrored request's record");
        *by_replica.entry(record.replica.unwrap_or_default()).or_default() += 1;
    }
    assert!(
        ["a", "b", "c"].iter().all(|r| by_replica.contains_key(*r)),
        "shadow runs came from {by_replica:?}"
    );
    // A's report counts the runs of all of them.
    let report = a
        .admin()
        .await
        .shadow_report(common::authorized(pb::ShadowSlotRequest { slot: SLOT.into() }, TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.logged as usize, runs.len(), "{report:?}");

    // Clearing on B clears everywhere.
    b.admin()
        .await
        .clear_shadow(common::authorized(pb::ShadowSlotRequest { slot: SLOT.into() }, TOKEN))
        .await
        .unwrap();
    a.admin()
        .await
        .clear_split(common::authorized(pb::SplitSlotRequest { slot: SLOT.into() }, TOKEN))
        .await
        .unwrap();
    let all = [a, b, c, d];
    on_every(&all, "clearing the shadow", |s| has_shadow(s, None)).await;
    on_every(&all, "clearing the split", |s| has_split(s, false)).await;
    // Every replica has followed every change: promote, rollback, shadow,
    // split, clear, clear.
    let latest = common::model_slot(a, SLOT).await.state_revision;
    assert_eq!(latest, 6);
    on_every(&all, "the latest revision", |s| async move {
        common::model_slot(s, SLOT).await.state_revision == latest
    })
    .await;
}
