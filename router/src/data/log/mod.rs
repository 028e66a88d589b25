//! The request log: one record per request, the flywheel's raw material.
//!
//! [`RequestLog::submit`] hands a [`RequestRecord`] to a writer thread and
//! returns at once; the writer commits batches to SQLite (WAL) at least every
//! `flush_interval_ms`. Durability rule: a record is on disk at most one flush
//! interval (default 50 ms) after its request finished; `kill -9` can lose
//! only the records of that last interval and never corrupts the file;
//! [`RequestLog::shutdown`] commits everything queued. [`LogReader`] reads
//! records back by request id (feedback and curation build on it).
//!
//! Feedback rows ([`FeedbackRecord`]) travel through the same writer, so a
//! request's record is always committed before feedback the pipeline
//! attaches to it (e.g. an abandoned stream). [`append_feedback`] writes
//! rows synchronously from another process (review imports).

mod record;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::OptionalExtension;

pub use schema::SCHEMA_VERSION;

use crate::config::LogSpec;
use crate::data::feedback::FeedbackRecord;

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
    /// A query failed.
    #[error("request log query failed")]
    Query(#[from] rusqlite::Error),
    /// The writer has stopped.
    #[error("the request log writer has stopped")]
    Closed,
    /// The writer could not commit the batch holding the row (disk or
    /// `log.max_size_mb` full, I/O error); the row is not stored.
    #[error("the request log could not write: {reason}")]
    WriteFailed {
        /// SQLite's message for the failed commit.
        reason: String,
    },
}

pub use crate::clock::unix_ms;
pub use record::{RequestRecord, RetrievedRef, ShadowRecord};

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

/// The log's writes are failing: since when, and SQLite's latest message.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteFailure {
    /// The latest failed commit's error.
    pub reason: String,
    /// When the first failed commit of this run of failures happened.
    pub since: std::time::Instant,
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
    fn commit_failed(&self, reason: String) {
        let mut failing = self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let since = failing.as_ref().map_or_else(std::time::Instant::now, |f| f.since);
        *failing = Some(WriteFailure { reason, since });
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
    path: PathBuf,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog").field("path", &self.path).finish()
    }
}

impl RequestLog {
    /// Open (creating and migrating) the database and start the writer thread.
    ///
    /// # Errors
    /// When the folder or database cannot be created or migrated.
    pub fn open(spec: &LogSpec) -> Result<Self, LogError> {
        let path = spec.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LogError::Folder {
                path: path.clone(),
                source,
            })?;
        }
        let mut conn = schema::open(&path).map_err(|source| LogError::Open {
            path: path.clone(),
            source,
        })?;
        schema::migrate(&mut conn).map_err(|source| LogError::Open {
            path: path.clone(),
            source,
        })?;
        if spec.max_size_mb > 0 {
            schema::limit_size(&conn, spec.max_size_mb).map_err(|source| LogError::Open {
                path: path.clone(),
                source,
            })?;
        }
        let inner = writer::WriterHandle::start(
            conn,
            Duration::from_millis(spec.flush_interval_ms),
            spec.batch_size,
            spec.queue_capacity,
            spec.persist,
        );
        if !spec.persist {
            tracing::warn!(path = %path.display(), "log.persist = false: request records are dropped, not written");
        }
        Ok(Self {
            inner: Arc::new(inner),
            path,
        })
    }

    /// Database file.
    pub fn path(&self) -> &Path {
        &self.path
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
    /// is told is stored is on disk.
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

    /// A reader on the same database.
    ///
    /// # Errors
    /// When the database cannot be opened.
    pub fn reader(&self) -> Result<LogReader, LogError> {
        LogReader::open(&self.path)
    }
}

/// Reads records back.
pub struct LogReader {
    conn: rusqlite::Connection,
}

impl LogReader {
    /// Open a database for reading.
    ///
    /// # Errors
    /// When it cannot be opened.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let conn = schema::open(path).map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self { conn })
    }

    /// The record of `request_id`, if any.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn get(&self, request_id: &str) -> Result<Option<RequestRecord>, LogError> {
        let sql = format!(
            "SELECT {} FROM requests WHERE request_id = ?1",
            writer::COLUMNS.join(", ")
        );
        Ok(self
            .conn
            .query_row(&sql, [request_id], writer::record_from_row)
            .optional()?)
    }

    /// Number of records.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn count(&self) -> Result<u64, LogError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM requests", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// The most recent `limit` records, newest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn recent(&self, limit: usize) -> Result<Vec<RequestRecord>, LogError> {
        let sql = format!(
            "SELECT {} FROM requests ORDER BY received_at_ms DESC, request_id DESC LIMIT ?1",
            writer::COLUMNS.join(", ")
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([limit as i64], writer::record_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records received in `[since_ms, until_ms)`, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn records_between(&self, since_ms: i64, until_ms: i64) -> Result<Vec<RequestRecord>, LogError> {
        let sql = format!(
            "SELECT {} FROM requests WHERE received_at_ms >= ?1 AND received_at_ms < ?2 \
             ORDER BY received_at_ms, request_id",
            writer::COLUMNS.join(", ")
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([since_ms, until_ms], writer::record_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every feedback row of `request_id`, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn feedback_for(&self, request_id: &str) -> Result<Vec<FeedbackRecord>, LogError> {
        let sql = format!(
            "SELECT {} FROM feedback WHERE request_id = ?1 ORDER BY created_at_ms, feedback_id",
            writer::FEEDBACK_COLUMNS
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([request_id], writer::feedback_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Shadow runs of `slot`, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn shadow_records(&self, slot: &str) -> Result<Vec<ShadowRecord>, LogError> {
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM shadow WHERE slot = ?1 ORDER BY created_at_ms, rowid")?;
        let rows = stmt.query_map([slot], writer::shadow_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every feedback row about requests received in `[since_ms, until_ms)`,
    /// oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn feedback_between(&self, since_ms: i64, until_ms: i64) -> Result<Vec<FeedbackRecord>, LogError> {
        let sql = format!(
            "SELECT {} FROM feedback WHERE request_id IN \
             (SELECT request_id FROM requests WHERE received_at_ms >= ?1 AND received_at_ms < ?2) \
             ORDER BY created_at_ms, feedback_id",
            writer::FEEDBACK_COLUMNS
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([since_ms, until_ms], writer::feedback_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// SQLite's integrity check; `"ok"` for a sound file.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn integrity_check(&self) -> Result<String, LogError> {
        Ok(self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }

    /// Schema version of the file.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn schema_version(&self) -> Result<i64, LogError> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }
}

/// Append feedback rows to the log at `path` in one transaction (for jobs
/// outside the server, such as review imports). Safe while the server runs:
/// SQLite's WAL serializes the writers.
///
/// # Errors
/// When the database cannot be opened, migrated or written.
pub fn append_feedback(path: &Path, rows: &[FeedbackRecord]) -> Result<(), LogError> {
    let open_error = |source| LogError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = schema::open(path).map_err(open_error)?;
    schema::migrate(&mut conn).map_err(open_error)?;
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(writer::INSERT_FEEDBACK)?;
        for row in rows {
            writer::insert_feedback(&mut stmt, row)?;
        }
    }
    tx.commit()?;
    Ok(())
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
        let log = RequestLog::open(&spec(dir.path())).unwrap();
        log.submit(record("a"));
        log.submit(record("b"));
        log.flush().await.unwrap();
        let reader = log.reader().unwrap();
        assert_eq!(reader.count().unwrap(), 2);
        assert_eq!(reader.get("a").unwrap().unwrap(), record("a"));
        // The second record of a batch reuses the writer's JSON buffers.
        assert_eq!(reader.get("b").unwrap().unwrap(), record("b"));
        assert!(reader.get("zzz").unwrap().is_none());
        assert_eq!(reader.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(log.stats().written(), 2);
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
        let log = RequestLog::open(&spec(dir.path())).unwrap();
        for i in 0..1000 {
            log.submit(record(&format!("r{i}")));
        }
        log.shutdown().await;
        assert_eq!(
            LogReader::open(&dir.path().join("sub/requests.db"))
                .unwrap()
                .count()
                .unwrap(),
            1000
        );
    }

    #[tokio::test]
    async fn records_reach_disk_within_the_flush_interval_without_flush() {
        let dir = tempfile::tempdir().unwrap();
        let log = RequestLog::open(&spec(dir.path())).unwrap();
        log.submit(record("x"));
        let reader = log.reader().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_millis(2_000);
        while reader.get("x").unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "record not committed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn feedback_joins_its_request_and_keeps_history() {
        use crate::data::feedback::{FeedbackKind, Rating, latest_explicit};
        let dir = tempfile::tempdir().unwrap();
        let log = RequestLog::open(&spec(dir.path())).unwrap();
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
        let (corrected, score): (String, f64) = reader
            .conn
            .query_row(
                "SELECT corrected_expert, score FROM latest_explicit_feedback WHERE request_id = 'a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((corrected.as_str(), score), ("it", -0.5));
        let joined: i64 = reader
            .conn
            .query_row("SELECT COUNT(*) FROM request_feedback WHERE query = 'q'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(joined, 2);
        // Another process appends reviews while the writer is open.
        let review = FeedbackRecord::new("a", FeedbackKind::Review);
        append_feedback(log.path(), std::slice::from_ref(&review)).unwrap();
        assert_eq!(reader.feedback_for("a").unwrap().len(), 3);
    }

    #[tokio::test]
    async fn reopening_keeps_records_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RequestLog::open(&spec(dir.path())).unwrap();
            log.submit(record("keep"));
            log.shutdown().await;
        }
        let log = RequestLog::open(&spec(dir.path())).unwrap();
        assert!(log.reader().unwrap().get("keep").unwrap().is_some());
    }
}
