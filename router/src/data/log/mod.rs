//! The request log: one record per request, the flywheel's raw material.
//!
//! [`RequestLog::submit`] hands a [`RequestRecord`] to a writer thread and
//! returns at once; the writer commits batches to the store at least every
//! `flush_interval_ms`. Durability rule: a record is stored at most one
//! flush interval (default 50 ms) after its request finished; `kill -9` can
//! lose only the records of that last interval and never corrupts the log;
//! [`RequestLog::shutdown`] commits everything queued. [`LogReader`] reads
//! records back by request id (feedback and curation build on it).
//!
//! Two stores ([`LogLocation`]): a SQLite file (the default, WAL mode, no
//! setup; `sqlite.rs`) and PostgreSQL (`log.store_url`; `postgres.rs`),
//! which several server replicas share. Both hold the same tables and are
//! written and read through the same code: rows become column values in
//! `columns.rs`, the writer thread (`writer.rs`) gathers batches, and each
//! store commits a batch as one transaction.
//!
//! Feedback rows ([`FeedbackRecord`]) travel through the same writer, so a
//! request's record is always committed before feedback the pipeline
//! attaches to it (e.g. an abandoned stream). [`append_feedback`] writes
//! rows synchronously from another process (review imports).

mod columns;
mod copy;
mod postgres;
mod record;
mod serving_state;
mod sqlite;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use sqlite::SCHEMA_VERSION;

use crate::config::LogSpec;
use crate::data::feedback::FeedbackRecord;
use columns::{ColumnRead, Value};

/// Errors of the request log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The database could not be opened or migrated.
    #[error("cannot open request log {path}")]
    Open {
        /// Database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A folder for the database could not be created.
    #[error("cannot create folder for request log {path}")]
    Folder {
        /// Database file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The PostgreSQL store could not be reached (or its URL is invalid).
    #[error("cannot connect to the request log at {url}")]
    Connect {
        /// The store's URL, password hidden.
        url: String,
        /// The client's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The store holds a schema newer than this binary knows.
    #[error("the request log's schema version {found} is newer than this binary's {supported}; upgrade the binary")]
    NewerSchema {
        /// Version found in the store.
        found: i64,
        /// Newest version this binary writes.
        supported: i64,
    },
    /// A copy's target already holds rows.
    #[error("the log at {target} is not empty; copy into a new database or file")]
    TargetNotEmpty {
        /// The target, password hidden.
        target: String,
    },
    /// A value of the wrong kind for its column (a bug in this module).
    #[error("a value does not fit column {column}")]
    ColumnKind {
        /// `table.column`.
        column: String,
    },
    /// The PostgreSQL client's runtime could not start.
    #[error("cannot start the request log's PostgreSQL client")]
    Runtime(#[source] std::io::Error),
    /// A query failed.
    #[error("request log query failed")]
    Query(#[from] rusqlite::Error),
    /// A PostgreSQL query failed.
    #[error("request log query failed (PostgreSQL)")]
    Postgres(#[from] tokio_postgres::Error),
    /// The writer has stopped.
    #[error("the request log writer has stopped")]
    Closed,
    /// A slot's serving state in the store does not parse.
    #[error("the serving state of slot `{slot}` in the store is not valid")]
    CorruptState {
        /// The slot.
        slot: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The writer could not commit the batch holding the row (disk or
    /// `log.max_size_mb` full, database unreachable, I/O error); the row is
    /// not stored.
    #[error("the request log could not write: {reason}")]
    WriteFailed {
        /// The store's message for the failed commit.
        reason: String,
    },
}

impl LogError {
    /// Whether the store cannot be reached for now (a PostgreSQL server
    /// down or restarting): worth a retry later, not a bug.
    pub fn store_unreachable(&self) -> bool {
        postgres::unreachable(self)
    }
}

/// Where a request log lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLocation {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database, by URL (`postgres://user:password@host/db`).
    Postgres(String),
}

impl LogLocation {
    /// Where `spec`'s log lives: the PostgreSQL store when `store_url` is
    /// set, else the SQLite file.
    pub fn of(spec: &LogSpec) -> Self {
        match &spec.store_url {
            Some(url) => Self::Postgres(url.clone()),
            None => Self::Sqlite(spec.path.clone()),
        }
    }
}

/// A path whose text is a `postgres://` URL names that database: every
/// command that takes a log file takes a PostgreSQL store the same way.
impl From<&Path> for LogLocation {
    fn from(path: &Path) -> Self {
        match path.to_str() {
            Some(s) if crate::config::is_postgres_url(s) => Self::Postgres(s.to_string()),
            _ => Self::Sqlite(path.to_path_buf()),
        }
    }
}

impl From<&PathBuf> for LogLocation {
    fn from(path: &PathBuf) -> Self {
        Self::from(path.as_path())
    }
}

/// The file's path, or the URL with its password hidden.
impl std::fmt::Display for LogLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => f.write_str(&postgres::redact(url)),
        }
    }
}

/// What a store's readers can do; [`LogReader`] builds every query on it.
trait LogReads: Send {
    /// Run `sql` (parameters `$1`, `$2`, ...) and hand each row to `each`.
    fn select(
        &self,
        sql: &str,
        params: &[Value<'_>],
        each: &mut dyn FnMut(&dyn ColumnRead) -> Result<(), LogError>,
    ) -> Result<(), LogError>;
    /// The store's schema version.
    fn schema_version(&self) -> Result<i64, LogError>;
    /// The store's own consistency check; `"ok"` when sound.
    fn integrity_check(&self) -> Result<String, LogError>;
}

pub use crate::clock::unix_ms;
pub use copy::{CopyReport, copy_log};
pub use record::{RequestRecord, RetrievedRef, ShadowRecord};
pub use serving_state::{Changes, SharedServingState, StoreCycleLock};

/// Counters of the log, shared with the writer.
#[derive(Debug, Default)]
pub struct LogStats {
    accepted: AtomicU64,
    written: AtomicU64,
    failed: AtomicU64,
    discarded: AtomicU64,
    feedback_failed: AtomicU64,
    /// Set while the latest commit failed.
    failing: std::sync::Mutex<Option<WriteFailure>>,
}

/// The log's writes are failing: since when, and the store's latest message.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteFailure {
    /// The latest failed commit's error.
    pub reason: String,
    /// When the first failed commit of this run of failures happened.
    pub since: std::time::Instant,
    /// When rows were first lost in this run of failures; `None` while
    /// every row is kept for another try (a PostgreSQL store unreachable,
    /// within `log.outage_buffer`).
    pub losing_since: Option<std::time::Instant>,
}

impl LogStats {
    /// Records handed to the log.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Records committed to disk.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
    /// Records that could not be written (SQLite errors), logged as errors.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    /// Records dropped unwritten because `log.persist` is off.
    pub fn discarded(&self) -> u64 {
        self.discarded.load(Ordering::Relaxed)
    }
    /// Feedback rows (explicit and implicit) that could not be written.
    pub fn feedback_failed(&self) -> u64 {
        self.feedback_failed.load(Ordering::Relaxed)
    }
    /// Why writes are failing, while the latest commit failed; `None` once
    /// a commit succeeds again.
    pub fn write_failure(&self) -> Option<WriteFailure> {
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
    fn commit_failed(&self, reason: String, lost: bool) {
        let mut failing = self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        let since = failing.as_ref().map_or(now, |f| f.since);
        let losing_since = failing.as_ref().and_then(|f| f.losing_since).or(lost.then_some(now));
        *failing = Some(WriteFailure {
            reason,
            since,
            losing_since,
        });
    }
    fn commit_succeeded(&self) {
        *self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
    /// Records handed to the log and not yet written, failed or discarded.
    pub fn queued(&self) -> u64 {
        self.accepted()
            .saturating_sub(self.written() + self.failed() + self.discarded())
    }
}

/// Handle to the request log; cheap to clone.
#[derive(Clone)]
pub struct RequestLog {
    inner: Arc<writer::WriterHandle>,
    location: LogLocation,
    /// PostgreSQL: the connection every reader of this log shares.
    shared_reads: Option<postgres::PgReads>,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog")
            .field("location", &self.location.to_string())
            .finish()
    }
}

impl RequestLog {
    /// Open (creating and migrating) the store and start the writer thread.
    ///
    /// # Errors
    /// When the folder or database cannot be created, reached or migrated.
    pub fn open(spec: &LogSpec) -> Result<Self, LogError> {
        Self::open_inner(spec, None)
    }

    /// [`RequestLog::open`] for a server replica named `replica`, recorded
    /// in every record (where several replicas share one store).
    ///
    /// # Errors
    /// As [`RequestLog::open`].
    pub fn open_for_replica(spec: &LogSpec, replica: &str) -> Result<Self, LogError> {
        Self::open_inner(spec, Some(replica.into()))
    }

    fn open_inner(spec: &LogSpec, replica: Option<Arc<str>>) -> Result<Self, LogError> {
        let location = LogLocation::of(spec);
        let sink = open_sink(&location, spec.max_size_mb)?;
        let shared_reads = match &location {
            LogLocation::Sqlite(_) => None,
            LogLocation::Postgres(url) => Some(postgres::PgReads::connect(url)?),
        };
        let inner = writer::WriterHandle::start(
            sink,
            writer::WriterSettings {
                interval: Duration::from_millis(spec.flush_interval_ms),
                max_batch: spec.batch_size,
                persist: spec.persist,
                outage_buffer: spec.outage_buffer,
                replica,
            },
            spec.queue_capacity,
        );
        if !spec.persist {
            tracing::warn!(log = %location, "log.persist = false: request records are dropped, not written");
        }
        Ok(Self {
            inner: Arc::new(inner),
            location,
            shared_reads,
        })
    }

    /// Where the log lives.
    pub fn location(&self) -> &LogLocation {
        &self.location
    }

    /// Counters.
    pub fn stats(&self) -> &LogStats {
        self.inner.stats()
    }

    /// Queue a record for writing; never blocks the caller and never drops
    /// the record while the log is open.
    pub fn submit(&self, record: RequestRecord) {
        let _span = tracing::info_span!(
            "log_write",
            request_id = %record.request_id,
            status = %record.status,
            queued = self.inner.stats().queued()
        )
        .entered();
        self.inner.submit(record);
    }

    /// Queue a feedback row; same guarantees as [`RequestLog::submit`].
    pub fn submit_feedback(&self, feedback: FeedbackRecord) {
        self.inner.submit_feedback(feedback);
    }

    /// Write a feedback row and return once it is committed: what a client
    /// is told is stored is stored.
    ///
    /// # Errors
    /// [`LogError::WriteFailed`] when its commit failed (nothing stored);
    /// [`LogError::Closed`] after shutdown.
    pub async fn store_feedback(&self, feedback: FeedbackRecord) -> Result<(), LogError> {
        self.inner.store_feedback(feedback).await
    }

    /// Queue a shadow-run record; same guarantees as [`RequestLog::submit`].
    pub fn submit_shadow(&self, shadow: ShadowRecord) {
        self.inner.submit_shadow(shadow);
    }

    /// Commit everything queued so far, then return.
    ///
    /// # Errors
    /// [`LogError::Closed`] after shutdown.
    pub async fn flush(&self) -> Result<(), LogError> {
        self.inner.flush().await
    }

    /// Commit everything queued and stop the writer. Later submits are
    /// counted as failed.
    pub async fn shutdown(&self) {
        self.inner.shutdown().await;
    }

    /// A reader on the same store (blocking calls: use it off the async
    /// workers, e.g. in `spawn_blocking`).
    ///
    /// # Errors
    /// When the store cannot be opened.
    pub fn reader(&self) -> Result<LogReader, LogError> {
        match (&self.shared_reads, &self.location) {
            (Some(reads), _) => Ok(LogReader {
                reads: Box::new(reads.clone()),
            }),
            (None, location) => LogReader::open(location.clone()),
        }
    }
}

/// Reads records back, from either store.
pub struct LogReader {
    reads: Box<dyn LogReads>,
}

impl LogReader {
    /// Open a log for reading: a SQLite file, or a PostgreSQL database by
    /// URL (also as a path whose text is the URL).
    ///
    /// # Errors
    /// When it cannot be opened or reached.
    pub fn open(location: impl Into<LogLocation>) -> Result<Self, LogError> {
        let reads: Box<dyn LogReads> = match location.into() {
            LogLocation::Sqlite(path) => Box::new(sqlite::SqliteReads::open(&path)?),
            LogLocation::Postgres(url) => Box::new(postgres::PgReads::connect(&url)?),
        };
        Ok(Self { reads })
    }

    /// Rows of `sql`, each mapped by `map`.
    fn rows<T>(
        &self,
        sql: &str,
        params: &[Value<'_>],
        map: impl Fn(&dyn ColumnRead) -> Result<T, LogError>,
    ) -> Result<Vec<T>, LogError> {
        let mut out = Vec::new();
        self.reads.select(sql, params, &mut |row| {
            out.push(map(row)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Records of `sql`'s `WHERE ...` (and order) clause.
    fn records(&self, clause: &str, params: &[Value<'_>]) -> Result<Vec<RequestRecord>, LogError> {
        let sql = format!("SELECT {} FROM requests {clause}", columns::REQUESTS.column_list());
        self.rows(&sql, params, columns::record_from_row)
    }

    /// Feedback rows of `sql`'s `WHERE ...` clause, oldest first.
    fn feedback(&self, clause: &str, params: &[Value<'_>]) -> Result<Vec<FeedbackRecord>, LogError> {
        let sql = format!(
            "SELECT {} FROM feedback {clause} ORDER BY created_at_ms, feedback_id",
            columns::FEEDBACK.column_list()
        );
        self.rows(&sql, params, columns::feedback_from_row)
    }

    /// Up to `limit` feedback rows whose id follows `after`, by id.
    fn feedback_page(&self, after: &str, limit: i64) -> Result<Vec<FeedbackRecord>, LogError> {
        let sql = format!(
            "SELECT {} FROM feedback WHERE feedback_id > $1 ORDER BY feedback_id LIMIT $2",
            columns::FEEDBACK.column_list()
        );
        self.rows(
            &sql,
            &[Value::Text(after), Value::Int(limit)],
            columns::feedback_from_row,
        )
    }

    /// The record of `request_id`, if any.
    ///
    /// # Errors
    /// Store errors.
    pub fn get(&self, request_id: &str) -> Result<Option<RequestRecord>, LogError> {
        Ok(self.records("WHERE request_id = $1", &[Value::Text(request_id)])?.pop())
    }

    /// Number of records.
    ///
    /// # Errors
    /// Store errors.
    pub fn count(&self) -> Result<u64, LogError> {
        let n = self.rows("SELECT COUNT(*) AS n FROM requests", &[], |r| r.required_int("n"))?;
        Ok(n.first().copied().unwrap_or_default().max(0) as u64)
    }

    /// The most recent `limit` records, newest first.
    ///
    /// # Errors
    /// Store errors.
    pub fn recent(&self, limit: usize) -> Result<Vec<RequestRecord>, LogError> {
        self.records(
            "ORDER BY received_at_ms DESC, request_id DESC LIMIT $1",
            &[Value::Int(i64::try_from(limit).unwrap_or(i64::MAX))],
        )
    }

    /// Records received in `[since_ms, until_ms)`, oldest first.
    ///
    /// # Errors
    /// Store errors.
    pub fn records_between(&self, since_ms: i64, until_ms: i64) -> Result<Vec<RequestRecord>, LogError> {
        self.records(
            "WHERE received_at_ms >= $1 AND received_at_ms < $2 ORDER BY received_at_ms, request_id",
            &[Value::Int(since_ms), Value::Int(until_ms)],
        )
    }

    /// Every feedback row of `request_id`, oldest first.
    ///
    /// # Errors
    /// Store errors.
    pub fn feedback_for(&self, request_id: &str) -> Result<Vec<FeedbackRecord>, LogError> {
        self.feedback("WHERE request_id = $1", &[Value::Text(request_id)])
    }

    /// Shadow runs of `slot`, oldest first.
    ///
    /// # Errors
    /// Store errors.
    pub fn shadow_records(&self, slot: &str) -> Result<Vec<ShadowRecord>, LogError> {
        let sql = format!(
            "SELECT {} FROM shadow WHERE slot = $1 ORDER BY created_at_ms, request_id",
            columns::SHADOW.column_list()
        );
        self.rows(&sql, &[Value::Text(slot)], columns::shadow_from_row)
    }

    /// Every feedback row about requests received in `[since_ms, until_ms)`,
    /// oldest first.
    ///
    /// # Errors
    /// Store errors.
    pub fn feedback_between(&self, since_ms: i64, until_ms: i64) -> Result<Vec<FeedbackRecord>, LogError> {
        self.feedback(
            "WHERE request_id IN \
             (SELECT request_id FROM requests WHERE received_at_ms >= $1 AND received_at_ms < $2)",
            &[Value::Int(since_ms), Value::Int(until_ms)],
        )
    }

    /// The store's consistency check; `"ok"` when sound (SQLite's
    /// `integrity_check`; for PostgreSQL, which checks its own pages, that
    /// the server answers with the schema in place).
    ///
    /// # Errors
    /// Store errors.
    pub fn integrity_check(&self) -> Result<String, LogError> {
        self.reads.integrity_check()
    }

    /// Schema version of the store.
    ///
    /// # Errors
    /// Store errors.
    pub fn schema_version(&self) -> Result<i64, LogError> {
        self.reads.schema_version()
    }
}

/// The writing side of the store at `location` (created and migrated when
/// new; a SQLite file capped at `max_size_mb` MiB when not 0).
fn open_sink(location: &LogLocation, max_size_mb: u64) -> Result<Box<dyn writer::Sink>, LogError> {
    Ok(match location {
        LogLocation::Sqlite(path) => Box::new(sqlite::SqliteSink::open(path, max_size_mb)?),
        LogLocation::Postgres(url) => Box::new(postgres::PgSink::connect(url)?),
    })
}

/// Append feedback rows to a log in one transaction (for jobs outside the
/// server, such as review imports). Safe while servers write: SQLite's WAL
/// serializes the writers, PostgreSQL its transactions.
///
/// # Errors
/// When the store cannot be opened, migrated or written.
pub fn append_feedback(location: impl Into<LogLocation>, rows: &[FeedbackRecord]) -> Result<(), LogError> {
    let mut sink = open_sink(&location.into(), 0)?;
    sink.write(&writer::Batch {
        records: &[],
        feedback: rows,
        shadows: &[],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::RouteDecision;

    fn spec(dir: &Path) -> LogSpec {
        LogSpec {
            path: dir.join("sub/requests.db"),
            ..LogSpec::default()
        }
    }

    /// The same log in each store: the SQLite file, and a fresh PostgreSQL
    /// database when the tests have a server.
    fn stores(dir: &Path) -> Vec<LogSpec> {
        let mut specs = vec![spec(dir)];
        if let Some(url) = crate::testing::postgres_database() {
            specs.push(LogSpec {
                store_url: Some(url),
                ..spec(dir)
            });
        }
        specs
    }

    fn record(id: &str) -> RequestRecord {
        RequestRecord {
            request_id: id.into(),
            kind: "complete".into(),
            query: "q".into(),
            status: "ok".into(),
            route: Some(RouteDecision::forced("hr")),
            answer: Some("a".into()),
            retrieved: vec![RetrievedRef {
                doc_id: "d".into(),
                chunk_id: "d#1".into(),
                score: 0.5,
            }],
            ..RequestRecord::default()
        }
    }

    #[tokio::test]
    async fn records_round_trip_by_request_id() {
        let dir = tempfile::tempdir().unwrap();
        for spec in stores(dir.path()) {
            let log = RequestLog::open(&spec).unwrap();
            let mut full = record("b");
            full.session_id = Some("s".into());
            full.prompt_tokens = Some(12);
            full.ttft_ms = Some(3.5);
            full.route = Some(RouteDecision {
                confidence: 0.75,
                latency_ms: 1.25,
                router_kind: Some(crate::engine::ModelKind::EncoderClassifier),
                ..RouteDecision::forced("it")
            });
            log.submit(record("a"));
            log.submit(full.clone());
            log.flush().await.unwrap();
            let reader = log.reader().unwrap();
            assert_eq!(reader.count().unwrap(), 2, "{}", log.location());
            assert_eq!(reader.get("a").unwrap().unwrap(), record("a"));
            assert_eq!(reader.get("b").unwrap().unwrap(), full);
            assert!(reader.get("zzz").unwrap().is_none());
            assert_eq!(reader.schema_version().unwrap(), SCHEMA_VERSION);
            assert_eq!(reader.integrity_check().unwrap(), "ok");
            assert_eq!(log.stats().written(), 2);
            // A record written again replaces the first version, also
            // when both are in one batch.
            let mut again = record("a");
            again.status = "cancelled".into();
            log.submit(again.clone());
            log.flush().await.unwrap();
            assert_eq!(reader.get("a").unwrap().unwrap(), again);
            let mut last = record("a");
            last.status = "internal".into();
            log.submit(again.clone());
            log.submit(last.clone());
            log.flush().await.unwrap();
            assert_eq!(reader.get("a").unwrap().unwrap(), last);
            assert_eq!(reader.count().unwrap(), 2);
            assert_eq!(reader.recent(1).unwrap().len(), 1);
            log.shutdown().await;
        }
    }

    #[tokio::test]
    async fn without_persistence_records_are_counted_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = RequestLog::open(&LogSpec {
            persist: false,
            ..spec(dir.path())
        })
        .unwrap();
        for i in 0..100 {
            log.submit(record(&format!("r{i}")));
        }
        log.flush().await.unwrap();
        assert_eq!(log.reader().unwrap().count().unwrap(), 0);
        let stats = log.stats();
        assert_eq!((stats.accepted(), stats.discarded(), stats.written()), (100, 100, 0));
        assert_eq!(stats.queued(), 0);
    }

    #[tokio::test]
    async fn shutdown_commits_everything_queued() {
        let dir = tempfile::tempdir().unwrap();
        for spec in stores(dir.path()) {
            let log = RequestLog::open(&spec).unwrap();
            for i in 0..1000 {
                log.submit(record(&format!("r{i}")));
            }
            log.shutdown().await;
            let reader = LogReader::open(LogLocation::of(&spec)).unwrap();
            assert_eq!(reader.count().unwrap(), 1000, "{}", LogLocation::of(&spec));
        }
    }

    #[tokio::test]
    async fn records_reach_disk_within_the_flush_interval_without_flush() {
        let dir = tempfile::tempdir().unwrap();
        for spec in stores(dir.path()) {
            let log = RequestLog::open(&spec).unwrap();
            log.submit(record("x"));
            let reader = log.reader().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_millis(2_000);
            while reader.get("x").unwrap().is_none() {
                assert!(std::time::Instant::now() < deadline, "record not committed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    #[tokio::test]
    async fn feedback_joins_its_request_and_keeps_history() {
        let dir = tempfile::tempdir().unwrap();
        for spec in stores(dir.path()) {
            feedback_round_trip(&spec).await;
        }
    }

    async fn feedback_round_trip(spec: &LogSpec) {
        use crate::data::feedback::{FeedbackKind, Rating, latest_explicit};
        let log = RequestLog::open(spec).unwrap();
        log.submit(record("a"));
        let mut down = FeedbackRecord::new("a", FeedbackKind::Explicit);
        down.rating = Some(Rating::Thumb(false));
        down.created_at_ms = 1;
        let mut fix = FeedbackRecord::new("a", FeedbackKind::Explicit);
        fix.rating = Some(Rating::Stars(2));
        fix.corrected_expert = Some("it".into());
        fix.created_at_ms = 2;
        log.submit_feedback(down.clone());
        log.submit_feedback(fix.clone());
        log.flush().await.unwrap();
        let reader = log.reader().unwrap();
        let rows = reader.feedback_for("a").unwrap();
        assert_eq!(rows, vec![down, fix.clone()]);
        assert_eq!(latest_explicit(&rows), Some(&fix));
        let latest = reader
            .rows(
                "SELECT corrected_expert, score FROM latest_explicit_feedback WHERE request_id = 'a'",
                &[],
                |r| Ok((r.required_text("corrected_expert")?, r.real("score")?)),
            )
            .unwrap();
        assert_eq!(latest, vec![("it".to_string(), Some(-0.5))]);
        let joined = reader
            .rows(
                "SELECT COUNT(*) AS n FROM request_feedback WHERE query = 'q'",
                &[],
                |r| r.required_int("n"),
            )
            .unwrap();
        assert_eq!(joined, vec![2]);
        // Another process appends reviews while the writer is open.
        let review = FeedbackRecord::new("a", FeedbackKind::Review);
        append_feedback(log.location().clone(), std::slice::from_ref(&review)).unwrap();
        assert_eq!(reader.feedback_for("a").unwrap().len(), 3);
        assert_eq!(reader.feedback_between(0, i64::MAX).unwrap().len(), 3);
        // Shadow runs come back per slot, oldest first.
        let shadow = |id: &str, at: i64| ShadowRecord::fixture(id, "router", at);
        log.submit_shadow(shadow("s2", 20));
        log.submit_shadow(shadow("s1", 10));
        log.flush().await.unwrap();
        assert_eq!(
            reader.shadow_records("router").unwrap(),
            vec![shadow("s1", 10), shadow("s2", 20)]
        );
        assert!(reader.shadow_records("expert:hr").unwrap().is_empty());
        log.shutdown().await;
    }

    #[tokio::test]
    async fn reopening_keeps_records_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        for spec in stores(dir.path()) {
            {
                let log = RequestLog::open(&spec).unwrap();
                log.submit(record("keep"));
                log.shutdown().await;
            }
            // A named replica records itself in what it serves.
            let log = RequestLog::open_for_replica(&spec, "eu-1").unwrap();
            log.submit(record("new"));
            log.flush().await.unwrap();
            let reader = log.reader().unwrap();
            assert_eq!(reader.get("keep").unwrap().unwrap().replica, None);
            assert_eq!(reader.get("new").unwrap().unwrap().replica.as_deref(), Some("eu-1"));
            assert_eq!(reader.schema_version().unwrap(), SCHEMA_VERSION);
        }
    }

    #[tokio::test]
    async fn while_postgres_is_unreachable_rows_wait_in_memory_up_to_the_buffer_then_land() {
        let Some(url) = crate::testing::postgres_database() else {
            return;
        };
        let db = url.rsplit('/').next().unwrap().to_string();
        let log = RequestLog::open(&LogSpec {
            store_url: Some(url),
            outage_buffer: 50,
            ..LogSpec::default()
        })
        .unwrap();
        log.submit(record("before"));
        log.flush().await.unwrap();
        assert_eq!(log.stats().written(), 1);

        // The database goes away: connections cut, new ones refused.
        crate::testing::postgres_admin(&format!(
            "ALTER DATABASE {db} ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
        ));
        for i in 0..10 {
            log.submit(record(&format!("early{i}")));
        }
        log.flush().await.unwrap();
        let stats = log.stats();
        let failure = stats.write_failure().expect("the commit failed");
        assert_eq!(failure.losing_since, None, "kept, not lost: {failure:?}");
        assert_eq!((stats.written(), stats.failed(), stats.queued()), (1, 0, 10));
        // Feedback a client waits for is refused, never kept.
        let feedback = FeedbackRecord::new("before", crate::data::feedback::FeedbackKind::Explicit);
        assert!(matches!(
            log.store_feedback(feedback).await,
            Err(LogError::WriteFailed { .. })
        ));
        // Past the buffer, the oldest rows go (and that is losing rows).
        for i in 0..60 {
            log.submit(record(&format!("late{i}")));
        }
        log.flush().await.unwrap();
        assert_eq!(stats.failed(), 20);
        assert!(stats.write_failure().unwrap().losing_since.is_some());

        // Back: the kept rows land without anything being submitted.
        crate::testing::postgres_admin(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while stats.written() < 51 {
            assert!(
                std::time::Instant::now() < deadline,
                "kept rows never written: {}",
                stats.written()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(stats.write_failure(), None);
        let reader = log.reader().unwrap();
        assert_eq!(reader.count().unwrap(), 51);
        // 70 kept, 50 fit: the 10 early and the first 10 late ones went.
        assert!(
            reader.get("early9").unwrap().is_none(),
            "the oldest kept rows were dropped"
        );
        assert!(reader.get("late9").unwrap().is_none());
        assert!(reader.get("late10").unwrap().is_some());
        assert!(reader.get("late59").unwrap().is_some());
        log.shutdown().await;
    }

    #[test]
    fn a_path_that_is_a_postgres_url_names_that_database() {
        let url = "postgres://f:secret@db:5432/log";
        assert_eq!(
            LogLocation::from(Path::new(url)),
            LogLocation::Postgres(url.to_string())
        );
        assert_eq!(
            LogLocation::from(Path::new(url)).to_string(),
            "postgres://f:***@db:5432/log"
        );
        assert_eq!(
            LogLocation::from(Path::new("var/requests.db")),
            LogLocation::Sqlite("var/requests.db".into())
        );
    }

    #[test]
    fn an_unreachable_store_fails_at_open_and_names_it_without_the_password() {
        // A port nothing listens on (the discard port, closed on loopback).
        let spec = LogSpec {
            store_url: Some("postgres://f:secret@127.0.0.1:9/log?connect_timeout=2".into()),
            ..LogSpec::default()
        };
        let err = RequestLog::open(&spec).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, LogError::Connect { .. }), "{err:?}");
        assert!(message.contains("postgres://f:***@127.0.0.1:9/log"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }
}
