//! `flywheel-trainer train --kind encoder-classifier`: a linear head over a
//! sentence encoder, and the rule that turns away out-of-scope queries. The
//! encoder is used as it is (`head-only`) or tuned on the labels first
//! (`end-to-end`, [`super::encoder_tune`], on all but a stratified fifth of
//! the queries, which the out-of-scope rule is then calibrated on).
//!
//! - **Head**: multinomial logistic regression on the normalised embeddings
//!   (the embeddings the server computes, with the same code), fitted by
//!   accelerated gradient descent. Its L2 strength is chosen by 5-fold
//!   cross-validation on the training data.
//! - **Out-of-scope rule** ([`OutOfScopeRule`]): a query is out of scope when
//!   its mean cosine similarity to its k nearest training queries is below a
//!   threshold. No out-of-scope examples are needed: each training query's
//!   similarity is measured with itself left out, and whether the head gets
//!   it right with cross-validation; the threshold is the highest that turns
//!   away right answers on at most `--oos-accuracy-loss` of them (wrong
//!   answers turned away cost nothing). k is the one that turns away most
//!   queries of a label held out of the reference set (each label in turn),
//!   which is how an unseen topic looks.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use flywheel_router::embed::Embedder;
use flywheel_router::engine::ModelKind;
use flywheel_router::engine::classifier::{
    self, ClassifierCard, ClassifierParts, Head, Neighbours, OutOfScopeRule, Training,
};
use serde::{Deserialize, Serialize};

use super::encoder_tune::{TuneReport, TuneSpec, tune};
use super::manifest::Distillation;
use super::targets::{Supervised, Targets};
use super::{DataInfo, FinetuneError, TrainArgs, TrainingData, gguf_err, io_err, read_training_data};
use crate::curate::export::sha256_file;

/// L2 strengths tried by cross-validation.
const L2_GRID: [f64; 4] = [1e-2, 1e-3, 1e-4, 1e-5];
/// Folds of the cross-validation.
const FOLDS: usize = 5;
/// Gradient steps per fit.
const ITERATIONS: usize = 400;
/// Neighbour counts tried by the out-of-scope calibration.
const K_GRID: [usize; 4] = [1, 3, 5, 10];
/// A threshold that turns nothing away (no mean cosine similarity is below
/// it); finite, so the card's JSON can hold it.
const NO_THRESHOLD: f32 = -1.0;
/// Most queries the out-of-scope calibration measures.
const MAX_MEASURED: usize = 2_000;

/// What an encoder classifier run produced (`manifest.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierManifest {
    /// [`ModelKind::EncoderClassifier`] or [`ModelKind::DecoderClassifier`].
    pub kind: ModelKind,
    /// Version label.
    pub version: String,
    /// Unix ms when the run finished.
    pub created_unix_ms: i64,
    /// The encoder (encoder classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<EncoderInfo>,
    /// The decoder backbone (decoder classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<super::manifest::DecoderInfo>,
    /// Training data.
    pub data: DataInfo,
    /// The head's fit.
    pub head: HeadFit,
    /// The teacher whose distributions trained the teacher-labelled
    /// examples (`flywheel-trainer distill`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<Distillation>,
    /// The out-of-scope rule (absent with `--oos-rejection 0`).
    pub out_of_scope: Option<OutOfScopeRule>,
    /// Seconds embedding the training queries.
    pub embed_seconds: f64,
    /// Seconds fitting and calibrating.
    pub fit_seconds: f64,
    /// The classifier (folder or GGUF file; what a server's model entry names).
    pub model_file: String,
    /// Bytes of its files.
    pub model_bytes: u64,
}

impl ClassifierManifest {
    /// Write `manifest.json` into `dir`.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn write(&self, dir: &std::path::Path) -> Result<(), FinetuneError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| FinetuneError::Write(e.into()))?;
        std::fs::write(dir.join("manifest.json"), text).map_err(io_err(dir))
    }

    /// Seconds of the whole run: tuning (if any), features, fit.
    pub fn seconds(&self) -> f64 {
        let tuning = self
            .encoder
            .as_ref()
            .and_then(|e| e.tuning.as_ref())
            .map_or(0.0, |t| t.seconds)
            + self.decoder.as_ref().map_or(0.0, |d| d.tune_seconds);
        tuning + self.embed_seconds + self.fit_seconds
    }
}

/// The encoder of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncoderInfo {
    /// Folder.
    pub path: String,
    /// SHA-256 of its `model.safetensors`.
    pub sha256: String,
    /// Embedding size.
    pub dim: usize,
    /// How it was trained.
    pub training: Training,
    /// The end-to-end tuning run, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning: Option<TuneReport>,
}

/// How the head was fitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadFit {
    /// L2 strength chosen.
    pub l2: f64,
    /// Cross-validated accuracy of each L2 strength tried.
    pub cross_validation: Vec<(f64, f64)>,
    /// Gradient steps.
    pub iterations: usize,
    /// Accuracy on the training data.
    pub train_accuracy: f64,
}

/// Run `flywheel-trainer train --kind encoder-classifier`.
///
/// # Errors
/// Unusable data or settings, an unreadable encoder, I/O failures.
pub fn run(args: &TrainArgs) -> Result<ClassifierManifest, FinetuneError> {
    check_oos_accuracy_loss(args)?;
    train(args, Supervised::gold(read_training_data(args)?))
}

/// `--oos-accuracy-loss` in range.
pub(crate) fn check_oos_accuracy_loss(args: &TrainArgs) -> Result<(), FinetuneError> {
    if (0.0..0.5).contains(&args.oos_accuracy_loss) {
        Ok(())
    } else {
        Err(FinetuneError::Invalid(format!(
            "--oos-accuracy-loss must be in [0, 0.5), not {}",
            args.oos_accuracy_loss
        )))
    }
}

/// Train an encoder classifier on `data` as `args` say.
///
/// # Errors
/// Unusable settings, an unreadable encoder, I/O failures.
pub fn train(args: &TrainArgs, data: Supervised) -> Result<ClassifierManifest, FinetuneError> {
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
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let y = targets.top();
    // End to end: the encoder's layers are tuned first, in a folder beside
    // the output; the rest of the run treats the tuned encoder as given.
    let tuned = match args.encoder_training {
        Training::HeadOnly => None,
        Training::EndToEnd => {
            let parent = args
                .out
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            let dir = tempfile::Builder::new()
                .prefix(".encoder-")
                .tempdir_in(parent)
                .map_err(io_err(parent))?;
            let spec = TuneSpec {
                seed: args.seed,
                epochs: args.epochs(),
                ..TuneSpec::default()
            };
            // A stratified share of the queries stays out of the tuning, to
            // calibrate the out-of-scope rule on queries the encoder never saw.
            let unseen = calibration_queries(&y, args.seed);
            let seen: Vec<usize> = (0..y.len()).filter(|i| unseen.binary_search(i).is_err()).collect();
            let seen_texts: Vec<&str> = seen.iter().map(|&i| texts[i]).collect();
            let report = tune(
                &args.encoder,
                &seen_texts,
                &targets.subset(&seen),
                spec,
                dir.path(),
                args.quiet,
            )
            .map_err(|e| FinetuneError::Invalid(format!("tuning the encoder: {e:#}")))?;
            Some(Tuned { dir, report, unseen })
        }
    };
    let encoder_dir = tuned.as_ref().map_or(args.encoder.as_path(), |t| t.dir.path());
    let embedder = Embedder::load(encoder_dir)
        .map_err(|e| FinetuneError::Invalid(format!("--encoder {}: {e}", args.encoder.display())))?;
    let t_embed = Instant::now();
    let bar = super::progress_bar(texts.len(), 0, args.quiet);
    let mut embeddings = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(64) {
        embeddings.extend(
            embedder
                .embed_batch(chunk, 64)
                .map_err(|e| FinetuneError::Invalid(format!("embedding the training data: {e}")))?,
        );
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let embed_seconds = t_embed.elapsed().as_secs_f64();

    let t_fit = Instant::now();
    let dim = embedder.dim();
    let unseen = tuned.as_ref().map(|t| t.unseen.as_slice());
    let Fitted {
        head,
        fit,
        out_of_scope,
        neighbours,
    } = fit_head(
        embeddings.iter().flatten().copied().collect(),
        dim,
        &targets,
        args,
        unseen,
    )?;
    let fit_seconds = t_fit.elapsed().as_secs_f64();

    let card = ClassifierCard {
        format: classifier::FORMAT.to_string(),
        training: args.encoder_training,
        labels: labels.names().to_vec(),
        out_of_scope: out_of_scope.clone(),
        prompt: None,
    };
    classifier::write(
        &args.out,
        &ClassifierParts {
            card: &card,
            head: &head,
            neighbours: out_of_scope.is_some().then_some(&neighbours),
            encoder_dir,
        },
    )
    .map_err(|e| FinetuneError::Write(e.into()))?;
    let head_sha = sha256_file(&args.out.join(classifier::HEAD_FILE))?;
    let model_bytes = std::fs::read_dir(&args.out)
        .map_err(io_err(&args.out))?
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.len())
        .sum();
    let manifest = ClassifierManifest {
        kind: ModelKind::EncoderClassifier,
        version: args
            .version
            .clone()
            .unwrap_or_else(|| format!("enc-{}", &head_sha[..12])),
        created_unix_ms: flywheel_router::data::log::unix_ms(std::time::SystemTime::now()),
        encoder: Some(EncoderInfo {
            path: args.encoder.display().to_string(),
            sha256: sha256_file(&args.encoder.join("model.safetensors"))?,
            dim,
            training: args.encoder_training,
            tuning: tuned.as_ref().map(|t| t.report.clone()),
        }),
        decoder: None,
        data: DataInfo::of(args, sha256_file(&args.data)?, rows, examples.len(), 0, label_counts),
        head: fit,
        distillation,
        out_of_scope,
        embed_seconds,
        fit_seconds,
        model_file: args.out.display().to_string(),
        model_bytes,
    };
    manifest.write(&args.out)?;
    Ok(manifest)
}

/// A head and out-of-scope rule fitted on training features.
pub struct Fitted {
    /// The head.
    pub head: Head,
    /// How it was fitted.
    pub fit: HeadFit,
    /// The rule (absent with `--oos-accuracy-loss 0`).
    pub out_of_scope: Option<OutOfScopeRule>,
    /// The features, as the rule's references.
    pub neighbours: Neighbours,
}

/// Fit the head (L2 strength by cross-validation) and calibrate the
/// out-of-scope rule on unit-length `features` (`[targets.len() * dim]`)
/// trained toward `targets`; `unseen` as for [`calibrate`].
///
/// # Errors
/// Tensor failures.
pub fn fit_head(
    features: Vec<f32>,
    dim: usize,
    targets: &Targets,
    args: &TrainArgs,
    unseen: Option<&[usize]>,
) -> Result<Fitted, FinetuneError> {
    let y = targets.top();
    let data = Data {
        x: features,
        y: y.clone(),
        targets: targets.clone(),
        dim,
    };
    let folds: Vec<(f64, Vec<bool>)> = L2_GRID
        .iter()
        .map(|&l2| Ok((l2, data.cross_validate(l2, args.seed)?)))
        .collect::<Result<_, candle_core::Error>>()
        .map_err(gguf_err)?;
    let share = |right: &[bool]| right.iter().filter(|&&r| r).count() as f64 / right.len().max(1) as f64;
    let cross_validation: Vec<(f64, f64)> = folds.iter().map(|(l2, right)| (*l2, share(right))).collect();
    let best = (0..folds.len())
        .max_by(|&a, &b| cross_validation[a].1.total_cmp(&cross_validation[b].1))
        .unwrap_or(0);
    let (l2, held_out_right) = folds[best].clone();
    let all: Vec<usize> = (0..y.len()).collect();
    let head = data.fit(&all, l2).map_err(gguf_err)?;
    let train_accuracy = data.accuracy(&head, &all);
    let neighbours = Neighbours {
        embeddings: data.x,
        dim,
    };
    let out_of_scope = (args.oos_accuracy_loss > 0.0)
        .then(|| calibrate(&neighbours, &y, &held_out_right, args.oos_accuracy_loss, unseen));
    Ok(Fitted {
        head,
        fit: HeadFit {
            l2,
            cross_validation,
            iterations: ITERATIONS,
            train_accuracy,
        },
        out_of_scope,
        neighbours,
    })
}

/// An encoder tuned end to end, in a temporary folder.
struct Tuned {
    dir: tempfile::TempDir,
    report: TuneReport,
    /// Queries left out of the tuning (sorted).
    unseen: Vec<usize>,
}

/// Share of the queries an end-to-end run keeps out of the tuning.
const CALIBRATION_SHARE: f64 = 0.2;

/// A stratified [`CALIBRATION_SHARE`] of the queries labelled `y` (at least
/// one of each label with two or more), sorted.
pub(crate) fn calibration_queries(y: &[u32], seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut by_label: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &l) in y.iter().enumerate() {
        by_label.entry(l).or_default().push(i);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xca1b);
    let mut out = Vec::new();
    for (_, mut idx) in by_label {
        if idx.len() < 2 {
            continue;
        }
        idx.shuffle(&mut rng);
        let take = ((idx.len() as f64 * CALIBRATION_SHARE).round() as usize).clamp(1, idx.len() - 1);
        out.extend_from_slice(&idx[..take]);
    }
    out.sort_unstable();
    out
}

/// Embeddings, their targets and their most likely labels.
struct Data {
    x: Vec<f32>,
    y: Vec<u32>,
    targets: Targets,
    dim: usize,
}

impl Data {
    /// Features `[idx, dim]`, targets `[idx, labels]`, and the weights
    /// `[idx, 1]` normalised to sum to 1.
    fn rows(&self, idx: &[usize]) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let cpu = Device::Cpu;
        let x: Vec<f32> = idx
            .iter()
            .flat_map(|&i| self.x[i * self.dim..(i + 1) * self.dim].iter().copied())
            .collect();
        let (t, w) = self.targets.tensors(idx, &cpu)?;
        let w = (&w / f64::from(w.sum_all()?.to_scalar::<f32>()?.max(1e-12)))?;
        Ok((Tensor::from_vec(x, (idx.len(), self.dim), &cpu)?, t, w.unsqueeze(1)?))
    }

    /// Fit the head on rows `idx` (accelerated gradient descent on the
    /// weighted mean cross-entropy to the targets plus `l2` times half the
    /// weights' squared norm).
    fn fit(&self, idx: &[usize], l2: f64) -> candle_core::Result<Head> {
        let (x, y, weights) = self.rows(idx)?;
        let labels = self.targets.labels();
        let cpu = Device::Cpu;
        let mut w = Tensor::zeros((labels, self.dim), DType::F32, &cpu)?;
        let mut b = Tensor::zeros(labels, DType::F32, &cpu)?;
        let (mut wy, mut by) = (w.clone(), b.clone());
        // Rows have unit norm (plus the bias input) and the weights sum to 1:
        // the loss's gradient is 1-Lipschitz, so a step of 1 / (1 + l2) is safe.
        let lr = 1.0 / (1.0 + l2);
        let mut t = 1.0f64;
        for _ in 0..ITERATIONS {
            let logits = x.matmul(&wy.t()?)?.broadcast_add(&by)?;
            let p = candle_nn::ops::softmax(&logits, D::Minus1)?;
            let g = (p - &y)?.broadcast_mul(&weights)?;
            let gw = (g.t()?.matmul(&x)? + (&wy * l2)?)?;
            let gb = g.sum(0)?;
            let w_next = (&wy - (gw * lr)?)?;
            let b_next = (&by - (gb * lr)?)?;
            let t_next = (1.0 + (1.0 + 4.0 * t * t).sqrt()) / 2.0;
            let momentum = (t - 1.0) / t_next;
            wy = (&w_next + ((&w_next - &w)? * momentum)?)?;
            by = (&b_next + ((&b_next - &b)? * momentum)?)?;
            (w, b, t) = (w_next, b_next, t_next);
        }
        Ok(Head {
            weight: w.flatten_all()?.to_vec1()?,
            bias: b.to_vec1()?,
            dim: self.dim,
        })
    }

    fn accuracy(&self, head: &Head, idx: &[usize]) -> f64 {
        let right = idx
            .iter()
            .filter(|&&i| self.predict(head, i) == self.y[i] as usize)
            .count();
        right as f64 / idx.len().max(1) as f64
    }

    /// Whether each example is predicted right by a head fitted without its
    /// fold ([`FOLDS`] folds, stratified by label).
    fn cross_validate(&self, l2: f64, seed: u64) -> candle_core::Result<Vec<bool>> {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut by_label: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, &l) in self.y.iter().enumerate() {
            by_label.entry(l).or_default().push(i);
        }
        let mut fold_of = vec![0usize; self.y.len()];
        let mut next = 0;
        for rows in by_label.values_mut() {
            rows.shuffle(&mut rng);
            for &i in rows.iter() {
                fold_of[i] = next % FOLDS;
                next += 1;
            }
        }
        let mut right = vec![false; self.y.len()];
        for f in 0..FOLDS {
            let train: Vec<usize> = (0..self.y.len()).filter(|&i| fold_of[i] != f).collect();
            let head = self.fit(&train, l2)?;
            for i in (0..self.y.len()).filter(|&i| fold_of[i] == f) {
                right[i] = self.predict(&head, i) == self.y[i] as usize;
            }
        }
        Ok(right)
    }

    fn predict(&self, head: &Head, i: usize) -> usize {
        argmax(&head.log_probs(&self.x[i * self.dim..(i + 1) * self.dim]))
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// The out-of-scope rule for reference embeddings `n` labelled `y`, given
/// whether the head gets each right when it is held out (`right`): the
/// highest threshold that turns away right answers on at most
/// `accuracy_loss` of the held-out queries.
///
/// `unseen` names the queries the encoder never saw while it was tuned (end
/// to end: a tuned encoder draws its own training queries together, so
/// only the others show how a new query lies); `None`: all of them.
pub fn calibrate(
    n: &Neighbours,
    y: &[u32],
    right: &[bool],
    accuracy_loss: f32,
    unseen: Option<&[usize]>,
) -> OutOfScopeRule {
    let q = |i: usize| &n.embeddings[i * n.dim..(i + 1) * n.dim];
    let all: Vec<usize> = (0..y.len()).collect();
    let measured = unseen.unwrap_or(&all);
    // Each measured query is compared with every reference: beyond
    // MAX_MEASURED (a distilled set of thousands), evenly spaced ones.
    let measured: Vec<usize> = measured
        .iter()
        .copied()
        .step_by(measured.len().div_ceil(MAX_MEASURED).max(1))
        .collect();
    let total = measured.len().max(1) as f32;
    let mut best: Option<OutOfScopeRule> = None;
    for k in K_GRID {
        // In scope: each query against the others, lowest first.
        let mut own: Vec<(f32, bool)> = measured
            .iter()
            .map(|&i| (n.similarity(q(i), k, |j| j == i), right[i]))
            .collect();
        own.sort_by(|a, b| a.0.total_cmp(&b.0));
        // A threshold at own[i].0 turns away own[..i].
        let mut lost = 0usize;
        let mut cut = 0usize;
        for (i, &(_, ok)) in own.iter().enumerate() {
            if (lost + usize::from(ok)) as f32 / total > accuracy_loss {
                cut = i;
                break;
            }
            lost += usize::from(ok);
            cut = i + 1;
        }
        // Every query could go within the budget (no held-out answer is
        // right: too few examples to tell): no evidence for a rule.
        let (threshold, cut) = match own.get(cut) {
            Some(o) => (o.0, cut),
            None => (NO_THRESHOLD, 0),
        };
        // An unseen topic: each label's queries against the other labels'.
        let turned_away = measured
            .iter()
            .filter(|&&i| n.similarity(q(i), k, |j| y[j] == y[i]) < threshold)
            .count();
        let rule = OutOfScopeRule {
            k,
            threshold,
            accuracy_loss,
            in_scope_rejection: cut as f32 / total,
            held_out_label_recall: turned_away as f32 / total,
        };
        if best
            .as_ref()
            .is_none_or(|b| rule.held_out_label_recall > b.held_out_label_recall)
        {
            best = Some(rule);
        }
    }
    best.unwrap_or(OutOfScopeRule {
        k: 1,
        threshold: NO_THRESHOLD,
        accuracy_loss: 0.0,
        in_scope_rejection: 0.0,
        held_out_label_recall: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: [f32; 2]) -> Vec<f32> {
        let n = (v[0] * v[0] + v[1] * v[1]).sqrt();
        vec![v[0] / n, v[1] / n]
    }

    use crate::finetune::tests::train_args as args;

    #[test]
    fn out_of_scope_examples_train_their_label_beside_the_experts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        std::fs::write(
            &path,
            "text,label\nwake me,alarm\nrain?,weather\nwhat is my balance,out_of_scope\n",
        )
        .unwrap();
        let data = read_training_data(&args(&path, "alarm,weather")).unwrap();
        assert_eq!(data.labels.names(), ["alarm", "weather", "out_of_scope"]);
        let err = read_training_data(&args(&path, "alarm")).unwrap_err().to_string();
        assert!(err.contains("weather") && !err.contains("out_of_scope"), "{err}");
    }

    #[test]
    fn the_calibration_share_is_stratified_and_leaves_every_label_in_the_tuning() {
        let y: Vec<u32> = (0..100).map(|i| if i < 90 { (i % 3) as u32 } else { 3 }).collect();
        let unseen = calibration_queries(&y, 7);
        assert!(unseen.windows(2).all(|w| w[0] < w[1]));
        for label in 0..4u32 {
            let total = y.iter().filter(|&&l| l == label).count();
            let held = unseen.iter().filter(|&&i| y[i] == label).count();
            assert_eq!(
                held,
                (total as f64 * CALIBRATION_SHARE).round() as usize,
                "label {label}"
            );
            assert!(held < total);
        }
        assert_eq!(calibration_queries(&y, 7), unseen, "a seed gives one split");
        assert!(
            calibration_queries(&[0, 1, 1], 0).iter().all(|&i| i != 0),
            "a lone example is tuned on"
        );
    }

    #[test]
    fn calibration_on_unseen_queries_reads_only_them() {
        // Queries 0..10 sit on their label's direction (as a tuned encoder
        // places the queries it was tuned on); 10..20 are spread out.
        let mut e = Vec::new();
        for i in 0..20 {
            let spread = if i < 10 { 0.0 } else { (i - 10) as f32 * 0.08 };
            e.extend(unit([1.0, spread]));
        }
        let n = Neighbours { embeddings: e, dim: 2 };
        let y = vec![0u32; 20];
        let unseen: Vec<usize> = (10..20).collect();
        let all = calibrate(&n, &y, &[true; 20], 0.1, None);
        let held = calibrate(&n, &y, &[true; 20], 0.1, Some(&unseen));
        assert!(
            held.threshold < all.threshold,
            "{} vs {}",
            held.threshold,
            all.threshold
        );
        assert!(held.in_scope_rejection <= 0.1);
    }

    #[test]
    fn an_end_to_end_run_tunes_the_encoder_and_writes_a_servable_classifier() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        let rows = [
            ("wake me up at seven", "alarm"),
            ("set an alarm for 6 am", "alarm"),
            ("cancel my morning alarm", "alarm"),
            ("alarm at noon please", "alarm"),
            ("snooze the alarm", "alarm"),
            ("is it going to rain today", "weather"),
            ("forecast for the weekend", "weather"),
            ("will it be sunny in Paris", "weather"),
            ("how cold is it outside", "weather"),
            ("do I need an umbrella", "weather"),
        ];
        let csv: String = std::iter::once("text,label".to_string())
            .chain(rows.iter().map(|(t, l)| format!("{t},{l}")))
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&path, csv).unwrap();
        let out = dir.path().join("enc");
        let encoder = crate::finetune::tests::encoder_dir();
        let mut a = args(&path, "alarm,weather");
        a.out = out.clone();
        a.encoder = encoder.clone();
        a.quiet = true;
        a.encoder_training = Training::EndToEnd;
        let m = run(&a).unwrap();
        let info = m.encoder.as_ref().unwrap();
        assert_eq!(info.training, Training::EndToEnd);
        assert!(info.tuning.as_ref().is_some_and(|t| !t.epoch_loss.is_empty()));
        // The folder holds its own, tuned weights, and serves.
        assert_ne!(
            sha256_file(&out.join("model.safetensors")).unwrap(),
            sha256_file(&encoder.join("model.safetensors")).unwrap()
        );
        let card = classifier::read_card(&out).unwrap();
        assert_eq!(card.training, Training::EndToEnd);
        let rule = card.out_of_scope.unwrap();
        assert!(rule.in_scope_rejection <= 0.5, "{rule:?}");
        let e = Embedder::load(&out).unwrap();
        let v = e.embed("set an alarm for 6 am").unwrap();
        let head = m.head;
        assert!(head.train_accuracy > 0.99, "{head:?}");
        assert_eq!(v.len(), 384);
        assert!(
            !dir.path()
                .read_dir()
                .unwrap()
                .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".encoder-"))
        );
    }

    #[test]
    fn the_head_separates_separable_labels() {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..20 {
            let a = i as f32 * 0.02;
            x.extend(unit([1.0, a]));
            y.push(0);
            x.extend(unit([a, 1.0]));
            y.push(1);
        }
        let data = Data {
            x,
            targets: Targets::hard(&y, 2),
            y,
            dim: 2,
        };
        let all: Vec<usize> = (0..40).collect();
        let head = data.fit(&all, 1e-4).unwrap();
        assert_eq!(data.accuracy(&head, &all), 1.0);
        assert!(data.cross_validate(1e-4, 0).unwrap().iter().all(|&r| r));
    }

    #[test]
    fn calibration_turns_away_a_held_out_topic_and_keeps_the_accuracy_budget() {
        // Two tight topics far apart: a held-out topic looks nothing like the other.
        let mut e = Vec::new();
        let mut y = Vec::new();
        for i in 0..30 {
            let a = i as f32 * 0.003;
            e.extend(unit([1.0, a]));
            y.push(0);
            e.extend(unit([-a, 1.0]));
            y.push(1);
        }
        let n = Neighbours { embeddings: e, dim: 2 };
        // Every held-out answer right: at most 3 of 60 may be turned away.
        let rule = calibrate(&n, &y, &[true; 60], 0.05, None);
        assert!(rule.held_out_label_recall > 0.99, "{rule:?}");
        let kept = (0..60)
            .filter(|&i| n.similarity(&n.embeddings[i * 2..i * 2 + 2], rule.k, |j| j == i) >= rule.threshold)
            .count();
        assert!(kept >= 57, "{kept} of 60 kept");
        // With every held-out answer wrong (too few examples to tell) any
        // threshold is within the budget: that is no evidence for a rule, so
        // it turns nothing away, and the card still holds a number.
        let none = calibrate(&n, &y, &[false; 60], 0.05, None);
        assert_eq!((none.threshold, none.in_scope_rejection), (-1.0, 0.0), "{none:?}");
        let back: OutOfScopeRule = serde_json::from_str(&serde_json::to_string(&none).unwrap()).unwrap();
        assert_eq!(back, none);
    }
}
