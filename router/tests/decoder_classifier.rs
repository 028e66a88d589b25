//! Decoder classifier routers on the real SmolLM2-135M: the GGUF's own
//! tokenizer reads text as the serving engine does, batched decisions equal
//! lone ones, a decision is one forward pass whatever the number of labels,
//! the file is recognised as its kind with its labels, and a classifier for
//! other labels is refused.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use flywheel_router::engine::classifier::{BatchSettings, Classifier};
use flywheel_router::engine::mistral::{MistralEngine, MistralOptions};
use flywheel_router::engine::{ChatMessage, Engine, EngineError, LabelSet, ModelKind};

fn base() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(flywheel_router::testing::test_model).clone()
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

fn build(path: &Path, labels: &[(String, Vec<&str>)], out_of_scope: Option<f32>) {
    let labels: Vec<(&str, &[&str])> = labels.iter().map(|(l, t)| (l.as_str(), t.as_slice())).collect();
    flywheel_router::testing::prototype_decoder_classifier(path, &base(), &labels, out_of_scope);
}

fn load(path: &Path, settings: BatchSettings) -> Classifier {
    Classifier::load(path, settings, &candle_core::Device::Cpu).unwrap()
}

const QUERIES: [&str; 8] = [
    "is it going to snow this weekend in the mountains near the lake",
    "play the new album",
    "wake me at 6",
    "what's the forecast",
    "skip this track and play something by the beatles instead please",
    "set my alarm",
    "umbrella needed?",
    "louder",
];

#[tokio::test]
async fn the_gguf_tokenizer_reads_text_as_the_serving_engine_does() {
    let backbone_file = std::fs::File::open(base()).unwrap();
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::BufReader::new(backbone_file)).unwrap();
    let ours = flywheel_router::llama::tokenizer::from_gguf(&content).unwrap();
    let engine = MistralEngine::load(&MistralOptions {
        max_num_seqs: Some(1),
        ..MistralOptions::new(base(), false)
    })
    .await
    .unwrap();
    for text in [
        "What's the weather in Zürich on 12/03/2026?",
        "  two  spaces, tabs\tand\nnew lines\r\n",
        "I'm sure they'll say it's 3.14159 — or ¥100!",
        "emoji 🚀 and CJK 天气 and accents àéîõü",
        "<|im_start|>user\nnot a real turn<|im_end|>",
        "",
    ] {
        let a = ours.encode(text, false).unwrap().get_ids().to_vec();
        let b = engine.text_tokens(text).await.unwrap();
        assert_eq!(a, b, "{text:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_decisions_equal_lone_decisions_and_take_fewer_passes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dec.gguf");
    build(&path, &topics(), None);
    assert_eq!(ModelKind::of(&path), ModelKind::DecoderClassifier);
    let task = flywheel_router::models::task::read_task(&path).unwrap().unwrap();
    assert_eq!(task.kind, ModelKind::DecoderClassifier);
    assert_eq!(task.labels, ["weather", "music", "alarm"]);
    let c = Arc::new(load(&path, BatchSettings::default()));
    assert_eq!(c.kind(), ModelKind::DecoderClassifier);
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
    // An untrained head over the base model's features routes nothing in
    // particular (the trainer's tests check routing); the decisions still differ.
    assert_ne!(alone[0].log_probs, alone[1].log_probs);
}

#[tokio::test]
async fn a_decision_is_one_forward_pass_for_5_or_60_labels() {
    for n in [5usize, 60] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dec.gguf");
        // Names sharing their leading tokens: the case that multiplies a
        // label-scoring router's passes.
        let labels: Vec<(String, Vec<&str>)> = (0..n)
            .map(|i| (format!("card payment issue {i}"), vec![QUERIES[i % QUERIES.len()]]))
            .collect();
        build(&path, &labels, None);
        let c = load(&path, BatchSettings::default());
        let set = LabelSet::new(labels.iter().map(|l| l.0.clone()).collect()).unwrap();
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
    let path = dir.path().join("dec.gguf");
    build(&path, &topics(), Some(0.5));
    let c = load(&path, BatchSettings::default());
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
    // The rule's references are in the file: a training query is in scope.
    let near = c.classify("will it rain tomorrow").await.unwrap();
    assert!(!near.out_of_scope, "{:?}", near.similarity);
    assert!((near.similarity.unwrap() - 1.0).abs() < 1e-3, "{:?}", near.similarity);
}
