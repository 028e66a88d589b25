//! Curation end to end: the real server (real SmolLM2 router) on
//! `127.0.0.1:0`, traffic and feedback through the generated gRPC clients,
//! then `flywheel-trainer curate` (with the real model as judge) and
//! `review-import` as processes against the live request log. Asserts the
//! dataset's counts per source, the cleaning, the stratified split, the
//! leakage check, the hashes, and a second cycle on a frozen test set.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::trainer;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use flywheel_proto::v1::chat_client::ChatClient;
use flywheel_proto::v1::feedback_client::FeedbackClient;
use flywheel_proto::v1::feedback_request::Rating;
use flywheel_proto::v1::router_client::RouterClient;
use flywheel_proto::v1::{
    ChatRequest, FeedbackHistoryRequest, FeedbackRequest, GenerationOptions, RouteRequest, Thumb,
};
use flywheel_server::Config;
use flywheel_trainer::curate::Manifest;
use flywheel_trainer::curate::review::{ReviewItem, read_queue, write_queue};
use tonic::transport::Channel;

/// Queries with the expert that should answer them.
const TRAFFIC: &[(&str, &str)] = &[
    ("How many vacation days do I get per year?", "hr"),
    ("When is the open enrollment period for health benefits?", "hr"),
    ("How do I request parental leave?", "hr"),
    ("Who do I talk to about a conflict with my manager?", "hr"),
    ("My laptop will not connect to the office VPN from home", "it"),
    ("My laptop will not connect to the office VPN from home today", "it"),
    ("How do I reset my email password?", "it"),
    ("How do I reset my email password?", "it"),
    ("The printer on the third floor is jammed", "it"),
    ("Can I install new software on my work computer?", "it"),
    ("How do I get reimbursed for a client dinner?", "finance"),
    ("When will my expense report be approved?", "finance"),
    ("Where do I send a vendor invoice?", "finance"),
    ("What is the travel budget for the sales conference?", "finance"),
    ("What are the specifications of the Acme Widget Pro?", "product"),
    ("How do I set up the Acme smart widget?", "product"),
    ("How much does the Acme widget cost?", "product"),
    ("Does the Acme widget support bluetooth?", "product"),
    ("What is a good book to read this weekend?", "general"),
    ("Tell me a fun fact about octopuses", "general"),
    ("Please send my payslip to jane.doe@example.com", "hr"),
];
/// Gets a neutral rating.
const NEUTRAL: &str = "Tell me a fun fact about octopuses";
/// Gets no feedback.
const SILENT: &str = "What is a good book to read this weekend?";
/// Wrongly routed requests that get a thumbs down but no correction.
const UNCORRECTED: usize = 2;

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

fn sha256(path: &Path) -> String {
    flywheel_trainer::curate::export::sha256_file(path).unwrap()
}

fn quota(n: usize) -> usize {
    if n < 2 {
        0
    } else {
        ((n as f64 * 0.4).round() as usize).clamp(1, n - 1)
    }
}

fn thumb(up: bool) -> Option<Rating> {
    Some(Rating::Thumb(if up { Thumb::Up } else { Thumb::Down }.into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logged_traffic_and_feedback_become_a_clean_leak_free_split() {
    let dir = tempfile::tempdir().unwrap();
    // The shared bootstrap: the default config (real model, real rails),
    // the log in a folder of its own.
    let model = flywheel_server::testing::model_path();
    let mut config = Config::default();
    for spec in config.settings.models.values_mut() {
        spec.path = model.clone();
    }
    let server = flywheel_server::testing::start(config);
    let (addr, log) = (server.addr, server.log_path.clone());
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut router = RouterClient::new(channel.clone());
    let mut feedback = FeedbackClient::new(channel.clone());
    let mut chat = ChatClient::new(channel);

    // Traffic and explicit feedback, as users and reviewers would give it.
    let (mut positive, mut corrected, mut uncorrected, mut labelled_texts) = (0, 0, 0, Vec::new());
    for (query, truth) in TRAFFIC {
        let r = router
            .route(RouteRequest {
                query: (*query).into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let routed = r.route.unwrap().expert;
        let mut fb = FeedbackRequest {
            request_id: r.request_id,
            reviewer_id: Some("sme-1".into()),
            ..Default::default()
        };
        if *query == SILENT {
            continue;
        } else if *query == NEUTRAL {
            fb.rating = Some(Rating::Stars(3));
        } else if routed == *truth {
            fb.rating = thumb(true);
            positive += 1;
            labelled_texts.push(*query);
        } else if uncorrected < UNCORRECTED {
            fb.rating = thumb(false);
            uncorrected += 1;
        } else {
            fb.rating = thumb(false);
            fb.corrected_expert = Some((*truth).into());
            corrected += 1;
            labelled_texts.push(*query);
        }
        feedback.submit(fb).await.unwrap();
    }
    // Implicit signals: an abandoned stream and a rephrase in one session.
    let ask = |q: &str, session: &str| ChatRequest {
        query: q.into(),
        session_id: Some(session.into()),
        options: Some(GenerationOptions {
            max_tokens: Some(4),
            temperature: None,
        }),
        ..Default::default()
    };
    // Long enough that the client leaves before the answer ends.
    let long = ChatRequest {
        options: Some(GenerationOptions {
            max_tokens: Some(128),
            temperature: None,
        }),
        ..ask("Explain our travel policy in detail", "sess-a")
    };
    let mut stream = chat.stream(long).await.unwrap().into_inner();
    let abandoned = match stream.message().await.unwrap().unwrap().event.unwrap() {
        flywheel_proto::v1::chat_stream_message::Event::Start(s) => s.request_id,
        other => panic!("expected start, got {other:?}"),
    };
    drop(stream);
    chat.complete(ask("How do I connect to the office wifi?", "sess-b"))
        .await
        .unwrap();
    chat.complete(ask("how can I connect to the office wifi", "sess-b"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = feedback
            .history(FeedbackHistoryRequest {
                request_id: abandoned.clone(),
            })
            .await
            .map(tonic::Response::into_inner);
        if h.is_ok_and(|h| h.feedback.iter().any(|f| f.kind == "abandoned")) {
            break;
        }
        assert!(Instant::now() < deadline, "abandoned signal never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let requests = TRAFFIC.len() + 3;
    let unsatisfied = uncorrected + 2;

    // Cycle 1: curate the live log with the real model as judge.
    let first = dir.path().join("cycle1");
    let args = [
        "curate",
        "--log",
        log.to_str().unwrap(),
        "--out",
        first.to_str().unwrap(),
        "--judge-model",
        model.to_str().unwrap(),
    ];
    let summary = trainer(&args);
    eprintln!("{summary}");
    assert!(summary.contains("leakage: train/test 0"), "{summary}");
    let m = manifest(&first);
    assert_eq!(m.selection.candidates, requests);
    assert_eq!(
        m.selection.labelled.get("positive_feedback").copied().unwrap_or(0),
        positive
    );
    assert_eq!(m.selection.labelled.get("correction").copied().unwrap_or(0), corrected);
    assert_eq!(m.selection.unsatisfactory, unsatisfied);
    assert_eq!(m.selection.neutral, 1);
    assert_eq!(
        m.selection.no_feedback,
        requests - positive - corrected - unsatisfied - 1
    );
    let judge = m.judge.as_ref().unwrap();
    assert_eq!(judge.judged, unsatisfied);
    let verdicts: usize = judge.causes.values().sum::<usize>() + judge.malformed.values().sum::<usize>();
    assert_eq!(
        verdicts, unsatisfied,
        "every judgement is parsed or counted as malformed"
    );
    assert_eq!(
        std::fs::read_to_string(first.join("judgements.jsonl"))
            .unwrap()
            .lines()
            .count(),
        unsatisfied
    );

    // Cleaning: the exact repeat and the near-duplicate go (when they were
    // labelled at all). The PII rail redacted the e-mail before it was
    // logged, so no logged example carries raw PII.
    let count = |q: &str| labelled_texts.iter().filter(|t| **t == q).count();
    assert_eq!(m.clean.input, positive + corrected);
    assert_eq!(m.clean.pii, 0);
    let train_text = std::fs::read_to_string(first.join("train.jsonl")).unwrap()
        + &std::fs::read_to_string(first.join("test.jsonl")).unwrap();
    assert!(!train_text.contains("jane.doe@example.com"));
    if count("Please send my payslip to jane.doe@example.com") == 1 {
        assert!(
            train_text.contains("Please send my payslip to <EMAIL_1>"),
            "{train_text}"
        );
    }
    assert_eq!(
        m.clean.exact_duplicates,
        count("How do I reset my email password?").saturating_sub(1)
    );
    let vpn = count("My laptop will not connect to the office VPN from home")
        + count("My laptop will not connect to the office VPN from home today");
    assert_eq!(m.clean.near_duplicates, vpn.saturating_sub(1));

    // The split: stratified 60/40, disjoint, hashes match the files.
    let train = &m.splits["train"];
    let test = &m.splits["test"];
    assert_eq!(train.total + test.total, m.clean.output);
    let mut per_label: BTreeMap<&String, usize> = BTreeMap::new();
    for (label, n) in train.labels.iter().chain(&test.labels) {
        *per_label.entry(label).or_default() += n;
    }
    for (label, n) in per_label {
        assert_eq!(test.labels.get(label).copied().unwrap_or(0), quota(n), "label {label}");
    }
    assert_eq!(
        (m.leakage.train_test, m.leakage.train_val, m.leakage.val_test),
        (0, 0, 0)
    );
    for f in &m.files {
        assert_eq!(f.sha256, sha256(&first.join(&f.path)), "{}", f.path.display());
    }
    for name in [
        "train.jsonl",
        "test.jsonl",
        "train.chat.jsonl",
        "train.parquet",
        "test.parquet",
    ] {
        assert!(first.join(name).exists(), "{name}");
    }

    // The constrained judge always yields a verdict, even from a 135M model.
    let choice = dir.path().join("cycle1-choice");
    trainer(&[
        "curate",
        "--log",
        log.to_str().unwrap(),
        "--out",
        choice.to_str().unwrap(),
        "--judge-model",
        model.to_str().unwrap(),
        "--judge-mode",
        "choice",
    ]);
    let jc = manifest(&choice).judge.unwrap();
    assert_eq!(jc.judged, unsatisfied);
    assert_eq!(jc.causes.values().sum::<usize>(), unsatisfied);
    assert!(jc.malformed.is_empty(), "{:?}", jc.malformed);

    // Review: the queue holds the judge-flagged and uncertain requests;
    // reviewers label them and the labels go back into the log.
    let queue_path = first.join("review_queue.csv");
    let queue = if queue_path.exists() {
        read_queue(&queue_path).unwrap()
    } else {
        Vec::new()
    };
    assert_eq!(queue.len(), m.review_queue.as_ref().map_or(0, |q| q.rows));
    assert!(queue.len() <= unsatisfied);
    let truth: BTreeMap<&str, &str> = TRAFFIC
        .iter()
        .copied()
        .chain([
            ("Explain our travel policy in detail", "finance"),
            ("How do I connect to the office wifi?", "it"),
        ])
        .collect();
    let reviewed: Vec<ReviewItem> = queue
        .iter()
        .map(|item| ReviewItem {
            reviewed_expert: Some(truth[item.query.as_str()].to_string()),
            ..item.clone()
        })
        .collect();
    let reviewed_path = dir.path().join("reviewed.csv");
    write_queue(&reviewed_path, &reviewed).unwrap();
    let out = trainer(&[
        "review-import",
        "--log",
        log.to_str().unwrap(),
        "--file",
        reviewed_path.to_str().unwrap(),
        "--reviewer",
        "sme-2",
    ]);
    assert!(
        out.contains(&format!("imported {} reviewed labels", reviewed.len())),
        "{out}"
    );

    // Cycle 2 on the frozen test set: reviewed labels join, test stays put.
    let second = dir.path().join("cycle2");
    trainer(&[
        "curate",
        "--log",
        log.to_str().unwrap(),
        "--out",
        second.to_str().unwrap(),
        "--frozen-test",
        first.join("test.jsonl").to_str().unwrap(),
    ]);
    let m2 = manifest(&second);
    assert_eq!(
        m2.selection.labelled.get("review").copied().unwrap_or(0),
        reviewed.len()
    );
    assert_eq!(m2.selection.unsatisfactory, unsatisfied - reviewed.len());
    assert_eq!(sha256(&second.join("test.jsonl")), sha256(&first.join("test.jsonl")));
    assert_eq!(m2.frozen_test.as_ref().unwrap().rows, test.total);
    assert_eq!(
        m2.splits["train"].total + m2.leakage.dropped_for_frozen_test,
        m2.clean.output
    );
    assert_eq!(m2.leakage.train_test, 0);

    // Filters select by feedback kind; imported rows with PII are dropped.
    let pii_file = dir.path().join("with_pii.jsonl");
    std::fs::write(
        &pii_file,
        "{\"text\":\"wire the refund to DE89 3704 0044 0532 0130 00\",\"label\":\"finance\"}\n",
    )
    .unwrap();
    let only = dir.path().join("rephrased");
    trainer(&[
        "curate",
        "--log",
        log.to_str().unwrap(),
        "--out",
        only.to_str().unwrap(),
        "--feedback",
        "rephrase",
        "--import",
        first.join("train.jsonl").to_str().unwrap(),
        "--import",
        pii_file.to_str().unwrap(),
    ]);
    let m3 = manifest(&only);
    assert_eq!(m3.selection.candidates, 1);
    assert_eq!(m3.clean.pii, 1);
}

/// Several replicas write one PostgreSQL log; `flywheel-trainer curate`
/// reads it by URL and sees every replica's traffic and the feedback given
/// on other replicas than the one that answered.
#[tokio::test]
async fn curating_a_postgres_log_sees_every_replicas_traffic() {
    let Some(url) = flywheel_router::testing::postgres_database() else {
        return;
    };
    let replicas: Vec<_> = (0..3)
        .map(|_| {
            let mut config = Config {
                engine: flywheel_server::config::EngineKind::Stub,
                ..Config::default()
            };
            config.settings.log.store_url = Some(url.clone());
            flywheel_server::testing::start(config)
        })
        .collect();
    let traffic: Vec<(&str, &str)> = TRAFFIC
        .iter()
        .copied()
        .filter(|(q, _)| *q != NEUTRAL && *q != SILENT && !q.contains('@'))
        .collect();
    let mut corrected = 0;
    for (i, (query, truth)) in traffic.iter().enumerate() {
        let served_by = &replicas[i % 3];
        let r = RouterClient::new(served_by.channel().await)
            .route(RouteRequest {
                query: (*query).into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Every other request is corrected on the next replica.
        if i % 2 == 0 {
            FeedbackClient::new(replicas[(i + 1) % 3].channel().await)
                .submit(FeedbackRequest {
                    request_id: r.request_id,
                    rating: thumb(false),
                    corrected_expert: Some((*truth).into()),
                    ..Default::default()
                })
                .await
                .unwrap();
            corrected += 1;
        }
    }
    for server in &replicas {
        server.pipeline.log().flush().await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("curated");
    trainer(&["curate", "--log", &url, "--out", out.to_str().unwrap()]);
    let m = manifest(&out);
    assert_eq!(m.selection.candidates, traffic.len());
    assert_eq!(m.selection.labelled.get("correction").copied().unwrap_or(0), corrected);
    assert_eq!(m.log.as_deref(), Some(Path::new(&url)));

    // The shared log copied back into a file carries every row.
    let file = dir.path().join("copy.db");
    let said = trainer(&["store-copy", "--from", &url, "--to", file.to_str().unwrap()]);
    assert!(
        said.contains(&format!(
            "copied {} request records, {corrected} feedback rows",
            traffic.len()
        )),
        "{said}"
    );
    let copy = flywheel_router::data::log::LogReader::open(&file).unwrap();
    assert_eq!(copy.count().unwrap(), traffic.len() as u64);
    // A second copy into the same file is refused, not doubled.
    let refused = common::trainer_fails(&["store-copy", "--from", &url, "--to", file.to_str().unwrap()]);
    assert!(refused.contains("not empty"), "{refused}");
}
