//! Where error kinds become gRPC statuses: one table over
//! [`ErrorKind`], the domain's one classification of its errors.

use flywheel_router::{Classified, ErrorKind};
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
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Internal => Code::Internal,
    }
}

/// How tonic's message decoder begins the `INTERNAL` status it answers a
/// request with when the request is not a valid protobuf message.
const UNDECODABLE: &str = "failed to decode Protobuf message";

/// tonic answers a request it cannot decode (malformed protobuf, a string
/// field that is not UTF-8) with `INTERNAL`, before any handler runs. The
/// fault is the client's: this turns that answer (its status is in the
/// headers) into `INVALID_ARGUMENT` saying what to fix. Applied to every
/// response as a layer; other answers pass unchanged.
pub fn undecodable_request_is_invalid_argument(
    mut response: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() == Code::Internal
        && let Some(detail) = status.message().strip_prefix(UNDECODABLE)
    {
        let detail = detail.trim_start_matches(':').trim();
        let fixed = Status::invalid_argument(format!(
            "the request is not a valid message of this method ({detail}); string fields must be UTF-8"
        ));
        crate::telemetry::record_status(Code::InvalidArgument);
        if fixed.add_header(response.headers_mut()).is_err() {
            tracing::debug!("could not rewrite an undecodable request's status");
        }
    }
    response
}

/// Map a request or control-plane error to the status the client sees.
pub fn to_status(error: &(impl Classified + ?Sized)) -> Status {
    let code = code(error.kind());
    crate::telemetry::record_status(code);
    Status::new(code, crate::errors::public_message(error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_router::engine::EngineError;
    use flywheel_router::{ControlError, PipelineError};

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
        let s = to_status(&ControlError::RequestInFlight {
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

    /// One value of every variant of both error types (every nested variant
    /// where the kind depends on it); the exhaustive matches below stop
    /// compiling when a variant is added, so the lists cannot fall behind.
    fn every_request_error() -> Vec<PipelineError> {
        use flywheel_router::guardrails::Blocked;
        use flywheel_router::retrieval::RetrievalError;
        let s = String::new;
        vec![
            PipelineError::EmptyQuery,
            PipelineError::QueryTooLong { len: 2, max: 1 },
            PipelineError::InvalidRequest {
                field: "f",
                reason: s(),
            },
            PipelineError::UnknownExpert { name: s(), known: s() },
            PipelineError::Overloaded { max: 1 },
            PipelineError::Blocked(Blocked {
                rail: s(),
                message: s(),
                verdicts: vec![],
                logged_query: None,
            }),
            PipelineError::InvalidInput { rail: s(), reason: s() },
            PipelineError::Cancelled,
            PipelineError::StalledReader { waited_ms: 1 },
            PipelineError::Engine(EngineError::ModelNotFound { path: s() }),
            PipelineError::Engine(EngineError::Load {
                path: s(),
                source: anyhow::anyhow!("x"),
            }),
            PipelineError::Engine(EngineError::Rejected(s())),
            PipelineError::Engine(EngineError::InvalidLabels(s())),
            PipelineError::Engine(EngineError::Backend(anyhow::anyhow!("x"))),
            PipelineError::Engine(EngineError::Disconnected),
            PipelineError::Engine(EngineError::Overloaded(s())),
            PipelineError::Retrieval(RetrievalError(anyhow::anyhow!("x"))),
        ]
    }

    fn every_control_error() -> Vec<ControlError> {
        use flywheel_router::data::log::LogError;
        use flywheel_router::guardrails::rails::RailsError;
        use flywheel_router::models::store::StoreError;
        use flywheel_router::retrieval::RetrievalError;
        let s = String::new;
        let json = || serde_json::from_str::<u8>("x").unwrap_err();
        vec![
            ControlError::InvalidRequest {
                field: "f",
                reason: s(),
            },
            ControlError::Engine(EngineError::Load {
                path: s(),
                source: anyhow::anyhow!("x"),
            }),
            ControlError::Engine(EngineError::Disconnected),
            ControlError::Retrieval(RetrievalError(anyhow::anyhow!("x"))),
            ControlError::UnknownRequest { request_id: s() },
            ControlError::RequestInFlight { request_id: s() },
            ControlError::InvalidFeedback { reason: s() },
            ControlError::Rails(RailsError::InvalidSpec { key: s(), reason: s() }),
            ControlError::Rails(RailsError::Head(json())),
            ControlError::Log(LogError::Closed),
            ControlError::LogUnavailable { reason: s() },
            ControlError::UnknownSlot { slot: s(), known: s() },
            ControlError::NoCorpus,
            ControlError::NoModelStore,
            ControlError::Store(StoreError::UnknownVersion(s())),
            ControlError::Store(StoreError::InvalidVersion(s())),
            ControlError::Store(StoreError::VersionExists(s())),
            ControlError::Store(StoreError::NothingToRollBack(s())),
            ControlError::Store(StoreError::CycleRunning("x".into())),
            ControlError::Store(StoreError::UnknownCycle(s())),
            ControlError::Store(StoreError::Corrupt {
                path: "x".into(),
                source: json(),
            }),
            ControlError::InvalidShadow { reason: s() },
            ControlError::InvalidSplit { reason: s() },
            ControlError::NoSplit { slot: s() },
            ControlError::NoShadow { slot: s() },
            ControlError::StateChanged { slot: s() },
            ControlError::ModelRejected {
                version: s(),
                serving: s(),
                reason: s(),
            },
        ]
    }

    /// The logged status (the kind's name) is the sent code's name in snake case.
    fn logged_as_sent(e: &(impl Classified + std::fmt::Debug), logged: &str) {
        let sent = format!("{:?}", to_status(e).code());
        let camel: String = logged.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect();
        assert_eq!(camel, sent, "{e:?}");
    }

    #[test]
    fn every_error_variant_is_logged_with_the_status_it_is_sent_with() {
        let mut seen = std::collections::BTreeSet::new();
        for e in every_request_error() {
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
                PipelineError::StalledReader { .. } => 10,
            });
            logged_as_sent(&e, e.status_name());
        }
        assert_eq!(seen.len(), 11, "a request error variant is missing from the list");
        seen.clear();
        for e in every_control_error() {
            seen.insert(match &e {
                ControlError::InvalidRequest { .. } => 0,
                ControlError::Engine(_) => 1,
                ControlError::Retrieval(_) => 2,
                ControlError::UnknownRequest { .. } => 3,
                ControlError::RequestInFlight { .. } => 4,
                ControlError::InvalidFeedback { .. } => 5,
                ControlError::Rails(_) => 6,
                ControlError::Log(_) => 7,
                ControlError::UnknownSlot { .. } => 8,
                ControlError::NoCorpus => 9,
                ControlError::NoModelStore => 10,
                ControlError::Store(_) => 11,
                ControlError::InvalidShadow { .. } => 12,
                ControlError::InvalidSplit { .. } => 13,
                ControlError::NoSplit { .. } => 14,
                ControlError::NoShadow { .. } => 15,
                ControlError::ModelRejected { .. } => 16,
                ControlError::LogUnavailable { .. } => 17,
                ControlError::StateChanged { .. } => 18,
            });
            logged_as_sent(&e, e.status_name());
        }
        assert_eq!(seen.len(), 19, "a control error variant is missing from the list");
    }
}
