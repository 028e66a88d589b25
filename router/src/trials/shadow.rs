//! Shadow traffic: a candidate model runs the same step as the live model on
//! a sample of live requests, off the request path, and both outputs are
//! logged under the live request's id.
//!
//! Correctness rules (the traps of mirroring): the live request never waits
//! for the shadow, never sees its output or its errors, and never fails
//! because of it. A shadow run starts only if a permit of the shadow's own
//! concurrency limit is free right away; otherwise it is skipped and counted,
//! never queued behind live work. Each run has a deadline, so a hung
//! candidate holds at most `max_concurrency` permits and stops being sampled.
//! Sampling hashes the request id, so it is reproducible and the same on
//! every request path.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::models::slots::ServedModel;

/// Shadow runs of a slot at once, by default: a shadow borrows spare CPU and
/// must not take it from live requests.
pub const DEFAULT_SHADOW_CONCURRENCY: usize = 2;
/// Deadline of one shadow run.
pub const SHADOW_DEADLINE: Duration = Duration::from_secs(60);

pub use crate::data::log::ShadowRecord;

/// Counters since the shadow was set.
#[derive(Debug, Default)]
pub struct ShadowStats {
    /// Requests selected by the sample.
    pub sampled: AtomicU64,
    /// Shadow runs started.
    pub mirrored: AtomicU64,
    /// Sampled requests skipped because the shadow was at its concurrency limit.
    pub skipped: AtomicU64,
    /// Shadow runs that failed or missed their deadline.
    pub failed: AtomicU64,
}

/// A candidate shadowing a slot.
pub struct Shadow {
    /// The slot.
    pub slot: String,
    /// The candidate, loaded and warm.
    pub model: Arc<ServedModel>,
    /// Share of live requests mirrored.
    pub fraction: f64,
    /// Runs at once at most.
    pub max_concurrency: usize,
    permits: Arc<Semaphore>,
    /// Counters.
    pub stats: ShadowStats,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("slot", &self.slot)
            .field("version", &self.model.version)
            .field("fraction", &self.fraction)
            .finish()
    }
}

/// Position of `request_id` in [0, 1): a stable hash, the same on every path.
pub fn sample_point(request_id: &str) -> f64 {
    let mut h = std::hash::DefaultHasher::new();
    request_id.hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

impl Shadow {
    /// A shadow of `slot` by `model` for `fraction` of requests.
    pub fn new(slot: impl Into<String>, model: Arc<ServedModel>, fraction: f64, max_concurrency: usize) -> Self {
        let max_concurrency = max_concurrency.max(1);
        Self {
            slot: slot.into(),
            model,
            fraction,
            max_concurrency,
            permits: Arc::new(Semaphore::new(max_concurrency)),
            stats: ShadowStats::default(),
        }
    }

    /// Whether request `request_id` is mirrored: sampled, and a permit is
    /// free now (else counted as skipped). The permit bounds the run.
    pub fn admit(&self, request_id: &str) -> Admission {
        if sample_point(request_id) >= self.fraction {
            return Admission::NotSampled;
        }
        self.stats.sampled.fetch_add(1, Ordering::Relaxed);
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => {
                self.stats.mirrored.fetch_add(1, Ordering::Relaxed);
                Admission::Run(p)
            }
            Err(_) => {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                Admission::Skipped
            }
        }
    }
}

/// [`Shadow::admit`]'s answer for one request.
#[derive(Debug)]
pub enum Admission {
    /// Outside the sampled fraction.
    NotSampled,
    /// Sampled, but the shadow is at its concurrency limit.
    Skipped,
    /// Run it, holding this permit until done.
    Run(OwnedSemaphorePermit),
}

impl Admission {
    /// The permit, when the request runs.
    pub fn permit(self) -> Option<OwnedSemaphorePermit> {
        match self {
            Self::Run(p) => Some(p),
            _ => None,
        }
    }
}

/// What a shadow has shown so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowReport {
    /// Slot.
    pub slot: String,
    /// Candidate version (empty when no shadow is set).
    pub version: String,
    /// Share mirrored.
    pub fraction: f64,
    /// Sampled since set.
    pub sampled: u64,
    /// Runs started since set.
    pub mirrored: u64,
    /// Skipped at the concurrency limit since set.
    pub skipped: u64,
    /// Failed or late since set.
    pub failed: u64,
    /// Logged runs of this version.
    pub logged: usize,
    /// Share of logged runs whose output equals the live one.
    pub agreement: Option<f64>,
    /// Logged runs whose request has a label from feedback.
    pub labelled: usize,
    /// Live accuracy on those.
    pub live_accuracy: Option<f64>,
    /// Candidate accuracy on those.
    pub shadow_accuracy: Option<f64>,
    /// Live latency p50 (ms) on the mirrored requests.
    pub live_p50_ms: Option<f64>,
    /// Live latency p99 (ms).
    pub live_p99_ms: Option<f64>,
    /// Candidate latency p50 (ms).
    pub shadow_p50_ms: Option<f64>,
    /// Candidate latency p99 (ms).
    pub shadow_p99_ms: Option<f64>,
}

/// Nearest-rank percentile of unsorted samples.
pub fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = (q * s.len() as f64).ceil().max(1.0) as usize;
    Some(s[rank.min(s.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_stable_and_close_to_the_fraction() {
        let ids: Vec<String> = (0..20_000).map(|i| format!("req-{i}")).collect();
        let hit = ids.iter().filter(|id| sample_point(id) < 0.25).count() as f64 / ids.len() as f64;
        assert!((hit - 0.25).abs() < 0.015, "{hit}");
        assert_eq!(sample_point("abc"), sample_point("abc"));
    }

    #[test]
    fn a_busy_shadow_skips_instead_of_queueing() {
        let model = Arc::new(crate::testing::stub_model("cand"));
        let shadow = Shadow::new("router", model, 1.0, 1);
        let first = shadow.admit("a").permit();
        assert!(first.is_some());
        assert!(
            matches!(shadow.admit("b"), Admission::Skipped),
            "no free permit: skipped"
        );
        drop(first);
        assert!(shadow.admit("c").permit().is_some());
        assert_eq!(shadow.stats.skipped.load(Ordering::Relaxed), 1);
        assert_eq!(shadow.stats.mirrored.load(Ordering::Relaxed), 2);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
    }
}
