//! Retrieval through the real server and a real client: answers cite the
//! demo knowledge base (real SmolLM2 router and expert, real embedder), the
//! request log records the passages, and `Admin.Reindex` swaps a rebuilt
//! index in under streaming load with no failed request.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use flywheel_proto::v1 as pb;
use flywheel_proto::v1::chat_stream_message::Event;
use flywheel_server::Config;
use tonic::Code;

const TOKEN: &str = "test-admin-token-0123456789";

fn ask(query: &str, expert: Option<&str>) -> pb::ChatRequest {
    pb::ChatRequest {
        query: query.into(),
        expert: expert.map(str::to_string),
        options: Some(pb::GenerationOptions {
            max_tokens: Some(24),
            temperature: None,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_question_only_one_document_answers_cites_that_document() {
    let server = common::real_server();
    let mut chat = server.chat().await;
    // Forced to the HR expert: what is tested is its retrieval, not the
    // zero-shot router's confidence.
    let r = chat
        .complete(ask(
            "How many weeks of paid parental leave do new parents get?",
            Some("hr"),
        ))
        .await
        .unwrap()
        .into_inner();
    let first = &r.citations[0];
    assert_eq!(first.doc_id, "hr/parental-leave", "{:?}", r.citations);
    assert_eq!(first.title, "Parental leave");
    assert!(first.chunk_id.starts_with("hr/parental-leave#"));
    assert!(first.text.contains("16 weeks"), "{}", first.text);
    assert!(r.citations.len() <= 3);
    assert!(r.citations.windows(2).all(|w| w[0].score >= w[1].score));

    // The stream's first message carries the same citations.
    let mut stream = chat
        .stream(ask(
            "How many weeks of paid parental leave do new parents get?",
            Some("hr"),
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(Event::Start(start)) = stream.message().await.unwrap().unwrap().event else {
        panic!("the first message is not the start");
    };
    assert_eq!(start.citations[0].doc_id, "hr/parental-leave");
    while stream.message().await.unwrap().is_some() {}

    // The log keeps the passages' ids and scores.
    let record = server.record(&r.request_id).await;
    let logged: Vec<&str> = record.retrieved.iter().map(|p| p.chunk_id.as_str()).collect();
    let cited: Vec<&str> = r.citations.iter().map(|c| c.chunk_id.as_str()).collect();
    assert_eq!(logged, cited);
    assert!((record.retrieved[0].score - first.score).abs() < 1e-6);

    // The fallback expert has no corpus: no citations.
    let general = chat
        .complete(ask("Tell me a joke", Some("general")))
        .await
        .unwrap()
        .into_inner();
    assert!(general.citations.is_empty());

    // Status reports the index.
    let status = server
        .admin()
        .await
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let index = status.retrieval.unwrap();
    assert_eq!((index.experts, index.documents), (4, 28));
    assert!(index.chunks >= 28);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

#[tokio::test]
async fn reindexing_under_load_swaps_the_new_index_in_with_no_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let kb = Path::new(env!("CARGO_MANIFEST_DIR")).join("kb/it");
    let corpus = dir.path().join("it");
    copy_dir(&kb, &corpus);
    let mut config = Config {
        engine: flywheel_server::config::EngineKind::Stub,
        stub_token_delay_ms: 2,
        admin_token: Some(TOKEN.into()),
        ..Config::default()
    };
    for e in &mut config.settings.experts {
        e.corpus = (e.name == "it").then(|| corpus.clone());
    }
    config.settings.retrieval.cache_dir = dir.path().join("cache");
    let server = common::start(config);

    // Not indexed yet: the new document is not cited.
    let query = "What is the badge colour for visitors to the data centre?";
    let before = server
        .chat()
        .await
        .complete(ask(query, Some("it")))
        .await
        .unwrap()
        .into_inner();
    assert!(before.citations.iter().all(|c| c.doc_id != "it/data-centre"));

    // Streams run continuously while the index is rebuilt and swapped three times.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(common::Progress::default()), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for i in 0..4 {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        let mut chat = server.chat().await;
        clients.push(tokio::spawn(async move {
            let queries = ["My VPN will not connect", "How do I reset my password?", query];
            let mut n = i;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let result = async {
                    let mut s = chat.stream(ask(queries[n % 3], Some("it"))).await?.into_inner();
                    let mut cited = false;
                    while let Some(m) = s.message().await? {
                        if let Some(Event::Start(start)) = m.event {
                            cited = !start.citations.is_empty();
                        }
                    }
                    Ok::<bool, tonic::Status>(cited)
                }
                .await;
                match result {
                    Ok(true) => done.tick(),
                    _ => drop(failed.fetch_add(1, Ordering::Relaxed)),
                }
            }
        }));
    }
    std::fs::write(
        corpus.join("data-centre.md"),
        "# Data centre access\n\n## Visitors\n\nVisitors to the data centre wear an orange badge and are escorted at all times.\n",
    )
    .unwrap();
    let mut admin = server.admin().await;
    let unauthorized = admin.reindex(pb::ReindexRequest {}).await.unwrap_err();
    assert_eq!(unauthorized.code(), Code::Unauthenticated);
    for _ in 0..3 {
        let stats = admin
            .reindex(common::authorized(pb::ReindexRequest {}, TOKEN))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((stats.experts, stats.documents), (1, 8));
        // Answers keep flowing between rebuilds.
        done.more(2).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(done.count() >= 8, "{}", done.count());

    let after = server
        .chat()
        .await
        .complete(ask(query, Some("it")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.citations[0].doc_id, "it/data-centre", "{:?}", after.citations);
}

#[tokio::test]
async fn reindex_without_corpora_is_a_failed_precondition() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::stub_config(&dir.path().join("registry"), Some(TOKEN));
    for e in &mut config.settings.experts {
        e.corpus = None;
    }
    let server = common::start(config);
    let err = server
        .admin()
        .await
        .reindex(common::authorized(pb::ReindexRequest {}, TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("corpus"), "{}", err.message());
}
