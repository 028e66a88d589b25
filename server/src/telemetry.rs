//! Telemetry, set up once from `main`: a `tracing` subscriber writing to
//! stderr, filtered by `RUST_LOG` (default `info`, with mistral.rs's own
//! chatter at `warn`), and, when an OTLP endpoint is configured, the same
//! spans exported to an OpenTelemetry collector over OTLP/gRPC.
//!
//! Every gRPC request gets a server span ([`request_span`]) that continues
//! the caller's W3C trace context (`traceparent` / `tracestate` metadata);
//! the pipeline's stage spans (`rails`, `route`, `retrieval`, `generation`)
//! and the log writer's `log_write` nest under it.

use flywheel_router::engine::mistral::is_false_alarm;
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{FilterExt as _, filter_fn};
use tracing_subscriber::layer::{Layer as _, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

/// Filter used when `RUST_LOG` is unset.
use flywheel_router::observe::DEFAULT_LOG_FILTER as DEFAULT_FILTER;
/// `service.name` of exported spans unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE_NAME: &str = "flywheel-server";

/// Errors setting up trace export.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (bad endpoint).
    #[error("cannot export traces to {endpoint}: {source}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// The exporter's error.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Installed telemetry; [`Telemetry::shutdown`] flushes spans still buffered.
#[derive(Debug, Default)]
#[must_use = "call shutdown() before exit, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Export what is buffered and stop the exporter. A collector that is
    /// down costs a warning, never an error: telemetry must not fail a shutdown.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "trace export did not flush cleanly");
        }
    }
}

/// Install the global subscriber, exporting spans to `otlp_endpoint` when
/// it is set (OTLP over gRPC, e.g. `http://127.0.0.1:4317`). Must run inside
/// the Tokio runtime (the exporter's client lives on it). A second call
/// installs nothing and exports nothing.
///
/// # Errors
/// An endpoint the exporter cannot use.
pub fn init(otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = otlp_endpoint.map(provider).transpose()?;
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Log lines see events only: formatting every span's fields on every
    // request would cost more than a route decision on the stub engine, and
    // events carry the request id themselves. Spans exist only to be exported:
    // without an exporter they are disabled at their call sites (no cost).
    let installed = match &provider {
        Some(p) => {
            let otel = tracing_opentelemetry::layer()
                .with_tracer(p.tracer(SERVICE_NAME))
                .with_filter(filter());
            tracing_subscriber::registry()
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .with_writer(std::io::stderr)
                        .with_filter(filter().and(filter_fn(|meta| meta.is_event() && !is_false_alarm(meta)))),
                )
                .with(otel)
                .try_init()
        }
        None => tracing_subscriber::registry()
            .with(filter())
            .with(filter_fn(|meta| meta.is_event() && !is_false_alarm(meta)))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    }
    .is_ok();
    if let Some(endpoint) = otlp_endpoint.filter(|_| installed) {
        tracing::info!(endpoint, "exporting traces over OTLP/gRPC");
    }
    Ok(Telemetry {
        provider: provider.filter(|_| installed),
    })
}

fn provider(endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: endpoint.to_string(),
            source,
        })?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The server span of one gRPC request, named after its method
/// (`flywheel.v1.Router/Route`) and continuing the caller's trace when the
/// request carries W3C trace context. Without export the span still scopes
/// the request's log lines.
pub fn request_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc",
        otel.name = path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
    // Fails only when no OpenTelemetry layer is installed: nothing to continue then.
    let _ = span.set_parent(parent);
    span
}

/// Mark the current request span with the status it ends in (called where
/// domain errors become statuses).
pub fn record_status(code: tonic::Code) {
    let span = tracing::Span::current();
    span.record("rpc.grpc.status_code", code as i32);
    if matches!(
        code,
        tonic::Code::Internal | tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DataLoss
    ) {
        span.record("otel.status_code", "ERROR");
    }
}

/// Reads trace context from HTTP/2 headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_is_read_from_grpc_metadata() {
        let request = http::Request::builder()
            .uri("http://127.0.0.1/flywheel.v1.Router/Route")
            .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .body(())
            .unwrap();
        let extractor = HeaderExtractor(request.headers());
        assert_eq!(
            extractor.get("traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(extractor.keys(), ["traceparent"]);
        // No subscriber in this test: the span is disabled but building it must not panic.
        let _ = request_span(&request);
    }
}
