//! `flywheel-trainer train --kind decoder-classifier`: a Llama-family GGUF
//! backbone (optionally pruned with `--keep-layers`) tuned with LoRA (or
//! `--full`) on the labels, then a linear head and the out-of-scope rule
//! fitted on its features, all in one GGUF file
//! ([`flywheel_router::engine::classifier::decoder`]).
//!
//! 1. A stratified fifth of the queries is kept out of the tuning (the
//!    out-of-scope rule is calibrated on them, as for an encoder tuned end to
//!    end).
//! 2. Tuning: the features are the final hidden state of the prompt's last
//!    token ([`Llama::last_token_features`], the server's forward pass), minus
//!    the base model's mean state over the tuning queries, at unit length
//!    ([`decoder::unit_features`]); loss: large-margin cosine loss against
//!    label vectors that start at the base model's class means
//!    ([`super::targets::cosface_loss`]).
//!    The blocks below `--trained-blocks` are frozen and computed once.
//! 3. The tuned backbone is written as GGUF (adapters merged, `--out-dtype`)
//!    and read back by the server's loader, so the head is fitted on exactly
//!    the features the server will compute (quantization included).
//! 4. Head and rule: as for an encoder classifier ([`super::encoder::fit_head`]).

use std::io::BufReader;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor, Var};
use flywheel_router::engine::ModelKind;
use flywheel_router::engine::classifier::decoder::{
    self, DecoderBackbone, PromptTemplate, right_padded, unit_features,
};
use flywheel_router::engine::classifier::{ClassifierCard, Training};
use flywheel_router::llama::Llama;
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::adamw::{AdamW, AdamWParams};
use super::encoder::{ClassifierManifest, Fitted, calibration_queries, check_oos_accuracy_loss, fit_head};
use super::encoder_tune::warmup_linear;
use super::manifest::DecoderInfo;
use super::targets::{Supervised, Targets, cosface_loss};
use super::{DataInfo, FinetuneError, TrainArgs, TrainingData, gguf_err, hyper_of, io_err, read_training_data};
use crate::curate::export::sha256_file;

/// Logit scale of the tuning loss.
const SCALE: f64 = 30.0;
/// Cosine margin of the tuning loss.
const MARGIN: f64 = 0.35;
/// Prompts per forward pass when computing features.
const FEATURE_BATCH: usize = 32;

/// Run `flywheel-trainer train --kind decoder-classifier`.
///
/// # Errors
/// Unusable data or settings, an unsupported base, I/O failures.
pub fn run(args: &TrainArgs) -> Result<ClassifierManifest, FinetuneError> {
    check(args)?;
    train(args, Supervised::gold(read_training_data(args)?))
}

/// The settings a decoder classifier run cannot take, refused before any work.
///
/// # Errors
/// The first such setting, saying what to change.
pub fn check(args: &TrainArgs) -> Result<(), FinetuneError> {
    check_oos_accuracy_loss(args)?;
    if args.dropout != 0.0 {
        return Err(FinetuneError::Invalid(
            "--dropout applies to label-scoring runs; decoder classifiers train without adapter dropout".into(),
        ));
    }
    hyper_of(args).map(drop)
}

/// Train a decoder classifier on `data` as `args` say.
///
/// # Errors
/// Unusable settings, an unsupported base, I/O failures.
pub fn train(args: &TrainArgs, data: Supervised) -> Result<ClassifierManifest, FinetuneError> {
    let mut hyper = hyper_of(args)?;
    let Supervised {
        data:
            TrainingData {
                examples,
                rows,
                label_counts,
                labels,
            },
        targets,
        distillation,
    } = data;
    let y = targets.top();
    let device = args
        .device
        .open()
        .map_err(|e| FinetuneError::Invalid(format!("--device: {e}")))?;
    let file = std::fs::File::open(&args.base).map_err(io_err(&args.base))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(gguf_err)?;
    let (model, originals) = Llama::from_gguf(&content, &mut reader, args.keep_layers, &device)?;
    hyper.trained_blocks = Some(args.trained_blocks(model.blocks.len()));
    let first = super::train::first_trained_block(model.blocks.len(), hyper.trained_blocks)?;
    let template = PromptTemplate::default();
    let tokenizer = flywheel_router::llama::tokenizer::from_gguf(&content)?;
    let backbone = DecoderBackbone::new(model, tokenizer, &template)?;
    let prompts: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| backbone.prompt(&e.text))
        .collect::<Result<_, _>>()?;
    let mut model = backbone.into_model();

    // 1-2. Tune on all but the calibration queries.
    let unseen = calibration_queries(&y, args.seed);
    let seen: Vec<usize> = (0..y.len()).filter(|i| unseen.binary_search(i).is_err()).collect();
    let t_tune = Instant::now();
    super::train::attach(&mut model, &hyper)?;
    let (epoch_loss, center) = tune(&model, first, &prompts, &targets, &seen, args)?;
    let tune_seconds = t_tune.elapsed().as_secs_f64();

    // 3. The tuned backbone as the server will read it.
    std::fs::create_dir_all(&args.out).map_err(io_err(&args.out))?;
    let staged = tempfile::Builder::new()
        .prefix(".backbone-")
        .suffix(".gguf")
        .tempfile_in(&args.out)
        .map_err(io_err(&args.out))?;
    super::export::write_merged_gguf(staged.path(), &content, &model, &originals, None, args.out_dtype)?;
    drop((model, originals));
    let staged_file = std::fs::File::open(staged.path()).map_err(io_err(staged.path()))?;
    let mut staged_reader = BufReader::new(staged_file);
    let staged_content = gguf_file::Content::read(&mut staged_reader).map_err(gguf_err)?;
    let served =
        DecoderBackbone::from_gguf(&staged_content, &mut staged_reader, &template, &device)?.with_center(&center)?;
    let t_embed = Instant::now();
    let features = features(&served, &prompts, args.quiet)?;
    let embed_seconds = t_embed.elapsed().as_secs_f64();
    let dim = served.model().cfg.n_embd;
    let blocks = served.model().blocks.len();
    drop(served);

    // 4. Head and out-of-scope rule.
    let t_fit = Instant::now();
    let Fitted {
        head,
        fit,
        out_of_scope,
        neighbours,
    } = fit_head(features, dim, &targets, args, Some(&unseen))?;
    let fit_seconds = t_fit.elapsed().as_secs_f64();
    let card = ClassifierCard {
        format: decoder::FORMAT.to_string(),
        training: Training::EndToEnd,
        labels: labels.names().to_vec(),
        out_of_scope: out_of_scope.clone(),
        prompt: Some(template.clone()),
    };
    let model_path = args.out.join("model.gguf");
    decoder::write(
        &model_path,
        &staged_content,
        &mut staged_reader,
        &card,
        &head,
        Some(&center),
        out_of_scope.is_some().then_some(&neighbours),
    )
    .map_err(|e| FinetuneError::Write(e.into()))?;
    drop(staged);

    let model_sha = sha256_file(&model_path)?;
    let model_bytes = std::fs::metadata(&model_path).map_err(io_err(&model_path))?.len();
    let manifest = ClassifierManifest {
        kind: ModelKind::DecoderClassifier,
        version: args
            .version
            .clone()
            .unwrap_or_else(|| format!("dec-{}", &model_sha[..12])),
        created_unix_ms: flywheel_router::data::log::unix_ms(std::time::SystemTime::now()),
        encoder: None,
        decoder: Some(DecoderInfo {
            base: args.base.display().to_string(),
            base_sha256: sha256_file(&args.base)?,
            blocks,
            trained_blocks: blocks - first,
            method: if args.full { "full" } else { "lora" }.into(),
            rank: args.rank,
            lr: args.lr,
            epochs: args.epochs(),
            batch_size: args.batch_size,
            epoch_loss,
            tune_seconds,
            prompt: template,
            dim,
        }),
        data: DataInfo::of(args, sha256_file(&args.data)?, rows, examples.len(), 0, label_counts),
        head: fit,
        distillation,
        out_of_scope,
        embed_seconds,
        fit_seconds,
        model_file: model_path.display().to_string(),
        model_bytes,
    };
    manifest.write(&args.out)?;
    Ok(manifest)
}

/// Tune `model`'s trainable parameters on the queries `seen` toward their
/// `targets`; returns the
/// mean loss of each epoch and the center (the base model's mean state over
/// `seen`, see [`decoder::unit_features`]).
fn tune(
    model: &Llama,
    first: usize,
    prompts: &[Vec<u32>],
    targets: &Targets,
    seen: &[usize],
    args: &TrainArgs,
) -> Result<(Vec<f64>, Vec<f32>), FinetuneError> {
    let labels = targets.labels();
    let y = targets.top();
    let device = model.device().clone();
    let t = |e: candle_core::Error| gguf_err(e);
    // The frozen blocks once: each query's hidden states entering block `first`.
    let mut entering: Vec<Option<Tensor>> = vec![None; prompts.len()];
    for chunk in seen.chunks(FEATURE_BATCH) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        let (tokens, lengths) = right_padded(&rows, &device).map_err(t)?;
        let x = model.embed(&tokens).map_err(t)?;
        let h = model.blocks_forward(&x, 0..first, &mut |_| Ok(None)).map_err(t)?;
        for (r, (&i, &len)) in chunk.iter().zip(&lengths).enumerate() {
            entering[i] = Some(h.get(r).and_then(|row| row.narrow(0, 0, len)).map_err(t)?);
        }
    }
    let batch_of = |idx: &[usize]| -> candle_core::Result<(Tensor, Vec<usize>)> {
        let states: Vec<&Tensor> = idx.iter().filter_map(|&i| entering[i].as_ref()).collect();
        let lengths: Vec<usize> = states.iter().map(|s| s.dim(0)).collect::<candle_core::Result<_>>()?;
        let longest = lengths.iter().copied().max().unwrap_or(1);
        let padded = states
            .iter()
            .zip(&lengths)
            .map(|(s, &len)| s.pad_with_zeros(0, 0, longest - len))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((Tensor::stack(&padded, 0)?, lengths))
    };
    // The base model's states: their mean is the center, and the label
    // vectors start at the class means of the centred features.
    let dim = model.cfg.n_embd;
    let mut states = Vec::with_capacity(seen.len());
    for chunk in seen.chunks(FEATURE_BATCH) {
        let (x, lengths) = batch_of(chunk).map_err(t)?;
        // Constants: the served center is this value, and the tuning must not
        // differentiate through (or keep alive) the pass that measured it.
        states.push(
            model
                .last_token_features_from(&x, first, &lengths, &mut |_| Ok(None))
                .map_err(t)?
                .detach(),
        );
    }
    let states = Tensor::cat(&states, 0).map_err(t)?;
    let center = states.mean(0).map_err(t)?;
    let base_features = unit_features(&states, Some(&center))
        .and_then(|f| f.to_device(&Device::Cpu))
        .and_then(|f| f.to_vec2::<f32>())
        .map_err(t)?;
    let mut means = vec![0f32; labels * dim];
    for (&i, v) in seen.iter().zip(base_features) {
        let l = y[i] as usize;
        for (m, x) in means[l * dim..(l + 1) * dim].iter_mut().zip(v) {
            *m += x;
        }
    }
    let label_vectors = Var::from_tensor(&Tensor::from_vec(means, (labels, dim), &device).map_err(t)?).map_err(t)?;
    let params = AdamWParams {
        weight_decay: args.weight_decay,
        ..AdamWParams::default()
    };
    let mut opt = AdamW::new(model.trainable(), params).map_err(t)?;
    let mut head_opt = AdamW::new(vec![("label_vectors".into(), label_vectors.clone())], params).map_err(t)?;
    let batch = args.batch_size.max(1);
    let per_epoch = seen.len().div_ceil(batch);
    let total = args.epochs() * per_epoch;
    let bar = super::progress_bar(total, 0, args.quiet);
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut order = seen.to_vec();
    let mut epoch_loss = Vec::with_capacity(args.epochs());
    let mut step = 0usize;
    for epoch in 0..args.epochs() {
        order.shuffle(&mut rng);
        let mut sum = 0.0;
        for idx in order.chunks(batch) {
            let lr = args.lr * warmup_linear(step, total);
            let (x, lengths) = batch_of(idx).map_err(t)?;
            let (probs, weights) = targets.tensors(idx, &device).map_err(t)?;
            let features = model
                .last_token_features_from(&x, first, &lengths, &mut |_| Ok(None))
                .and_then(|s| unit_features(&s, Some(&center)))
                .map_err(t)?;
            let loss =
                cosface_loss(&features, label_vectors.as_tensor(), &probs, &weights, SCALE, MARGIN).map_err(t)?;
            let value = loss.to_scalar::<f32>().map_err(t)?;
            if !value.is_finite() {
                bar.abandon();
                return Err(FinetuneError::Diverged {
                    step: step + 1,
                    loss: value,
                    lr,
                });
            }
            let grads = loss.backward().map_err(t)?;
            opt.step(&grads, lr).map_err(t)?;
            head_opt.step(&grads, lr).map_err(t)?;
            sum += f64::from(value);
            step += 1;
            bar.set_message(format!("loss {value:.4} | epoch {}", epoch + 1));
            bar.inc(1);
        }
        epoch_loss.push(sum / per_epoch.max(1) as f64);
        if args.quiet {
            tracing::info!(epoch = epoch + 1, loss = epoch_loss[epoch], "epoch done");
        }
    }
    bar.finish_and_clear();
    let center = center
        .to_device(&Device::Cpu)
        .and_then(|c| c.to_vec1::<f32>())
        .map_err(t)?;
    Ok((epoch_loss, center))
}

/// Features of every prompt with the served backbone, shortest first (less padding).
fn features(backbone: &DecoderBackbone, prompts: &[Vec<u32>], quiet: bool) -> Result<Vec<f32>, FinetuneError> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let dim = backbone.model().cfg.n_embd;
    let mut out = vec![0f32; prompts.len() * dim];
    let bar = super::progress_bar(prompts.len(), 0, quiet);
    for chunk in order.chunks(FEATURE_BATCH) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        let f = backbone.features_of(&rows)?;
        for (&i, v) in chunk.iter().zip(f) {
            out[i * dim..(i + 1) * dim].copy_from_slice(&v);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::path::Path;

    use flywheel_router::engine::classifier::{BatchSettings, Classifier};

    use super::*;
    use crate::finetune::tests::train_args;

    const ROWS: [(&str, &str); 18] = [
        ("wake me up at seven", "alarm"),
        ("set an alarm for 6 am", "alarm"),
        ("cancel my morning alarm", "alarm"),
        ("alarm at noon please", "alarm"),
        ("snooze the alarm", "alarm"),
        ("turn off all my alarms", "alarm"),
        ("is it going to rain today", "weather"),
        ("forecast for the weekend", "weather"),
        ("will it be sunny in Paris", "weather"),
        ("how cold is it outside", "weather"),
        ("do I need an umbrella", "weather"),
        ("what is the temperature now", "weather"),
        ("play some jazz", "music"),
        ("skip this song", "music"),
        ("put on my workout playlist", "music"),
        ("turn the music up", "music"),
        ("who sings this track", "music"),
        ("shuffle my favourite songs", "music"),
    ];

    /// The real SmolLM2 pruned to two blocks, tuned on a few examples: the
    /// loss falls, the file is a decoder classifier the server loads, with
    /// the LM head left out, and it routes its training queries.
    #[tokio::test]
    async fn a_pruned_decoder_classifier_tunes_and_writes_a_servable_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.csv");
        let csv: String = std::iter::once("text,label".to_string())
            .chain(ROWS.iter().map(|(t, l)| format!("{t},{l}")))
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&data, csv).unwrap();
        let mut a = train_args(&data, "alarm,weather,music");
        a.kind = ModelKind::DecoderClassifier;
        a.base = flywheel_router::testing::test_model();
        a.out = dir.path().join("dec");
        a.keep_layers = Some(2);
        a.trained_blocks = Some(2);
        a.epochs = Some(6);
        a.batch_size = 4;
        a.lr = 2e-3;
        a.quiet = true;
        let m = run(&a).unwrap();
        let info = m.decoder.as_ref().unwrap();
        assert_eq!(
            (m.kind, info.blocks, info.trained_blocks),
            (ModelKind::DecoderClassifier, 2, 2)
        );
        assert!(
            info.epoch_loss.last().unwrap() < info.epoch_loss.first().unwrap(),
            "{:?}",
            info.epoch_loss
        );
        let path = a.out.join("model.gguf");
        assert_eq!(ModelKind::of(&path), ModelKind::DecoderClassifier);
        let content = gguf_file::Content::read(&mut BufReader::new(std::fs::File::open(&path).unwrap())).unwrap();
        assert!(!content.tensor_infos.contains_key("output.weight"));
        assert!(!content.tensor_infos.contains_key("blk.2.attn_q.weight"));
        assert_eq!(content.metadata["llama.block_count"].to_u32().unwrap(), 2);
        // Nothing staged is left beside the output.
        assert_eq!(
            std::fs::read_dir(&a.out).unwrap().count(),
            2,
            "model.gguf and manifest.json"
        );

        let c = Classifier::load(&path, BatchSettings::default(), &Device::Cpu).unwrap();
        assert_eq!(c.card().labels, ["alarm", "weather", "music"]);
        let mut right = 0;
        for (text, label) in ROWS {
            let got = c.classify(text).await.unwrap();
            let top = (0..3)
                .max_by(|&x, &y| got.log_probs[x].total_cmp(&got.log_probs[y]))
                .unwrap();
            right += usize::from(c.card().labels[top] == label);
        }
        assert!(right >= 16, "{right} of {} training queries routed right", ROWS.len());
        assert!((m.head.train_accuracy * ROWS.len() as f64 - right as f64).abs() < 1.5);
    }

    #[test]
    fn adapter_dropout_is_refused_with_what_to_change() {
        let mut a = train_args(Path::new("unused.csv"), "a,b");
        a.kind = ModelKind::DecoderClassifier;
        a.dropout = 0.1;
        let err = run(&a).unwrap_err().to_string();
        assert!(err.contains("--dropout"), "{err}");
    }
}
