//! The demo's second cycle: the routers it distils from the first cycle's
//! (the teacher) over the logged traffic.

use std::path::Path;

use flywheel_router::engine::ModelKind;
use flywheel_router::engine::classifier::Training;
use flywheel_trainer::cycle::candidates::CandidateSpec;

/// Accuracy the second cycle's winner may give up against the best router:
/// the seed's bar (a 1B at 94% replacing a 70B at 96%).
pub const DEFAULT_TOLERANCE: f64 = 0.02;

/// The students: MiniLM-L6 classifiers (tuned end to end, and head-only on
/// the rails' own encoder), and the served model's first 12 blocks with a
/// classifier head. `quick` keeps the two that train in seconds on a CI-sized
/// log.
pub fn default_candidates(quick: bool, encoder: &Path) -> Vec<CandidateSpec> {
    let encoder_student = |name: &str, training: Training, epochs: Option<usize>| CandidateSpec {
        encoder: Some(encoder.to_path_buf()),
        encoder_training: Some(training),
        epochs,
        ..CandidateSpec::new(name, ModelKind::EncoderClassifier)
    };
    let mut out = vec![
        encoder_student("encoder-tuned", Training::EndToEnd, Some(1)),
        encoder_student("encoder-head", Training::HeadOnly, None),
    ];
    if !quick {
        out.push(CandidateSpec {
            keep_layers: Some(12),
            epochs: Some(2),
            ..CandidateSpec::new("decoder-12", ModelKind::DecoderClassifier)
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_students_are_valid_candidates_that_distil() {
        for quick in [false, true] {
            let specs = default_candidates(quick, Path::new("models/all-minilm-l6-v2"));
            flywheel_trainer::cycle::candidates::check(&specs).unwrap();
            assert!(specs.iter().all(|s| s.distils(true)));
            assert_eq!(specs.len(), if quick { 2 } else { 3 });
        }
    }
}
