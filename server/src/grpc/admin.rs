//! `flywheel.v1.Admin`: model slots and server status.

use std::sync::Arc;
use std::time::Instant;

use flywheel_proto::v1 as pb;
use flywheel_router::Pipeline;
use tonic::{Request, Response, Status};

use super::convert;
use super::status::to_status;

/// The Admin service.
pub struct AdminService {
    pipeline: Arc<Pipeline>,
    started: Instant,
}

impl AdminService {
    /// Report on `pipeline`, counting uptime from now.
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self {
            pipeline,
            started: Instant::now(),
        }
    }

    fn slots(&self) -> Vec<pb::ModelSlot> {
        self.pipeline.registry().slots().map(|s| convert::slot(s)).collect()
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_models(&self, _: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse { slots: self.slots() }))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let admission = self.pipeline.status();
        let log = self.pipeline.log();
        Ok(Response::new(pb::StatusResponse {
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            in_flight: admission.in_flight as u32,
            max_in_flight: admission.max_in_flight as u32,
            slots: self.slots(),
            experts: self.pipeline.experts().to_vec(),
            log_records_accepted: log.stats().accepted(),
            log_records_written: log.stats().written(),
            log_path: log.path().display().to_string(),
            rails_toml: self
                .pipeline
                .rails()
                .set
                .as_ref()
                .map(|s| convert::rails_toml(s.spec()))
                .unwrap_or_default(),
        }))
    }

    async fn update_rails(
        &self,
        request: Request<pb::UpdateRailsRequest>,
    ) -> Result<Response<pb::UpdateRailsResponse>, Status> {
        let spec = self
            .pipeline
            .reconfigure_rails(&request.into_inner().toml)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::UpdateRailsResponse {
            toml: convert::rails_toml(&spec),
        }))
    }
}
