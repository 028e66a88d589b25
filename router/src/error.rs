//! Errors, and the one place that classifies them: [`PipelineError`] for
//! everything a request can hit, [`ControlError`] for the control plane
//! (admin calls and feedback).
//!
//! [`Classified::kind`] (one match for each type) classifies every variant once, as an
//! [`ErrorKind`] free of any transport; the request log records the kind's
//! name and each transport maps kinds to its own codes in one small table
//! (`server/src/grpc/status.rs`, `server/src/http/error.rs`).

use crate::data::log::LogError;
use crate::engine::EngineError;
use crate::guardrails::Blocked;
use crate::guardrails::rails::RailsError;
use crate::models::store::StoreError;
use crate::retrieval::RetrievalError;

/// Why a request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The query is empty or only whitespace.
    #[error("query must not be empty")]
    EmptyQuery,
    /// The query is longer than the configured limit.
    #[error("query is {len} characters long; the limit is {max} characters")]
    QueryTooLong {
        /// Its length in characters.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A request field the server cannot use as given.
    #[error("invalid `{field}`: {reason}")]
    InvalidRequest {
        /// The field.
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The caller forced an expert that is not configured.
    #[error("unknown expert `{name}`; configured experts: {known}")]
    UnknownExpert {
        /// The name asked for.
        name: String,
        /// The configured names, comma-separated.
        known: String,
    },
    /// Admission control: too many requests in flight.
    #[error("the server is at its limit of {max} requests in flight; retry later")]
    Overloaded {
        /// The limit.
        max: usize,
    },
    /// An input rail refused the query.
    #[error(transparent)]
    Blocked(#[from] Blocked),
    /// An input rail found the query malformed (control characters, mixed scripts).
    #[error("invalid query ({rail} rail): {reason}")]
    InvalidInput {
        /// The rail.
        rail: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The client went away before the answer was complete.
    #[error("request cancelled by the client")]
    Cancelled,
    /// The client of a streamed answer read none of it for too long: the
    /// stream was cut and its slot freed.
    #[error(
        "answer stream cut: the client read nothing for {waited_ms} ms (limits.stream_write_timeout_ms); read the stream as it arrives"
    )]
    StalledReader {
        /// How long the stream waited for the client.
        waited_ms: u64,
    },
    /// The model runtime failed or rejected the request.
    #[error("engine failure: {0}")]
    Engine(#[from] EngineError),
    /// Retrieval failed.
    #[error("retrieval failure")]
    Retrieval(#[from] RetrievalError),
}

/// Why a control-plane call (promotion, shadow, split, rails, re-index,
/// feedback, the cycle journal) did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A request field the server cannot use as given.
    #[error("invalid `{field}`: {reason}")]
    InvalidRequest {
        /// The field.
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A model version could not be loaded or run.
    #[error("engine failure: {0}")]
    Engine(#[from] EngineError),
    /// The retrieval index could not be rebuilt.
    #[error("retrieval failure")]
    Retrieval(#[from] RetrievalError),
    /// Feedback names a request id the log does not hold.
    #[error("no request with id `{request_id}` in the request log")]
    UnknownRequest {
        /// The id asked for.
        request_id: String,
    },
    /// The request is still being answered: its record is logged when the
    /// answer ends.
    #[error(
        "request `{request_id}` is still being answered; its record is logged when the answer ends: ask again then"
    )]
    RequestInFlight {
        /// The id asked for.
        request_id: String,
    },
    /// Feedback that cannot be recorded as given.
    #[error("invalid feedback: {reason}")]
    InvalidFeedback {
        /// What is wrong and what is expected.
        reason: String,
    },
    /// Rails could not be (re)configured.
    #[error(transparent)]
    Rails(#[from] RailsError),
    /// The request log failed.
    #[error("request log failure")]
    Log(#[from] LogError),
    /// The request log cannot store rows now (its writes fail): nothing
    /// was recorded, and a request's record may have been lost with them.
    #[error("the request log cannot store data now ({reason}); nothing was recorded: retry later")]
    LogUnavailable {
        /// The failed commit's message (e.g. "database or disk is full").
        reason: String,
    },
    /// A model slot that does not exist.
    #[error("unknown model slot `{slot}`; slots: {known}")]
    UnknownSlot {
        /// The slot asked for.
        slot: String,
        /// The slots, comma-separated.
        known: String,
    },
    /// Re-indexing needs corpora and no expert has one.
    #[error("no expert has a corpus to index; set `corpus` on the experts that should answer from documents")]
    NoCorpus,
    /// Promotion needs a model registry and the server has none.
    #[error("this server has no model registry; set `registry_dir` (FLYWHEEL_REGISTRY_DIR) to promote models")]
    NoModelStore,
    /// The model registry refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shadow settings that cannot be used.
    #[error("invalid shadow: {reason}")]
    InvalidShadow {
        /// What to fix.
        reason: String,
    },
    /// A/B split weights that cannot be used.
    #[error("invalid split: {reason}")]
    InvalidSplit {
        /// What to fix.
        reason: String,
    },
    /// No split is set on the slot.
    #[error("no A/B split is set on slot `{slot}`")]
    NoSplit {
        /// The slot.
        slot: String,
    },
    /// No shadow is set on the slot.
    #[error("no shadow is set on slot `{slot}`")]
    NoShadow {
        /// The slot.
        slot: String,
    },
    /// Another replica changed the slot while this change was prepared;
    /// nothing was changed.
    #[error(
        "slot `{slot}` was changed by another replica while this change was prepared; nothing was changed: send it again"
    )]
    StateChanged {
        /// The slot.
        slot: String,
    },
    /// A model failed to load, warm up or validate; the slot keeps its model.
    #[error("model version `{version}` was rejected and the slot keeps serving `{serving}`: {reason}")]
    ModelRejected {
        /// The version tried.
        version: String,
        /// The version still serving.
        serving: String,
        /// Why, with its causes.
        reason: String,
    },
}

/// What kind of failure an error is, independent of any transport: the one
/// classification every transport maps to its own codes (gRPC status, HTTP
/// status) and the request log records by [`ErrorKind::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request cannot be used as given; the message says what to fix.
    InvalidArgument,
    /// It names something that does not exist.
    NotFound,
    /// It would create something that already exists.
    AlreadyExists,
    /// The server is at its admission limit; retry later.
    Overloaded,
    /// Not possible now; retry later.
    Unavailable,
    /// A rail refused it.
    Blocked,
    /// The client went away.
    Cancelled,
    /// It took too long (a client that stopped reading its stream).
    DeadlineExceeded,
    /// The server is not in a state to do it (no registry, no shadow set, ...).
    FailedPrecondition,
    /// The server failed; the cause is in the server log, not in the answer.
    Internal,
}

impl ErrorKind {
    /// Every kind, for exhaustive tests of the transports' tables.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Overloaded,
        ErrorKind::Unavailable,
        ErrorKind::Blocked,
        ErrorKind::Cancelled,
        ErrorKind::DeadlineExceeded,
        ErrorKind::FailedPrecondition,
        ErrorKind::Internal,
    ];

    /// The status name recorded in the request log.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Overloaded => "resource_exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Blocked => "permission_denied",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::Internal => "internal",
        }
    }
}

/// An engine error's kind, the same on both planes.
fn engine_kind(e: &EngineError) -> ErrorKind {
    match e {
        EngineError::Rejected(_) => ErrorKind::InvalidArgument,
        EngineError::Disconnected => ErrorKind::Unavailable,
        EngineError::Overloaded(_) => ErrorKind::Overloaded,
        EngineError::ModelNotFound { .. }
        | EngineError::Load { .. }
        | EngineError::InvalidLabels(_)
        | EngineError::Backend(_) => ErrorKind::Internal,
    }
}

/// What both error types give a transport and the log: a kind, and
/// whether the message may reach the client.
pub trait Classified: std::error::Error {
    /// The kind of this error: the one classification every transport and
    /// the request log use.
    fn kind(&self) -> ErrorKind;

    /// Whether the error is an engine that stopped.
    fn engine_stopped(&self) -> bool;

    /// Whether a client is told only that the server failed: server faults,
    /// and an engine that stopped (the cause, paths and backend messages,
    /// goes to the server log).
    fn hides_cause(&self) -> bool {
        self.kind() == ErrorKind::Internal || self.engine_stopped()
    }

    /// The status the request log records: the kind's name.
    fn status_name(&self) -> &'static str {
        self.kind().as_str()
    }
}

impl Classified for PipelineError {
    fn kind(&self) -> ErrorKind {
        use ErrorKind as K;
        match self {
            PipelineError::EmptyQuery
            | PipelineError::QueryTooLong { .. }
            | PipelineError::InvalidRequest { .. }
            | PipelineError::InvalidInput { .. } => K::InvalidArgument,
            PipelineError::UnknownExpert { .. } => K::NotFound,
            PipelineError::Overloaded { .. } => K::Overloaded,
            PipelineError::Blocked(_) => K::Blocked,
            PipelineError::Cancelled => K::Cancelled,
            PipelineError::StalledReader { .. } => K::DeadlineExceeded,
            PipelineError::Engine(e) => engine_kind(e),
            PipelineError::Retrieval(_) => K::Internal,
        }
    }

    fn engine_stopped(&self) -> bool {
        matches!(self, PipelineError::Engine(EngineError::Disconnected))
    }
}

impl Classified for ControlError {
    fn kind(&self) -> ErrorKind {
        use ErrorKind as K;
        match self {
            ControlError::InvalidRequest { .. }
            | ControlError::InvalidFeedback { .. }
            | ControlError::InvalidShadow { .. }
            | ControlError::InvalidSplit { .. }
            | ControlError::Rails(RailsError::InvalidSpec { .. })
            | ControlError::Store(StoreError::InvalidVersion(_)) => K::InvalidArgument,
            ControlError::UnknownRequest { .. }
            | ControlError::UnknownSlot { .. }
            | ControlError::Store(StoreError::UnknownVersion(_) | StoreError::UnknownCycle(_)) => K::NotFound,
            ControlError::Store(StoreError::VersionExists(_)) => K::AlreadyExists,
            ControlError::RequestInFlight { .. }
            | ControlError::LogUnavailable { .. }
            | ControlError::StateChanged { .. } => K::Unavailable,
            ControlError::Log(e) if e.store_unreachable() => K::Unavailable,
            ControlError::Rails(RailsError::Embedder { .. })
            | ControlError::NoModelStore
            | ControlError::NoCorpus
            | ControlError::NoShadow { .. }
            | ControlError::NoSplit { .. }
            | ControlError::ModelRejected { .. }
            | ControlError::Store(StoreError::NothingToRollBack(_) | StoreError::CycleRunning(_)) => {
                K::FailedPrecondition
            }
            ControlError::Engine(e) => engine_kind(e),
            ControlError::Rails(RailsError::Head(_))
            | ControlError::Retrieval(_)
            | ControlError::Log(_)
            | ControlError::Store(StoreError::Io { .. } | StoreError::Corrupt { .. }) => K::Internal,
        }
    }

    fn engine_stopped(&self) -> bool {
        matches!(self, ControlError::Engine(EngineError::Disconnected))
    }
}
