//! The demo's second cycle: the routers it distils from the first cycle's
//! (the teacher) over the logged traffic.

use std::path::Path;

use flywheel_router::engine::ModelKind;
use flywheel_router::engine::classifier::Training;
use flywheel_trainer::cycle::candidates::CandidateSpec;

/// Accuracy the second cycle's winner may give up against the best router:
/// the seed's bar (a 1B at 94% replacing a 70B at 96%).
pub const DEFAULT_TOLERANCE: f64 = 0.02;

/// The students: MiniLM-L6 classifiers, tuned end to end and head-only on
/// the rails' own encoder. (SmolLM2's first 12 blocks with a head is a
/// `--students` entry: on the demo's ~1k queries it trains in ~5 minutes and
/// lands below the teacher, 85.1% against 87.0%.)
pub fn default_candidates(encoder: &Path) -> Vec<CandidateSpec> {
    let encoder_student = |name: &str, training: Training, epochs: Option<usize>| CandidateSpec {
        encoder: Some(encoder.to_path_buf()),
        encoder_training: Some(training),
        epochs,
        ..CandidateSpec::new(name, ModelKind::EncoderClassifier)
    };
    vec![
        encoder_student("encoder-tuned", Training::EndToEnd, Some(1)),
        encoder_student("encoder-head", Training::HeadOnly, None),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_students_are_valid_candidates_that_distil() {
        let specs = default_candidates(Path::new("models/all-minilm-l6-v2"));
        flywheel_trainer::cycle::candidates::check(&specs).unwrap();
        assert!(
            specs
                .iter()
                .all(|s| s.distils(true) && s.kind == ModelKind::EncoderClassifier)
        );
    }
}
