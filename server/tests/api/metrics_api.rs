//! Prometheus metrics over HTTP after real gRPC traffic: the named series
//! appear with the traffic's labels (stub engine, selected explicitly, with
//! a per-token delay so that inter-token gaps exist; real rails), and the
//! shadow counters while a candidate is mirrored.

use crate::common;

use flywheel_proto::v1::{ChatRequest, RouteRequest};
use flywheel_server::Config;
use flywheel_server::config::EngineKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn metrics_expose_the_named_series_after_traffic() {
    let (server, metrics) = common::start_with_metrics(Config {
        engine: EngineKind::Stub,
        stub_token_delay_ms: 2,
        ..Config::default()
    });
    server
        .router()
        .await
        .route(RouteRequest {
            query: "an it question".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = server
        .chat()
        .await
        .stream(ChatRequest {
            query: "an hr question".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
    let bad = server
        .chat()
        .await
        .complete(ChatRequest {
            query: String::new(),
            ..Default::default()
        })
        .await;
    assert!(bad.is_err());
    server.pipeline.log().flush().await.unwrap();

    let page = get(metrics, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for series in [
        r#"flywheel_requests_total{kind="route",expert="",status="ok"} 1"#,
        r#"flywheel_requests_total{kind="stream",expert="hr",status="ok"} 1"#,
        r#"flywheel_requests_total{kind="complete",expert="",status="invalid_argument"} 1"#,
        r#"flywheel_ttft_seconds_count{expert="hr"} 1"#,
        r#"flywheel_ttft_seconds_bucket{le="0.025",expert="hr"}"#,
        r#"flywheel_inter_token_latency_seconds_bucket{le="0.005",expert="hr"}"#,
        r#"flywheel_route_decision_seconds_count{kind="route"} 1"#,
        r#"flywheel_request_duration_seconds_count{kind="stream"} 1"#,
        r#"flywheel_rail_verdicts_total{rail="jailbreak",decision="allow"} 2"#,
        r#"flywheel_rail_verdicts_total{rail="pii_output",decision="allow"} 1"#,
        "flywheel_in_flight_requests 0",
        "flywheel_request_log_queue_depth 0",
        "flywheel_request_log_written_records 3",
        r#"flywheel_model_info{slot="router",version="#,
        r#"flywheel_model_info{slot="expert/hr",version="#,
        // The default config's experts answer from the demo knowledge base.
        r#"flywheel_retrieval_seconds_count{expert="hr"} 1"#,
        r#"flywheel_retrieved_passages_total{expert="hr"} 3"#,
        "flywheel_retrieval_index_documents 28",
        "# EOF",
    ] {
        assert!(page.contains(series), "missing `{series}` in\n{page}");
    }
    // Every streamed token after the first is one inter-token observation.
    let itl_count: u64 = page
        .lines()
        .find(|l| l.starts_with(r#"flywheel_inter_token_latency_seconds_count{expert="hr"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(itl_count >= 10, "{itl_count}");
    assert!(get(metrics, "/other").await.starts_with("HTTP/1.1 404"));
}

/// The value of the series line starting with `prefix` (0 when absent).
fn value(page: &str, prefix: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn shadow_runs_are_counted_by_outcome() {
    use candle_core::quantized::gguf_file;
    use flywheel_proto::v1 as pb;
    const TOKEN: &str = "metrics-test-admin-token-42";
    let dir = tempfile::tempdir().unwrap();
    let store = flywheel_router::models::store::ModelStore::open(dir.path().join("registry")).unwrap();
    common::register_stub(&store, dir.path(), "cand", &[]);
    // Hangs after the router warm-up's two calls: holds its one permit.
    let hang = gguf_file::Value::String("hang:2".into());
    common::register_stub(
        &store,
        dir.path(),
        "hanging",
        &[(flywheel_router::engine::stub::STUB_FAULT_KEY, hang)],
    );
    let (server, metrics) = common::start_with_metrics(common::stub_config(store.root(), Some(TOKEN)));
    let mut admin = server.admin().await;
    let mut router = server.router().await;
    let set = |version: &str, max_concurrency| {
        common::authorized(
            pb::SetShadowRequest {
                slot: "router".into(),
                version: version.into(),
                fraction: 1.0,
                max_concurrency,
            },
            TOKEN,
        )
    };
    let route = |q: &str| RouteRequest {
        query: q.into(),
        ..Default::default()
    };
    admin.set_shadow(set("cand", 4)).await.unwrap();
    for q in ["an it question", "an hr question", "a finance question"] {
        router.route(route(q)).await.unwrap();
    }
    // Shadow runs are detached: poll until all three have ended.
    let done = r#"flywheel_shadow_run_seconds_count{slot="router"}"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut page = get(metrics, "/metrics").await;
    while value(&page, done) < 3.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        page = get(metrics, "/metrics").await;
    }
    let cand = |outcome: &str| {
        value(
            &page,
            &format!(r#"flywheel_shadow_runs_total{{slot="router",version="cand",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(value(&page, done), 3.0, "{page}");
    assert_eq!(cand("agreed") + cand("disagreed"), 3.0, "{page}");
    assert_eq!(cand("skipped") + cand("failed"), 0.0);

    // One permit, held by a run that hangs: the next two requests are skipped.
    admin.set_shadow(set("hanging", 1)).await.unwrap();
    for q in ["first", "second", "third"] {
        router.route(route(q)).await.unwrap();
    }
    let page = get(metrics, "/metrics").await;
    assert_eq!(
        value(
            &page,
            r#"flywheel_shadow_runs_total{slot="router",version="hanging",outcome="skipped"}"#
        ),
        2.0,
        "{page}"
    );
}
