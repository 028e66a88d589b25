//! Classifier routers through a real client: `Router.Route` decides
//! with the classifier (out-of-scope queries take the fallback expert),
//! `Admin.ListModels` names the kind, the log records the version, and the
//! router slot swaps between a label-scoring model and either classifier
//! kind under load with no failed request. Answers come from the stub
//! engine; the encoder classifier runs on the real all-MiniLM-L6-v2, the
//! decoder classifier on the real SmolLM2-135M.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use flywheel_proto::v1 as pb;
use flywheel_router::engine::ModelKind;
use flywheel_router::models::store::ModelStore;
use flywheel_server::config::EngineKind;
use flywheel_server::{Config, testing};
use tonic::Code;

const TOKEN: &str = "test-admin-token-0123456789";

/// Examples for the default experts.
const EXPERTS: [(&str, &[&str]); 5] = [
    (
        "hr",
        &[
            "how many vacation days do I get",
            "parental leave policy",
            "update my payroll tax form",
        ],
    ),
    (
        "it",
        &[
            "my laptop will not boot",
            "reset my VPN password",
            "the printer is offline",
        ],
    ),
    (
        "finance",
        &[
            "submit an expense report",
            "when are invoices paid",
            "corporate card limit",
        ],
    ),
    (
        "product",
        &[
            "what does the pro plan include",
            "feature roadmap for the app",
            "pricing of the enterprise tier",
        ],
    ),
    (
        "general",
        &[
            "where is the cafeteria",
            "office opening hours",
            "who do I ask about parking",
        ],
    ),
];

fn classifier(dir: &Path, labels: &[(&str, &[&str])]) {
    flywheel_router::testing::prototype_classifier(dir, &testing::embedder_dir(), labels, Some(0.3));
}

struct Setup {
    server: testing::TestServer,
    _dir: tempfile::TempDir,
}

/// A stub-engine server whose router slot serves an encoder classifier;
/// the registry also holds a label-scoring router, a decoder classifier,
/// and a classifier of each kind for other labels.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let enc = dir.path().join("enc");
    classifier(&enc, &EXPERTS);
    let store = ModelStore::open(dir.path().join("registry")).unwrap();
    store.add("enc-1", &enc, None).unwrap();
    let other = dir.path().join("other");
    classifier(&other, &[("alpha", &["first"]), ("beta", &["second"])]);
    store.add("enc-other", &other, None).unwrap();
    common::register_stub(&store, dir.path(), "scoring-1", &[]);
    let dec = dir.path().join("dec.gguf");
    flywheel_router::testing::prototype_decoder_classifier(
        &dec,
        &flywheel_router::testing::test_model(),
        &EXPERTS,
        Some(0.3),
    );
    store.add("dec-1", &dec, None).unwrap();
    let dec_other = dir.path().join("dec-other.gguf");
    flywheel_router::testing::prototype_decoder_classifier(
        &dec_other,
        &flywheel_router::testing::test_model(),
        &[("alpha", &["first"]), ("beta", &["second"])],
        None,
    );
    store.add("dec-other", &dec_other, None).unwrap();
    let mut config = Config {
        engine: EngineKind::Stub,
        stub_token_delay_ms: 1,
        registry_dir: Some(store.root().to_path_buf()),
        admin_token: Some(TOKEN.into()),
        ..Config::default()
    };
    let router_model = config.settings.router.model.clone();
    let mut spec = config.settings.models[&router_model].clone();
    spec.path = store.model_path("enc-1").unwrap();
    spec.version = Some("enc-1".into());
    config.settings.models.insert("router-classifier".into(), spec);
    config.settings.router.model = "router-classifier".into();
    Setup {
        server: common::start(config),
        _dir: dir,
    }
}

async fn route(server: &testing::TestServer, query: &str) -> Result<pb::RouteDecision, tonic::Status> {
    let r = server
        .router()
        .await
        .route(pb::RouteRequest {
            query: query.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.route.unwrap())
}

async fn router_slot(server: &testing::TestServer) -> pb::ModelSlot {
    common::model_slot(server, "router").await
}

fn promote(version: &str) -> tonic::Request<pb::PromoteRequest> {
    common::authorized(
        pb::PromoteRequest {
            slot: "router".into(),
            version: version.into(),
        },
        TOKEN,
    )
}

#[tokio::test]
async fn a_classifier_routes_turns_away_out_of_scope_queries_and_is_listed_with_its_kind() {
    let s = setup();
    let server = &s.server;
    let slot = router_slot(server).await;
    assert_eq!(
        (slot.version.as_str(), slot.kind.as_str()),
        ("enc-1", "encoder-classifier")
    );
    assert_eq!(slot.backend, "candle-encoder");

    let d = route(server, "my laptop screen stays black when I turn it on")
        .await
        .unwrap();
    assert_eq!((d.expert.as_str(), d.fallback), ("it", false), "{d:?}");
    assert_eq!(d.router_model_version, "enc-1");
    assert_eq!(d.router_kind, "encoder-classifier");
    assert_eq!(d.scores.len(), 5);
    let d = route(server, "how many days of leave do parents get").await.unwrap();
    assert_eq!(d.expert, "hr", "{d:?}");

    // Nothing like the training data: the fallback expert answers.
    let d = route(server, "recite a sonnet about the ocean at night").await.unwrap();
    assert!(d.fallback, "{d:?}");
    assert_eq!(d.expert, "general");
}

#[tokio::test]
async fn the_router_slot_swaps_between_kinds_under_load_and_refuses_other_labels() {
    let s = setup();
    let server = &s.server;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(common::Progress::default());
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut router = server.router().await;
        let mut chat = server.chat().await;
        let (stop, done) = (stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let query = EXPERTS[i % 5].1[0].to_string();
                let result = if i % 2 == 0 {
                    router
                        .route(pb::RouteRequest {
                            query,
                            ..Default::default()
                        })
                        .await
                        .map(drop)
                } else {
                    match chat
                        .stream(pb::ChatRequest {
                            query,
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(r) => {
                            let mut stream = r.into_inner();
                            loop {
                                match stream.message().await {
                                    Ok(Some(_)) => {}
                                    Ok(None) => break Ok(()),
                                    Err(e) => break Err(e),
                                }
                            }
                        }
                        Err(e) => Err(e),
                    }
                };
                match result {
                    Ok(()) => done.tick(),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        }));
    }
    let mut admin = server.admin().await;
    done.more(10).await;
    for v in [
        "scoring-1",
        "enc-1",
        "scoring-1",
        "dec-1",
        "scoring-1",
        "dec-1",
        "enc-1",
    ] {
        let r = admin.promote(promote(v)).await.unwrap().into_inner();
        assert_eq!(r.version, v);
        done.more(10).await;
    }
    for other in ["enc-other", "dec-other"] {
        let err = admin.promote(promote(other)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{other}: {}", err.message());
        assert!(err.message().contains("alpha"), "{other}: {}", err.message());
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let failures = c.await.unwrap();
        assert!(failures.is_empty(), "failed requests during swaps: {failures:?}");
    }
    let slot = router_slot(server).await;
    assert_eq!(
        (slot.version.as_str(), slot.kind.as_str()),
        ("enc-1", "encoder-classifier")
    );

    server.pipeline.log().flush().await.unwrap();
    let records = server.pipeline.log().reader().unwrap().recent(1_000_000).unwrap();
    // Every decision logs the version and the kind of the model that made it.
    let deciders: std::collections::BTreeSet<(String, Option<ModelKind>)> = records
        .iter()
        .filter_map(|r| r.route.as_ref())
        .map(|d| (d.router_model_version.clone(), d.router_kind))
        .collect();
    assert_eq!(
        deciders.into_iter().collect::<Vec<_>>(),
        [
            ("dec-1".to_string(), Some(ModelKind::DecoderClassifier)),
            ("enc-1".to_string(), Some(ModelKind::EncoderClassifier)),
            ("scoring-1".to_string(), Some(ModelKind::LabelScoring)),
        ],
    );
    assert!(records.iter().all(|r| r.status == "ok"), "a request failed");
}

#[tokio::test]
async fn a_decoder_classifier_decides_beside_the_rails_on_the_text_they_pass() {
    let s = setup();
    let server = &s.server;
    let mut admin = server.admin().await;
    admin.promote(promote("dec-1")).await.unwrap();
    // Its features are not the rails' encoding, so it starts on the raw
    // query while the rails run; the PII rail rewrites this one, so the
    // decision is made again on what the rail passed.
    let raw = "submit an expense report to jane.doe@corp.example today";
    let r = server
        .router()
        .await
        .route(pb::RouteRequest {
            query: raw.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let passed = server.record(&r.request_id).await.query;
    assert!(!passed.contains("jane.doe"), "{passed}");
    let alone = route(server, &passed).await.unwrap();
    let decided = r.route.unwrap();
    assert_eq!(decided.router_model_version, "dec-1");
    let probabilities = |d: &pb::RouteDecision| d.scores.iter().map(|s| s.probability).collect::<Vec<_>>();
    assert_eq!(probabilities(&decided), probabilities(&alone));
    // A query the rails leave as it is keeps the decision made beside them.
    let d = route(server, "submit an expense report").await.unwrap();
    assert_eq!(d.top_expert, "finance", "{d:?}");
}
