//! Test fixtures for every crate's integration tests (feature `test-util`):
//! a real server on `127.0.0.1:0`, started on a runtime of its own that lives
//! as long as the test process, with typed handles on it.

#![allow(clippy::unwrap_used, missing_docs)] // a failed unwrap is a failed test

use std::path::PathBuf;
use std::sync::Arc;

use flywheel_proto::v1::admin_client::AdminClient;
use flywheel_proto::v1::chat_client::ChatClient;
use flywheel_proto::v1::feedback_client::FeedbackClient;
use flywheel_proto::v1::router_client::RouterClient;
use flywheel_router::Pipeline;
use tonic::transport::Channel;

use crate::{App, Config};

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
    /// The HTTP API's address, when the config turned it on.
    pub http_addr: Option<std::net::SocketAddr>,
    pub pipeline: Arc<Pipeline>,
    pub control: Arc<flywheel_router::ControlPlane>,
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
    pub async fn record(&self, request_id: &str) -> flywheel_router::data::log::RequestRecord {
        self.pipeline.log().flush().await.unwrap();
        let reader = self.pipeline.log().reader().unwrap();
        reader
            .get(request_id)
            .unwrap()
            .unwrap_or_else(|| panic!("no log record for {request_id}"))
    }

    /// Records whose query is exactly `query`.
    pub async fn records_with_query(&self, query: &str) -> Vec<flywheel_router::data::log::RequestRecord> {
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
            let http = match config.http_listen {
                Some(_) => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
                None => None,
            };
            let http_addr = http.as_ref().map(|h| h.local_addr().unwrap());
            let app = App::build(config).await.expect("building the server");
            tx.send((addr, http_addr, app.control().clone(), metrics_addr)).unwrap();
            let listeners = crate::Listeners {
                grpc: listener,
                http,
                metrics,
            };
            app.serve_on(listeners, std::future::pending()).await.unwrap();
        });
    });
    let (addr, http_addr, control, metrics) = rx.recv().expect("server thread died while starting");
    (
        TestServer {
            addr,
            http_addr,
            pipeline: control.serving().clone(),
            control,
            log_path,
            _dir: dir,
        },
        metrics,
    )
}
