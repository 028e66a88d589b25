//! A/B splits through a real client on the stub engine: sticky assignment
//! per session and user, per-arm reports joined with feedback, validation.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};

use flywheel_proto::v1 as pb;
use flywheel_router::models::store::ModelStore;
use tonic::Code;

const TOKEN: &str = "split-test-admin-token-77";

fn setup() -> (common::TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path().join("registry")).unwrap();
    for v in ["a", "b"] {
        common::register_stub(&store, dir.path(), v, &[]);
    }
    (common::start(common::stub_config(store.root(), Some(TOKEN))), dir)
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    common::authorized(message, TOKEN)
}

fn split(slot: &str, weights: &[(&str, f64)]) -> tonic::Request<pb::SetSplitRequest> {
    authorized(pb::SetSplitRequest {
        slot: slot.into(),
        weights: weights.iter().map(|(v, w)| (v.to_string(), *w)).collect(),
    })
}

#[tokio::test]
async fn sessions_stick_to_one_version_and_the_report_compares_arms() {
    let (server, _dir) = setup();
    let mut admin = server.admin().await;
    admin
        .set_split(split("expert/hr", &[("a", 0.5), ("b", 0.5)]))
        .await
        .unwrap();
    let mut chat = server.chat().await;
    let mut feedback = server.feedback().await;
    let mut by_session: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in 0..16 {
        for i in 0..4 {
            let r = chat
                .complete(pb::ChatRequest {
                    query: format!("leave question {i}"),
                    session_id: Some(format!("session-{s}")),
                    expert: Some("hr".into()),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            by_session
                .entry(format!("session-{s}"))
                .or_default()
                .insert(r.expert_model_version.clone());
            // Users like version a and dislike version b.
            let thumb = if r.expert_model_version == "a" {
                pb::Thumb::Up
            } else {
                pb::Thumb::Down
            };
            feedback
                .submit(pb::FeedbackRequest {
                    request_id: r.request_id,
                    rating: Some(pb::feedback_request::Rating::Thumb(thumb as i32)),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    assert!(
        by_session.values().all(|v| v.len() == 1),
        "a session saw two versions: {by_session:?}"
    );
    let served: BTreeSet<String> = by_session.values().flatten().cloned().collect();
    assert_eq!(served, BTreeSet::from(["a".to_string(), "b".to_string()]));

    let report = admin
        .split_report(pb::SplitSlotRequest {
            slot: "expert/hr".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let arm = |v: &str| report.arms.iter().find(|a| a.version == v).unwrap().clone();
    assert_eq!(arm("a").requests + arm("b").requests, 64);
    assert_eq!(arm("a").positive_rate, Some(1.0));
    assert_eq!(arm("b").positive_rate, Some(0.0));
    assert!(arm("a").ci_low.unwrap() > arm("b").ci_high.unwrap());
    assert_eq!(report.recommendation.as_deref(), Some("a"));
    assert!(report.p_value.unwrap() < 0.05);

    // The router slot splits by user id when there is no session.
    admin
        .set_split(split("router", &[("a", 0.7), ("b", 0.3)]))
        .await
        .unwrap();
    let mut router = server.router().await;
    for u in 0..8 {
        let versions: BTreeSet<String> = futures_versions(&mut router, &format!("user-{u}")).await;
        assert_eq!(versions.len(), 1, "user-{u} saw {versions:?}");
    }
    let cleared = admin
        .clear_split(authorized(pb::SplitSlotRequest { slot: "router".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.arms.iter().map(|a| a.requests).sum::<u64>(), 24);
}

async fn futures_versions(
    router: &mut pb::router_client::RouterClient<tonic::transport::Channel>,
    user: &str,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for q in ["laptop it issue", "hr leave", "finance invoice"] {
        let r = router
            .route(pb::RouteRequest {
                query: q.into(),
                user_id: Some(user.into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.insert(r.route.unwrap().router_model_version);
    }
    out
}

#[tokio::test]
async fn split_settings_are_validated() {
    let (server, _dir) = setup();
    let mut admin = server.admin().await;
    for bad in [
        &[("a", 0.5), ("b", 0.4)][..],
        &[("a", 1.0)][..],
        &[("a", 1.5), ("b", -0.5)][..],
    ] {
        let err = admin.set_split(split("router", bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
    }
    let err = admin
        .set_split(split("router", &[("a", 0.5), ("zz", 0.5)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let plain = pb::SetSplitRequest {
        slot: "router".into(),
        weights: [("a".to_string(), 0.5), ("b".to_string(), 0.5)].into_iter().collect(),
    };
    assert_eq!(admin.set_split(plain).await.unwrap_err().code(), Code::Unauthenticated);
    let err = admin
        .split_report(pb::SplitSlotRequest { slot: "router".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}
