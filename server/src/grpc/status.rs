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

    /// One value of every variant (every nested variant where the kind
    /// depends on it); the exhaustive match below stops compiling when a
    /// variant is added, so the list cannot fall behind.
    fn every_variant() -> Vec<PipelineError> {
        use flywheel_router::data::log::LogError;
        use flywheel_router::guardrails::Blocked;
        use flywheel_router::guardrails::rails::RailsError;
        use flywheel_router::models::store::StoreError;
        use flywheel_router::retrieval::RetrievalError;
        let s = String::new;
        let json = || serde_json::from_str::<u8>("x").unwrap_err();
        vec![
            PipelineError::EmptyQuery,
            PipelineError::QueryTooLong { len: 2, max: 1 },
            PipelineError::InvalidRequest { field: "f", reason: s() },
            PipelineError::UnknownExpert { name: s(), known: s() },
            PipelineError::Overloaded { max: 1 },
            PipelineError::Blocked(Blocked { rail: s(), message: s(), verdicts: vec![], logged_query: None }),
            PipelineError::InvalidInput { rail: s(), reason: s() },
            PipelineError::Cancelled,
            PipelineError::Engine(EngineError::ModelNotFound { path: s() }),
            PipelineError::Engine(EngineError::Load { path: s(), source: anyhow::anyhow!("x") }),
            PipelineError::Engine(EngineError::Rejected(s())),
            PipelineError::Engine(EngineError::InvalidLabels(s())),
            PipelineError::Engine(EngineError::Backend(anyhow::anyhow!("x"))),
            PipelineError::Engine(EngineError::Disconnected),
            PipelineError::Retrieval(RetrievalError(anyhow::anyhow!("x"))),
            PipelineError::UnknownRequest { request_id: s() },
            PipelineError::RequestInFlight { request_id: s() },
            PipelineError::InvalidFeedback { reason: s() },
            PipelineError::Rails(RailsError::InvalidSpec { key: s(), reason: s() }),
            PipelineError::Rails(RailsError::Head(json())),
            PipelineError::Log(LogError::Closed),
            PipelineError::UnknownSlot { slot: s(), known: s() },
            PipelineError::NoCorpus,
            PipelineError::NoModelStore,
            PipelineError::Store(StoreError::UnknownVersion(s())),
            PipelineError::Store(StoreError::InvalidVersion(s())),
            PipelineError::Store(StoreError::VersionExists(s())),
            PipelineError::Store(StoreError::NothingToRollBack(s())),
            PipelineError::Store(StoreError::CycleRunning("x".into())),
            PipelineError::Store(StoreError::UnknownCycle(s())),
            PipelineError::Store(StoreError::Corrupt { path: "x".into(), source: json() }),
            PipelineError::InvalidShadow { reason: s() },
            PipelineError::InvalidSplit { reason: s() },
            PipelineError::NoSplit { slot: s() },
            PipelineError::NoShadow { slot: s() },
            PipelineError::ModelRejected { version: s(), serving: s(), reason: s() },
        ]
    }

    #[test]
    fn every_error_variant_is_logged_with_the_status_it_is_sent_with() {
        let mut seen = std::collections::BTreeSet::new();
        for e in every_variant() {
            seen.insert(match &e {
                PipelineError::EmptyQuery => 0,
                PipelineError::QueryTooLong { .. } => 1,
                PipelineError::InvalidRequest { .. } => 2,
                PipelineError::UnknownExpert { .. } => 3,
                PipelineError::Overloaded { .. } => 4,
                PipelineError::Blocked(_) => 5,
                PipelineError::InvalidInput { .. } => 6,
                PipelineError::Cancelled => 7,
                PipelineError::Engine(_) => 8,
                PipelineError::Retrieval(_) => 9,
                PipelineError::UnknownRequest { .. } => 10,
                PipelineError::RequestInFlight { .. } => 11,
                PipelineError::InvalidFeedback { .. } => 12,
                PipelineError::Rails(_) => 13,
                PipelineError::Log(_) => 14,
                PipelineError::UnknownSlot { .. } => 15,
                PipelineError::NoCorpus => 16,
                PipelineError::NoModelStore => 17,
                PipelineError::Store(_) => 18,
                PipelineError::InvalidShadow { .. } => 19,
                PipelineError::InvalidSplit { .. } => 20,
                PipelineError::NoSplit { .. } => 21,
                PipelineError::NoShadow { .. } => 22,
                PipelineError::ModelRejected { .. } => 23,
            });
            // The logged status is the sent code's name in snake case.
            let sent = format!("{:?}", to_status(&e).code());
            let logged: String = e.status_name().split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect();
            assert_eq!(logged, sent, "{e:?}");
        }
        assert_eq!(seen.len(), 24, "a variant is missing from every_variant()");
    }

}
