//! The official `openai` Python client (from PyPI) against the real server
//! with the real model, over the OpenAI-compatible HTTP API: a whole and a
//! streamed answer, a forced expert, the models list, an error, a refused
//! jailbreak, feedback by the returned id, and a dropped stream.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use flywheel_proto::v1::FeedbackHistoryRequest;
use flywheel_server::Config;
use serde_json::Value;

/// The `openai` client version the test installs.
const OPENAI: &str = "3.63.0";

/// Run the client script against `base_url`; its checks by name.
fn run_client(base_url: &str) -> BTreeMap<String, Value> {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let openai = common::python_package("openai", OPENAI, "openai");
    let stdout = common::python(
        &["openai_client.py", base_url],
        &tests,
        openai.to_str().unwrap(),
        Duration::from_secs(300),
    );
    stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["check"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

#[tokio::test]
async fn the_openai_python_client_works_against_the_real_model() {
    let mut config = Config::default();
    let model = common::model_path();
    for spec in config.settings.models.values_mut() {
        spec.path = model.clone();
    }
    config.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = common::start(config);
    let base_url = format!("http://{}/v1", server.http_addr.unwrap());
    let checks = tokio::task::spawn_blocking(move || run_client(&base_url))
        .await
        .unwrap();
    let experts = server.pipeline.experts();

    let c = &checks["complete"];
    assert_eq!(c["object"], "chat.completion");
    assert!(!c["content"].as_str().unwrap().is_empty(), "{c}");
    assert!(c["completion_tokens"].as_u64().unwrap() <= 8, "{c}");
    assert!(experts.contains(&c["expert"].as_str().unwrap().to_string()), "{c}");
    let record = server.record(c["id"].as_str().unwrap()).await;
    assert_eq!((record.kind.as_str(), record.status.as_str()), ("complete", "ok"));
    assert_eq!(record.answer.as_deref(), c["content"].as_str());

    let s = &checks["stream"];
    let ids = s["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 1, "one id for every chunk: {s}");
    let id = ids[0].as_str().unwrap();
    assert!(s["completion_tokens"].as_u64().unwrap() > 0, "the usage chunk: {s}");
    let record = server.record(id).await;
    assert_eq!(record.kind, "stream");
    assert_eq!(
        record.query, "And how do I book leave?",
        "the router sees the last message"
    );
    assert_eq!(record.answer.as_deref(), s["content"].as_str());

    let f = &checks["forced"];
    assert_eq!((f["expert"].as_str(), f["forced"].as_bool()), (Some("hr"), Some(true)));

    let mut models = vec!["flywheel".to_string()];
    models.extend(experts.iter().cloned());
    let listed: Vec<String> = checks["models"]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, models);

    let e = &checks["empty"];
    assert_eq!(
        (e["raised"].as_str(), e["status"].as_u64()),
        (Some("BadRequestError"), Some(400)),
        "{e}"
    );
    let j = &checks["jailbreak"];
    assert_eq!(
        (j["status"].as_u64(), j["code"].as_str()),
        (Some(400), Some("content_filter")),
        "{j}"
    );

    // The rating given over HTTP is in the request's gRPC feedback history.
    let fb = &checks["feedback"];
    assert_eq!(fb["status"], 200, "{fb}");
    let history = server
        .feedback()
        .await
        .history(FeedbackHistoryRequest { request_id: id.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.feedback.len(), 1, "{history:?}");
    assert_eq!(history.feedback[0].corrected_expert.as_deref(), Some("hr"));
    assert_eq!(
        history.feedback[0].feedback_id,
        fb["body"]["feedback_id"].as_str().unwrap()
    );

    // The stream the client dropped stopped and was logged as abandoned.
    let dropped = checks["dropped"]["id"].as_str().unwrap();
    let history = server
        .feedback()
        .await
        .history(FeedbackHistoryRequest {
            request_id: dropped.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.status, "cancelled", "{history:?}");
    let kinds: Vec<&str> = history.feedback.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["abandoned"]);

    // The README's example, as written there.
    let example = common::readme_python_block("from openai import OpenAI");
    assert!(
        example.contains("http://127.0.0.1:8080/v1"),
        "the example's address changed"
    );
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("example.py");
    let http = server.http_addr.unwrap().to_string();
    std::fs::write(&script, example.replace("127.0.0.1:8080", &http)).unwrap();
    let openai = common::python_package("openai", OPENAI, "openai");
    let stdout = tokio::task::spawn_blocking(move || {
        common::python(
            &[script.to_str().unwrap()],
            std::path::Path::new("."),
            openai.to_str().unwrap(),
            Duration::from_secs(300),
        )
    })
    .await
    .unwrap();
    let last = stdout.lines().last().unwrap_or_default();
    let expert = last
        .strip_prefix("answered by ")
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no route line: {stdout}"));
    assert!(experts.contains(&expert.to_string()), "{stdout}");
}
