//! `flywheel-trainer promote` and `rollback`: the gate between a trained
//! model and live traffic.
//!
//! Promotion evaluates the candidate and the model the server's slot serves
//! now on the same frozen test set (through the router's own code, see
//! [`crate::eval`]), applies the gate (accuracy no worse than the incumbent's
//! minus a tolerance, p99 decision latency within a budget), and only then
//! adds the candidate to the model registry and asks the server to swap it in
//! (`Admin.Promote`). A refused candidate never reaches the server.

use std::path::{Path, PathBuf};

use anyhow::Context;
use flywheel_proto::v1 as pb;
use flywheel_proto::v1::admin_client::AdminClient;
use flywheel_router::models::store::ModelStore;
use serde::{Deserialize, Serialize};

use crate::eval::{self, Comparison, ModelReport};

/// Default accuracy tolerance: a candidate may be this much less accurate
/// than the incumbent (e.g. a much smaller, faster model) and still pass.
pub const DEFAULT_TOLERANCE: f64 = 0.01;

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051", env = "FLYWHEEL_SERVER")]
    pub server: String,
    /// Admin token of the server.
    #[arg(long, env = "FLYWHEEL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
    /// Slot: `router` or `expert/<name>`.
    #[arg(long, default_value = "router")]
    pub slot: String,
}

/// `flywheel-trainer promote`.
#[derive(Debug, Clone, clap::Args)]
pub struct PromoteArgs {
    /// Server, token, slot.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Candidate: a training output folder (model.gguf + manifest.json) or a GGUF file.
    #[arg(long)]
    pub candidate: PathBuf,
    /// Version name in the registry (default: the manifest's, else `ft-` + SHA-256 prefix).
    #[arg(long)]
    pub version: Option<String>,
    /// The frozen test set (JSONL or CSV with `text` and `label`).
    #[arg(long)]
    pub test: PathBuf,
    /// Text column.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Label column.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Server config (router instructions and expert descriptions for a base
    /// incumbent; its router model entry loads both models).
    #[arg(long)]
    pub server_config: Option<PathBuf>,
    /// Device.
    #[command(flatten)]
    pub device: eval::DeviceArg,
    /// Accepted accuracy loss against the incumbent (absolute, 0.01 = one point).
    #[arg(long, default_value_t = DEFAULT_TOLERANCE)]
    pub tolerance: f64,
    /// Largest accepted p99 decision latency of the candidate, in ms.
    #[arg(long)]
    pub max_p99_ms: Option<f64>,
    /// Model registry folder shared with the server.
    #[arg(long, env = "FLYWHEEL_REGISTRY_DIR")]
    pub registry_dir: PathBuf,
    /// Write the gate's report (both evaluations, comparison, decision) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Evaluate and decide, but do not promote.
    #[arg(long)]
    pub dry_run: bool,
}

/// The gate's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Whether the candidate may be promoted.
    pub pass: bool,
    /// Why not (empty when it passes).
    pub reasons: Vec<String>,
}

/// Apply the gate to a candidate and the incumbent measured on the same set.
pub fn gate(candidate: &ModelReport, incumbent: &ModelReport, tolerance: f64, max_p99_ms: Option<f64>) -> Decision {
    let mut reasons = Vec::new();
    if candidate.accuracy + 1e-12 < incumbent.accuracy - tolerance {
        reasons.push(format!(
            "accuracy {:.2}% is below the incumbent's {:.2}% minus the tolerance of {:.2} points",
            candidate.accuracy * 100.0,
            incumbent.accuracy * 100.0,
            tolerance * 100.0
        ));
    }
    if let Some(max) = max_p99_ms
        && candidate.latency_p99_ms > max
    {
        reasons.push(format!(
            "p99 decision latency {:.1} ms is over the budget of {max:.1} ms",
            candidate.latency_p99_ms
        ));
    }
    Decision {
        pass: reasons.is_empty(),
        reasons,
    }
}

/// The report `promote` writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromoteReport {
    /// Candidate's accuracy.
    pub accuracy: f64,
    /// Version name of the candidate.
    pub version: String,
    /// Candidate evaluation.
    pub candidate: ModelReport,
    /// Incumbent evaluation.
    pub incumbent: ModelReport,
    /// Candidate vs incumbent.
    pub comparison: Comparison,
    /// The gate's decision.
    pub decision: Decision,
    /// Whether the server now serves the candidate.
    pub promoted: bool,
}

/// An Admin client connected to the server (mutating calls add the token with `authorized`).
pub async fn admin(args: &ServerArgs) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    AdminClient::connect(args.server.clone())
        .await
        .with_context(|| format!("connecting to {}", args.server))
}

fn authorized<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("the admin token is not valid header text")?,
    );
    Ok(r)
}

fn candidate_files(candidate: &Path) -> (PathBuf, Option<PathBuf>) {
    if flywheel_router::engine::classifier::is_classifier(candidate) {
        // The folder is the model; the store copies its manifest.
        (candidate.to_path_buf(), None)
    } else if candidate.is_dir() {
        let manifest = candidate.join("manifest.json");
        (candidate.join("model.gguf"), manifest.is_file().then_some(manifest))
    } else {
        (candidate.to_path_buf(), None)
    }
}

/// Run `flywheel-trainer promote`: [`assess`], then [`apply`] when the gate passes.
///
/// # Errors
/// The gate refuses, the server refuses, or something cannot be read or reached.
pub async fn promote(args: &PromoteArgs) -> anyhow::Result<PromoteReport> {
    let mut report = assess(args).await?;
    if report.decision.pass && !args.dry_run {
        apply(args, &report.version).await?;
        report.promoted = true;
    }
    if let Some(path) = &args.report {
        eval::write_json(path, &report)?;
    }
    Ok(report)
}

/// Evaluate the candidate and the slot's serving model on the test set and
/// apply the gate; changes nothing.
///
/// # Errors
/// Unreadable files, an unreachable server, evaluation failures.
pub async fn assess(args: &PromoteArgs) -> anyhow::Result<PromoteReport> {
    let (model, manifest) = candidate_files(&args.candidate);
    anyhow::ensure!(model.is_file(), "{} is not a model file", model.display());
    let setup = eval::EvalSetup::new(args.server_config.as_deref(), args.device)?;
    let version = match (&args.version, &manifest) {
        (Some(v), _) => v.clone(),
        (None, Some(_)) => eval::manifest_version(&model).context("the manifest has no `version`")?,
        (None, None) => format!("ft-{}", &crate::curate::export::sha256_file(&model)?[..12]),
    };
    let mut client = admin(&args.server).await?;
    let current = serving(&mut client, &args.server).await?;
    let (examples, labels) = eval::read_test(&args.test, &args.text_column, &args.label_column, None)?;
    let labels = eval::label_space(&labels, &[Path::new(&current.path), &model])?;
    tracing::info!(incumbent = %current.version, candidate = %version, n = examples.len(), device = %setup.device(), "evaluating");
    let incumbent = eval::evaluate_model(Path::new(&current.path), &examples, &labels, &setup, None).await?;
    let candidate = eval::evaluate_model(&model, &examples, &labels, &setup, None).await?;
    let comparison = eval::compare(&candidate, &incumbent);
    let decision = gate(&candidate, &incumbent, args.tolerance, args.max_p99_ms);
    Ok(PromoteReport {
        accuracy: candidate.accuracy,
        version,
        candidate,
        incumbent,
        comparison,
        decision,
        promoted: false,
    })
}

/// What `slot` serves now. Asked with the admin token: the server shows
/// the model's whole path (the incumbent is evaluated from that file) only
/// to the admin.
///
/// # Errors
/// The server cannot be reached or has no such slot.
pub async fn serving(
    client: &mut AdminClient<tonic::transport::Channel>,
    server: &ServerArgs,
) -> anyhow::Result<pb::ModelSlot> {
    let request = authorized(pb::ListModelsRequest {}, &server.admin_token)?;
    let slots = client.list_models(request).await?.into_inner().slots;
    let slot = &server.slot;
    slots
        .into_iter()
        .find(|s| &s.slot == slot)
        .with_context(|| format!("the server has no slot `{slot}`"))
}

/// Add the candidate to the registry as `version` and ask the server to
/// swap it into the slot (no gate: call [`assess`] first).
///
/// # Errors
/// Registry failures, or the server refuses.
pub async fn apply(args: &PromoteArgs, version: &str) -> anyhow::Result<()> {
    let (model, manifest) = candidate_files(&args.candidate);
    let store = ModelStore::open(&args.registry_dir)?;
    store.add(version, &model, manifest.as_deref())?;
    let request = authorized(
        pb::PromoteRequest {
            slot: args.server.slot.clone(),
            version: version.to_string(),
        },
        &args.server.admin_token,
    )?;
    admin(&args.server)
        .await?
        .promote(request)
        .await
        .context("the server refused the promotion")?;
    Ok(())
}

/// A readable summary of a promotion.
pub fn render(report: &PromoteReport) -> String {
    let mut s = eval::render(&eval::EvalReport {
        accuracy: report.candidate.accuracy,
        data: String::new(),
        model: report.candidate.clone(),
        against: Some(report.incumbent.clone()),
        comparison: Some(report.comparison.clone()),
    });
    if report.decision.pass {
        s.push_str(&format!(
            "\ngate: PASS{}\n",
            if report.promoted {
                format!(", `{}` promoted", report.version)
            } else {
                " (dry run)".into()
            }
        ));
    } else {
        s.push_str("\ngate: REFUSED\n");
        for r in &report.decision.reasons {
            s.push_str(&format!("  - {r}\n"));
        }
    }
    s
}

/// Run `flywheel-trainer rollback`.
///
/// # Errors
/// The server refuses or cannot be reached.
pub async fn rollback(args: &ServerArgs) -> anyhow::Result<pb::SwapResponse> {
    let mut client = admin(args).await?;
    let request = authorized(
        pb::RollbackRequest {
            slot: args.slot.clone(),
        },
        &args.admin_token,
    )?;
    Ok(client
        .rollback(request)
        .await
        .context("the server refused the rollback")?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(accuracy: f64, p99: f64) -> ModelReport {
        ModelReport::fixture("v", accuracy, p99 / 2.0, p99)
    }

    #[test]
    fn gate_allows_the_tolerance_and_refuses_beyond_it() {
        let incumbent = report(0.90, 100.0);
        assert!(gate(&report(0.895, 50.0), &incumbent, 0.01, None).pass);
        assert!(
            gate(&report(0.89, 50.0), &incumbent, 0.01, None).pass,
            "exactly at the tolerance"
        );
        let refused = gate(&report(0.85, 50.0), &incumbent, 0.01, None);
        assert!(!refused.pass);
        assert!(
            refused.reasons[0].contains("below the incumbent"),
            "{:?}",
            refused.reasons
        );
    }

    #[test]
    fn gate_refuses_a_slow_candidate_and_gives_every_reason() {
        let incumbent = report(0.90, 100.0);
        let d = gate(&report(0.80, 250.0), &incumbent, 0.01, Some(200.0));
        assert!(!d.pass);
        assert_eq!(d.reasons.len(), 2);
        assert!(d.reasons[1].contains("over the budget"));
        assert!(gate(&report(0.95, 150.0), &incumbent, 0.01, Some(200.0)).pass);
    }
}
