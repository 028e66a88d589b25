//! The one place where domain errors become gRPC statuses.

use flywheel_router::PipelineError;
use flywheel_router::engine::EngineError;
use flywheel_router::guardrails::rails::RailsError;
use flywheel_router::store::StoreError;
use tonic::{Code, Status};

/// Map a pipeline error to the status the client sees. Internal failures get
/// a generic message; their cause goes to the server log.
pub fn to_status(error: &PipelineError) -> Status {
    let code = match error {
        PipelineError::EmptyQuery
        | PipelineError::QueryTooLong { .. }
        | PipelineError::InvalidRequest { .. }
        | PipelineError::InvalidFeedback { .. }
        | PipelineError::InvalidInput { .. } => Code::InvalidArgument,
        PipelineError::UnknownExpert { .. } | PipelineError::UnknownRequest { .. } => Code::NotFound,
        PipelineError::Overloaded { .. } => Code::ResourceExhausted,
        PipelineError::RequestInFlight { .. } => Code::Unavailable,
        PipelineError::Blocked(_) => Code::PermissionDenied,
        PipelineError::Cancelled => Code::Cancelled,
        PipelineError::Engine(e) => match e {
            EngineError::Rejected(_) => Code::InvalidArgument,
            EngineError::ModelNotFound { .. }
            | EngineError::Load { .. }
            | EngineError::InvalidLabels(_)
            | EngineError::Backend(_) => Code::Internal,
            EngineError::Disconnected => Code::Unavailable,
        },
        PipelineError::Rails(RailsError::InvalidSpec { .. }) => Code::InvalidArgument,
        PipelineError::Rails(RailsError::Embedder { .. }) => Code::FailedPrecondition,
        PipelineError::Retrieval(_) | PipelineError::Log(_) | PipelineError::Rails(RailsError::Head(_)) => {
            Code::Internal
        }
        PipelineError::UnknownSlot { .. } => Code::NotFound,
        PipelineError::InvalidShadow { .. } | PipelineError::InvalidSplit { .. } => Code::InvalidArgument,
        PipelineError::NoModelStore
        | PipelineError::NoCorpus
        | PipelineError::NoShadow { .. }
        | PipelineError::NoSplit { .. }
        | PipelineError::ModelRejected { .. } => Code::FailedPrecondition,
        PipelineError::Store(e) => match e {
            StoreError::UnknownVersion(_) => Code::NotFound,
            StoreError::InvalidVersion(_) => Code::InvalidArgument,
            StoreError::VersionExists(_) => Code::AlreadyExists,
            StoreError::NothingToRollBack(_) | StoreError::CycleRunning(_) => Code::FailedPrecondition,
            StoreError::UnknownCycle(_) => Code::NotFound,
            StoreError::Io { .. } | StoreError::Corrupt { .. } => Code::Internal,
        },
    };
    crate::telemetry::record_status(code);
    // Server-side failures keep their cause in the log; a request still in
    // flight (also UNAVAILABLE) is the client's to retry, so it says so.
    let server_side = code == Code::Internal || matches!(error, PipelineError::Engine(EngineError::Disconnected));
    if server_side {
        tracing::error!(error = %error, cause = ?std::error::Error::source(error), "request failed");
        Status::new(code, "internal error; see the server log")
    } else {
        Status::new(code, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_keep_their_message() {
        let s = to_status(&PipelineError::QueryTooLong { len: 10, max: 5 });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("limit is 5"));
        let s = to_status(&PipelineError::UnknownExpert {
            name: "x".into(),
            known: "hr, it".into(),
        });
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(
            to_status(&PipelineError::Overloaded { max: 1 }).code(),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let s = to_status(&PipelineError::Engine(EngineError::Backend(anyhow::anyhow!(
            "secret path /x"
        ))));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"));
        let s = to_status(&PipelineError::Engine(EngineError::Disconnected));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("see the server log"));
    }

    #[test]
    fn a_request_still_in_flight_is_retryable_and_says_why() {
        let s = to_status(&PipelineError::RequestInFlight {
            request_id: "r1".into(),
        });
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("`r1` is still being answered"), "{}", s.message());
    }
}
