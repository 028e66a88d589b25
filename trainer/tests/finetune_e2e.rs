//! Fine-tuning on the real SmolLM2 base, pruned to a few blocks so it runs in
//! seconds: the merged GGUF loads in the serving engine with the logits the
//! trainer computed, and `train` (interrupted, then resumed) and `eval` work
//! end to end as processes.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor, Var};
use common::{trainer, trainer_output};
use flywheel_router::engine::mistral::{MistralEngine, MistralOptions};
use flywheel_router::engine::{ChatMessage, Engine, LabelSet};
use flywheel_trainer::finetune::export::{OutDType, TaskMeta, write_merged_gguf};
use flywheel_trainer::finetune::llama::Llama;
use flywheel_trainer::finetune::train::{Hyper, Schedule, attach};
use rand::{Rng, SeedableRng};

fn base() -> PathBuf {
    flywheel_router::testing::test_model()
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = row.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
    row.iter().map(|v| v - lse).collect()
}

#[tokio::test]
async fn merged_model_loads_in_the_engine_with_the_trainers_logits() {
    let dir = tempfile::tempdir().unwrap();
    let mut reader = BufReader::new(std::fs::File::open(base()).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let (mut model, originals) = Llama::from_gguf(&content, &mut reader, Some(3), &candle_core::Device::Cpu).unwrap();
    let hyper = Hyper {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        lr: 1e-3,
        schedule: Schedule::Constant,
        warmup_ratio: 0.0,
        epochs: 1,
        batch_size: 1,
        max_seq_len: 64,
        seed: 1,
        targets: flywheel_trainer::finetune::llama::Target::ALL.to_vec(),
        trained_blocks: Some(2),
        full: false,
        adamw: Default::default(),
    };
    attach(&mut model, &hyper).unwrap();
    // Give the adapters non-zero B so the merge matters (every target, incl.
    // the permuted Q/K rows).
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for block in &mut model.blocks {
        for l in &mut block.linears {
            if let Some(lora) = &mut l.lora {
                let (o, r) = lora.b.dims2().unwrap();
                let v: Vec<f32> = (0..o * r).map(|_| rng.random_range(-0.05..0.05)).collect();
                lora.b = Var::from_tensor(&Tensor::from_vec(v, (o, r), &Device::Cpu).unwrap()).unwrap();
            }
        }
    }
    let out = dir.path().join("merged.gguf");
    let task = TaskMeta {
        system_prompt: "Classify.".into(),
        labels: vec!["yes".into(), "no".into()],
    };
    write_merged_gguf(&out, &content, &model, &originals, Some(&task), OutDType::F32).unwrap();

    let engine = MistralEngine::load(&MistralOptions {
        max_num_seqs: Some(1),
        ..MistralOptions::new(out.clone(), false)
    })
    .await
    .unwrap();
    let messages = [ChatMessage::system("Classify."), ChatMessage::user("is the sky blue")];
    let labels = LabelSet::new(vec!["yes".into(), "no".into(), "maybe".into()]).unwrap();
    let served = engine.score_labels(&messages, &labels).await.unwrap();
    let (label_tokens, _) = engine.label_tokens(&labels).await.unwrap();
    let prompt = engine.chat_tokens(&messages).await.unwrap();
    drop(engine);

    let ids = Tensor::from_vec(prompt.clone(), (1, prompt.len()), &Device::Cpu).unwrap();
    let logits = model
        .next_token_logits(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let lp = log_softmax(&logits);
    for (i, toks) in label_tokens.iter().enumerate() {
        assert_eq!(toks.len(), 1, "single-token labels keep the comparison exact");
        let ours = lp[toks[0] as usize];
        let theirs = served.logprobs[i];
        // The engine multiplies Q8_0 weights with Q8-quantized activations;
        // the trainer dequantizes to f32: agreement within 1% (a wrong rotary
        // convention or merge would be off by whole units).
        assert!(
            (ours - theirs).abs() <= 0.01 * theirs.abs() + 0.02,
            "label {}: trainer {ours} vs engine {theirs}",
            labels.names()[i]
        );
    }
}

fn write_toy_data(path: &Path) {
    let mut rows = vec!["text,label".to_string()];
    for i in 0..12 {
        rows.push(format!("wake me up at {} am,alarm", i + 1));
        rows.push(format!("what is the weather in city {i},weather"));
    }
    std::fs::write(path, rows.join("\n")).unwrap();
}

#[test]
fn train_resumes_after_interruption_and_eval_measures_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("toy.csv");
    write_toy_data(&data);
    let out = dir.path().join("run");
    let base = base();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--data",
            data.to_str().unwrap(),
            "--base",
            base.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--keep-layers",
            "4",
            "--trained-blocks",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "3e-3",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // Interrupted after 3 of 12 steps: the checkpoint stays, no model yet.
    let interrupted = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel-trainer"))
        .args(args(&["--stop-after", "3"]))
        .output()
        .unwrap();
    assert!(!interrupted.status.success());
    assert!(String::from_utf8_lossy(&interrupted.stderr).contains("run the same command again to resume"));
    assert!(out.join("checkpoint/progress.json").is_file());
    assert!(!out.join("model.gguf").exists());

    let a = args(&[]);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    trainer(&refs);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["training"]["steps"], 12);
    assert_eq!(
        manifest["training"]["curve"].as_array().unwrap().len(),
        12,
        "resumed, not restarted"
    );
    assert_eq!(manifest["base"]["kept_blocks"], 4);
    assert_eq!(manifest["data"]["examples"], 24);
    assert!(
        !out.join("checkpoint").exists(),
        "a finished run removes its checkpoint"
    );
    assert!(out.join("adapter/adapter_config.json").is_file());
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
    let task = flywheel_router::models::task::read_task(&out.join("model.gguf"))
        .unwrap()
        .unwrap();
    assert_eq!(task.labels, vec!["alarm", "weather"]);

    // A checkpoint of other settings is refused, not silently mixed in.
    let other = dir.path().join("other");
    std::fs::create_dir_all(other.join("checkpoint")).unwrap();
    std::fs::write(
        other.join("checkpoint/progress.json"),
        r#"{"fingerprint":"x","step":1,"seconds":1.0,"tokens":1,"curve":[]}"#,
    )
    .unwrap();
    std::fs::write(other.join("checkpoint/state.safetensors"), b"").unwrap();
    let mut b = args(&[]);
    let pos = b.iter().position(|s| s == "--out").unwrap();
    b[pos + 1] = other.to_str().unwrap().to_string();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel-trainer"))
        .args(&b)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("checkpoint of a different run"));

    let report = dir.path().join("report.json");
    let (table, log) = trainer_output(&[
        "eval",
        "--model",
        out.join("model.gguf").to_str().unwrap(),
        "--against",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(table.contains("McNemar"), "{table}");
    assert!(table.contains("decisions on device `cpu`"), "{table}");
    // mistral.rs's false "mix of GPU and CPU" warning on every CPU load is dropped.
    assert!(!log.contains("mix of GPU and CPU"), "{log}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let acc = r["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert_eq!(r["model"]["fine_tuned"], true);
    assert_eq!(r["against"]["fine_tuned"], false);
    assert_eq!(r["model"]["device"], "cpu");
    assert_eq!(r["model"]["n"], 24);
    assert_eq!(r["model"]["version"], manifest["version"]);
    assert!(r["comparison"]["p_value"].as_f64().unwrap() <= 1.0);
}

/// Settings that cannot train are refused before any work, and a run whose
/// loss stops being a number ends with an error instead of a model.
#[test]
fn bad_settings_are_refused_and_a_diverging_run_writes_no_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("toy.csv");
    write_toy_data(&data);
    let base = base();
    let run_with = |out: &Path, extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel-trainer"))
            .args([
                "train",
                "--data",
                data.to_str().unwrap(),
                "--base",
                base.to_str().unwrap(),
            ])
            .args(["--out", out.to_str().unwrap()])
            .args(["--epochs", "2", "--batch-size", "4", "--quiet"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let run = |out: &Path, extra: &[&str]| {
        let args: Vec<&str> = ["--keep-layers", "2", "--trained-blocks", "2"]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        run_with(out, &args)
    };
    let refused = dir.path().join("refused");
    for (flag, says) in [
        ("--lr=-1", "--lr must be a positive number, not -1"),
        ("--lr=nan", "--lr must be a positive number, not NaN"),
        ("--alpha=0", "--alpha must be a positive number, not 0"),
        ("--weight-decay=-0.1", "--weight-decay must be a number >= 0"),
        ("--warmup-ratio=2", "--warmup-ratio must be in [0, 1], not 2"),
    ] {
        let stderr = run(&refused, &[flag]);
        assert!(stderr.contains(says), "{flag}: {stderr}");
    }
    // Block counts the base cannot take are refused from its header, before
    // the examples are tokenized; sequences that all exceed the length cap
    // say so.
    for (args, says) in [
        (&["--keep-layers", "99"][..], "--keep-layers 99: the base has 30 blocks"),
        (
            &["--keep-layers", "2", "--trained-blocks", "3"][..],
            "--trained-blocks 3: the model has 2 blocks",
        ),
        (
            &["--trained-blocks", "31"][..],
            "--trained-blocks 31: the model has 30 blocks",
        ),
    ] {
        let stderr = run_with(&refused, args);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("tokenizing"),
            "{args:?} was refused only after tokenizing: {stderr}"
        );
    }
    let stderr = run(&refused, &["--max-seq-len", "4"]);
    assert!(
        stderr.contains("examples are longer than --max-seq-len 4 tokens") && stderr.contains("raise --max-seq-len"),
        "{stderr}"
    );
    assert!(!refused.exists(), "a refused run creates nothing");

    let diverged = dir.path().join("diverged");
    let stderr = run(&diverged, &["--lr", "1e30"]);
    assert!(
        stderr.contains("training diverged: the loss is NaN at step"),
        "{stderr}"
    );
    assert!(!diverged.join("model.gguf").exists());
    assert!(!diverged.join("manifest.json").exists());
}
