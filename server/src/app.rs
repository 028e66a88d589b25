//! Wiring: build the pipeline from the configuration, then serve it over
//! gRPC (and, when configured, the OpenAI-compatible HTTP API) until a
//! shutdown signal, in the order the house style sets: signal -> health
//! NOT_SERVING -> stop accepting -> drain (with a deadline) -> flush the
//! request log.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use flywheel_proto::v1::admin_server::AdminServer;
use flywheel_proto::v1::chat_server::ChatServer;
use flywheel_proto::v1::feedback_server::FeedbackServer;
use flywheel_proto::v1::router_server::RouterServer;
use flywheel_router::data::log::{LogError, LogLocation, RequestLog, SharedServingState};
use flywheel_router::embed::Embedder;
use flywheel_router::engine::EngineError;
use flywheel_router::engine::EngineLoader;
use flywheel_router::engine::ModelLoader;
use flywheel_router::engine::stub::StubLoader;
use flywheel_router::guardrails::Rails;
use flywheel_router::guardrails::rails::{RailSet, RailsError};
use flywheel_router::models::slots::ModelRegistry;
use flywheel_router::models::store::{ModelStore, StoreError};
use flywheel_router::retrieval::{HybridRetriever, hybrid};
use flywheel_router::{ControlPlane, Pipeline};
use futures::TryStreamExt as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::{ApiKeys, GrpcAuth};
use crate::config::{Config, EngineKind};
use crate::grpc::{admin::AdminService, chat::ChatService, feedback::FeedbackService, route::RouterService};
use crate::metrics::Metrics;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The request log could not be opened.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A model failed to load or warm up.
    #[error("model failed to load or warm up")]
    Engine(#[from] EngineError),
    /// The guardrails could not be built.
    #[error("cannot build the guardrails")]
    Rails(#[from] RailsError),
    /// The pipeline could not be assembled.
    #[error("cannot assemble the pipeline")]
    Pipeline(#[from] flywheel_router::PipelineError),
    /// The promoted versions could not be restored.
    #[error("cannot restore the promoted model versions")]
    Control(#[from] flywheel_router::ControlError),
    /// The retrieval index could not be built.
    #[error("cannot build the retrieval index")]
    Retrieval(#[from] flywheel_router::retrieval::RetrievalError),
    /// The model registry could not be opened.
    #[error("cannot open the model registry")]
    Store(#[from] StoreError),
    /// The reflection service could not be built.
    #[error("cannot build gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC transport failure")]
    Transport(#[from] tonic::transport::Error),
    /// The listener could not be inspected.
    #[error("listener failure")]
    Io(#[from] std::io::Error),
}

/// The sockets a server answers on.
pub struct Listeners {
    /// gRPC.
    pub grpc: TcpListener,
    /// The OpenAI-compatible HTTP API (off when `None`).
    pub http: Option<TcpListener>,
    /// Prometheus metrics (off when `None`).
    pub metrics: Option<TcpListener>,
}

/// The guardrails and the experts' retriever, sharing one sentence embedder
/// when both use the same model files (blocking).
fn load_rails_and_retrieval(
    settings: &flywheel_router::config::EngineSettings,
) -> Result<(RailSet, Option<HybridRetriever>), ServerError> {
    let rails_dir = &settings.rails.jailbreak.embedder_dir;
    let retrieval_needs = settings.experts.iter().any(|e| e.corpus.is_some())
        && settings.retrieval.mode != flywheel_router::retrieval::Mode::Bm25;
    let shared = if settings.rails.jailbreak.enabled && retrieval_needs && hybrid::embedder_dir(settings) == *rails_dir
    {
        let e = Embedder::load(rails_dir).map_err(|source| RailsError::Embedder {
            dir: rails_dir.clone(),
            source,
        })?;
        Some(Arc::new(e))
    } else {
        None
    };
    let rails = RailSet::load(settings.rails.clone(), shared.clone())?;
    let retriever = hybrid::from_settings(settings, shared, &mut |_, _| {})?;
    Ok((rails, retriever))
}

/// A built server, models loaded and warm, ready to serve.
pub struct App {
    config: Config,
    pipeline: Arc<Pipeline>,
    control: Arc<ControlPlane>,
    metrics: Arc<Metrics>,
}

impl App {
    /// Open the request log, load and warm the models, assemble the pipeline.
    ///
    /// # Errors
    /// Any of these steps failing.
    pub async fn build(config: Config) -> Result<Self, ServerError> {
        let settings = &config.settings;
        let log = RequestLog::open_for_replica(&settings.log, &config.replica_id)?;
        let started = std::time::Instant::now();
        let loader: Arc<dyn EngineLoader> = match config.engine {
            EngineKind::Mistralrs => Arc::new(ModelLoader),
            EngineKind::Stub => Arc::new(StubLoader {
                per_token_delay: Duration::from_millis(config.stub_token_delay_ms),
                sign_tokens: config.stub_sign_tokens,
            }),
        };
        let registry = ModelRegistry::load(settings, loader.as_ref()).await?;
        let for_blocking = settings.clone();
        let (rail_set, retriever) = tokio::task::spawn_blocking(move || load_rails_and_retrieval(&for_blocking))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        let metrics = Arc::new(Metrics::new());
        let mut pipeline = Pipeline::new(settings, Arc::new(registry), log)?
            .with_rails(Rails::configured(Arc::new(rail_set)))
            .with_observer(metrics.clone());
        if let Some(r) = retriever {
            let stats = r.stats();
            tracing::info!(
                experts = stats.experts,
                documents = stats.documents,
                chunks = stats.chunks,
                embedded = stats.embedded,
                build_ms = stats.build_ms as u64,
                "retrieval index built"
            );
            pipeline = pipeline.with_retriever(Arc::new(r));
        }
        let pipeline = Arc::new(pipeline);
        let mut control = ControlPlane::new(pipeline.clone());
        if let Some(dir) = &config.registry_dir {
            control = control.with_model_store(ModelStore::open(dir)?, loader);
            // Replicas sharing a store share what they serve too.
            if let LogLocation::Postgres(url) = LogLocation::of(&settings.log) {
                let state = SharedServingState::connect(&url, &config.replica_id).await?;
                control = control.with_shared_state(state);
            }
            for (slot, change) in control.restore_promoted().await? {
                tracing::info!(slot, %change, "serving the recorded state");
            }
        }
        pipeline.warm_up().await?;
        tracing::info!(
            engine = ?config.engine,
            experts = pipeline.experts().len(),
            load_ms = started.elapsed().as_millis() as u64,
            "models loaded and warm"
        );
        Ok(Self {
            config,
            pipeline,
            control: Arc::new(control),
            metrics,
        })
    }

    /// The pipeline (for in-process benchmarks and tests).
    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// The control plane (promotions, shadows, splits, feedback).
    pub fn control(&self) -> &Arc<ControlPlane> {
        &self.control
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The metrics the pipeline reports to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serve gRPC on `listener` until `shutdown` resolves, then drain and
    /// flush; HTTP on `config.http_listen` and metrics on
    /// `config.metrics_listen` when set.
    ///
    /// # Errors
    /// Transport failures, or an HTTP or metrics address that cannot be bound.
    pub async fn serve<F>(self, listener: TcpListener, shutdown: F) -> Result<(), ServerError>
    where
        F: Future<Output = ()> + Send,
    {
        let bind = |addr: Option<std::net::SocketAddr>| async move {
            match addr {
                Some(a) => TcpListener::bind(a)
                    .await
                    .map(Some)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}"))),
                None => Ok(None),
            }
        };
        let listeners = Listeners {
            grpc: listener,
            http: bind(self.config.http_listen).await?,
            metrics: bind(self.config.metrics_listen).await?,
        };
        self.serve_on(listeners, shutdown).await
    }

    /// [`App::serve`] with an already bound metrics listener (tests use `127.0.0.1:0`).
    ///
    /// # Errors
    /// Transport failures.
    pub async fn serve_with_metrics<F>(
        self,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: F,
    ) -> Result<(), ServerError>
    where
        F: Future<Output = ()> + Send,
    {
        let listeners = Listeners {
            grpc: listener,
            http: None,
            metrics: metrics_listener,
        };
        self.serve_on(listeners, shutdown).await
    }

    /// [`App::serve`] on already bound listeners.
    ///
    /// # Errors
    /// Transport failures.
    pub async fn serve_on<F>(self, listeners: Listeners, shutdown: F) -> Result<(), ServerError>
    where
        F: Future<Output = ()> + Send,
    {
        let Listeners {
            grpc: listener,
            http: http_listener,
            metrics: metrics_listener,
        } = listeners;
        let stop_metrics = CancellationToken::new();
        if let Some(m) = metrics_listener {
            let flush_s = self.config.settings.log.flush_interval_ms as f64 / 1e3;
            tokio::spawn(crate::metrics::serve(
                m,
                self.metrics.clone(),
                self.pipeline.clone(),
                flush_s,
                stop_metrics.clone(),
            ));
        }
        let _stop_metrics = stop_metrics.drop_guard();
        let _stop_following = AbortOnDropHandle::new(self.control.follow());
        let addr = listener.local_addr()?;
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ChatServer<ChatService>>().await;
        health.set_serving::<RouterServer<RouterService>>().await;
        health.set_serving::<AdminServer<AdminService>>().await;
        health.set_serving::<FeedbackServer<FeedbackService>>().await;
        let stop_log_watch = CancellationToken::new();
        let log_watch = tokio::spawn(watch_log_health(
            health.clone(),
            self.pipeline.log().clone(),
            Duration::from_millis(self.config.settings.log.unhealthy_after_ms),
            stop_log_watch.clone(),
        ));
        // Reflection in both versions: grpcurl and Postman speak v1, Python's
        // grpcio-reflection and older tools v1alpha.
        let reflection_builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(flywheel_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = reflection_builder().build_v1()?;
        let reflection_v1alpha = reflection_builder().build_v1alpha()?;
        let stop_accepting = CancellationToken::new();
        let keys = ApiKeys::new(&self.config.api_keys);
        if keys.enabled() {
            tracing::info!(
                keys = self.config.api_keys.len(),
                "client API keys required on Chat, Router and Feedback"
            );
        } else {
            tracing::info!(
                "no client API keys configured: Chat, Router and Feedback are open to anyone who can reach the server"
            );
        }
        let guarded = keys.enabled().then(|| GrpcAuth(keys.clone()));
        let open = guarded.is_none();
        let http = match http_listener {
            Some(l) => {
                let http_addr = l.local_addr()?;
                let routes = crate::http::router(self.pipeline.clone(), self.control.clone(), keys);
                tracing::info!(%http_addr, "OpenAI-compatible HTTP API listening");
                let l = crate::listener::GuardedListener::new(l, self.config.connection_limits());
                Some(tokio::spawn(crate::http::serve(l, routes, stop_accepting.clone())))
            }
            None => None,
        };
        let server = Server::builder()
            .trace_fn(crate::telemetry::request_span)
            .layer(tower::util::MapResponseLayer::new(
                crate::grpc::status::undecodable_request_is_invalid_argument,
            ))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            // With keys, Chat, Router and Feedback check them; without, they
            // are served as they are (no interceptor on the hot path).
            .add_optional_service(open.then(|| ChatServer::new(ChatService::new(self.pipeline.clone()))))
            .add_optional_service(
                guarded
                    .clone()
                    .map(|auth| ChatServer::with_interceptor(ChatService::new(self.pipeline.clone()), auth)),
            )
            .add_optional_service(open.then(|| RouterServer::new(RouterService::new(self.pipeline.clone()))))
            .add_optional_service(
                guarded
                    .clone()
                    .map(|auth| RouterServer::with_interceptor(RouterService::new(self.pipeline.clone()), auth)),
            )
            .add_service(AdminServer::new(AdminService::new(
                self.control.clone(),
                self.config.admin_token.clone(),
                self.config.replica_id.clone(),
            )))
            .add_optional_service(open.then(|| FeedbackServer::new(FeedbackService::new(self.control.clone()))))
            .add_optional_service(
                guarded.map(|auth| FeedbackServer::with_interceptor(FeedbackService::new(self.control.clone()), auth)),
            )
            .serve_with_incoming_shutdown(
                crate::listener::GuardedListener::new(listener, self.config.connection_limits())
                    .into_stream()
                    .map_ok(flywheel_proto::coalesce::CoalescedIo::new),
                stop_accepting.clone().cancelled_owned(),
            );
        tokio::pin!(server);
        tracing::info!(%addr, "flywheel-server listening");
        let result = tokio::select! {
            result = &mut server => result.map_err(ServerError::from),
            () = shutdown => {
                tracing::info!("shutdown: health NOT_SERVING, draining");
                stop_log_watch.cancel();
                let _ = log_watch.await;
                set_health(&health, ServingStatus::NotServing).await;
                stop_accepting.cancel();
                let grace = Duration::from_millis(self.config.shutdown_grace_ms);
                let drained = async {
                    let grpc = (&mut server).await;
                    if let Some(h) = http {
                        match h.await {
                            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP listener failed while draining"),
                            Err(e) => tracing::warn!(error = %e, "HTTP server task ended abnormally"),
                            Ok(Ok(())) => {}
                        }
                    }
                    grpc
                };
                match tokio::time::timeout(grace, drained).await {
                    Ok(result) => result.map_err(ServerError::from),
                    Err(_) => {
                        tracing::warn!(grace_ms = grace.as_millis() as u64, "drain deadline passed; closing remaining requests");
                        Ok(())
                    }
                }
            }
        };
        self.pipeline.log().shutdown().await;
        tracing::info!(
            written = self.pipeline.log().stats().written(),
            "request log flushed; stopped"
        );
        result
    }
}

/// The services health reports on ("" is the server as a whole).
const HEALTH_SERVICES: [&str; 5] = [
    "",
    "flywheel.v1.Chat",
    "flywheel.v1.Router",
    "flywheel.v1.Admin",
    "flywheel.v1.Feedback",
];

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in HEALTH_SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// Health follows the request log: `NOT_SERVING` once it has been losing
/// rows for `after` (requests are answered but no longer recorded, and
/// feedback is refused), `SERVING` again after a commit succeeds.
async fn watch_log_health(health: HealthReporter, log: RequestLog, after: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut degraded = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let failure = log.stats().write_failure();
        // Rows kept for another try (a PostgreSQL store unreachable, within
        // `log.outage_buffer`) are not lost: every replica shares that store,
        // so turning them all NOT_SERVING would only stop the answers too.
        let failing = failure
            .as_ref()
            .and_then(|f| f.losing_since)
            .is_some_and(|t| t.elapsed() >= after);
        if failing != degraded {
            degraded = failing;
            match &failure {
                Some(f) if failing => tracing::error!(
                    reason = %f.reason,
                    "request log writes have failed for {} ms: health NOT_SERVING until a commit succeeds",
                    f.since.elapsed().as_millis()
                ),
                _ => tracing::info!("request log writes succeed again: health SERVING"),
            }
            let status = if failing {
                ServingStatus::NotServing
            } else {
                ServingStatus::Serving
            };
            set_health(&health, status).await;
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
