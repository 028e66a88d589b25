//! Misbehaving clients cost the others nothing, measured through the real
//! server, the real model and real clients: one client that stops reading
//! its stream, thirty that cancel at once.
//!
//! These tests compare latencies, so they live in a test binary of their own:
//! cargo runs test binaries one after another, and inside this one they run
//! one at a time, so nothing else in the suite loads the CPU while they
//! measure.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::{Duration, Instant};

use flywheel_proto::v1::chat_client::ChatClient;
use flywheel_proto::v1::chat_stream_message::Event;
use flywheel_proto::v1::{ChatRequest, GenerationOptions};
use flywheel_server::Config;
use flywheel_server::testing as common;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

fn chat(query: &str, max_tokens: u32) -> ChatRequest {
    ChatRequest {
        query: query.into(),
        options: Some(GenerationOptions {
            max_tokens: Some(max_tokens),
            temperature: None,
        }),
        ..Default::default()
    }
}

/// The real model, one answer at a time (the CPU default).
fn real_config(write_timeout_ms: u64) -> Config {
    let mut config = Config::default();
    let model = common::model_path();
    for spec in config.settings.models.values_mut() {
        spec.path = model.clone();
    }
    config.settings.limits.stream_write_timeout_ms = write_timeout_ms;
    config
}

/// A client whose HTTP/2 stream window holds a few bytes and that never
/// reads: the server can send it almost nothing.
async fn non_reading_client(server: &common::TestServer) -> ChatClient<Channel> {
    let channel = Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(Some(64))
        .initial_connection_window_size(Some(64))
        .connect()
        .await
        .unwrap();
    ChatClient::new(channel)
}

/// The tests here compare latencies: one at a time, so that neither
/// measures the other's load on the CPU.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long `Complete(max_tokens = 8)` takes on an idle server: the mean of
/// two, after a warm-up.
async fn idle_complete(client: &mut ChatClient<Channel>) -> Duration {
    timed_complete(client).await;
    (timed_complete(client).await + timed_complete(client).await) / 2
}

/// How long `Complete(max_tokens = 8)` takes.
async fn timed_complete(client: &mut ChatClient<Channel>) -> Duration {
    let started = Instant::now();
    let answer = client
        .complete(chat("How do I reset my password?", 8))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.answer.is_empty());
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_stalls_nobody_and_is_cut_with_deadline_exceeded() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let server = common::start(real_config(4_000));
    let mut other = server.chat().await;
    let idle = idle_complete(&mut other).await;

    let mut stalled = non_reading_client(&server).await;
    let stalled_query = "Write a long story about a lighthouse keeper and his cat.";
    let response = stalled.stream(chat(stalled_query, 200)).await.unwrap();
    // While that answer waits for its reader, other clients are served: the
    // engine is not held by the unread answer (it finishes generating, then
    // waits), so this takes one answer's time more at most, never the 4 s
    // write timeout or forever.
    let busy = timed_complete(&mut other).await;
    let stalled_answer_budget = Duration::from_secs(20);
    assert!(
        busy < stalled_answer_budget,
        "{busy:?} while another client stalled (idle {idle:?})"
    );

    // The stalled stream is cut: its record says so and its slot is free.
    let started = Instant::now();
    let record = loop {
        let recs = server.records_with_query(stalled_query).await;
        if let Some(r) = recs.into_iter().next() {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the stalled stream was never cut"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(record.status, "deadline_exceeded", "{record:?}");
    assert!(record.error.as_deref().unwrap().contains("read nothing for 4000 ms"));
    assert_eq!(server.pipeline.status().in_flight, 0);
    // Idle again, the server answers in its idle time.
    let after = timed_complete(&mut other).await;
    assert!(after < idle * 3, "after the cut {after:?}, idle {idle:?}");

    // When the client finally reads: what was sent, then a clear status.
    let mut stream = response.into_inner();
    let mut saw_start = false;
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => saw_start |= matches!(m.event, Some(Event::Start(_))),
            Ok(None) => panic!("a cut stream must end with a status, not OK"),
            Err(status) => break status,
        }
    };
    assert!(saw_start);
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("read the stream as it arrives"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_cancelled_streams_leave_no_work_behind() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let server = common::start(real_config(15_000));
    let mut other = server.chat().await;
    let idle = idle_complete(&mut other).await;

    // 30 streams asking for long answers, each on its own connection,
    // all cancelled once the first is answering.
    let mut streams = Vec::new();
    for i in 0..30 {
        let mut client = server.chat().await;
        streams.push(tokio::spawn(async move {
            let query = format!("Tell me everything about office printers, question {i}.");
            let mut s = client.stream(chat(&query, 256)).await?.into_inner();
            while s.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        }));
    }
    let started = Instant::now();
    while server.pipeline.status().in_flight < 30 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the streams were not admitted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in &streams {
        s.abort();
    }
    // What was already running ends: one route pass and one prompt step,
    // which mistral.rs cannot stop mid-way (on the CPU a prompt step is most
    // of an idle answer's time, hence the second's slack). Nothing else of
    // the 30 runs: queued answers and decisions leave with their clients.
    let next = timed_complete(&mut other).await;
    assert!(
        next < idle * 2 + Duration::from_secs(1),
        "next answer took {next:?} after 30 cancels; idle {idle:?}"
    );
    assert_eq!(server.pipeline.status().in_flight, 0);
    // Every cancelled stream left a record, at whatever stage it stopped.
    let mut cancelled = 0;
    for i in 0..30 {
        let recs = server
            .records_with_query(&format!("Tell me everything about office printers, question {i}."))
            .await;
        assert_eq!(recs.len(), 1, "stream {i}: {recs:?}");
        cancelled += usize::from(recs[0].status == "cancelled");
    }
    assert_eq!(cancelled, 30);
}
