//! Where error kinds become gRPC statuses: one table over
//! [`ErrorKind`], the domain's one classification of its errors.

use flywheel_router::{ErrorKind, PipelineError};
use tonic::{Code, Status};

/// The gRPC code of each error kind.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::Overloaded => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Blocked => Code::PermissionDenied,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Internal => Code::Internal,
    }
}

/// Map a pipeline error to the status the client sees.
pub fn to_status(error: &PipelineError) -> Status {
    let code = code(error.kind());
    crate::telemetry::record_status(code);
    Status::new(code, crate::errors::public_message(error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_router::engine::EngineError;

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

    #[test]
    fn every_kind_has_its_own_code_and_the_logged_name_matches_it() {
        let codes: std::collections::BTreeSet<i32> = ErrorKind::ALL.iter().map(|k| code(*k) as i32).collect();
        assert_eq!(codes.len(), ErrorKind::ALL.len());
        for kind in ErrorKind::ALL {
            // The log's status name is the gRPC code's name in snake case.
            let grpc = format!("{:?}", code(kind));
            let snake: String = grpc
                .chars()
                .enumerate()
                .flat_map(|(i, c)| {
                    let lower = c.to_ascii_lowercase();
                    if c.is_ascii_uppercase() && i > 0 {
                        vec!['_', lower]
                    } else {
                        vec![lower]
                    }
                })
                .collect();
            assert_eq!(kind.as_str(), snake, "{kind:?}");
        }
        // The engine stopping is logged as it is sent.
        let e = PipelineError::Engine(EngineError::Disconnected);
        assert_eq!(e.status_name(), "unavailable");
        assert_eq!(to_status(&e).code(), Code::Unavailable);
    }
}
