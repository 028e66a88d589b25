//! `Admin.Promote` / `Admin.Rollback` through a real client: hot swaps under
//! streaming load with no failed request and no answer mixing two models,
//! rejection of corrupt or mismatched models, and the admin token.
//!
//! The stub engine signs every word it streams with its model version
//! (`word@version`), so the request log shows which model produced each token.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::gguf_file;
use flywheel_proto::v1 as pb;
use flywheel_proto::v1::chat_stream_message::Event;
use flywheel_router::models::store::ModelStore;
use flywheel_server::{Config, config::EngineKind};
use tonic::Code;

const TOKEN: &str = "test-admin-token-0123456789";
const EXPERT_SLOT: &str = "expert/hr";

/// A stub model; `labels` makes it a fine-tuned classifier for those labels.
fn write_model(path: &Path, name: &str, labels: Option<&[&str]>) {
    let extra: Vec<(&str, gguf_file::Value)> = match labels {
        Some(l) => vec![
            (
                flywheel_router::models::task::SYSTEM_PROMPT_KEY,
                gguf_file::Value::String("Reply with the label.".into()),
            ),
            (
                flywheel_router::models::task::LABELS_KEY,
                gguf_file::Value::Array(l.iter().map(|s| gguf_file::Value::String((*s).into())).collect()),
            ),
        ],
        None => Vec::new(),
    };
    common::write_stub_model(path, name, &extra);
}

struct Setup {
    server: common::TestServer,
    _dir: tempfile::TempDir,
}

fn setup(token: Option<&str>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path().join("registry")).unwrap();
    for v in ["v1", "v2", "v3", "v4", "v5"] {
        common::register_stub(&store, dir.path(), v, &[]);
    }
    let corrupt = dir.path().join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00 this is not a model").unwrap();
    store.add("corrupt", &corrupt, None).unwrap();
    let other = dir.path().join("other-labels.gguf");
    write_model(&other, "other", Some(&["alpha", "beta"]));
    store.add("other-labels", &other, None).unwrap();
    let trained = dir.path().join("trained.gguf");
    write_model(
        &trained,
        "trained",
        Some(&["hr", "it", "finance", "product", "general"]),
    );
    store.add("trained-router", &trained, None).unwrap();

    let config = Config {
        engine: EngineKind::Stub,
        stub_token_delay_ms: 1,
        stub_sign_tokens: true,
        registry_dir: Some(store.root().to_path_buf()),
        admin_token: token.map(str::to_string),
        ..Config::default()
    };
    Setup {
        server: common::start(config),
        _dir: dir,
    }
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    common::authorized(message, TOKEN)
}

fn promote(slot: &str, version: &str) -> tonic::Request<pb::PromoteRequest> {
    authorized(pb::PromoteRequest {
        slot: slot.into(),
        version: version.into(),
    })
}

async fn serving(server: &common::TestServer, slot: &str) -> String {
    common::model_slot(server, slot).await.version
}

/// One streamed answer; `Err` on any failure.
async fn stream_once(client: &mut pb::chat_client::ChatClient<tonic::transport::Channel>) -> Result<(), tonic::Status> {
    let request = pb::ChatRequest {
        query: "How many vacation days do I get?".into(),
        expert: Some("hr".into()),
        ..Default::default()
    };
    let mut stream = client.stream(request).await?.into_inner();
    let mut ended = false;
    while let Some(msg) = stream.message().await? {
        ended |= matches!(msg.event, Some(Event::End(_)));
    }
    if ended {
        Ok(())
    } else {
        Err(tonic::Status::internal("stream ended without its end message"))
    }
}

#[tokio::test]
async fn swaps_under_streaming_load_fail_no_request_and_never_mix_models() {
    let s = setup(Some(TOKEN));
    let server = &s.server;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(common::Progress::default());
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut client = server.chat().await;
        let (stop, done) = (stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match stream_once(&mut client).await {
                    Ok(()) => done.tick(),
                    Err(e) => failures.push(e.to_string()),
                };
            }
            failures
        }));
    }
    let mut admin = server.admin().await;
    // Each swap lands while answers stream: a few complete between swaps.
    done.more(4).await;
    for v in ["v1", "v2", "v3", "v4", "v5"] {
        let r = admin.promote(promote(EXPERT_SLOT, v)).await.unwrap().into_inner();
        assert_eq!(r.version, v);
        done.more(4).await;
    }
    let r = admin
        .rollback(authorized(pb::RollbackRequest {
            slot: EXPERT_SLOT.into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.previous_version.as_str(), r.version.as_str()), ("v5", "v4"));
    done.more(4).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let failures = c.await.unwrap();
        assert!(failures.is_empty(), "failed requests during swaps: {failures:?}");
    }
    assert_eq!(serving(server, EXPERT_SLOT).await, "v4");

    // From the log: every answer's words carry exactly one signature, the
    // version the record says served it; several versions served traffic.
    server.pipeline.log().flush().await.unwrap();
    let records = server.pipeline.log().reader().unwrap().recent(1_000_000).unwrap();
    assert!(records.len() >= done.count());
    let mut versions = std::collections::BTreeSet::new();
    for rec in records.iter().filter(|r| r.kind == "stream") {
        assert_eq!(rec.status, "ok", "{:?}", rec.error);
        let served = rec.expert_model_version.clone().unwrap();
        let answer = rec.answer.as_deref().unwrap();
        for word in answer.split_whitespace() {
            let sig = word.rsplit_once('@').map(|(_, v)| v).unwrap();
            assert_eq!(sig, served, "answer mixes models: {answer}");
        }
        versions.insert(served);
    }
    assert!(versions.len() >= 4, "traffic served by {versions:?}");
}

#[tokio::test]
async fn a_model_that_fails_to_load_or_validate_is_rejected_and_the_old_one_keeps_serving() {
    let s = setup(Some(TOKEN));
    let server = &s.server;
    let mut admin = server.admin().await;
    admin.promote(promote(EXPERT_SLOT, "v2")).await.unwrap();

    let err = admin.promote(promote(EXPERT_SLOT, "corrupt")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("keeps serving `v2`"), "{}", err.message());
    assert_eq!(serving(server, EXPERT_SLOT).await, "v2");

    let err = admin.promote(promote("router", "other-labels")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("alpha, beta"), "{}", err.message());

    let err = admin.promote(promote(EXPERT_SLOT, "trained-router")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("router"), "{}", err.message());

    // A classifier trained for exactly the configured experts may route.
    let r = admin
        .promote(promote("router", "trained-router"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, "trained-router");

    let err = admin.promote(promote(EXPERT_SLOT, "v9")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin.promote(promote("expert/nobody", "v1")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("expert/hr"),
        "lists the slots: {}",
        err.message()
    );

    let mut chat = server.chat().await;
    stream_once(&mut chat).await.expect("the server still answers");
}

#[tokio::test]
async fn admin_calls_need_the_configured_token() {
    let s = setup(Some(TOKEN));
    let mut admin = s.server.admin().await;
    let plain = pb::PromoteRequest {
        slot: EXPERT_SLOT.into(),
        version: "v1".into(),
    };
    let err = admin.promote(plain.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(plain.clone());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(admin.promote(wrong).await.unwrap_err().code(), Code::Unauthenticated);
    let err = admin
        .update_rails(pb::UpdateRailsRequest { toml: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(serving(&s.server, EXPERT_SLOT).await, "smollm2-135m-instruct-q8_0");

    let without = setup(None);
    let err = without
        .server
        .admin()
        .await
        .promote(promote(EXPERT_SLOT, "v1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("admin_token"));
}

#[tokio::test]
async fn a_restarted_server_serves_the_last_promoted_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path().join("registry")).unwrap();
    let file = dir.path().join("v7.gguf");
    write_model(&file, "v7", None);
    store.add("v7", &file, None).unwrap();
    let config = || Config {
        engine: EngineKind::Stub,
        registry_dir: Some(store.root().to_path_buf()),
        admin_token: Some(TOKEN.into()),
        ..Config::default()
    };
    let first = common::start(config());
    first.admin().await.promote(promote(EXPERT_SLOT, "v7")).await.unwrap();
    let second = common::start(config());
    assert_eq!(serving(&second, EXPERT_SLOT).await, "v7");
    assert_eq!(serving(&second, "expert/it").await, "smollm2-135m-instruct-q8_0");
}

#[tokio::test]
async fn list_cycles_serves_the_journal_records_newest_first() {
    use flywheel_router::data::journal::{
        CandidateRun, CycleGate, CycleJournal, CycleMetrics, CycleRecord, CycleStatus, ModelRow, StageTime,
    };
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry");
    ModelStore::open(&registry).unwrap();
    let server = common::start(common::stub_config(&registry, Some(TOKEN)));
    let mut admin = server.admin().await;
    // A registry without cycles lists none.
    let none = admin
        .list_cycles(pb::ListCyclesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(none.cycles.is_empty());

    let journal = CycleJournal::open(&registry).unwrap();
    let mut done = CycleRecord::new("cycle-100".into(), "labels", "router", 100, dir.path().join("w"));
    done.status = CycleStatus::Promoted;
    done.promoted = true;
    done.candidate_version = Some("ft-abc".into());
    done.stages.push(StageTime {
        stage: "curate".into(),
        seconds: 2.0,
    });
    done.metrics = Some(CycleMetrics {
        incumbent_version: "base".into(),
        incumbent_accuracy: 0.34,
        candidate_accuracy: 0.89,
        p_value: 1e-9,
        n: 400,
        candidate_p99_ms: 300.0,
        incumbent_p99_ms: 500.0,
    });
    done.candidates = vec![
        CandidateRun {
            name: "encoder".into(),
            kind: "encoder-classifier".into(),
            dir: dir.path().join("w/encoder"),
            version: Some("enc-1".into()),
            distilled: true,
            seconds: 30.0,
            error: None,
        },
        CandidateRun {
            name: "decoder-12".into(),
            kind: "decoder-classifier".into(),
            dir: dir.path().join("w/decoder-12"),
            version: None,
            distilled: true,
            seconds: 3.0,
            error: Some("the loss diverged".into()),
        },
    ];
    let row = |name: &str, incumbent: bool, accuracy: f64, p50_ms: f64, verdict: &str| ModelRow {
        name: name.into(),
        version: format!("{name}-v"),
        kind: "encoder-classifier".into(),
        incumbent,
        parameters: 22_700_000,
        size_bytes: 91_000_000,
        accuracy,
        macro_f1: accuracy - 0.02,
        teacher_agreement: (!incumbent).then_some(0.95),
        p_value_vs_best: 0.4,
        p50_ms,
        p99_ms: 2.0 * p50_ms,
        cpu_seconds_per_1k: 1.5 * p50_ms,
        on_front: true,
        holds: true,
        verdict: verdict.into(),
    };
    done.gate = Some(CycleGate {
        cost: "p50".into(),
        tolerance: 0.02,
        max_p99_ms: None,
        teacher: Some("ft-teacher".into()),
        best: "incumbent".into(),
        winner: Some("encoder".into()),
        summary: "promote encoder".into(),
        models: vec![
            row("encoder", false, 0.88, 12.0, "promoted"),
            row("incumbent", true, 0.89, 200.0, "costs more"),
        ],
    });
    journal.write(&done).unwrap();
    let running = CycleRecord::new("cycle-200".into(), "interval", "router", 200, dir.path().join("w2"));
    journal.write(&running).unwrap();

    let all = admin
        .list_cycles(pb::ListCyclesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = all.cycles.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["cycle-200", "cycle-100"]);
    assert_eq!(all.cycles[0].status, "running");
    let one = admin
        .list_cycles(pb::ListCyclesRequest {
            limit: 0,
            id: Some("cycle-100".into()),
        })
        .await
        .unwrap()
        .into_inner();
    let c = &one.cycles[0];
    assert_eq!(
        (c.status.as_str(), c.promoted, c.candidate_version.as_str()),
        ("promoted", true, "ft-abc")
    );
    assert_eq!(
        (c.incumbent_accuracy, c.candidate_accuracy, c.stages.len()),
        (0.34, 0.89, 1)
    );
    // The Pareto table and each candidate's training come through whole.
    assert_eq!(
        (c.winner.as_str(), c.cost.as_str(), c.teacher_version.as_str()),
        ("encoder", "p50", "ft-teacher")
    );
    assert_eq!(c.gate_summary, "promote encoder");
    let names: Vec<(&str, bool, f64, f64)> = c
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.incumbent, m.accuracy, m.p50_ms))
        .collect();
    assert_eq!(
        names,
        [("encoder", false, 0.88, 12.0), ("incumbent", true, 0.89, 200.0)]
    );
    assert_eq!(c.models[0].teacher_agreement, Some(0.95));
    assert_eq!(c.models[1].teacher_agreement, None);
    assert_eq!(
        (c.models[0].parameters, c.models[0].verdict.as_str()),
        (22_700_000, "promoted")
    );
    let failed = &c.candidates[1];
    assert_eq!(
        (failed.name.as_str(), failed.version.as_str(), failed.error.as_deref()),
        ("decoder-12", "", Some("the loss diverged"))
    );
    assert_eq!(c.candidates[0].version, "enc-1");
    let newest = admin
        .list_cycles(pb::ListCyclesRequest { limit: 1, id: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(newest.cycles.len(), 1);
    let missing = admin
        .list_cycles(pb::ListCyclesRequest {
            limit: 0,
            id: Some("cycle-9".into()),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
}
