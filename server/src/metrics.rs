//! Prometheus metrics on an HTTP port (`GET /metrics`, OpenMetrics text).
//!
//! [`Metrics`] implements the pipeline's [`Observer`]: it counts every
//! finished request (by kind, expert and status) and rail verdict, and fills
//! the TTFT, inter-token, route-decision and request-duration histograms
//! (explicit buckets below), times retrievals and counts shadow runs by
//! outcome. Gauges that describe
//! state (requests in flight, log writer queue depth and lag, model version
//! per slot, retrieval index size) are read
//! from the pipeline at scrape time. Labels are bounded: never a request id.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use bytes::Bytes;
use flywheel_router::Pipeline;
use flywheel_router::data::log::RequestRecord;
use flywheel_router::observe::{Observer, ShadowOutcome};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Time to first token: from a cached short answer (~50 ms) to a long
/// prompt on a busy CPU (tens of seconds).
pub const TTFT_BUCKETS: [f64; 12] = [0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0];
/// Inter-token latency: ~20 ms per token on 2 cores at batch 1, more under load.
pub const ITL_BUCKETS: [f64; 11] = [0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0];
/// Route decisions: one prefill of the query, ~0.3 s for the 135M model.
pub const ROUTE_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0];
/// Retrieval: BM25 alone well under 1 ms; with the query's embedding ~10-20 ms.
pub const RETRIEVAL_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25];
/// Whole requests, route-only to long answers.
pub const DURATION_BUCKETS: [f64; 12] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: String,
    expert: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExpertLabels {
    expert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShadowLabels {
    slot: String,
    version: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShadowSlotLabels {
    slot: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RailLabels {
    rail: String,
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    slot: String,
    version: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn ttft() -> Histogram {
    Histogram::new(TTFT_BUCKETS)
}
fn itl() -> Histogram {
    Histogram::new(ITL_BUCKETS)
}
fn route() -> Histogram {
    Histogram::new(ROUTE_BUCKETS)
}
fn retrieval() -> Histogram {
    Histogram::new(RETRIEVAL_BUCKETS)
}
fn duration() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}
fn shadow_run() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    ttft: HistogramFamily<ExpertLabels>,
    itl: HistogramFamily<ExpertLabels>,
    route: HistogramFamily<KindLabels>,
    duration: HistogramFamily<KindLabels>,
    rails: Family<RailLabels, Counter>,
    in_flight: Gauge,
    log_queue: Gauge,
    log_written: Gauge,
    log_failed: Gauge,
    log_feedback_failed: Gauge,
    log_failing: Gauge,
    log_lag: Gauge<f64, AtomicU64>,
    models: Family<SlotLabels, Gauge<i64, AtomicI64>>,
    retrieval: HistogramFamily<ExpertLabels>,
    passages: Family<ExpertLabels, Counter>,
    index_chunks: Gauge,
    index_documents: Gauge,
    shadow_runs: Family<ShadowLabels, Counter>,
    shadow_seconds: HistogramFamily<ShadowSlotLabels>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every series registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "flywheel_requests",
            "Requests by kind, expert and final status",
            requests.clone(),
        );
        let ttft = HistogramFamily::<ExpertLabels>::new_with_constructor(ttft as fn() -> Histogram);
        registry.register_with_unit(
            "flywheel_ttft",
            "Time to the first answer token",
            Unit::Seconds,
            ttft.clone(),
        );
        let itl = HistogramFamily::<ExpertLabels>::new_with_constructor(itl as fn() -> Histogram);
        registry.register_with_unit(
            "flywheel_inter_token_latency",
            "Time between two streamed answer deltas (first token excluded)",
            Unit::Seconds,
            itl.clone(),
        );
        let route = HistogramFamily::<KindLabels>::new_with_constructor(route as fn() -> Histogram);
        registry.register_with_unit(
            "flywheel_route_decision",
            "Router decision time",
            Unit::Seconds,
            route.clone(),
        );
        let duration = HistogramFamily::<KindLabels>::new_with_constructor(duration as fn() -> Histogram);
        registry.register_with_unit(
            "flywheel_request_duration",
            "Whole request, arrival to last token",
            Unit::Seconds,
            duration.clone(),
        );
        let rails = Family::<RailLabels, Counter>::default();
        registry.register(
            "flywheel_rail_verdicts",
            "Guardrail verdicts by rail and decision",
            rails.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "flywheel_in_flight_requests",
            "Requests admitted now",
            in_flight.clone(),
        );
        let log_queue = Gauge::default();
        registry.register(
            "flywheel_request_log_queue_depth",
            "Records handed to the log writer and not yet committed",
            log_queue.clone(),
        );
        let log_written = Gauge::default();
        registry.register(
            "flywheel_request_log_written_records",
            "Records committed to the request log since start",
            log_written.clone(),
        );
        let log_failed = Gauge::default();
        registry.register(
            "flywheel_request_log_failed_records",
            "Records the request log could not write since start (lost: full disk or log.max_size_mb, I/O errors)",
            log_failed.clone(),
        );
        let log_feedback_failed = Gauge::default();
        registry.register(
            "flywheel_request_log_failed_feedback",
            "Feedback rows the request log could not write since start",
            log_feedback_failed.clone(),
        );
        let log_failing = Gauge::default();
        registry.register(
            "flywheel_request_log_write_failing",
            "1 while the request log's latest commit failed, else 0",
            log_failing.clone(),
        );
        let log_lag = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "flywheel_request_log_lag",
            "Upper bound on how long a finished request waits to be committed (flush interval while records are queued)",
            Unit::Seconds,
            log_lag.clone(),
        );
        let models = Family::<SlotLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "flywheel_model_info",
            "Model version served by each slot (value 1)",
            models.clone(),
        );
        let retrieval = HistogramFamily::<ExpertLabels>::new_with_constructor(retrieval as fn() -> Histogram);
        registry.register_with_unit(
            "flywheel_retrieval",
            "Retrieval time of an expert's passages (query embedding, search, fusion)",
            Unit::Seconds,
            retrieval.clone(),
        );
        let passages = Family::<ExpertLabels, Counter>::default();
        registry.register(
            "flywheel_retrieved_passages",
            "Passages put into expert prompts",
            passages.clone(),
        );
        let index_chunks = Gauge::default();
        registry.register(
            "flywheel_retrieval_index_chunks",
            "Chunks in the retrieval index in use",
            index_chunks.clone(),
        );
        let index_documents = Gauge::default();
        registry.register(
            "flywheel_retrieval_index_documents",
            "Documents in the retrieval index in use",
            index_documents.clone(),
        );
        let shadow_runs = Family::<ShadowLabels, Counter>::default();
        registry.register(
            "flywheel_shadow_runs",
            "Requests sampled for a shadow, by outcome (skipped at the concurrency limit, agreed or disagreed with the live route, answered, failed)",
            shadow_runs.clone(),
        );
        let shadow_seconds = HistogramFamily::<ShadowSlotLabels>::new_with_constructor(shadow_run as fn() -> Histogram);
        registry.register_with_unit(
            "flywheel_shadow_run",
            "Time of a shadow run (route decision or whole answer)",
            Unit::Seconds,
            shadow_seconds.clone(),
        );
        Self {
            registry,
            requests,
            ttft,
            itl,
            route,
            duration,
            rails,
            in_flight,
            log_queue,
            log_written,
            log_failed,
            log_feedback_failed,
            log_failing,
            log_lag,
            models,
            retrieval,
            passages,
            index_chunks,
            index_documents,
            shadow_runs,
            shadow_seconds,
        }
    }

    /// The OpenMetrics text, with state gauges read from `pipeline` now.
    pub fn render(&self, pipeline: &Pipeline, flush_interval_s: f64) -> String {
        let status = pipeline.status();
        self.in_flight.set(status.in_flight as i64);
        let stats = pipeline.log().stats();
        let queued = stats.queued();
        self.log_queue.set(queued as i64);
        self.log_written.set(stats.written() as i64);
        self.log_failed.set(stats.failed() as i64);
        self.log_feedback_failed.set(stats.feedback_failed() as i64);
        self.log_failing.set(i64::from(stats.write_failure().is_some()));
        self.log_lag.set(if queued > 0 { flush_interval_s } else { 0.0 });
        let index = pipeline.retrieval_stats().unwrap_or_default();
        self.index_chunks.set(index.chunks as i64);
        self.index_documents.set(index.documents as i64);
        self.models.clear();
        for slot in pipeline.registry().slots() {
            self.models
                .get_or_create(&SlotLabels {
                    slot: slot.name().to_string(),
                    version: slot.current().version.clone(),
                })
                .set(1);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Observer for Metrics {
    fn request_finished(&self, r: &RequestRecord) {
        let expert = r.expert.clone().unwrap_or_default();
        self.requests
            .get_or_create(&RequestLabels {
                kind: r.kind.clone(),
                expert: expert.clone(),
                status: r.status.clone(),
            })
            .inc();
        if let Some(ms) = r.ttft_ms {
            self.ttft.get_or_create(&ExpertLabels { expert }).observe(ms / 1e3);
        }
        if let Some(route) = r.route.as_ref().filter(|d| !d.forced) {
            self.route
                .get_or_create(&KindLabels { kind: r.kind.clone() })
                .observe(route.latency_ms / 1e3);
        }
        if let Some(ms) = r.total_ms {
            self.duration
                .get_or_create(&KindLabels { kind: r.kind.clone() })
                .observe(ms / 1e3);
        }
        for v in &r.guardrails {
            self.rails
                .get_or_create(&RailLabels {
                    rail: v.rail.clone(),
                    decision: v.decision.as_str().to_string(),
                })
                .inc();
        }
    }

    fn retrieval(&self, expert: &str, seconds: f64, passages: usize) {
        let labels = ExpertLabels {
            expert: expert.to_string(),
        };
        self.retrieval.get_or_create(&labels).observe(seconds);
        self.passages.get_or_create(&labels).inc_by(passages as u64);
    }

    fn shadow(&self, slot: &str, version: &str, outcome: ShadowOutcome, seconds: Option<f64>) {
        self.shadow_runs
            .get_or_create(&ShadowLabels {
                slot: slot.to_string(),
                version: version.to_string(),
                outcome: outcome.as_str().to_string(),
            })
            .inc();
        if let Some(s) = seconds {
            self.shadow_seconds
                .get_or_create(&ShadowSlotLabels { slot: slot.to_string() })
                .observe(s);
        }
    }

    fn inter_token(&self, expert: &str, seconds: f64) {
        self.itl
            .get_or_create(&ExpertLabels {
                expert: expert.to_string(),
            })
            .observe(seconds);
    }
}

/// Serve `GET /metrics` on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    pipeline: Arc<Pipeline>,
    flush_interval_s: f64,
    stop: CancellationToken,
) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "metrics listening");
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "metrics accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let pipeline = pipeline.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let pipeline = pipeline.clone();
                async move {
                    if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(metrics.render(&pipeline, flush_interval_s))))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"only /metrics is served here\n")))
                    }
                }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "metrics connection ended");
            }
        });
    }
}
