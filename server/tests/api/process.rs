//! The `flywheel-server` binary as a real process: bound-address logging,
//! graceful shutdown on SIGTERM (drain + flush), request-log durability
//! after `kill -9`, admission control, and trace export: a client's W3C
//! trace context continued by the server's spans and exported over OTLP to
//! a collector. These tests exercise the server and its log, not the model,
//! so they select the stub engine explicitly (`--engine stub`).

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flywheel_proto::v1::admin_client::AdminClient;
use flywheel_proto::v1::router_client::RouterClient;
use flywheel_proto::v1::{ChatRequest, ListModelsRequest, PromoteRequest, RouteRequest};
use flywheel_router::data::log::LogReader;
use flywheel_server::Config;
use flywheel_server::config::EngineKind;
use tonic::Code;

/// Log flush interval used by these tests (the default, 50 ms).
const FLUSH_MS: u64 = 50;

struct Proc {
    child: Child,
    url: String,
}

/// A failed test leaves no server running.
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(db: &std::path::Path, extra: &[&str]) -> Proc {
    spawn_with_env(db, extra, &[])
}

fn spawn_with_env(db: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    spawn_command(Command::new(env!("CARGO_BIN_EXE_flywheel-server")), db, extra, env)
}

/// The server with at most `nofile` open file descriptors (`ulimit -n`).
fn spawn_with_fd_limit(db: &std::path::Path, nofile: u32) -> Proc {
    let mut sh = Command::new("sh");
    sh.args(["-c", &format!("ulimit -n {nofile} && exec \"$0\" \"$@\"")])
        .arg(env!("CARGO_BIN_EXE_flywheel-server"));
    spawn_command(sh, db, &[], &[])
}

fn spawn_command(mut command: Command, db: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut child = command
        .args(["--engine", "stub", "--listen", "127.0.0.1:0", "--log-path"])
        .arg(db)
        .arg("--embedder")
        .arg(common::embedder_dir())
        .args(extra)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting flywheel-server");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Shown with a failing test's output.
            eprintln!("server: {line}");
            if let Some(addr) = line.split("addr=").nth(1) {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server never logged its bound address");
    Proc {
        child,
        url: format!("http://{addr}"),
    }
}

/// CPU time (user + system) of process `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

async fn route(url: &str, query: &str) -> Result<String, tonic::Status> {
    let mut client = RouterClient::connect(url.to_string()).await.expect("connect");
    Ok(client
        .route(RouteRequest {
            query: query.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .request_id)
}

#[tokio::test]
async fn sigterm_drains_and_flushes_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("requests.db");
    let mut server = spawn(&db, &[]);
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(route(&server.url, &format!("hr question {i}")).await.unwrap());
    }
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let reader = LogReader::open(&db).unwrap();
    assert_eq!(reader.integrity_check().unwrap(), "ok");
    for id in &ids {
        assert!(
            reader.get(id).unwrap().is_some(),
            "record {id} lost on graceful shutdown"
        );
    }
}

#[tokio::test]
async fn kill_9_loses_at_most_the_last_flush_interval_and_never_corrupts_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("requests.db");
    let mut server = spawn(&db, &[]);
    let mut client = RouterClient::connect(server.url.clone()).await.unwrap();
    let mut done: Vec<(String, Instant)> = Vec::new();
    let start = Instant::now();
    // Continuous traffic, then kill -9 in the middle of it.
    while start.elapsed() < Duration::from_millis(800) {
        let q = RouteRequest {
            query: format!("it question {}", done.len()),
            ..Default::default()
        };
        let id = client.route(q).await.unwrap().into_inner().request_id;
        done.push((id, Instant::now()));
    }
    let killed_at = Instant::now();
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();

    let reader = LogReader::open(&db).unwrap();
    assert_eq!(reader.integrity_check().unwrap(), "ok");
    let lost = assert_durable(&reader, &done, killed_at);
    eprintln!(
        "{} requests, {lost} lost to kill -9 (all within the last {FLUSH_MS} ms + margin)",
        done.len(),
    );
}

/// Every request of `done` that finished more than one flush interval (plus
/// commit time) before `killed_at` is in the log; how many of `done` are not.
fn assert_durable(reader: &LogReader, done: &[(String, Instant)], killed_at: Instant) -> usize {
    let margin = Duration::from_millis(FLUSH_MS + 100);
    let must_have: Vec<&String> = done
        .iter()
        .filter(|(_, t)| killed_at.duration_since(*t) > margin)
        .map(|(id, _)| id)
        .collect();
    assert!(
        must_have.len() > 10,
        "test produced too little traffic: {}",
        must_have.len()
    );
    let missing: Vec<&&String> = must_have
        .iter()
        .filter(|id| reader.get(id).unwrap().is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} old-enough records lost: {:?}",
        missing.len(),
        must_have.len(),
        &missing[..missing.len().min(5)]
    );
    done.iter().filter(|(id, _)| reader.get(id).unwrap().is_none()).count()
}

/// Three replicas on one PostgreSQL log under load; one is killed with
/// SIGKILL: the others go on answering, and the shared log holds every
/// request the killed one finished more than a flush interval before. A
/// promotion made while it is down is what it serves when it comes back.
#[tokio::test]
async fn kill_9_of_one_replica_on_postgres_loses_at_most_its_last_flush_interval() {
    let Some(url) = flywheel_router::testing::postgres_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unused = dir.path().join("unused.db");
    let store = flywheel_router::models::store::ModelStore::open(dir.path().join("registry")).unwrap();
    common::register_stub(&store, dir.path(), "v2", &[]);
    let registry = store.root().to_str().unwrap().to_string();
    const TOKEN: &str = "replica-admin-token";
    let args = ["--store-url", &url, "--registry-dir", &registry, "--admin-token", TOKEN];
    let mut replicas: Vec<Proc> = (0..3).map(|_| spawn(&unused, &args)).collect();
    let mut clients = Vec::new();
    for r in &replicas {
        clients.push(RouterClient::connect(r.url.clone()).await.unwrap());
    }
    let route = |i: usize| RouteRequest {
        query: format!("it question {i}"),
        ..Default::default()
    };
    let mut done: Vec<(String, Instant)> = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(800) {
        let i = done.len();
        let id = clients[i % 3].route(route(i)).await.unwrap().into_inner().request_id;
        done.push((id, Instant::now()));
    }
    let killed_at = Instant::now();
    replicas[1].child.kill().unwrap(); // SIGKILL
    replicas[1].child.wait().unwrap();
    // The survivors answer on, without a failure.
    let mut after_kill = Vec::new();
    for i in 0..50 {
        let n = done.len() + i;
        let client = &mut clients[if n.is_multiple_of(2) { 0 } else { 2 }];
        after_kill.push(client.route(route(n)).await.unwrap().into_inner().request_id);
    }
    // Their records land (each writer commits in order, so the earlier
    // ones of the survivors are in by then too).
    let reader = LogReader::open(std::path::Path::new(&url)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while after_kill.iter().any(|id| reader.get(id).unwrap().is_none()) {
        assert!(Instant::now() < deadline, "the survivors' records never landed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost = assert_durable(&reader, &done, killed_at);
    assert_eq!(reader.count().unwrap(), (done.len() + 50 - lost) as u64);
    eprintln!("{} requests over 3 replicas, {lost} lost to kill -9 of one", done.len());

    // Promoted while it is down; restarted, it serves the promoted version.
    let mut admin = AdminClient::connect(replicas[0].url.clone()).await.unwrap();
    admin
        .promote(common::authorized(
            PromoteRequest {
                slot: "expert/hr".into(),
                version: "v2".into(),
            },
            TOKEN,
        ))
        .await
        .unwrap();
    replicas[1] = spawn(&unused, &args);
    let mut restarted = AdminClient::connect(replicas[1].url.clone()).await.unwrap();
    let slots = restarted
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .slots;
    let hr = slots.iter().find(|s| s.slot == "expert/hr").unwrap();
    assert_eq!(hr.version, "v2");
}

#[tokio::test]
async fn requests_over_the_in_flight_limit_get_resource_exhausted_and_a_record() {
    let mut config = Config {
        engine: EngineKind::Stub,
        stub_token_delay_ms: 20,
        ..Config::default()
    };
    config.settings.limits.max_in_flight = 1;
    let server = common::start(config);
    let mut chat = server.chat().await;
    // A slow stream holds the only slot.
    let request = ChatRequest {
        query: "a slow answer".into(),
        ..Default::default()
    };
    let mut held = chat.stream(request).await.unwrap().into_inner();
    held.message().await.unwrap().unwrap();

    let err = server
        .router()
        .await
        .route(RouteRequest {
            query: "one more".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("limit of 1"), "{}", err.message());
    let recs = server.records_with_query("one more").await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].status, "resource_exhausted");

    while held.message().await.unwrap().is_some() {}
    // The slot is free again once the stream ended.
    let ok = server
        .router()
        .await
        .route(RouteRequest {
            query: "now it fits".into(),
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn invalid_config_exits_with_a_clear_error_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[router]\nfallback_expert = \"legal\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flywheel-server"))
        .args(["--engine", "stub", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("router.fallback_expert") && stderr.contains("legal"),
        "{stderr}"
    );
}

/// An OTLP/gRPC trace collector on a free port, keeping every span it receives.
mod collector {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use opentelemetry_proto::tonic::trace::v1::Span;

    #[derive(Clone, Default)]
    pub struct Collector(pub Arc<Mutex<Vec<Span>>>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let spans = request
                .into_inner()
                .resource_spans
                .into_iter()
                .flat_map(|r| r.scope_spans)
                .flat_map(|s| s.spans);
            self.0.lock().unwrap().extend(spans);
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Start it; returns its URL and the spans it has received.
    pub async fn start() -> (String, Arc<Mutex<Vec<Span>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let collector = Collector::default();
        let spans = collector.0.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (url, spans)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// Multi-threaded: the collector must answer while the test blocks in `wait()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trace_context_is_continued_and_exported_over_otlp() {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    let (collector_url, spans) = collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("requests.db");
    let mut server = spawn_with_env(
        &db,
        &["--otlp-endpoint", &collector_url],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    let mut client = RouterClient::connect(server.url.clone()).await.unwrap();
    let mut request = tonic::Request::new(RouteRequest {
        query: "How many vacation days do I get per year?".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{TRACE}-{PARENT}-01").parse().unwrap());
    let traced_id = client.route(request).await.unwrap().into_inner().request_id;
    let untraced_id = route(&server.url, "My laptop will not connect to the VPN")
        .await
        .unwrap();
    drop(client);
    // SIGTERM flushes the exporter before exit.
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert!(server.child.wait().unwrap().success());

    let spans = spans.lock().unwrap().clone();
    let attr = |s: &opentelemetry_proto::tonic::trace::v1::Span, key: &str| {
        s.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone())
            .and_then(|v| v.value)
            .map(|v| format!("{v:?}"))
    };
    let roots: Vec<_> = spans.iter().filter(|s| s.name == "flywheel.v1.Router/Route").collect();
    assert_eq!(roots.len(), 2, "one server span per request: {:?}", names(&spans));
    // The traced request continues the client's trace, under the client's span.
    let root = roots
        .iter()
        .find(|s| hex(&s.trace_id) == TRACE)
        .expect("no span in the client's trace");
    assert_eq!(hex(&root.parent_span_id), PARENT);
    assert_eq!(root.kind, SpanKind::Server as i32);
    // Its stages are children of the server span, in the same trace.
    for stage in ["rails", "route", "log_write"] {
        let s = spans
            .iter()
            .find(|s| s.name == stage && hex(&s.trace_id) == TRACE)
            .unwrap_or_else(|| panic!("no `{stage}` span in the client's trace: {:?}", names(&spans)));
        assert_eq!(
            s.parent_span_id, root.span_id,
            "`{stage}` is not under the request span"
        );
        assert!(
            attr(s, "request_id").is_some_and(|v| v.contains(&traced_id)),
            "`{stage}` lacks the request id"
        );
    }
    let route_span = spans
        .iter()
        .find(|s| s.name == "route" && hex(&s.trace_id) == TRACE)
        .unwrap();
    assert!(attr(route_span, "expert").is_some(), "the route span names the expert");
    // A request without trace context starts its own trace.
    let other = roots.iter().find(|s| hex(&s.trace_id) != TRACE).unwrap();
    assert!(other.parent_span_id.is_empty());
    assert!(spans.iter().any(|s| s.name == "log_write"
        && attr(s, "request_id").is_some_and(|v| v.contains(&untraced_id))
        && s.trace_id == other.trace_id));
}

fn names(spans: &[opentelemetry_proto::tonic::trace::v1::Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

#[tokio::test]
async fn an_unreachable_collector_never_fails_requests() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("requests.db");
    // Nothing listens on port 9 (discard) here.
    let mut server = spawn_with_env(
        &db,
        &["--otlp-endpoint", "http://127.0.0.1:9"],
        &[("OTEL_BSP_SCHEDULE_DELAY", "50")],
    );
    for i in 0..20 {
        route(&server.url, &format!("it question {i}")).await.unwrap();
    }
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert!(
        server.child.wait().unwrap().success(),
        "shutdown must not fail on a dead collector"
    );
}

#[tokio::test]
async fn out_of_file_descriptors_the_listener_backs_off_instead_of_spinning_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = spawn_with_fd_limit(&dir.path().join("requests.db"), 128);
    route(&server.url, "an it question").await.unwrap();
    // Connections that send nothing, far more than the server has
    // descriptors for: accepting fails with EMFILE.
    let addr = server.url.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = server.child.id();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    // A spinning accept loop burns a whole core (~100 ticks a second).
    assert!(
        used < 30,
        "the listener used {used} ticks in 1 s while out of descriptors"
    );
    drop(idle);
    let started = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(10), route(&server.url, "an hr question")).await;
    assert!(
        matches!(answered, Ok(Ok(_))),
        "no recovery: {answered:?} after {:?}",
        started.elapsed()
    );
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}
