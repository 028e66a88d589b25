//! Observation hooks: how the pipeline tells an observer (the server's
//! metrics) what happened, without knowing about any metrics system.
//!
//! [`Observer::request_finished`] sees every request record as it is handed
//! to the log (so metrics and the log always agree), and
//! [`Observer::inter_token`] sees each gap between two streamed deltas.

/// Default log filter of flywheel's binaries (`RUST_LOG` overrides it):
/// mistral.rs logs every request at `info`, which would drown the rest.
pub const DEFAULT_LOG_FILTER: &str = "info,mistralrs_core=warn,mistralrs_quant=warn,mistralrs=warn";

use crate::data::log::RequestRecord;

/// Receives pipeline events; implementations must be cheap and non-blocking.
pub trait Observer: Send + Sync {
    /// A request ended (any status), with its final record.
    fn request_finished(&self, _record: &RequestRecord) {}
    /// Time between two consecutive answer deltas of `expert` (seconds).
    fn inter_token(&self, _expert: &str, _seconds: f64) {}
    /// A retrieval for `expert` took `seconds` and gave `passages` passages.
    fn retrieval(&self, _expert: &str, _seconds: f64, _passages: usize) {}
    /// A request sampled for the shadow of `slot` by `version` ended in
    /// `outcome`; `seconds` is the shadow run's time (`None` when skipped).
    fn shadow(&self, _slot: &str, _version: &str, _outcome: ShadowOutcome, _seconds: Option<f64>) {}
}

/// How a sampled shadow run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowOutcome {
    /// Not run: the shadow's concurrency limit was reached.
    Skipped,
    /// Ran and made the live route decision.
    Agreed,
    /// Ran and decided differently from live.
    Disagreed,
    /// Ran and answered (expert slots: answers are not compared here).
    Answered,
    /// Failed or missed its deadline.
    Failed,
}

impl ShadowOutcome {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skipped => "skipped",
            Self::Agreed => "agreed",
            Self::Disagreed => "disagreed",
            Self::Answered => "answered",
            Self::Failed => "failed",
        }
    }
}

/// Observes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {}
