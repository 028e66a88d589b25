//! `flywheel.v1.Feedback`: ratings and corrections joined to logged requests.

use std::sync::Arc;

use flywheel_proto::v1 as pb;
use flywheel_router::ControlPlane;
use tonic::{Request, Response, Status};

use super::{convert, status::to_status};

/// The Feedback service.
pub struct FeedbackService {
    control: Arc<ControlPlane>,
}

impl FeedbackService {
    /// Record feedback through `control`.
    pub fn new(control: Arc<ControlPlane>) -> Self {
        Self { control }
    }
}

#[tonic::async_trait]
impl pb::feedback_server::Feedback for FeedbackService {
    async fn submit(&self, request: Request<pb::FeedbackRequest>) -> Result<Response<pb::FeedbackResponse>, Status> {
        let row = self
            .control
            .submit_feedback(convert::feedback_input(request.into_inner()))
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::FeedbackResponse {
            feedback_id: row.feedback_id,
            created_at_unix_ms: row.created_at_ms,
        }))
    }

    async fn history(
        &self,
        request: Request<pb::FeedbackHistoryRequest>,
    ) -> Result<Response<pb::FeedbackHistoryResponse>, Status> {
        let (record, rows) = self
            .control
            .feedback_history(&request.into_inner().request_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::feedback_history(record, rows)))
    }
}
