//! Encoder classifier routers on the real all-MiniLM-L6-v2 encoder: the
//! route batcher gives batched decisions equal to lone ones, a decision is
//! one forward pass whatever the number of labels, a full queue is refused
//! at once, and a caller that goes away leaves the batch.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flywheel_router::embed::Embedder;
use flywheel_router::engine::classifier::{self, BatchSettings, Classifier};
use flywheel_router::engine::{ChatMessage, Engine, EngineError, LabelSet};

fn encoder_dir() -> PathBuf {
    match std::env::var_os("FLYWHEEL_TEST_EMBEDDER") {
        Some(d) => PathBuf::from(d),
        None => {
            let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models");
            flywheel_router::model_prep::fetch::ensure_embedder(&models, "python3").unwrap()
        }
    }
}

/// A prototype classifier (see `testing::prototype_classifier`).
fn build(dir: &Path, labels: &[(String, Vec<&str>)], out_of_scope: Option<f32>) {
    let labels: Vec<(&str, &[&str])> = labels.iter().map(|(l, t)| (l.as_str(), t.as_slice())).collect();
    flywheel_router::testing::prototype_classifier(dir, &encoder_dir(), &labels, out_of_scope);
}

fn topics() -> Vec<(String, Vec<&'static str>)> {
    vec![
        (
            "weather".into(),
            vec!["will it rain tomorrow", "how hot is it outside today"],
        ),
        ("music".into(), vec!["play some jazz", "turn the song up"]),
        ("alarm".into(), vec!["wake me up at seven", "set an alarm for noon"]),
    ]
}

fn load(dir: &Path, settings: BatchSettings) -> Classifier {
    Classifier::load(dir, settings, &candle_core::Device::Cpu).unwrap()
}

const QUERIES: [&str; 12] = [
    "is it going to snow this weekend in the mountains near the lake",
    "play the new album",
    "wake me at 6",
    "what's the forecast",
    "skip this track and play something by the beatles instead please",
    "set my alarm",
    "umbrella needed?",
    "louder",
    "cancel every alarm I set for tomorrow morning and the day after",
    "sunny or cloudy",
    "next song",
    "remind me with an alarm in ten minutes",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_decisions_equal_lone_decisions_and_take_fewer_passes() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), &topics(), None);
    let c = Arc::new(load(dir.path(), BatchSettings::default()));
    let run = flywheel_router::testing::lone_and_batched(&c, &QUERIES).await;
    let alone = run.alone;
    assert_eq!(run.lone_passes, QUERIES.len() as u64);
    let passes = run.batched_passes;
    assert!(
        passes < QUERIES.len() as u64 / 2,
        "{passes} passes for {} queries",
        QUERIES.len()
    );
    let worst = run.worst;
    assert!(worst <= 1e-4, "batched and lone probabilities differ by {worst}");
    // The prototypes route the obvious queries right.
    let top = |c: &classifier::Classification| {
        c.log_probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    assert_eq!(top(&alone[0]), 0);
    assert_eq!(top(&alone[1]), 1);
    assert_eq!(top(&alone[2]), 2);
}

#[tokio::test]
async fn a_decision_is_one_forward_pass_for_5_or_60_labels() {
    for n in [5usize, 60] {
        let dir = tempfile::tempdir().unwrap();
        // Names sharing their leading tokens: the case that multiplies a
        // label-scoring router's passes.
        let labels: Vec<(String, Vec<&str>)> = (0..n)
            .map(|i| (format!("card payment issue {i}"), vec![QUERIES[i % QUERIES.len()]]))
            .collect();
        build(dir.path(), &labels, None);
        let c = load(dir.path(), BatchSettings::default());
        let set = LabelSet::new(labels.iter().map(|l| l.0.clone()).collect()).unwrap();
        Embedder::forget_recent();
        let before = c.batcher().forward_passes();
        let scores = c
            .score_labels(&[ChatMessage::user("my card payment was declined")], &set)
            .await
            .unwrap();
        assert_eq!(scores.logprobs.len(), n);
        assert_eq!(scores.forward_passes, 1);
        assert_eq!(c.batcher().forward_passes() - before, 1, "{n} labels");
    }
}

#[tokio::test]
async fn labels_it_was_not_trained_for_are_refused_and_it_cannot_answer() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), &topics(), None);
    let c = load(dir.path(), BatchSettings::default());
    let set = LabelSet::new(vec!["weather".into(), "banking".into()]).unwrap();
    let err = c.score_labels(&[ChatMessage::user("hi")], &set).await.unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidLabels(m) if m.contains("banking")),
        "{err}"
    );
    let err = c
        .generate(vec![ChatMessage::user("hi")], Default::default())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::Rejected(_)));
}

#[tokio::test]
async fn queries_unlike_the_training_data_are_out_of_scope() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), &topics(), Some(0.5));
    let c = load(dir.path(), BatchSettings::default());
    let near = c.classify("will it rain today").await.unwrap();
    let far = c
        .classify("how do I transfer money to my savings account")
        .await
        .unwrap();
    assert!(!near.out_of_scope, "{:?}", near.similarity);
    assert!(far.out_of_scope, "{:?}", far.similarity);
    let set = LabelSet::new(topics().into_iter().map(|t| t.0).collect()).unwrap();
    let scores = c
        .score_labels(
            &[ChatMessage::user("how do I transfer money to my savings account")],
            &set,
        )
        .await
        .unwrap();
    assert!(scores.out_of_scope);
}

const LONG: &str = "The quarterly report covers revenue, costs, staffing, travel, and the outlook for every region. ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_at_once_and_the_rest_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), &topics(), None);
    let c = Arc::new(load(
        dir.path(),
        BatchSettings {
            queue: 1,
            max_batch_tokens: 64,
            ..BatchSettings::default()
        },
    ));
    let long = LONG.repeat(40);
    let results = futures::future::join_all((0..30).map(|i| {
        let c = c.clone();
        let text = if i == 0 {
            long.clone()
        } else {
            QUERIES[i % 12].to_string()
        };
        async move { c.classify(&text).await }
    }))
    .await;
    let overloaded = results
        .iter()
        .filter(|r| matches!(r, Err(EngineError::Overloaded(_))))
        .count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!(overloaded >= 1, "no query was refused");
    assert_eq!(ok + overloaded, 30, "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_leaves_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), &topics(), None);
    let c = Arc::new(load(dir.path(), BatchSettings::default()));
    // Keep the worker busy with a long text...
    let busy = {
        let c = c.clone();
        tokio::spawn(async move { c.classify(&LONG.repeat(60)).await })
    };
    // (until the worker has taken it off the queue) ...
    while c.batcher().taken() < 1 {
        tokio::task::yield_now().await;
    }
    // ... queue a decision and give up on it before its batch forms.
    let gone = tokio::time::timeout(Duration::from_millis(1), c.classify("play jazz")).await;
    assert!(gone.is_err(), "the decision ran before the busy one ended");
    busy.await.unwrap().unwrap();
    c.classify("set an alarm").await.unwrap();
    assert_eq!(c.batcher().embedded(), 2, "the abandoned decision was embedded");
}

#[tokio::test]
async fn a_text_the_rails_just_embedded_is_not_encoded_again() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), &topics(), None);
    let c = load(dir.path(), BatchSettings::default());
    // The jailbreak rail's embedder: another instance on the same files.
    let rail = Embedder::load(&encoder_dir()).unwrap();
    let query = "will the wind be strong on the coast tonight";
    let seen_by_rail = rail.embed(query).unwrap();
    let before = c.batcher().forward_passes();
    let shared = c.classify(query).await.unwrap();
    assert_eq!(c.batcher().forward_passes(), before, "the query was encoded twice");
    assert_eq!(c.batcher().recalled(), 1);
    // The same decision as an encoding of its own.
    Embedder::forget_recent();
    let own = c.classify(query).await.unwrap();
    for (a, b) in shared.log_probs.iter().zip(&own.log_probs) {
        assert!((a.exp() - b.exp()).abs() <= 1e-4);
    }
    assert!((seen_by_rail.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
}
