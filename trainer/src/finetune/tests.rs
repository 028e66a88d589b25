//! Training on a tiny random Llama written as GGUF: the loop learns, resumes
//! exactly, and its merged output reads back with the same logits.

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::curate::dataset::{Example, LabelSource};
use export::OutDType;
use llama::Target;
use ops::max_abs_diff;
use train::{Schedule, Sequence};

const VOCAB: usize = 24;
const D: usize = 32;
const FF: usize = 64;
const LAYERS: usize = 3;

/// The real all-MiniLM-L6-v2 folder (`FLYWHEEL_TEST_EMBEDDER`, or fetched
/// into `models/` on first use).
pub(crate) fn encoder_dir() -> std::path::PathBuf {
    match std::env::var_os("FLYWHEEL_TEST_EMBEDDER") {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
            #[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
            flywheel_router::model_prep::fetch::ensure_embedder(&models, "python3").unwrap()
        }
    }
}

/// `flywheel-trainer train --data <data> --out x --labels <labels>`, parsed.
pub(crate) fn train_args(data: &Path, labels: &str) -> TrainArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: TrainArgs,
    }
    let data = data.display().to_string();
    Wrap::parse_from(["train", "--data", &data, "--out", "x", "--labels", labels]).args
}

fn rand_tensor(rng: &mut StdRng, shape: (usize, usize), scale: f32) -> QTensor {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    QTensor::quantize(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
}

/// A 3-block Llama with random weights, as a GGUF file.
fn tiny_gguf(path: &Path) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), rand_tensor(&mut rng, (VOCAB, D), 1.0)),
        (
            "output_norm.weight".into(),
            QTensor::quantize(
                &Tensor::ones(D, candle_core::DType::F32, &Device::Cpu).unwrap(),
                GgmlDType::F32,
            )
            .unwrap(),
        ),
    ];
    let kv = D / 2; // 4 heads of 8, 2 kv heads
    for i in 0..LAYERS {
        let ones = || {
            QTensor::quantize(
                &Tensor::ones(D, candle_core::DType::F32, &Device::Cpu).unwrap(),
                GgmlDType::F32,
            )
            .unwrap()
        };
        tensors.push((format!("blk.{i}.attn_norm.weight"), ones()));
        tensors.push((format!("blk.{i}.ffn_norm.weight"), ones()));
        for (t, shape) in [
            (Target::Q, (D, D)),
            (Target::K, (kv, D)),
            (Target::V, (kv, D)),
            (Target::O, (D, D)),
            (Target::Gate, (FF, D)),
            (Target::Up, (FF, D)),
            (Target::Down, (D, FF)),
        ] {
            tensors.push((
                format!("blk.{i}.{}.weight", t.gguf_name()),
                rand_tensor(&mut rng, shape, 0.3),
            ));
        }
    }
    let s = |v: &str| gguf_file::Value::String(v.into());
    let u = gguf_file::Value::U32;
    let meta = [
        ("general.architecture", s("llama")),
        ("llama.block_count", u(LAYERS as u32)),
        ("llama.embedding_length", u(D as u32)),
        ("llama.attention.head_count", u(4)),
        ("llama.attention.head_count_kv", u(2)),
        ("llama.feed_forward_length", u(FF as u32)),
        ("llama.attention.layer_norm_rms_epsilon", gguf_file::Value::F32(1e-5)),
        ("llama.rope.freq_base", gguf_file::Value::F32(10_000.0)),
        ("tokenizer.chat_template", s("kept")),
    ];
    let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    flywheel_router::model_prep::write_gguf(path, &meta_refs, &refs).unwrap();
}

fn load(path: &Path, keep: Option<usize>) -> (gguf_file::Content, Llama, llama::Originals) {
    let mut r = BufReader::new(std::fs::File::open(path).unwrap());
    let c = gguf_file::Content::read(&mut r).unwrap();
    let (m, o) = Llama::from_gguf(&c, &mut r, keep, &Device::Cpu).unwrap();
    (c, m, o)
}

/// Toy task: `[1, a, 2]` → answer `[10 + a % 3, 3]` for a in 4..10.
fn toy_sequences() -> Vec<Sequence> {
    (4u32..10)
        .flat_map(|a| std::iter::repeat_n(a, 4))
        .map(|a| Sequence {
            tokens: vec![1, a, 2, 10 + a % 3, 3],
            prompt_len: 3,
        })
        .collect()
}

fn hyper(trained_blocks: usize) -> Hyper {
    Hyper {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        lr: 1e-2,
        schedule: Schedule::Constant,
        warmup_ratio: 0.0,
        epochs: 20,
        batch_size: 8,
        max_seq_len: 64,
        seed: 3,
        targets: Target::ALL.to_vec(),
        trained_blocks: Some(trained_blocks),
        full: false,
        adamw: Default::default(),
    }
}

fn predict(model: &Llama, tokens: &[u32]) -> u32 {
    let t = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &Device::Cpu).unwrap();
    let logits = model.next_token_logits(&t).unwrap();
    logits.argmax(candle_core::D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0]
}

#[test]
fn lora_training_reduces_loss_and_learns_a_toy_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_gguf(&path);
    let (_, mut model, _) = load(&path, None);
    let h = hyper(2);
    let first = train::attach(&mut model, &h).unwrap();
    assert_eq!(first, 1, "only the top two blocks are trained");
    let mut trainer = Trainer::new(&model, first, h, toy_sequences()).unwrap();
    let mut curve = Vec::new();
    while trainer.opt.step < trainer.total_steps() {
        curve.push(trainer.step().unwrap());
    }
    let first_loss = curve[..3].iter().map(|p| p.loss).sum::<f32>() / 3.0;
    let last_loss = curve[curve.len() - 3..].iter().map(|p| p.loss).sum::<f32>() / 3.0;
    assert!(last_loss < first_loss / 5.0, "loss {first_loss} -> {last_loss}");
    drop(trainer);
    for a in 4u32..10 {
        assert_eq!(predict(&model, &[1, a, 2]), 10 + a % 3, "input {a}");
    }
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_gguf(&path);
    let mut h = hyper(3);
    h.epochs = 2;
    let run = |stop: Option<usize>, restore: Option<(&std::collections::HashMap<String, Tensor>, usize)>| {
        let (_, mut model, _) = load(&path, None);
        let first = train::attach(&mut model, &h).unwrap();
        let mut trainer = Trainer::new(&model, first, h.clone(), toy_sequences()).unwrap();
        if let Some((state, step)) = restore {
            trainer.opt.restore(state, step).unwrap();
        }
        while trainer.opt.step < stop.unwrap_or(trainer.total_steps()) {
            trainer.step().unwrap();
        }
        trainer.opt.state()
    };
    let straight = run(None, None);
    let half = run(Some(3), None);
    let resumed = run(None, Some((&half, 3)));
    assert_eq!(straight.len(), resumed.len());
    for (name, t) in &straight {
        let diff = max_abs_diff(t, &resumed[name]);
        assert_eq!(diff, 0.0, "{name} differs after resuming");
    }
}

#[test]
fn merged_gguf_reads_back_with_the_trained_logits_and_prunes_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_gguf(&path);
    let (content, mut model, originals) = load(&path, Some(2));
    let h = hyper(1);
    let first = train::attach(&mut model, &h).unwrap();
    let mut trainer = Trainer::new(&model, first, h.clone(), toy_sequences()).unwrap();
    for _ in 0..10 {
        trainer.step().unwrap();
    }
    drop(trainer);
    let out = dir.path().join("merged.gguf");
    let task = TaskMeta {
        system_prompt: "sys".into(),
        labels: vec!["a".into(), "b".into()],
    };
    export::write_merged_gguf(&out, &content, &model, &originals, Some(&task), OutDType::F32).unwrap();
    let (c2, merged, _) = load(&out, None);
    assert_eq!(merged.blocks.len(), 2, "pruned to the kept blocks");
    assert!(!c2.tensor_infos.contains_key("blk.2.attn_q.weight"));
    assert_eq!(c2.metadata["tokenizer.chat_template"].to_string().unwrap(), "kept");
    let back = flywheel_router::models::task::read_task(&out).unwrap().unwrap();
    assert_eq!(back.labels, task.labels);
    let tokens = Tensor::new(&[[1u32, 5, 2, 11]], &Device::Cpu).unwrap();
    let a = model.next_token_logits(&tokens).unwrap();
    let b = merged.next_token_logits(&tokens).unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-4, "max logit difference {diff}");
    // Untouched tensors are copied bit for bit.
    let untouched = export::read_tensor(&out, "blk.0.attn_q.weight").unwrap();
    let original = originals["blk.0.attn_q.weight"].dequantize(&Device::Cpu).unwrap();
    let d0 = max_abs_diff(&untouched, &original);
    assert_eq!(d0, 0.0);
    // The PEFT adapter holds A and B for every adapted module of the trained block.
    export::write_peft(&dir.path().join("adapter"), &model, &h, "tiny.gguf").unwrap();
    let st =
        candle_core::safetensors::load(dir.path().join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(st.len(), 14);
    assert!(st.contains_key("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"));
}

#[test]
fn stratified_sample_keeps_label_shares() {
    let ex = |label: &str, i: usize| Example {
        text: format!("{label} {i}"),
        label: label.into(),
        source: LabelSource::Import,
        request_id: None,
    };
    let data: Vec<Example> = (0..60)
        .map(|i| ex("a", i))
        .chain((0..30).map(|i| ex("b", i)))
        .chain((0..10).map(|i| ex("c", i)))
        .collect();
    let s = stratified_sample(data.clone(), 20, 1);
    let count = |l: &str| s.iter().filter(|e| e.label == l).count();
    assert_eq!((count("a"), count("b"), count("c")), (12, 6, 2));
    assert_eq!(stratified_sample(data.clone(), 20, 1), s, "deterministic with the seed");
    assert_ne!(stratified_sample(data, 20, 2), s);
}

#[test]
fn epochs_and_trained_blocks_default_by_kind_and_yield_to_flags() {
    let mut a = train_args(Path::new("data.csv"), "a,b");
    assert_eq!((a.epochs(), a.trained_blocks(30)), (3, 8));
    a.kind = flywheel_router::engine::ModelKind::EncoderClassifier;
    assert_eq!(a.epochs(), 4);
    a.kind = flywheel_router::engine::ModelKind::DecoderClassifier;
    assert_eq!((a.epochs(), a.trained_blocks(30)), (6, 16));
    // A pruned backbone trains every block it keeps.
    assert_eq!(a.trained_blocks(12), 12);
    a.epochs = Some(2);
    a.trained_blocks = Some(4);
    assert_eq!((a.epochs(), a.trained_blocks(30)), (2, 4));
}
