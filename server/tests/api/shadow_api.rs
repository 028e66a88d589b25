//! Shadow traffic through a real client on the stub engine: the configured
//! fraction is mirrored on every request path, a failing or hanging
//! candidate never changes or delays live answers, settings are validated,
//! and the report joins feedback labels.

use crate::common;

use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use flywheel_proto::v1 as pb;
use flywheel_router::models::store::ModelStore;
use tonic::Code;

const TOKEN: &str = "shadow-test-admin-token-42";

struct Setup {
    server: common::TestServer,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path().join("registry")).unwrap();
    // Router warm-up scores twice (label prior, then a probe): faults start after.
    for (v, fault) in [("cand", None), ("failing", Some("fail:2")), ("hanging", Some("hang:2"))] {
        let extra: Vec<(&str, gguf_file::Value)> = fault
            .map(|f| {
                (
                    flywheel_router::engine::stub::STUB_FAULT_KEY,
                    gguf_file::Value::String(f.into()),
                )
            })
            .into_iter()
            .collect();
        common::register_stub(&store, dir.path(), v, &extra);
    }
    Setup {
        server: common::start(common::stub_config(store.root(), Some(TOKEN))),
        _dir: dir,
    }
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    common::authorized(message, TOKEN)
}

fn set(slot: &str, version: &str, fraction: f64, max_concurrency: u32) -> tonic::Request<pb::SetShadowRequest> {
    authorized(pb::SetShadowRequest {
        slot: slot.into(),
        version: version.into(),
        fraction,
        max_concurrency,
    })
}

/// The router shadow's report once `done` holds: shadow runs are detached and
/// log when they finish, so poll (up to 5 s) rather than sleep.
async fn settled(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    done: impl Fn(&pb::ShadowReport) -> bool,
) -> pb::ShadowReport {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = admin
            .shadow_report(pb::ShadowSlotRequest { slot: "router".into() })
            .await
            .unwrap()
            .into_inner();
        if done(&r) || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const QUERIES: [&str; 4] = [
    "my laptop it is broken",
    "hr question about leave",
    "finance: expense report",
    "product specs please",
];

#[tokio::test]
async fn the_fraction_is_mirrored_on_every_request_path() {
    let s = setup();
    let server = &s.server;
    let mut admin = server.admin().await;
    admin.set_shadow(set("router", "cand", 0.5, 64)).await.unwrap();
    let (mut router, mut chat) = (server.router().await, server.chat().await);
    let n = 80;
    for i in 0..n {
        let q = QUERIES[i % QUERIES.len()].to_string();
        router
            .route(pb::RouteRequest {
                query: q.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        chat.complete(pb::ChatRequest {
            query: q.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut stream = chat
            .stream(pb::ChatRequest {
                query: q,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while stream.message().await.unwrap().is_some() {}
    }
    // Forced routes make no live decision: never mirrored.
    chat.complete(pb::ChatRequest {
        query: "x".into(),
        expert: Some("hr".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let report = settled(&mut admin, |r| r.logged == r.mirrored).await;
    assert_eq!(report.skipped, 0);
    assert_eq!(report.mirrored, report.logged);
    assert_eq!(report.agreement, Some(1.0), "the same stub decides the same");
    let reader = server.pipeline.log().reader().unwrap();
    let mut per_kind = std::collections::BTreeMap::<String, usize>::new();
    for r in reader.shadow_records("router").unwrap() {
        let kind = reader.get(&r.request_id).unwrap().unwrap().kind;
        *per_kind.entry(kind).or_default() += 1;
        assert_eq!(r.version, "cand");
    }
    for kind in ["route", "complete", "stream"] {
        let share = per_kind.get(kind).copied().unwrap_or(0) as f64 / n as f64;
        // Binomial(80, 0.5): 4 standard deviations is +-0.22.
        assert!((share - 0.5).abs() < 0.22, "{kind}: {share} ({per_kind:?})");
    }
}

async fn answers(server: &common::TestServer, expert: Option<&str>) -> (Vec<String>, Duration) {
    let mut chat = server.chat().await;
    let mut out = Vec::new();
    let mut slowest = Duration::ZERO;
    for q in QUERIES.iter().cycle().take(12) {
        let t = Instant::now();
        let r = chat
            .complete(pb::ChatRequest {
                query: (*q).into(),
                expert: expert.map(str::to_string),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        slowest = slowest.max(t.elapsed());
        out.push(format!("{} {}", r.route.unwrap().expert, r.answer));
    }
    (out, slowest)
}

#[tokio::test]
async fn a_failing_or_hanging_candidate_leaves_live_answers_identical_and_on_time() {
    let s = setup();
    let server = &s.server;
    let mut admin = server.admin().await;
    let (baseline, _) = answers(server, None).await;

    admin.set_shadow(set("router", "hanging", 1.0, 1)).await.unwrap();
    let (with_hang, slowest) = answers(server, None).await;
    assert_eq!(with_hang, baseline);
    assert!(
        slowest < Duration::from_secs(1),
        "live waited for the shadow: {slowest:?}"
    );
    let r = admin
        .shadow_report(pb::ShadowSlotRequest { slot: "router".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.mirrored, 1, "the hung run holds the only permit");
    assert_eq!(r.skipped, 11, "later samples are skipped, not queued");

    admin.set_shadow(set("router", "failing", 1.0, 4)).await.unwrap();
    let (with_failure, _) = answers(server, None).await;
    assert_eq!(with_failure, baseline);
    let r = settled(&mut admin, |r| r.failed == r.mirrored && r.mirrored > 0).await;
    assert_eq!(r.failed, r.mirrored);
    assert!(r.mirrored >= 10, "{r:?}");
    let rows = server
        .pipeline
        .log()
        .reader()
        .unwrap()
        .shadow_records("router")
        .unwrap();
    assert!(
        rows.iter()
            .filter(|x| x.version == "failing")
            .all(|x| x.output.is_none() && x.error.is_some())
    );

    // An expert slot's candidate generates whole answers; hung, it changes nothing either.
    let (forced_baseline, _) = answers(server, Some("hr")).await;
    admin.set_shadow(set("expert/hr", "hanging", 1.0, 1)).await.unwrap();
    let (forced, slowest) = answers(server, Some("hr")).await;
    assert_eq!(forced, forced_baseline);
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    let cleared = admin
        .clear_shadow(authorized(pb::ShadowSlotRequest {
            slot: "expert/hr".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    // An expert warm-up does not generate, so the candidate's first two
    // answers complete; the third hangs and holds the only permit.
    assert_eq!((cleared.mirrored, cleared.skipped), (3, 9));
}

#[tokio::test]
async fn shadow_settings_are_validated_and_feedback_labels_score_both_models() {
    let s = setup();
    let server = &s.server;
    let mut admin = server.admin().await;
    for bad in [0.0, -0.1, 1.5, f64::NAN] {
        let err = admin.set_shadow(set("router", "cand", bad, 1)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
    }
    assert_eq!(
        admin
            .set_shadow(set("router", "nope", 0.5, 1))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        admin
            .set_shadow(set("expert/x", "cand", 0.5, 1))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let plain = pb::SetShadowRequest {
        slot: "router".into(),
        version: "cand".into(),
        fraction: 1.0,
        max_concurrency: 1,
    };
    assert_eq!(admin.set_shadow(plain).await.unwrap_err().code(), Code::Unauthenticated);
    let err = admin
        .shadow_report(pb::ShadowSlotRequest { slot: "router".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    admin.set_shadow(set("router", "cand", 1.0, 8)).await.unwrap();
    let mut router = server.router().await;
    let mut feedback = server.feedback().await;
    for q in ["my laptop it is broken", "hr question about leave"] {
        let r = router
            .route(pb::RouteRequest {
                query: q.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        feedback
            .submit(pb::FeedbackRequest {
                request_id: r.request_id,
                corrected_expert: Some("it".into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let r = settled(&mut admin, |r| r.logged == r.mirrored).await;
    assert_eq!(r.labelled, 2);
    assert_eq!(
        r.live_accuracy,
        Some(0.5),
        "the stub routes the laptop query to it, the leave query to hr"
    );
    assert_eq!(r.shadow_accuracy, Some(0.5));
    assert!(r.shadow_p99_ms.is_some() && r.live_p99_ms.is_some());
}
