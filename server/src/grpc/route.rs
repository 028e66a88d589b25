//! `flywheel.v1.Router`: route decisions without generation.

use std::sync::Arc;

use flywheel_proto::v1 as pb;
use flywheel_router::{Pipeline, Query};
use tonic::{Request, Response, Status};

use super::{convert, status::to_status};

/// The Router service.
pub struct RouterService {
    pipeline: Arc<Pipeline>,
}

impl RouterService {
    /// Serve route decisions with `pipeline`.
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self { pipeline }
    }
}

#[tonic::async_trait]
impl pb::router_server::Router for RouterService {
    async fn route(&self, request: Request<pb::RouteRequest>) -> Result<Response<pb::RouteResponse>, Status> {
        let api_key_id = crate::auth::grpc_key_id(&request);
        let outcome = self
            .pipeline
            .route(Query {
                api_key_id,
                ..convert::route_query(request.into_inner())
            })
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::RouteResponse {
            request_id: outcome.request_id,
            route: Some(convert::route(outcome.route)),
        }))
    }
}
