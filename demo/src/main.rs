//! `flywheel-demo`: the flywheel end to end in one command (see the crate docs).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "flywheel-demo",
    version,
    about = "The flywheel end to end: serve, replay traffic, feedback, curate, fine-tune, evaluate, promote, replay, report"
)]
struct Cli {
    #[command(flatten)]
    demo: flywheel_demo::DemoArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs only: the demo exports no traces.
    let _logs = flywheel_server::telemetry::init(None)?;
    flywheel_demo::run(Cli::parse().demo).await.map(drop)
}
