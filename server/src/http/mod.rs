//! The OpenAI-compatible HTTP front door, on the same pipeline as gRPC:
//! `POST /v1/chat/completions` (JSON or server-sent events),
//! `GET /v1/models`, `POST /v1/feedback`, `GET /health`.
//!
//! Thin handlers, as on the gRPC side: [`openai`] reads and writes the wire
//! format, [`error`] maps error kinds to HTTP statuses in one table, and
//! the client API keys of [`crate::auth`] guard every `/v1` route.

pub mod error;
pub mod openai;

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flywheel_router::data::feedback::{FeedbackInput, Rating};
use flywheel_router::{ChatEvent, ControlPlane, Pipeline};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::{ApiKeys, ClientKeyId};
use error::ApiError;
use openai::{ChatRequest, Chunks, ROUTED_MODEL};

/// What the handlers share.
pub struct HttpState {
    pipeline: Arc<Pipeline>,
    control: Arc<ControlPlane>,
    keys: Arc<ApiKeys>,
}

/// The HTTP routes over `pipeline` (feedback through `control`), guarded by `keys`.
pub fn router(pipeline: Arc<Pipeline>, control: Arc<ControlPlane>, keys: Arc<ApiKeys>) -> Router {
    let state = Arc::new(HttpState {
        pipeline,
        control,
        keys,
    });
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/feedback", post(feedback))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .fallback(not_found)
        .with_state(state)
}

/// Serve `router` on `listener` until `stop` is cancelled, then finish the
/// requests in flight.
///
/// # Errors
/// Listener failures.
pub async fn serve(
    listener: crate::listener::GuardedListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Every `/v1` route needs a client key when keys are configured; the key's
/// id goes with the request into the request log.
async fn authenticate(State(state): State<Arc<HttpState>>, mut request: Request, next: Next) -> Response {
    let header = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    match state.keys.authenticate(header) {
        Ok(Some(id)) => {
            request.extensions_mut().insert(id);
            next.run(request).await
        }
        Ok(None) => next.run(request).await,
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn chat_completions(State(state): State<Arc<HttpState>>, request: Request) -> Response {
    let key = request.extensions().get::<ClientKeyId>().map(|k| k.0.clone());
    let body = match axum::body::to_bytes(request.into_body(), BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::invalid("body", format!("the body must be at most {BODY_LIMIT} bytes")).into_response();
        }
    };
    let chat = match ChatRequest::parse(&body, key) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if chat.stream {
        // Errors before the first token (invalid input, a rail, routing)
        // are a plain JSON error with its status; later ones an SSE event.
        match state.pipeline.stream(chat.query).await {
            Ok(events) => sse(events, chat.model, chat.include_usage),
            Err(e) => ApiError::from(&e).into_response(),
        }
    } else {
        // A client that disconnects drops this future, which cancels the answer.
        match state.pipeline.complete(chat.query).await {
            Ok(outcome) => axum::Json(openai::completion(&chat.model, &outcome)).into_response(),
            Err(e) => ApiError::from(&e).into_response(),
        }
    }
}

/// Largest request body accepted (bytes): far above the query and history limits.
pub const BODY_LIMIT: usize = 4 << 20;

/// An answer stream as `chat.completion.chunk` events, then `[DONE]`. When
/// the client goes away hyper drops this body, which drops the pipeline's
/// stream and cancels generation (logged as abandoned), as on gRPC.
fn sse(events: flywheel_router::ChatStream, model: String, include_usage: bool) -> Response {
    let created = openai::created();
    let mut chunks: Option<Chunks> = None;
    let body = events.map(move |event| {
        let bytes = match event {
            Ok(ChatEvent::Start {
                request_id,
                route,
                expert_model_version,
                citations,
            }) => {
                let c = Chunks::new(&request_id, created, &model);
                let first = c.start(&openai::Extension::new(&route, &expert_model_version, &citations));
                chunks = Some(c);
                first
            }
            // Every event after the first has its chunks.
            Ok(ChatEvent::Delta(text)) => chunks.as_ref().map(|c| c.delta(&text)).unwrap_or_default(),
            Ok(ChatEvent::End {
                usage,
                timings,
                finish_reason,
            }) => match &chunks {
                Some(c) if include_usage => [c.end(&finish_reason, &timings), c.usage(usage)].concat(),
                Some(c) => c.end(&finish_reason, &timings),
                None => Vec::new(),
            },
            Err(e) => format!("data: {}\n\n", ApiError::from(&e).body()).into_bytes(),
        };
        Ok::<_, Infallible>(Bytes::from(bytes))
    });
    let done = futures::stream::once(async { Ok(Bytes::from_static(openai::DONE.as_bytes())) });
    (
        [(CONTENT_TYPE, "text/event-stream"), (CACHE_CONTROL, "no-cache")],
        Body::from_stream(body.chain(done)),
    )
        .into_response()
}

async fn models(State(state): State<Arc<HttpState>>) -> Response {
    let model = |id: &str, description: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "flywheel", "description": description});
    let mut data = vec![model(ROUTED_MODEL, "the router chooses the expert")];
    data.extend(
        state
            .pipeline
            .experts()
            .iter()
            .map(|e| model(e, "this expert answers (no routing)")),
    );
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn health(State(state): State<Arc<HttpState>>) -> Response {
    let s = state.pipeline.status();
    axum::Json(json!({"status": "ok", "in_flight": s.in_flight, "max_in_flight": s.max_in_flight})).into_response()
}

async fn not_found(request: Request) -> Response {
    let e = ApiError {
        status: axum::http::StatusCode::NOT_FOUND,
        code: "not_found",
        ..ApiError::invalid(
            "path",
            format!(
                "no route {} {}: the API is POST /v1/chat/completions, GET /v1/models, POST /v1/feedback, GET /health",
                request.method(),
                request.uri().path()
            ),
        )
    };
    e.into_response()
}

/// `POST /v1/feedback`: the JSON twin of `Feedback.Submit`.
async fn feedback(State(state): State<Arc<HttpState>>, body: Bytes) -> Response {
    let input = match feedback_input(&body) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    match state.control.submit_feedback(input).await {
        Ok(row) => axum::Json(json!({
            "feedback_id": row.feedback_id,
            "request_id": row.request_id,
            "created_at_unix_ms": row.created_at_ms,
        }))
        .into_response(),
        Err(e) => ApiError::from(&e).into_response(),
    }
}

/// `{"request_id", "thumb": "up"|"down" | "stars": 1-5, "corrected_expert",
/// "comment", "reviewer_id"}`.
fn feedback_input(body: &[u8]) -> Result<FeedbackInput, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wire {
        request_id: String,
        thumb: Option<String>,
        stars: Option<i64>,
        corrected_expert: Option<String>,
        comment: Option<String>,
        reviewer_id: Option<String>,
    }
    let w: Wire = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            "body",
            format!(
                "{e}; send {{\"request_id\": ..., \"thumb\": \"up\"|\"down\" or \"stars\": 1-5, \
                 \"corrected_expert\", \"comment\", \"reviewer_id\"}}"
            ),
        )
    })?;
    let rating = match (w.thumb.as_deref(), w.stars) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("stars", "give `thumb` or `stars`, not both")),
        (Some("up"), None) => Some(Rating::Thumb(true)),
        (Some("down"), None) => Some(Rating::Thumb(false)),
        (Some(other), None) => {
            return Err(ApiError::invalid(
                "thumb",
                format!("`thumb` is `up` or `down`, not `{other}`"),
            ));
        }
        // Out of range becomes 0, which the pipeline refuses naming the range.
        (None, Some(s)) => Some(Rating::Stars(u8::try_from(s).unwrap_or(0))),
        (None, None) => None,
    };
    let nonempty = |s: Option<String>| s.filter(|v| !v.is_empty());
    Ok(FeedbackInput {
        request_id: w.request_id,
        rating,
        corrected_expert: nonempty(w.corrected_expert),
        comment: nonempty(w.comment),
        reviewer_id: nonempty(w.reviewer_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_json_reads_like_the_grpc_message() {
        let i = feedback_input(br#"{"request_id": "r1", "thumb": "down", "corrected_expert": "it"}"#).unwrap();
        assert_eq!(i.rating, Some(Rating::Thumb(false)));
        assert_eq!(i.corrected_expert.as_deref(), Some("it"));
        let i = feedback_input(br#"{"request_id": "r1", "stars": 4, "comment": ""}"#).unwrap();
        assert_eq!((i.rating, i.comment), (Some(Rating::Stars(4)), None));
        let e = feedback_input(br#"{"request_id": "r1", "thumb": "sideways"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("thumb"));
        let e = feedback_input(br#"{"request_id": "r1", "thumb": "up", "stars": 5}"#).unwrap_err();
        assert!(e.message.contains("not both"));
        let e = feedback_input(br#"{"request_id": "r1", "rating": 5}"#).unwrap_err();
        assert!(
            e.message.contains("rating") && e.message.contains("thumb"),
            "{}",
            e.message
        );
    }
}
