//! The request log in a SQLite file (the default store): its schema, its
//! migrations, the writer's batch commit and the reader's queries.
//!
//! The schema version is SQLite's `PRAGMA user_version`; [`migrate`] applies
//! every migration above it in one transaction, so a database is always at a
//! known version. Append migrations, never edit a released one.
//!
//! Version 1, table `requests` (one row per request, rejected ones included):
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `request_id` | TEXT PK | UUIDv7, also returned to the client |
//! | `kind` | TEXT | `route`, `complete` or `stream` |
//! | `session_id`, `user_id` | TEXT NULL | caller-supplied ids |
//! | `received_at_ms` | INTEGER | Unix time the request arrived (ms) |
//! | `finished_at_ms` | INTEGER | Unix time its record was closed (ms) |
//! | `query` | TEXT | the query as routed (after input rails) |
//! | `status` | TEXT | `ok`, `invalid_argument`, `not_found`, `resource_exhausted`, `permission_denied`, `cancelled`, `internal` |
//! | `error` | TEXT NULL | error message for non-ok requests |
//! | `guardrails` | TEXT | JSON array of rail verdicts |
//! | `route_expert`, `route_top_expert` | TEXT NULL | chosen and top-scored expert |
//! | `route_confidence` | REAL NULL | top probability |
//! | `route_scores` | TEXT NULL | JSON array `{expert, probability, logprob}` |
//! | `route_forced`, `route_fallback` | INTEGER NULL | 0/1 |
//! | `router_model_version` | TEXT NULL | model that decided |
//! | `router_kind` | TEXT NULL | how it decides: `label-scoring` or `encoder-classifier` |
//! | `route_latency_ms` | REAL NULL | decision time |
//! | `expert`, `expert_model_version` | TEXT NULL | who answered, on which model |
//! | `retrieved` | TEXT | JSON array of passages `{doc_id, chunk_id, score}` |
//! | `answer` | TEXT NULL | the answer as sent (partial when cancelled) |
//! | `prompt_tokens`, `completion_tokens` | INTEGER NULL | expert token counts |
//! | `ttft_ms`, `total_ms` | REAL NULL | time to first token, whole request |
//! | `finish_reason` | TEXT NULL | `stop`, `length`, ... |
//!
//! Version 2, table `feedback` (any number of rows per request: history is
//! kept, readers take the latest of a kind):
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `feedback_id` | TEXT PK | UUIDv7 |
//! | `request_id` | TEXT | the request it is about (joins `requests`) |
//! | `created_at_ms` | INTEGER | Unix time it was recorded (ms) |
//! | `kind` | TEXT | `explicit`, `review`, `rephrase` (implicit), `abandoned` (implicit) |
//! | `rating_scale`, `rating` | TEXT, INTEGER NULL | `thumb` (1 / -1) or `stars` (1-5) |
//! | `score` | REAL NULL | the rating on one scale, -1 to 1 |
//! | `corrected_expert` | TEXT NULL | the expert that should have answered |
//! | `comment`, `reviewer_id` | TEXT NULL | free text, who gave it |
//! | `detail` | TEXT NULL | evidence of an implicit signal (JSON) |
//!
//! Views: `request_feedback` (every feedback row joined with its request)
//! and `latest_explicit_feedback` (the newest explicit row per request).
//!
//! Table `shadow` (v3): one row per shadow run of a candidate model, under
//! the live request's id: `slot`, `version` and `live_version`, `output`
//! (the shadow's expert or answer; NULL when it failed) and `live_output`,
//! `agree` (1/0), `latency_ms` and `live_latency_ms`, `error`, `created_at_ms`.
//!
//! Version 4 adds `requests.api_key_id` (TEXT NULL): the id of the client API
//! key the request came with, from the server's key list; never the key.
//! Version 5 adds `requests.router_kind`; version 6 `requests.replica` (TEXT
//! NULL): the `replica_id` of the server that served the request.

use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, ValueRef};

use super::columns::{self, ColumnRead, Value};
use super::writer::{Batch, Sink};
use super::{LogError, LogReads};

/// Current schema version.
pub const SCHEMA_VERSION: i64 = 6;

const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE requests (
        request_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        session_id TEXT,
        user_id TEXT,
        received_at_ms INTEGER NOT NULL,
        finished_at_ms INTEGER NOT NULL,
        query TEXT NOT NULL,
        status TEXT NOT NULL,
        error TEXT,
        guardrails TEXT NOT NULL DEFAULT '[]',
        route_expert TEXT,
        route_top_expert TEXT,
        route_confidence REAL,
        route_scores TEXT,
        route_forced INTEGER,
        route_fallback INTEGER,
        router_model_version TEXT,
        route_latency_ms REAL,
        expert TEXT,
        expert_model_version TEXT,
        retrieved TEXT NOT NULL DEFAULT '[]',
        answer TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        ttft_ms REAL,
        total_ms REAL,
        finish_reason TEXT
    );
    CREATE INDEX requests_received_at ON requests(received_at_ms);
    CREATE INDEX requests_session ON requests(session_id, received_at_ms);",
    // v2
    "CREATE TABLE feedback (
        feedback_id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        rating_scale TEXT,
        rating INTEGER,
        score REAL,
        corrected_expert TEXT,
        comment TEXT,
        reviewer_id TEXT,
        detail TEXT
    );
    CREATE INDEX feedback_request ON feedback(request_id, created_at_ms);
    CREATE INDEX feedback_created ON feedback(created_at_ms);
    CREATE VIEW request_feedback AS
        SELECT r.request_id, r.kind AS request_kind, r.received_at_ms, r.session_id, r.user_id, r.query,
               r.status, r.route_expert, r.router_model_version, r.expert, r.expert_model_version,
               f.feedback_id, f.created_at_ms AS feedback_at_ms, f.kind AS feedback_kind, f.rating_scale,
               f.rating, f.score, f.corrected_expert, f.comment, f.reviewer_id, f.detail
        FROM requests r JOIN feedback f ON f.request_id = r.request_id;
    CREATE VIEW latest_explicit_feedback AS
        SELECT f.* FROM feedback f
        WHERE f.kind = 'explicit' AND NOT EXISTS (
            SELECT 1 FROM feedback g
            WHERE g.request_id = f.request_id AND g.kind = 'explicit'
              AND (g.created_at_ms > f.created_at_ms
                   OR (g.created_at_ms = f.created_at_ms AND g.feedback_id > f.feedback_id)));",
    // v3: shadow runs of candidate models, under the live request's id
    "CREATE TABLE shadow (
        request_id TEXT NOT NULL,
        slot TEXT NOT NULL,
        version TEXT NOT NULL,
        live_version TEXT NOT NULL,
        live_output TEXT NOT NULL,
        output TEXT,
        agree INTEGER,
        latency_ms REAL,
        live_latency_ms REAL,
        error TEXT,
        created_at_ms INTEGER NOT NULL
    );
    CREATE INDEX shadow_slot ON shadow(slot, created_at_ms);
    CREATE INDEX shadow_request ON shadow(request_id);",
    // v4: which client API key a request came with (its id, never the key)
    "ALTER TABLE requests ADD COLUMN api_key_id TEXT;",
    // v5: the kind of router model that decided
    "ALTER TABLE requests ADD COLUMN router_kind TEXT;",
    // v6: the replica that served the request (several share a store)
    "ALTER TABLE requests ADD COLUMN replica TEXT;",
];

/// The schema of version 1 (for tests of logs written by old servers).
#[cfg(test)]
pub(super) fn first_schema() -> &'static str {
    MIGRATIONS[0]
}

/// Bring `conn` to [`SCHEMA_VERSION`].
///
/// # Errors
/// SQLite errors, or a database newer than this binary.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "request log schema version {current} is newer than this binary's {SCHEMA_VERSION}"
        )));
    }
    let tx = conn.transaction()?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    tx.commit()
}

/// Page size of a new log database, in bytes.
pub const PAGE_SIZE: i64 = 16_384;

/// WAL size that triggers a checkpoint, in bytes.
const CHECKPOINT_BYTES: i64 = 4 << 20;

/// Open a connection in WAL mode with the settings the log relies on.
///
/// `synchronous = NORMAL` in WAL mode: a committed transaction survives a
/// process crash (`kill -9`); only an OS crash or power loss can drop the
/// last commits, and the file is never corrupt either way.
///
/// # Errors
/// SQLite errors.
pub fn open(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // Takes effect only when the file is new (SQLite keeps an existing
    // database's page size): 16 KiB pages hold ~20 request rows, so a batch
    // commit and a checkpoint move fewer pages than with the default 4 KiB.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Checkpoint every ~4 MiB of WAL whatever the page size (SQLite's default
    // is 1,000 pages: 16 MiB with 16 KiB pages, whose longer checkpoints showed
    // as latency spikes in open-loop runs).
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_BYTES / page_size.max(512))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Cap the database at `max_mb` MiB (on this connection, the writer's):
/// a commit that would grow it further fails with SQLite's "database or
/// disk is full", as on a full disk.
pub(super) fn limit_size(conn: &Connection, max_mb: u64) -> rusqlite::Result<()> {
    let page_size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let pages = (max_mb.saturating_mul(1 << 20) / page_size.max(512)).max(1);
    conn.pragma_update(None, "max_page_count", pages)
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Real(v) => ToSqlOutput::Borrowed(ValueRef::Real(*v)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Bool(b) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*b))),
        })
    }
}

impl ColumnRead for rusqlite::Row<'_> {
    fn text(&self, name: &str) -> Result<Option<String>, LogError> {
        Ok(self.get(name)?)
    }
    fn int(&self, name: &str) -> Result<Option<i64>, LogError> {
        Ok(self.get(name)?)
    }
    fn real(&self, name: &str) -> Result<Option<f64>, LogError> {
        Ok(self.get(name)?)
    }
    fn flag(&self, name: &str) -> Result<Option<bool>, LogError> {
        Ok(self.get(name)?)
    }
}

/// The statements a batch commit runs, built once.
struct Statements {
    record: String,
    feedback: String,
    shadow: String,
}

impl Statements {
    fn new() -> Self {
        Self {
            record: columns::REQUESTS.upsert(),
            feedback: columns::FEEDBACK.upsert(),
            shadow: columns::SHADOW.upsert(),
        }
    }
}

/// The writer's side of a SQLite log: one connection, one transaction per
/// batch.
pub(super) struct SqliteSink {
    conn: Connection,
    sql: Statements,
    json: columns::JsonColumns,
}

impl SqliteSink {
    /// Open (creating and migrating) the file at `path`, capped at
    /// `max_size_mb` MiB when not 0.
    pub(super) fn open(path: &std::path::Path, max_size_mb: u64) -> Result<Self, LogError> {
        let open_error = |source| LogError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LogError::Folder {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let mut conn = open(path).map_err(open_error)?;
        migrate(&mut conn).map_err(open_error)?;
        if max_size_mb > 0 {
            limit_size(&conn, max_size_mb).map_err(open_error)?;
        }
        Ok(Self {
            conn,
            sql: Statements::new(),
            json: columns::JsonColumns::default(),
        })
    }
}

impl Sink for SqliteSink {
    fn write(&mut self, batch: &Batch<'_>) -> Result<(), LogError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(&self.sql.record)?;
            for r in batch.records {
                self.json.fill(r);
                stmt.execute(rusqlite::params_from_iter(columns::record_values(r, &self.json)))?;
            }
            let mut stmt = tx.prepare_cached(&self.sql.feedback)?;
            for f in batch.feedback {
                stmt.execute(rusqlite::params_from_iter(columns::feedback_values(f)))?;
            }
            let mut stmt = tx.prepare_cached(&self.sql.shadow)?;
            for r in batch.shadows {
                stmt.execute(rusqlite::params_from_iter(columns::shadow_values(r)))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn close(&mut self) {
        // Fold the WAL into the file so a stopped server leaves one file.
        let _ = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
    }
}

/// The reader's side of a SQLite log: a connection of its own (WAL lets it
/// read while the writer commits).
pub(super) struct SqliteReads {
    conn: Connection,
}

impl SqliteReads {
    /// Open the file at `path` for reading.
    pub(super) fn open(path: &std::path::Path) -> Result<Self, LogError> {
        let conn = open(path).map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self { conn })
    }
}

impl LogReads for SqliteReads {
    fn select(
        &self,
        sql: &str,
        params: &[Value<'_>],
        each: &mut dyn FnMut(&dyn ColumnRead) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        while let Some(row) = rows.next()? {
            each(row)?;
        }
        Ok(())
    }

    fn schema_version(&self) -> Result<i64, LogError> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    fn integrity_check(&self) -> Result<String, LogError> {
        Ok(self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_log_upgrades_in_place_and_keeps_its_records() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO requests (request_id, kind, received_at_ms, finished_at_ms, query, status) \
             VALUES ('old', 'route', 1, 2, 'q', 'ok')",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        conn.execute(
            "INSERT INTO feedback (feedback_id, request_id, created_at_ms, kind) VALUES ('f', 'old', 3, 'explicit')",
            [],
        )
        .unwrap();
        let joined: String = conn
            .query_row("SELECT query FROM request_feedback WHERE feedback_id = 'f'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(joined, "q");
        // Records from before v4 came with no client key.
        let key: Option<String> = conn
            .query_row("SELECT api_key_id FROM requests WHERE request_id = 'old'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(key, None);
        // Migrating again is a no-op.
        migrate(&mut conn).unwrap();
    }

    #[test]
    fn new_logs_get_large_pages_and_existing_ones_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let page_size = |c: &Connection| -> i64 { c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap() };
        let fresh = dir.path().join("fresh.db");
        let mut conn = open(&fresh).unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(page_size(&conn), PAGE_SIZE);
        let pages: i64 = conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0)).unwrap();
        assert_eq!(pages * PAGE_SIZE, CHECKPOINT_BYTES);
        // A log created with SQLite's default 4 KiB pages opens, migrates and
        // takes rows as before; its pages are not rewritten.
        let old = dir.path().join("old.db");
        {
            let c = Connection::open(&old).unwrap();
            c.pragma_update(None, "journal_mode", "WAL").unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
        }
        let mut conn = open(&old).unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(page_size(&conn), 4096);
        let pages: i64 = conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0)).unwrap();
        assert_eq!(pages * 4096, CHECKPOINT_BYTES);
        conn.execute(
            "INSERT INTO requests (request_id, kind, received_at_ms, finished_at_ms, query, status) \
             VALUES ('r', 'route', 1, 2, 'q', 'ok')",
            [],
        )
        .unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }
}
