//! The log's writer thread: batches records into SQLite transactions.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use rusqlite::{Connection, Row, params};
use tokio::sync::oneshot;

use super::ShadowRecord;
use super::{LogError, LogStats, RequestRecord};
use crate::agents::RouteDecision;
use crate::data::feedback::{FeedbackKind, FeedbackRecord, Rating};

/// Told whether a row's commit succeeded (its SQLite message if not).
type Ack = oneshot::Sender<Result<(), String>>;

enum Command {
    Record(Box<RequestRecord>),
    Feedback(Box<FeedbackRecord>, Option<Ack>),
    Shadow(Box<ShadowRecord>),
    Flush(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

pub(super) struct WriterHandle {
    tx: SyncSender<Command>,
    stats: Arc<LogStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl WriterHandle {
    pub(super) fn start(conn: Connection, interval: Duration, batch: usize, capacity: usize, persist: bool) -> Self {
        let (tx, rx) = sync_channel(capacity);
        let stats = Arc::new(LogStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("request-log".into())
            .spawn(move || run(conn, rx, interval, batch, persist, &thread_stats))
            .expect("spawning the request-log thread");
        Self {
            tx,
            stats,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub(super) fn stats(&self) -> &LogStats {
        &self.stats
    }

    pub(super) fn submit(&self, record: RequestRecord) {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.enqueue(Command::Record(Box::new(record)));
    }

    pub(super) fn submit_feedback(&self, feedback: FeedbackRecord) {
        self.enqueue(Command::Feedback(Box::new(feedback), None));
    }

    pub(super) async fn store_feedback(&self, feedback: FeedbackRecord) -> Result<(), LogError> {
        let (ack, committed) = oneshot::channel();
        self.enqueue(Command::Feedback(Box::new(feedback), Some(ack)));
        match committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(LogError::WriteFailed { reason }),
            Err(_) => Err(LogError::Closed),
        }
    }

    pub(super) fn submit_shadow(&self, shadow: ShadowRecord) {
        self.enqueue(Command::Shadow(Box::new(shadow)));
    }

    fn enqueue(&self, command: Command) {
        match self.tx.try_send(command) {
            Ok(()) => {}
            Err(TrySendError::Full(cmd)) => {
                // The writer is a full queue behind: wait for room on the
                // blocking pool rather than on the caller's task.
                let tx = self.tx.clone();
                let stats = self.stats.clone();
                let send = move || {
                    if tx.send(cmd).is_err() {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                    }
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(handle) => drop(handle.spawn_blocking(send)),
                    Err(_) => send(),
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!("request log is closed; a record was not written");
            }
        }
    }

    pub(super) async fn flush(&self) -> Result<(), LogError> {
        let (done, wait) = oneshot::channel();
        self.send_blocking(Command::Flush(done)).await?;
        wait.await.map_err(|_| LogError::Closed)
    }

    pub(super) async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.send_blocking(Command::Shutdown(done)).await.is_ok() {
            let _ = wait.await;
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    async fn send_blocking(&self, cmd: Command) -> Result<(), LogError> {
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || tx.send(cmd))
            .await
            .map_err(|_| LogError::Closed)?
            .map_err(|_| LogError::Closed)
    }
}

/// How often a gathering writer looks for new commands (also the most a
/// flush request waits before its batch is written).
const POLL: Duration = Duration::from_millis(1);

fn run(
    mut conn: Connection,
    rx: Receiver<Command>,
    interval: Duration,
    max_batch: usize,
    persist: bool,
    stats: &LogStats,
) {
    // Records stay boxed as they came: moving them out would copy each one.
    let mut batch: Vec<Box<RequestRecord>> = Vec::with_capacity(max_batch);
    let mut feedback: Vec<FeedbackRecord> = Vec::new();
    let mut acks: Vec<Ack> = Vec::new();
    let mut shadows: Vec<ShadowRecord> = Vec::new();
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        // Block for the first command, then gather until the interval since
        // it has passed: a record waits at most one interval to be committed.
        let first = match rx.recv() {
            Ok(cmd) => cmd,
            Err(_) => return, // every handle is gone
        };
        let deadline = Instant::now() + interval;
        let mut shutdown = None;
        let mut next = Some(first);
        // Gather by polling rather than blocking per record: a blocked
        // receiver costs every submitter a futex wake-up, which at tens of
        // thousands of records a second is a large share of a request.
        'gather: loop {
            while let Some(cmd) = next.take().or_else(|| rx.try_recv().ok()) {
                match cmd {
                    Command::Record(r) => batch.push(r),
                    Command::Feedback(f, ack) => {
                        feedback.push(*f);
                        acks.extend(ack);
                    }
                    Command::Shadow(r) => shadows.push(*r),
                    // Once shutting down, drain everything still queued;
                    // later flushes and shutdowns wait for this last batch.
                    Command::Flush(done) | Command::Shutdown(done) if shutdown.is_some() => waiters.push(done),
                    Command::Flush(done) => {
                        waiters.push(done);
                        break 'gather;
                    }
                    Command::Shutdown(done) => shutdown = Some(done),
                }
                if shutdown.is_none() && batch.len() + feedback.len() + shadows.len() >= max_batch {
                    break 'gather;
                }
            }
            let now = Instant::now();
            if shutdown.is_some() || now >= deadline {
                break;
            }
            std::thread::sleep((deadline - now).min(POLL));
        }
        let committed = if persist {
            write_batch(&mut conn, &mut batch, &mut feedback, &mut shadows, stats)
        } else {
            stats.discarded.fetch_add(batch.len() as u64, Ordering::Relaxed);
            batch.clear();
            feedback.clear();
            shadows.clear();
            Ok(())
        };
        for ack in acks.drain(..) {
            let _ = ack.send(committed.clone());
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
        if let Some(done) = shutdown {
            let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
            let _ = done.send(());
            return;
        }
    }
}

#[allow(
    clippy::vec_box,
    reason = "records arrive boxed through the queue; unboxing would copy each (~600 bytes)"
)]
fn write_batch(
    conn: &mut Connection,
    batch: &mut Vec<Box<RequestRecord>>,
    feedback: &mut Vec<FeedbackRecord>,
    shadows: &mut Vec<ShadowRecord>,
    stats: &LogStats,
) -> Result<(), String> {
    if batch.is_empty() && feedback.is_empty() && shadows.is_empty() {
        return Ok(());
    }
    let n = batch.len() as u64;
    let _span = tracing::info_span!(
        "log_commit",
        records = n,
        feedback = feedback.len(),
        shadows = shadows.len()
    )
    .entered();
    let result = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(INSERT)?;
            let mut json = JsonColumns::default();
            for r in batch.iter() {
                insert(&mut stmt, &mut json, r)?;
            }
            let mut stmt = tx.prepare_cached(INSERT_FEEDBACK)?;
            for f in feedback.iter() {
                insert_feedback(&mut stmt, f)?;
            }
            let mut stmt = tx.prepare_cached(INSERT_SHADOW)?;
            for r in shadows.iter() {
                stmt.execute(params![
                    r.request_id,
                    r.slot,
                    r.version,
                    r.live_version,
                    r.live_output,
                    r.output,
                    r.agree,
                    r.latency_ms,
                    r.live_latency_ms,
                    r.error,
                    r.created_at_ms,
                ])?;
            }
        }
        tx.commit()
    })();
    let feedback_rows = feedback.len();
    feedback.clear();
    shadows.clear();
    batch.clear();
    match result {
        Ok(()) => {
            stats.written.fetch_add(n, Ordering::Relaxed);
            stats.commit_succeeded();
            Ok(())
        }
        Err(error) => {
            stats.failed.fetch_add(n, Ordering::Relaxed);
            stats.feedback_failed.fetch_add(feedback_rows as u64, Ordering::Relaxed);
            tracing::error!(%error, records = n, feedback_rows, "request log batch failed; its rows are lost");
            let reason = error.to_string();
            stats.commit_failed(reason.clone());
            Err(reason)
        }
    }
}

const INSERT_SHADOW: &str = "INSERT INTO shadow (request_id, slot, version, live_version, live_output, output, \
     agree, latency_ms, live_latency_ms, error, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

pub(super) fn shadow_from_row(row: &Row<'_>) -> rusqlite::Result<ShadowRecord> {
    Ok(ShadowRecord {
        request_id: row.get("request_id")?,
        slot: row.get("slot")?,
        version: row.get("version")?,
        live_version: row.get("live_version")?,
        live_output: row.get("live_output")?,
        output: row.get("output")?,
        agree: row.get("agree")?,
        latency_ms: row.get("latency_ms")?,
        live_latency_ms: row.get("live_latency_ms")?,
        error: row.get("error")?,
        created_at_ms: row.get("created_at_ms")?,
    })
}

pub(super) const COLUMNS: &[&str] = &[
    "request_id",
    "kind",
    "session_id",
    "user_id",
    "received_at_ms",
    "finished_at_ms",
    "query",
    "status",
    "error",
    "guardrails",
    "route_expert",
    "route_top_expert",
    "route_confidence",
    "route_scores",
    "route_forced",
    "route_fallback",
    "router_model_version",
    "route_latency_ms",
    "expert",
    "expert_model_version",
    "retrieved",
    "answer",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "total_ms",
    "finish_reason",
    "api_key_id",
    "router_kind",
];

const INSERT: &str = "INSERT OR REPLACE INTO requests (request_id, kind, session_id, user_id, \
    received_at_ms, finished_at_ms, query, status, error, guardrails, route_expert, route_top_expert, \
    route_confidence, route_scores, route_forced, route_fallback, router_model_version, route_latency_ms, \
    expert, expert_model_version, retrieved, answer, prompt_tokens, completion_tokens, ttft_ms, total_ms, \
    finish_reason, api_key_id, router_kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, \
    ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29)";

pub(super) const FEEDBACK_COLUMNS: &str = "feedback_id, request_id, created_at_ms, kind, rating_scale, rating, \
    corrected_expert, comment, reviewer_id, detail";

pub(super) const INSERT_FEEDBACK: &str = "INSERT OR REPLACE INTO feedback (feedback_id, request_id, created_at_ms, \
    kind, rating_scale, rating, score, corrected_expert, comment, reviewer_id, detail) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

pub(super) fn insert_feedback(stmt: &mut rusqlite::CachedStatement<'_>, f: &FeedbackRecord) -> rusqlite::Result<usize> {
    let stored = f.rating.map(Rating::stored);
    stmt.execute(params![
        f.feedback_id,
        f.request_id,
        f.created_at_ms,
        f.kind.as_str(),
        stored.map(|(scale, _)| scale),
        stored.map(|(_, v)| v),
        f.rating.map(Rating::score),
        f.corrected_expert,
        f.comment,
        f.reviewer_id,
        f.detail,
    ])
}

pub(super) fn feedback_from_row(row: &Row<'_>) -> rusqlite::Result<FeedbackRecord> {
    let kind: String = row.get("kind")?;
    let scale: Option<String> = row.get("rating_scale")?;
    let value: Option<i64> = row.get("rating")?;
    Ok(FeedbackRecord {
        feedback_id: row.get("feedback_id")?,
        request_id: row.get("request_id")?,
        created_at_ms: row.get("created_at_ms")?,
        // Rows are only written by this module, so an unknown kind means a
        // newer writer; treat it as explicit rather than fail the read.
        kind: FeedbackKind::parse(&kind).unwrap_or(FeedbackKind::Explicit),
        rating: scale.zip(value).and_then(|(s, v)| Rating::from_stored(&s, v)),
        corrected_expert: row.get("corrected_expert")?,
        comment: row.get("comment")?,
        reviewer_id: row.get("reviewer_id")?,
        detail: row.get("detail")?,
    })
}

/// Buffers of a record's JSON columns, reused from one record to the next.
#[derive(Default)]
struct JsonColumns {
    guardrails: Vec<u8>,
    scores: Vec<u8>,
    retrieved: Vec<u8>,
}

/// `v` as JSON in `buf` (its old content replaced).
fn json_into<'b, T: serde::Serialize>(buf: &'b mut Vec<u8>, v: &T) -> &'b str {
    buf.clear();
    // Serializing these plain structs cannot fail, and serde_json writes
    // UTF-8 only; `null` stands in should either ever change.
    if serde_json::to_writer(&mut *buf, v).is_err() {
        return "null";
    }
    std::str::from_utf8(buf).unwrap_or("null")
}

fn insert(
    stmt: &mut rusqlite::CachedStatement<'_>,
    json: &mut JsonColumns,
    r: &RequestRecord,
) -> rusqlite::Result<usize> {
    let route = r.route.as_ref();
    let guardrails = json_into(&mut json.guardrails, &r.guardrails);
    let scores = route.map(|d| json_into(&mut json.scores, &d.scores));
    let retrieved = json_into(&mut json.retrieved, &r.retrieved);
    stmt.execute(params![
        r.request_id,
        r.kind,
        r.session_id,
        r.user_id,
        r.received_at_ms,
        r.finished_at_ms,
        r.query,
        r.status,
        r.error,
        guardrails,
        route.map(|d| &d.expert),
        route.map(|d| &d.top_expert),
        route.map(|d| f64::from(d.confidence)),
        scores,
        route.map(|d| d.forced),
        route.map(|d| d.fallback),
        route.map(|d| &d.router_model_version),
        route.map(|d| d.latency_ms),
        r.expert,
        r.expert_model_version,
        retrieved,
        r.answer,
        r.prompt_tokens,
        r.completion_tokens,
        r.ttft_ms,
        r.total_ms,
        r.finish_reason,
        r.api_key_id,
        route.and_then(|d| d.router_kind).map(crate::engine::ModelKind::as_str),
    ])
}

fn parse<T: serde::de::DeserializeOwned + Default>(s: Option<String>) -> T {
    s.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
}

pub(super) fn record_from_row(row: &Row<'_>) -> rusqlite::Result<RequestRecord> {
    let route = match row.get::<_, Option<String>>("route_expert")? {
        Some(expert) => Some(RouteDecision {
            expert,
            top_expert: row.get::<_, Option<String>>("route_top_expert")?.unwrap_or_default(),
            confidence: row.get::<_, Option<f64>>("route_confidence")?.unwrap_or_default() as f32,
            scores: parse(row.get("route_scores")?),
            router_model_version: row
                .get::<_, Option<String>>("router_model_version")?
                .unwrap_or_default(),
            latency_ms: row.get::<_, Option<f64>>("route_latency_ms")?.unwrap_or_default(),
            forced: row.get::<_, Option<bool>>("route_forced")?.unwrap_or_default(),
            fallback: row.get::<_, Option<bool>>("route_fallback")?.unwrap_or_default(),
            prompt_tokens: 0,
            router_kind: row
                .get::<_, Option<String>>("router_kind")?
                .and_then(|k| k.parse().ok()),
        }),
        None => None,
    };
    Ok(RequestRecord {
        request_id: row.get("request_id")?,
        kind: row.get("kind")?,
        session_id: row.get("session_id")?,
        user_id: row.get("user_id")?,
        received_at_ms: row.get("received_at_ms")?,
        finished_at_ms: row.get("finished_at_ms")?,
        query: row.get("query")?,
        status: row.get("status")?,
        error: row.get("error")?,
        guardrails: parse(row.get("guardrails")?),
        route,
        expert: row.get("expert")?,
        expert_model_version: row.get("expert_model_version")?,
        retrieved: parse(row.get("retrieved")?),
        answer: row.get("answer")?,
        prompt_tokens: row.get("prompt_tokens")?,
        completion_tokens: row.get("completion_tokens")?,
        ttft_ms: row.get("ttft_ms")?,
        total_ms: row.get("total_ms")?,
        finish_reason: row.get("finish_reason")?,
        api_key_id: row.get("api_key_id")?,
    })
}
