//! The request log in PostgreSQL: one log shared by every server replica
//! (feedback on any replica for a request any other served; curation over
//! all of their traffic).
//!
//! Client: `tokio-postgres`, the asynchronous client the blocking `postgres`
//! crate wraps: plain SQL with prepared statements and pipelining, no ORM,
//! nothing but tokio underneath (already the server's runtime). TLS is not
//! built in: connect over a private network or a local socket
//! (`sslmode=require` is refused at connection time).
//!
//! The writer thread owns a current-thread runtime and one connection; a
//! batch is one transaction with one `INSERT ... SELECT FROM UNNEST(...)`
//! per table, each column's values bound as one array (one statement to
//! parse and plan per batch instead of one per row). A lost
//! connection fails its batch (counted and reported as a failed commit, as
//! a full disk is for SQLite) and is opened again for the next one. Readers
//! share one more connection, driven by a runtime thread of their own, so
//! their blocking calls work from any thread, async or not.
//!
//! The schema is SQLite's (see `sqlite.rs`) with PostgreSQL's types
//! (`BIGINT`, `DOUBLE PRECISION`, `BOOLEAN`); its version lives in the
//! table `flywheel_schema`, and replicas starting together migrate one at a
//! time under an advisory lock.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::runtime::Runtime;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Config, NoTls, Statement};

use super::columns::{self, ColumnRead, JsonColumns, Kind, Table, Value};
use super::writer::{Batch, Sink};
use super::{LogError, LogReads, SCHEMA_VERSION};

/// Key of the advisory lock that serializes migrations ("flywheel" in ASCII).
const MIGRATION_LOCK: i64 = 0x666c_7977_6865_656c;

/// How long a connection attempt waits when the URL does not say
/// (`connect_timeout`): long enough for a database across a network, short
/// enough that a server pointed at a wrong host says so at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Migrations as `(version reached, SQL)`. A PostgreSQL log starts at the
/// schema SQLite logs reached by version 5; later versions are appended to
/// both stores together.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        5,
        "CREATE TABLE requests (
        request_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        session_id TEXT,
        user_id TEXT,
        received_at_ms BIGINT NOT NULL,
        finished_at_ms BIGINT NOT NULL,
        query TEXT NOT NULL,
        status TEXT NOT NULL,
        error TEXT,
        guardrails TEXT NOT NULL DEFAULT '[]',
        route_expert TEXT,
        route_top_expert TEXT,
        route_confidence DOUBLE PRECISION,
        route_scores TEXT,
        route_forced BOOLEAN,
        route_fallback BOOLEAN,
        router_model_version TEXT,
        route_latency_ms DOUBLE PRECISION,
        expert TEXT,
        expert_model_version TEXT,
        retrieved TEXT NOT NULL DEFAULT '[]',
        answer TEXT,
        prompt_tokens BIGINT,
        completion_tokens BIGINT,
        ttft_ms DOUBLE PRECISION,
        total_ms DOUBLE PRECISION,
        finish_reason TEXT,
        api_key_id TEXT,
        router_kind TEXT
    );
    CREATE INDEX requests_received_at ON requests(received_at_ms);
    CREATE INDEX requests_session ON requests(session_id, received_at_ms);
    CREATE TABLE feedback (
        feedback_id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        rating_scale TEXT,
        rating BIGINT,
        score DOUBLE PRECISION,
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
                   OR (g.created_at_ms = f.created_at_ms AND g.feedback_id > f.feedback_id)));
    CREATE TABLE shadow (
        request_id TEXT NOT NULL,
        slot TEXT NOT NULL,
        version TEXT NOT NULL,
        live_version TEXT NOT NULL,
        live_output TEXT NOT NULL,
        output TEXT,
        agree BOOLEAN,
        latency_ms DOUBLE PRECISION,
        live_latency_ms DOUBLE PRECISION,
        error TEXT,
        created_at_ms BIGINT NOT NULL
    );
    CREATE INDEX shadow_slot ON shadow(slot, created_at_ms);
    CREATE INDEX shadow_request ON shadow(request_id);",
    ),
    (6, "ALTER TABLE requests ADD COLUMN replica TEXT;"),
];

/// Binds `T` only to a column of a type it is encoded for (an integer in
/// a `DOUBLE PRECISION` column would be 8 bytes of nonsense).
fn encode<T: ToSql>(
    value: &T,
    ty: &Type,
    out: &mut BytesMut,
) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
    if T::accepts(ty) {
        value.to_sql(ty, out)
    } else {
        Err(format!("a {} cannot be stored in a {ty} column", std::any::type_name::<T>()).into())
    }
}

impl ToSql for Value<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => encode(v, ty, out),
            Value::Real(v) => encode(v, ty, out),
            Value::Text(v) => encode(v, ty, out),
            Value::Bool(v) => encode(v, ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per value in `to_sql`, where the variant is known.
        true
    }

    to_sql_checked!();
}

impl ColumnRead for tokio_postgres::Row {
    fn text(&self, name: &str) -> Result<Option<String>, LogError> {
        Ok(self.try_get(name)?)
    }
    fn int(&self, name: &str) -> Result<Option<i64>, LogError> {
        Ok(self.try_get(name)?)
    }
    fn real(&self, name: &str) -> Result<Option<f64>, LogError> {
        Ok(self.try_get(name)?)
    }
    fn flag(&self, name: &str) -> Result<Option<bool>, LogError> {
        Ok(self.try_get(name)?)
    }
}

/// `url` with its password hidden (in the user part or as a
/// `password=` parameter), for messages and records.
pub(crate) fn redact(url: &str) -> String {
    let mut shown = url.to_string();
    if let Some(scheme_end) = url.find("://").map(|i| i + 3) {
        let rest = &url[scheme_end..];
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@')
            && let Some(colon) = authority[..at].find(':')
        {
            shown = format!("{}{}:***{}", &url[..scheme_end], &rest[..colon], &rest[at..]);
        }
    }
    if let Some(start) = shown.find("password=").map(|i| i + "password=".len()) {
        let end = shown[start..].find('&').map_or(shown.len(), |i| start + i);
        shown.replace_range(start..end, "***");
    }
    shown
}

/// A parsed URL and how to name it in messages.
#[derive(Clone)]
pub(super) struct Target {
    config: Config,
    shown: String,
}

impl Target {
    pub(super) fn parse(url: &str) -> Result<Self, LogError> {
        let shown = redact(url);
        let mut config: Config = url.parse().map_err(|source| LogError::Connect {
            url: shown.clone(),
            source,
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("flywheel");
        }
        Ok(Self { config, shown })
    }

    /// Connect, driving the connection on the current runtime.
    pub(super) async fn connect(&self) -> Result<Client, LogError> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(|source| LogError::Connect {
            url: self.shown.clone(),
            source,
        })?;
        let shown = self.shown.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, url = %shown, "request log connection to PostgreSQL closed");
            }
        });
        Ok(client)
    }

    /// Connect and pass on every notification the connection receives
    /// (after a `LISTEN`); the receiver ends when the connection does.
    pub(super) async fn connect_listening(
        &self,
    ) -> Result<
        (
            Client,
            tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
        ),
        LogError,
    > {
        let (client, mut connection) = self.config.connect(NoTls).await.map_err(|source| LogError::Connect {
            url: self.shown.clone(),
            source,
        })?;
        let (send, receive) = tokio::sync::mpsc::unbounded_channel();
        let shown = self.shown.clone();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = futures::StreamExt::next(&mut messages).await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if send.send(n).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, url = %shown, "serving state connection to PostgreSQL closed");
                        return;
                    }
                }
            }
        });
        Ok((client, receive))
    }

    /// The URL, password hidden.
    pub(super) fn shown(&self) -> &str {
        &self.shown
    }
}

/// Bring the database to [`SCHEMA_VERSION`], one replica at a time.
async fn migrate(client: &mut Client) -> Result<(), LogError> {
    migrate_tables(client, "flywheel_schema", MIGRATIONS, SCHEMA_VERSION).await
}

/// Apply the `migrations` (`(version reached, SQL)`, oldest first) newer
/// than the version kept in `version_table`, up to `supported`, in one
/// transaction under the migration lock (replicas starting together
/// migrate one at a time).
pub(super) async fn migrate_tables(
    client: &mut Client,
    version_table: &str,
    migrations: &[(i64, &str)],
    supported: i64,
) -> Result<(), LogError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {version_table} (version BIGINT NOT NULL)"
    ))
    .await?;
    let current: i64 = match tx
        .query_opt(&format!("SELECT version FROM {version_table}"), &[])
        .await?
    {
        Some(row) => row.try_get(0)?,
        None => 0,
    };
    if current > supported {
        return Err(LogError::NewerSchema {
            found: current,
            supported,
        });
    }
    let mut reached = current;
    for (version, sql) in migrations.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await?;
        reached = *version;
    }
    if current == 0 {
        tx.execute(
            &format!("INSERT INTO {version_table} (version) VALUES ($1)"),
            &[&reached],
        )
        .await?;
    } else if reached != current {
        tx.execute(&format!("UPDATE {version_table} SET version = $1"), &[&reached])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Run `f` where blocking on another runtime is allowed: on this thread
/// when it is outside any runtime, else on a scoped thread of its own (a
/// runtime cannot be entered from inside another).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// A runtime that may be dropped anywhere (dropping a runtime inside
/// another one panics; this one is shut down in the background instead).
struct OwnedRuntime(Option<Runtime>);

impl OwnedRuntime {
    fn current_thread() -> Result<Self, LogError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LogError::Runtime)?;
        Ok(Self(Some(rt)))
    }

    fn background(name: &str) -> Result<Self, LogError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .map_err(LogError::Runtime)?;
        Ok(Self(Some(rt)))
    }

    fn get(&self) -> &Runtime {
        // Only `Drop` takes it out.
        self.0.as_ref().expect("runtime present until drop")
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The statements of a batch commit, prepared on one connection.
struct Prepared {
    record: Statement,
    feedback: Statement,
    shadow: Statement,
}

impl Prepared {
    async fn on(client: &Client) -> Result<Self, LogError> {
        Ok(Self {
            record: client.prepare(&columns::REQUESTS.upsert_arrays()).await?,
            feedback: client.prepare(&columns::FEEDBACK.upsert_arrays()).await?,
            shadow: client.prepare(&columns::SHADOW.upsert_arrays()).await?,
        })
    }
}

/// One column's values over a batch, bound as one PostgreSQL array.
#[derive(Debug)]
enum ColumnArray<'a> {
    Text(Vec<Option<&'a str>>),
    Int(Vec<Option<i64>>),
    Real(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
}

impl ToSql for ColumnArray<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Self::Text(v) => encode(v, ty, out),
            Self::Int(v) => encode(v, ty, out),
            Self::Real(v) => encode(v, ty, out),
            Self::Bool(v) => encode(v, ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per array in `to_sql`, where the variant is known.
        true
    }

    to_sql_checked!();
}

/// `rows` (each in `table`'s column order) as one array per column. A row
/// whose key comes again later in the batch is left out: one statement
/// cannot update a row twice, and the later version is the one to keep.
fn arrays<'a>(table: &Table, rows: &[Vec<Value<'a>>]) -> Result<Vec<ColumnArray<'a>>, LogError> {
    let key = table
        .key
        .and_then(|key| table.columns.iter().position(|(c, _)| *c == key));
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<&[Value<'a>]> = Vec::with_capacity(rows.len());
    for row in rows.iter().rev() {
        if let Some(Value::Text(id)) = key.map(|k| &row[k])
            && !seen.insert(*id)
        {
            continue;
        }
        kept.push(row);
    }
    kept.reverse();
    table
        .columns
        .iter()
        .enumerate()
        .map(|(j, (name, kind))| {
            let mismatch = || LogError::ColumnKind {
                column: format!("{}.{name}", table.name),
            };
            Ok(match kind {
                Kind::Text => ColumnArray::Text(column(&kept, j, Value::as_text, mismatch)?),
                Kind::Int => ColumnArray::Int(column(&kept, j, Value::as_int, mismatch)?),
                Kind::Real => ColumnArray::Real(column(&kept, j, Value::as_real, mismatch)?),
                Kind::Bool => ColumnArray::Bool(column(&kept, j, Value::as_bool, mismatch)?),
            })
        })
        .collect()
}

/// Column `j` of `rows`, each value read by `read` (`None`: a value of
/// another kind, reported by `mismatch`).
fn column<'a, T>(
    rows: &[&[Value<'a>]],
    j: usize,
    read: fn(&Value<'a>) -> Option<T>,
    mismatch: impl Fn() -> LogError,
) -> Result<Vec<Option<T>>, LogError> {
    rows.iter()
        .map(|row| match &row[j] {
            Value::Null => Ok(None),
            v => read(v).map(Some).ok_or_else(&mismatch),
        })
        .collect()
}

/// The writer's side of a PostgreSQL log.
pub(super) struct PgSink {
    rt: OwnedRuntime,
    target: Target,
    conn: Option<(Client, Prepared)>,
}

impl PgSink {
    /// Connect to `url` and migrate its schema.
    pub(super) fn connect(url: &str) -> Result<Self, LogError> {
        let mut sink = Self {
            rt: OwnedRuntime::current_thread()?,
            target: Target::parse(url)?,
            conn: None,
        };
        off_runtime(|| {
            let Self { rt, target, conn } = &mut sink;
            rt.get().block_on(async {
                let mut client = target.connect().await?;
                migrate(&mut client).await?;
                let prepared = Prepared::on(&client).await?;
                *conn = Some((client, prepared));
                Ok::<_, LogError>(())
            })
        })?;
        Ok(sink)
    }
}

/// Whether `error` says the database cannot be reached for now (connection
/// refused, lost or shut down, the server starting or out of resources)
/// rather than refusing these rows.
pub(super) fn unreachable(error: &LogError) -> bool {
    match error {
        LogError::Connect { .. } => true,
        LogError::Postgres(e) => {
            e.is_closed()
                || e.code().is_some_and(|state| {
                    let code = state.code();
                    // 08: connection exception; 57P: operator intervention
                    // (shutdown, cannot connect now); 53: insufficient resources.
                    code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
                })
                || e.as_db_error().is_none() && std::error::Error::source(e).is_some_and(|c| c.is::<std::io::Error>())
        }
        _ => false,
    }
}

impl Sink for PgSink {
    fn is_transient(&self, error: &LogError) -> bool {
        unreachable(error)
    }

    fn write(&mut self, batch: &Batch<'_>) -> Result<(), LogError> {
        let Self { rt, target, conn } = self;
        off_runtime(|| {
            rt.get().block_on(async {
                if conn.as_ref().is_none_or(|(client, _)| client.is_closed()) {
                    let client = target.connect().await?;
                    let prepared = Prepared::on(&client).await?;
                    *conn = Some((client, prepared));
                }
                let Some((client, prepared)) = conn.as_mut() else {
                    return Err(LogError::Closed);
                };
                let result = write_batch(client, prepared, batch).await;
                if result.is_err() && client.is_closed() {
                    *conn = None;
                }
                result
            })
        })
    }
}

type Params<'a> = Vec<&'a (dyn ToSql + Sync)>;

fn params<T: ToSql + Sync>(values: &[T]) -> Params<'_> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// One transaction: one array insert per table with rows in the batch.
async fn write_batch(client: &mut Client, prepared: &Prepared, batch: &Batch<'_>) -> Result<(), LogError> {
    let json: Vec<JsonColumns> = batch.records.iter().map(|r| JsonColumns::of(r)).collect();
    let records: Vec<Vec<Value<'_>>> = batch
        .records
        .iter()
        .zip(&json)
        .map(|(r, j)| columns::record_values(r, j))
        .collect();
    let feedback: Vec<Vec<Value<'_>>> = batch.feedback.iter().map(columns::feedback_values).collect();
    let shadows: Vec<Vec<Value<'_>>> = batch.shadows.iter().map(columns::shadow_values).collect();
    let tx = client.transaction().await?;
    for (statement, table, rows) in [
        (&prepared.record, &columns::REQUESTS, &records),
        (&prepared.feedback, &columns::FEEDBACK, &feedback),
        (&prepared.shadow, &columns::SHADOW, &shadows),
    ] {
        if !rows.is_empty() {
            let arrays = arrays(table, rows)?;
            tx.execute(statement, &params(&arrays)).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The readers' side of a PostgreSQL log: one connection, shared by every
/// reader of one log, opened again when it was lost.
#[derive(Clone)]
pub(super) struct PgReads(Arc<PgShared>);

struct PgShared {
    client: std::sync::Mutex<Arc<Client>>,
    target: Target,
    // Dropped after the client: the runtime drives its connection.
    rt: OwnedRuntime,
}

impl PgReads {
    /// Connect to `url` (migrating its schema, so a new database reads as
    /// an empty log).
    pub(super) fn connect(url: &str) -> Result<Self, LogError> {
        let target = Target::parse(url)?;
        let rt = OwnedRuntime::background("request-log-reader")?;
        let client = off_runtime(|| {
            rt.get().block_on(async {
                let mut client = target.connect().await?;
                migrate(&mut client).await?;
                Ok::<_, LogError>(client)
            })
        })?;
        Ok(Self(Arc::new(PgShared {
            client: std::sync::Mutex::new(Arc::new(client)),
            target,
            rt,
        })))
    }

    fn query(&self, sql: &str, values: &[Value<'_>]) -> Result<Vec<tokio_postgres::Row>, LogError> {
        let shared = &*self.0;
        let p = params(values);
        off_runtime(|| {
            shared.rt.get().block_on(async {
                let current = shared
                    .client
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let client = if current.is_closed() {
                    let fresh = Arc::new(shared.target.connect().await?);
                    *shared.client.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh.clone();
                    fresh
                } else {
                    current
                };
                Ok(client.query(sql, &p).await?)
            })
        })
    }
}

impl LogReads for PgReads {
    fn select(
        &self,
        sql: &str,
        params: &[Value<'_>],
        each: &mut dyn FnMut(&dyn ColumnRead) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        for row in self.query(sql, params)? {
            each(&row)?;
        }
        Ok(())
    }

    fn schema_version(&self) -> Result<i64, LogError> {
        let rows = self.query("SELECT version FROM flywheel_schema", &[])?;
        Ok(match rows.first() {
            Some(row) => row.try_get(0)?,
            None => 0,
        })
    }

    fn integrity_check(&self) -> Result<String, LogError> {
        // PostgreSQL checks its own pages; what a reader can check is that
        // the server answers with the schema in place.
        self.query("SELECT 1 FROM flywheel_schema", &[])?;
        Ok("ok".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_shown_without_its_password() {
        assert_eq!(
            redact("postgres://flywheel:s3cret@db:5432/log"),
            "postgres://flywheel:***@db:5432/log"
        );
        assert_eq!(redact("postgres://flywheel@db/log"), "postgres://flywheel@db/log");
        assert_eq!(
            redact("postgresql:///log?host=/run/pg"),
            "postgresql:///log?host=/run/pg"
        );
        assert_eq!(
            redact("postgres://db/log?user=f&password=s3cret&sslmode=disable"),
            "postgres://db/log?user=f&password=***&sslmode=disable"
        );
    }

    #[test]
    fn a_store_of_an_older_version_upgrades_in_place_and_keeps_its_records() {
        let Some(url) = crate::testing::postgres_database() else {
            return;
        };
        // A store as version 5 left it, with one record.
        let setup = url.clone();
        std::thread::spawn(move || {
            let rt = OwnedRuntime::current_thread().unwrap();
            rt.get().block_on(async {
                let client = Target::parse(&setup).unwrap().connect().await.unwrap();
                client.batch_execute(MIGRATIONS[0].1).await.unwrap();
                client
                    .batch_execute(
                        "CREATE TABLE flywheel_schema (version BIGINT NOT NULL);
                         INSERT INTO flywheel_schema VALUES (5);
                         INSERT INTO requests (request_id, kind, received_at_ms, finished_at_ms, query, status)
                         VALUES ('old', 'route', 1, 2, 'q', 'ok');",
                    )
                    .await
                    .unwrap();
            });
        })
        .join()
        .unwrap();
        drop(PgSink::connect(&url).unwrap());
        let reads = PgReads::connect(&url).unwrap();
        assert_eq!(reads.schema_version().unwrap(), SCHEMA_VERSION);
        let reader = super::super::LogReader { reads: Box::new(reads) };
        let old = reader.get("old").unwrap().unwrap();
        assert_eq!((old.query.as_str(), old.replica), ("q", None));
    }

    #[test]
    fn a_value_is_refused_by_a_column_of_another_type() {
        let mut out = BytesMut::new();
        assert!(Value::Int(3).to_sql(&Type::INT8, &mut out).is_ok());
        assert!(Value::Int(3).to_sql(&Type::FLOAT8, &mut out).is_err());
        assert!(Value::Text("x").to_sql(&Type::TEXT, &mut out).is_ok());
        assert!(matches!(Value::Null.to_sql(&Type::BOOL, &mut out), Ok(IsNull::Yes)));
    }
}
