//! `flywheel.v1.Admin`: model slots and server status.

use std::sync::Arc;
use std::time::Instant;

use flywheel_proto::v1 as pb;
use flywheel_router::ControlPlane;
use tonic::{Request, Response, Status};

use super::convert::{self, Paths};
use super::status::to_status;

/// The Admin service.
pub struct AdminService {
    control: Arc<ControlPlane>,
    started: Instant,
    token: Option<String>,
    replica: String,
}

/// Metadata key of the admin token.
const AUTHORIZATION: &str = "authorization";

/// Equal strings, in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AdminService {
    /// Report on and change what `control` serves, counting uptime from now;
    /// mutating calls need `token`; `replica` names this process in `Status`.
    pub fn new(control: Arc<ControlPlane>, token: Option<String>, replica: String) -> Self {
        Self {
            control,
            started: Instant::now(),
            token,
            replica,
        }
    }

    /// Check the bearer token of a mutating call.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.token else {
            return Err(Status::failed_precondition(
                "admin calls are disabled: set `admin_token` (FLYWHEEL_ADMIN_TOKEN) on the server",
            ));
        };
        let given = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if same_secret(t.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated("wrong admin token")),
            None => Err(Status::unauthenticated(
                "missing admin token: send metadata `authorization: Bearer <admin_token>`",
            )),
        }
    }

    /// How much of server paths `request`'s caller may see.
    fn paths<T>(&self, request: &Request<T>) -> Paths {
        if self.authorize(request).is_ok() {
            Paths::Full
        } else {
            Paths::Names
        }
    }

    fn slots(&self, paths: Paths) -> Vec<pb::ModelSlot> {
        self.control
            .serving()
            .registry()
            .slots()
            .map(|s| convert::slot(s, &self.control, paths))
            .collect()
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse {
            slots: self.slots(self.paths(&request)),
        }))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let paths = self.paths(&request);
        let admission = self.control.serving().status();
        let log = self.control.serving().log();
        Ok(Response::new(pb::StatusResponse {
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            in_flight: admission.in_flight as u32,
            max_in_flight: admission.max_in_flight as u32,
            slots: self.slots(paths),
            experts: self.control.serving().experts().to_vec(),
            log_records_accepted: log.stats().accepted(),
            log_records_written: log.stats().written(),
            log_records_failed: log.stats().failed(),
            log_feedback_failed: log.stats().feedback_failed(),
            log_write_error: log.stats().write_failure().map(|f| f.reason).unwrap_or_default(),
            log_path: paths.show_log(log.location()),
            replica: self.replica.clone(),
            rails_toml: self
                .control
                .serving()
                .rails()
                .set
                .as_ref()
                .map(|s| convert::rails_toml(s.spec(), paths))
                .unwrap_or_default(),
            retrieval: self
                .control
                .serving()
                .retrieval_stats()
                .as_ref()
                .map(convert::index_stats),
        }))
    }

    async fn update_rails(
        &self,
        request: Request<pb::UpdateRailsRequest>,
    ) -> Result<Response<pb::UpdateRailsResponse>, Status> {
        self.authorize(&request)?;
        let spec = self
            .control
            .reconfigure_rails(&request.into_inner().toml)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::UpdateRailsResponse {
            toml: convert::rails_toml(&spec, Paths::Full),
        }))
    }

    async fn promote(&self, request: Request<pb::PromoteRequest>) -> Result<Response<pb::SwapResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let report = self
            .control
            .promote(&r.slot, &r.version)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::swap(&report)))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::SwapResponse>, Status> {
        self.authorize(&request)?;
        let report = self
            .control
            .rollback(&request.into_inner().slot)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::swap(&report)))
    }

    async fn set_shadow(&self, request: Request<pb::SetShadowRequest>) -> Result<Response<pb::ShadowReport>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let concurrency = match r.max_concurrency {
            0 => flywheel_router::trials::shadow::DEFAULT_SHADOW_CONCURRENCY,
            n => n as usize,
        };
        let report = self
            .control
            .set_shadow(&r.slot, &r.version, r.fraction, concurrency)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::shadow(&report)))
    }

    async fn clear_shadow(
        &self,
        request: Request<pb::ShadowSlotRequest>,
    ) -> Result<Response<pb::ShadowReport>, Status> {
        self.authorize(&request)?;
        let report = self
            .control
            .clear_shadow(&request.into_inner().slot)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::shadow(&report)))
    }

    async fn shadow_report(
        &self,
        request: Request<pb::ShadowSlotRequest>,
    ) -> Result<Response<pb::ShadowReport>, Status> {
        let report = self
            .control
            .shadow_report(&request.into_inner().slot)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::shadow(&report)))
    }

    async fn set_split(&self, request: Request<pb::SetSplitRequest>) -> Result<Response<pb::SplitReport>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let mut weights: Vec<(String, f64)> = r.weights.into_iter().collect();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        let report = self
            .control
            .set_split(&r.slot, &weights)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::split(&report)))
    }

    async fn clear_split(&self, request: Request<pb::SplitSlotRequest>) -> Result<Response<pb::SplitReport>, Status> {
        self.authorize(&request)?;
        let report = self
            .control
            .clear_split(&request.into_inner().slot)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::split(&report)))
    }

    async fn split_report(&self, request: Request<pb::SplitSlotRequest>) -> Result<Response<pb::SplitReport>, Status> {
        let report = self
            .control
            .split_report(&request.into_inner().slot)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::split(&report)))
    }

    async fn reindex(&self, request: Request<pb::ReindexRequest>) -> Result<Response<pb::ReindexResponse>, Status> {
        self.authorize(&request)?;
        let stats = self.control.reindex().await.map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::index_stats(&stats)))
    }

    async fn list_cycles(
        &self,
        request: Request<pb::ListCyclesRequest>,
    ) -> Result<Response<pb::ListCyclesResponse>, Status> {
        let paths = self.paths(&request);
        let request = request.into_inner();
        let limit = if request.id.is_some() {
            0
        } else {
            request.limit as usize
        };
        let mut cycles = self.control.cycles(limit).map_err(|e| to_status(&e))?;
        if let Some(id) = &request.id {
            cycles.retain(|c| &c.id == id);
            if cycles.is_empty() {
                let missing = flywheel_router::models::store::StoreError::UnknownCycle(id.clone());
                return Err(to_status(&flywheel_router::ControlError::from(missing)));
            }
        }
        Ok(Response::new(pb::ListCyclesResponse {
            cycles: cycles.iter().map(|c| convert::cycle(c, paths)).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret(b"abcdefgh", b"abcdefgh"));
        assert!(!same_secret(b"abcdefgh", b"abcdefgx"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
