//! Shared fixtures: a real server on `127.0.0.1:0` with the real default model,
//! started once per test binary on its own runtime thread, and helpers to
//! spawn the `flywheel-server` binary as a process.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use flywheel_proto::v1::admin_client::AdminClient;
use flywheel_proto::v1::chat_client::ChatClient;
use flywheel_proto::v1::feedback_client::FeedbackClient;
use flywheel_proto::v1::router_client::RouterClient;
use flywheel_router::Pipeline;
use flywheel_server::{App, Config};
use tonic::transport::Channel;

/// The prepared default model (fetched on first use).
pub fn model_path() -> PathBuf {
    flywheel_router::testing::test_model()
}

/// The sentence embedder of the jailbreak rail (fetched on first use).
pub fn embedder_dir() -> PathBuf {
    flywheel_router::testing::test_embedder()
}

/// A running in-process server.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub pipeline: Arc<Pipeline>,
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connecting to the test server")
    }

    pub async fn chat(&self) -> ChatClient<Channel> {
        ChatClient::new(self.channel().await)
    }

    pub async fn router(&self) -> RouterClient<Channel> {
        RouterClient::new(self.channel().await)
    }

    pub async fn feedback(&self) -> FeedbackClient<Channel> {
        FeedbackClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    /// The log record of `request_id`, after committing everything queued.
    pub async fn record(&self, request_id: &str) -> flywheel_router::log::RequestRecord {
        self.pipeline.log().flush().await.unwrap();
        let reader = self.pipeline.log().reader().unwrap();
        reader
            .get(request_id)
            .unwrap()
            .unwrap_or_else(|| panic!("no log record for {request_id}"))
    }

    /// Records whose query is exactly `query`.
    pub async fn records_with_query(&self, query: &str) -> Vec<flywheel_router::log::RequestRecord> {
        self.pipeline.log().flush().await.unwrap();
        let reader = self.pipeline.log().reader().unwrap();
        reader
            .recent(100_000)
            .unwrap()
            .into_iter()
            .filter(|r| r.query == query)
            .collect()
    }
}

/// Start a server with `config` on a runtime of its own that lives as long
/// as the test process.
pub fn start(config: Config) -> TestServer {
    start_inner(config, false).0
}

/// [`start`], also serving metrics on `127.0.0.1:0`; returns that address.
pub fn start_with_metrics(config: Config) -> (TestServer, std::net::SocketAddr) {
    let (server, metrics) = start_inner(config, true);
    (server, metrics.expect("metrics address"))
}

fn start_inner(mut config: Config, with_metrics: bool) -> (TestServer, Option<std::net::SocketAddr>) {
    let dir = tempfile::tempdir().unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.settings.log.path = dir.path().join("requests.db");
    if config.settings.rails.jailbreak.embedder_dir.is_relative() {
        config.settings.rails.jailbreak.embedder_dir = embedder_dir();
    }
    let log_path = config.settings.log.path.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let metrics = if with_metrics {
                Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
            } else {
                None
            };
            let metrics_addr = metrics.as_ref().map(|m| m.local_addr().unwrap());
            let app = App::build(config).await.expect("building the server");
            tx.send((addr, app.pipeline().clone(), metrics_addr)).unwrap();
            app.serve_with_metrics(listener, metrics, std::future::pending())
                .await
                .unwrap();
        });
    });
    let (addr, pipeline, metrics) = rx.recv().expect("server thread died while starting");
    (
        TestServer {
            addr,
            pipeline,
            log_path,
            _dir: dir,
        },
        metrics,
    )
}

/// The shared server on the real default model (default config).
pub fn real_server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut config = Config::default();
        let model = model_path();
        for spec in config.settings.models.values_mut() {
            spec.path = model.clone();
        }
        config.settings.limits.max_query_chars = 500;
        config.settings.rails.jailbreak.embedder_dir = embedder_dir();
        start(config)
    })
}

/// `message` with the metadata `authorization: Bearer <token>`.
pub fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// A GGUF file with metadata only (the stub engine needs no weights):
/// `general.name` plus `extra` key/value pairs.
pub fn write_stub_model(
    path: &std::path::Path,
    name: &str,
    extra: &[(&str, candle_core::quantized::gguf_file::Value)],
) {
    use candle_core::quantized::{QTensor, gguf_file};
    let name = gguf_file::Value::String(name.into());
    let mut meta: Vec<(&str, &gguf_file::Value)> = vec![("general.name", &name)];
    meta.extend(extra.iter().map(|(k, v)| (*k, v)));
    let none: [(&str, &QTensor); 0] = [];
    flywheel_router::model_prep::write_gguf(path, &meta, &none).unwrap();
}

/// Write a stub model for `version` in `dir` and add it to `store`.
pub fn register_stub(
    store: &flywheel_router::store::ModelStore,
    dir: &std::path::Path,
    version: &str,
    extra: &[(&str, candle_core::quantized::gguf_file::Value)],
) {
    let file = dir.join(format!("{version}.gguf"));
    write_stub_model(&file, version, extra);
    store.add(version, &file, None).unwrap();
}

/// A stub-engine config promoting from `registry`, with `token` as admin token.
pub fn stub_config(registry: &std::path::Path, token: Option<&str>) -> Config {
    Config {
        engine: flywheel_server::config::EngineKind::Stub,
        registry_dir: Some(registry.to_path_buf()),
        admin_token: token.map(str::to_string),
        ..Config::default()
    }
}
