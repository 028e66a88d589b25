//! `flywheel.v1.Chat`: unary and streaming answers.

use std::pin::Pin;
use std::sync::Arc;

use flywheel_proto::v1 as pb;
use flywheel_router::{Pipeline, Query};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{convert, status::to_status};

/// The Chat service.
pub struct ChatService {
    pipeline: Arc<Pipeline>,
}

impl ChatService {
    /// Serve chats with `pipeline`.
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self { pipeline }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ChatStreamMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::chat_server::Chat for ChatService {
    async fn complete(&self, request: Request<pb::ChatRequest>) -> Result<Response<pb::ChatResponse>, Status> {
        let api_key_id = crate::auth::grpc_key_id(&request);
        let outcome = self
            .pipeline
            .complete(Query {
                api_key_id,
                ..convert::chat_query(request.into_inner())
            })
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ChatResponse {
            request_id: outcome.request_id,
            route: Some(convert::route(outcome.route)),
            answer: outcome.answer,
            expert_model_version: outcome.expert_model_version,
            usage: Some(convert::usage(outcome.usage)),
            timings: Some(convert::timings(outcome.timings)),
            finish_reason: outcome.finish_reason,
            citations: convert::citations(&outcome.citations),
        }))
    }

    type StreamStream = EventStream;

    async fn stream(&self, request: Request<pb::ChatRequest>) -> Result<Response<Self::StreamStream>, Status> {
        let api_key_id = crate::auth::grpc_key_id(&request);
        let events = self
            .pipeline
            .stream(Query {
                api_key_id,
                ..convert::chat_query(request.into_inner())
            })
            .await
            .map_err(|e| to_status(&e))?;
        // When the client goes away tonic drops this stream, which drops the
        // pipeline's receiver and stops generation.
        let out = events.map(|e| e.map(convert::event).map_err(|err| to_status(&err)));
        Ok(Response::new(Box::pin(out)))
    }
}
