//! Replaying traffic through the gRPC API as users would, and the simulated
//! users' and reviewers' feedback.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flywheel_proto::v1::chat_client::ChatClient;
use flywheel_proto::v1::chat_stream_message::Event;
use flywheel_proto::v1::feedback_client::FeedbackClient;
use flywheel_proto::v1::feedback_request::Rating;
use flywheel_proto::v1::router_client::RouterClient;
use flywheel_proto::v1::{ChatRequest, FeedbackRequest, GenerationOptions, RouteRequest, Thumb};
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use flywheel_router::clock::process_cpu_seconds;

use super::traffic::Query;

/// Tokens each sampled chat answer streams (enough to time TTFT and decoding).
const CHAT_MAX_TOKENS: u32 = 16;

/// What one replayed request did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Position in the traffic.
    pub index: usize,
    /// Request id from the server.
    pub request_id: String,
    /// The expert that should answer.
    pub truth: String,
    /// The expert the router chose.
    pub routed: String,
    /// The router model version that decided.
    pub version: String,
    /// Server-side decision time (ms).
    pub route_ms: f64,
    /// Client-side time of the whole call (ms).
    pub e2e_ms: f64,
    /// Sent as a streamed chat: time to the first answer token (ms, server-side, includes routing).
    pub ttft_ms: Option<f64>,
    /// Streamed chat: answer tokens.
    pub completion_tokens: u32,
    /// Streamed chat: decoding time after the first token (ms).
    pub decode_ms: f64,
    /// gRPC status code name when it did not succeed.
    pub error: Option<String>,
}

impl Outcome {
    /// The rails refused it (a verdict, not a failure).
    pub fn refused(&self) -> bool {
        self.error.as_deref() == Some("PermissionDenied")
    }

    /// It failed (any error other than a rail's refusal).
    pub fn failed(&self) -> bool {
        self.error.is_some() && !self.refused()
    }
}

/// A whole replay.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// Per request, in traffic order.
    pub outcomes: Vec<Outcome>,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// CPU seconds this process spent (server and client).
    pub cpu_seconds: f64,
}

fn code_name(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

/// Send one query: through `Router.Route`, or as a streamed chat when `chat`.
pub async fn send(channel: Channel, index: usize, query: &Query, chat: bool) -> Outcome {
    let mut out = Outcome {
        index,
        truth: query.expert.clone(),
        ..Outcome::default()
    };
    let t = Instant::now();
    if chat {
        let request = ChatRequest {
            query: query.text.clone(),
            options: Some(GenerationOptions {
                max_tokens: Some(CHAT_MAX_TOKENS),
                temperature: None,
            }),
            ..Default::default()
        };
        match stream_chat(channel, request, &mut out).await {
            Ok(()) => {}
            Err(status) => out.error = Some(code_name(&status)),
        }
    } else {
        let request = RouteRequest {
            query: query.text.clone(),
            ..Default::default()
        };
        match RouterClient::new(channel).route(request).await {
            Ok(r) => {
                let r = r.into_inner();
                out.request_id = r.request_id;
                let d = r.route.unwrap_or_default();
                out.routed = d.expert;
                out.version = d.router_model_version;
                out.route_ms = d.latency_ms;
            }
            Err(status) => out.error = Some(code_name(&status)),
        }
    }
    out.e2e_ms = t.elapsed().as_secs_f64() * 1e3;
    out
}

async fn stream_chat(channel: Channel, request: ChatRequest, out: &mut Outcome) -> Result<(), tonic::Status> {
    let mut stream = ChatClient::new(channel).stream(request).await?.into_inner();
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(Event::Start(s)) => {
                out.request_id = s.request_id;
                let d = s.route.unwrap_or_default();
                out.routed = d.expert;
                out.version = d.router_model_version;
                out.route_ms = d.latency_ms;
            }
            Some(Event::End(e)) => {
                let t = e.timings.unwrap_or_default();
                out.ttft_ms = Some(t.ttft_ms);
                out.decode_ms = (t.total_ms - t.ttft_ms).max(0.0);
                out.completion_tokens = e.usage.unwrap_or_default().completion_tokens;
            }
            Some(Event::Delta(_)) | None => {}
        }
    }
    Ok(())
}

/// Replay `traffic` with `concurrency` clients; every `chat_every`-th query
/// (0 = none) is a streamed chat instead of a route call.
pub async fn replay(
    channel: &Channel,
    traffic: &[Query],
    concurrency: usize,
    chat_every: usize,
    bar: &ProgressBar,
) -> Replay {
    let cpu0 = process_cpu_seconds();
    let t = Instant::now();
    let traffic = Arc::new(traffic.to_vec());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (channel, traffic, next, bar) = (channel.clone(), traffic.clone(), next.clone(), bar.clone());
        workers.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(query) = traffic.get(i) else { break };
                let chat = chat_every > 0 && i % chat_every == chat_every - 1;
                let outcome = send(channel.clone(), i, query, chat).await;
                if outcome.failed() {
                    bar.println(format!("request {i} failed: {:?}", outcome.error));
                }
                mine.push(outcome);
                bar.inc(1);
            }
            mine
        });
    }
    let mut outcomes = Vec::with_capacity(traffic.len());
    while let Some(done) = workers.join_next().await {
        outcomes.extend(done.unwrap_or_default());
    }
    outcomes.sort_by_key(|o| o.index);
    Replay {
        outcomes,
        seconds: t.elapsed().as_secs_f64(),
        cpu_seconds: process_cpu_seconds() - cpu0,
    }
}

/// How the simulated users and reviewers behave.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct FeedbackPolicy {
    /// Share of requests that get a rating at all.
    pub rate: f64,
    /// Share of thumbs-down ratings whose reviewer also names the right expert.
    pub reviewer_share: f64,
    /// Share of reviewer corrections that name a wrong expert (label noise).
    pub noise: f64,
    /// Seed of the simulation.
    pub seed: u64,
}

/// What the simulated feedback gave.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FeedbackStats {
    /// Thumbs up (route was right).
    pub thumbs_up: usize,
    /// Thumbs down without a correction.
    pub thumbs_down: usize,
    /// Thumbs down with the right expert named.
    pub corrected: usize,
    /// Corrections that named a wrong expert (noise).
    pub noisy_corrections: usize,
    /// Requests left without feedback.
    pub silent: usize,
    /// Their positions in the traffic: a random share never curated, so an
    /// unbiased held-out set for the before/after accuracy.
    #[serde(skip)]
    pub silent_indices: HashSet<usize>,
}

/// Rate every successful request of `replay`: thumbs up when routed right,
/// thumbs down when wrong, and for a share of those a reviewer's correction.
///
/// # Errors
/// The server refuses a feedback (every one here is valid, so that is a bug).
pub async fn give_feedback(
    channel: &Channel,
    replay: &Replay,
    experts: &[String],
    policy: FeedbackPolicy,
) -> anyhow::Result<FeedbackStats> {
    let mut client = FeedbackClient::new(channel.clone());
    let mut rng = StdRng::seed_from_u64(policy.seed);
    let mut stats = FeedbackStats::default();
    for o in replay.outcomes.iter().filter(|o| o.error.is_none()) {
        if rng.random::<f64>() >= policy.rate {
            stats.silent += 1;
            stats.silent_indices.insert(o.index);
            continue;
        }
        let right = o.routed == o.truth;
        let mut request = FeedbackRequest {
            request_id: o.request_id.clone(),
            rating: Some(Rating::Thumb(if right { Thumb::Up } else { Thumb::Down }.into())),
            ..Default::default()
        };
        if right {
            stats.thumbs_up += 1;
        } else if rng.random::<f64>() < policy.reviewer_share {
            request.reviewer_id = Some("demo-reviewer".into());
            let wrong: Vec<&String> = experts.iter().filter(|e| **e != o.truth).collect();
            if rng.random::<f64>() < policy.noise && !wrong.is_empty() {
                request.corrected_expert = Some(wrong[rng.random_range(0..wrong.len())].clone());
                stats.noisy_corrections += 1;
            } else {
                request.corrected_expert = Some(o.truth.clone());
            }
            stats.corrected += 1;
        } else {
            stats.thumbs_down += 1;
        }
        client.submit(request).await?;
    }
    Ok(stats)
}

/// Traffic that keeps flowing in the background (one client, a pause
/// between requests) while a cycle trains, evaluates and swaps models.
pub struct Background {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Outcome>>,
}

/// What the background traffic saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackgroundStats {
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed (any error but a rail's refusal).
    pub failed: usize,
    /// Requests per router model version that decided them, in order of first appearance.
    pub versions: Vec<(String, usize)>,
}

impl Background {
    /// Start sending `traffic` in a loop.
    pub fn start(channel: Channel, traffic: Vec<Query>, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (i, query) in traffic.iter().cycle().enumerate() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                seen.push(send(channel.clone(), i, query, false).await);
                tokio::time::sleep(pause).await;
            }
            seen
        });
        Self { stop, task }
    }

    /// Stop and count.
    pub async fn finish(self) -> BackgroundStats {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.task.await.unwrap_or_default();
        let mut versions: Vec<(String, usize)> = Vec::new();
        for o in seen.iter().filter(|o| o.error.is_none()) {
            match versions.iter_mut().find(|(v, _)| *v == o.version) {
                Some((_, n)) => *n += 1,
                None => versions.push((o.version.clone(), 1)),
            }
        }
        BackgroundStats {
            requests: seen.len(),
            failed: seen.iter().filter(|o| o.failed()).count(),
            versions,
        }
    }
}

/// Requests per router model version.
pub fn versions(replay: &Replay) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for o in replay.outcomes.iter().filter(|o| o.error.is_none()) {
        *out.entry(o.version.clone()).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_not_failures() {
        let refused = Outcome {
            error: Some("PermissionDenied".into()),
            ..Outcome::default()
        };
        let failed = Outcome {
            error: Some("Internal".into()),
            ..Outcome::default()
        };
        assert!(refused.refused() && !refused.failed());
        assert!(failed.failed() && !Outcome::default().failed());
    }
}
