//! The log's rows as column values, written once for every store.
//!
//! A record becomes a list of [`Value`]s in its [`Table`]'s order (both stores
//! bind them as statement parameters), and comes back from any store's row
//! through [`ColumnRead`]. The SQL that uses them is the dialect SQLite and
//! PostgreSQL share (`$n` parameters, `INSERT ... ON CONFLICT DO UPDATE`).

use super::{LogError, RequestRecord, ShadowRecord};
use crate::agents::RouteDecision;
use crate::data::feedback::{FeedbackKind, FeedbackRecord, Rating};

/// One column value, borrowed from the record it describes.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Bool(bool),
}

impl<'a> Value<'a> {
    pub(super) fn as_text(&self) -> Option<&'a str> {
        match self {
            Self::Text(v) => Some(v),
            _ => None,
        }
    }
    pub(super) fn as_int(&self) -> Option<i64> {
        match self {
            Self::Int(v) => Some(*v),
            _ => None,
        }
    }
    pub(super) fn as_real(&self) -> Option<f64> {
        match self {
            Self::Real(v) => Some(*v),
            _ => None,
        }
    }
    pub(super) fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(v) => Some(*v),
            _ => None,
        }
    }
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(v: Option<&'a str>) -> Self {
        v.map_or(Value::Null, Value::Text)
    }
}
impl From<Option<i64>> for Value<'_> {
    fn from(v: Option<i64>) -> Self {
        v.map_or(Value::Null, Value::Int)
    }
}
impl From<Option<f64>> for Value<'_> {
    fn from(v: Option<f64>) -> Self {
        v.map_or(Value::Null, Value::Real)
    }
}
impl From<Option<bool>> for Value<'_> {
    fn from(v: Option<bool>) -> Self {
        v.map_or(Value::Null, Value::Bool)
    }
}

/// Reads one row's columns by name, whatever the store.
pub(super) trait ColumnRead {
    fn text(&self, name: &str) -> Result<Option<String>, LogError>;
    fn int(&self, name: &str) -> Result<Option<i64>, LogError>;
    fn real(&self, name: &str) -> Result<Option<f64>, LogError>;
    fn flag(&self, name: &str) -> Result<Option<bool>, LogError>;

    /// A column the schema declares `NOT NULL`.
    fn required_text(&self, name: &str) -> Result<String, LogError> {
        Ok(self.text(name)?.unwrap_or_default())
    }
    /// A column the schema declares `NOT NULL`.
    fn required_int(&self, name: &str) -> Result<i64, LogError> {
        Ok(self.int(name)?.unwrap_or_default())
    }
    /// A token count (stored as a 64-bit integer).
    fn count(&self, name: &str) -> Result<Option<u32>, LogError> {
        Ok(self.int(name)?.and_then(|v| u32::try_from(v).ok()))
    }
}

/// What a column holds (its type in either store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Text,
    Int,
    Real,
    Bool,
}

/// One table's columns, in the order its `*_values` function lists them.
#[derive(Debug)]
pub(super) struct Table {
    pub(super) name: &'static str,
    pub(super) columns: &'static [(&'static str, Kind)],
    /// The primary key a row written again replaces; `None`: rows only add.
    pub(super) key: Option<&'static str>,
}

use Kind::{Bool, Int, Real, Text};

/// Table `requests`, in the order of [`record_values`].
pub(super) const REQUESTS: Table = Table {
    name: "requests",
    columns: &[
        ("request_id", Text),
        ("kind", Text),
        ("session_id", Text),
        ("user_id", Text),
        ("received_at_ms", Int),
        ("finished_at_ms", Int),
        ("query", Text),
        ("status", Text),
        ("error", Text),
        ("guardrails", Text),
        ("route_expert", Text),
        ("route_top_expert", Text),
        ("route_confidence", Real),
        ("route_scores", Text),
        ("route_forced", Bool),
        ("route_fallback", Bool),
        ("router_model_version", Text),
        ("route_latency_ms", Real),
        ("expert", Text),
        ("expert_model_version", Text),
        ("retrieved", Text),
        ("answer", Text),
        ("prompt_tokens", Int),
        ("completion_tokens", Int),
        ("ttft_ms", Real),
        ("total_ms", Real),
        ("finish_reason", Text),
        ("api_key_id", Text),
        ("router_kind", Text),
        ("replica", Text),
    ],
    key: Some("request_id"),
};

/// Table `feedback`, in the order of [`feedback_values`].
pub(super) const FEEDBACK: Table = Table {
    name: "feedback",
    columns: &[
        ("feedback_id", Text),
        ("request_id", Text),
        ("created_at_ms", Int),
        ("kind", Text),
        ("rating_scale", Text),
        ("rating", Int),
        ("score", Real),
        ("corrected_expert", Text),
        ("comment", Text),
        ("reviewer_id", Text),
        ("detail", Text),
    ],
    key: Some("feedback_id"),
};

/// Table `shadow`, in the order of [`shadow_values`].
pub(super) const SHADOW: Table = Table {
    name: "shadow",
    columns: &[
        ("request_id", Text),
        ("slot", Text),
        ("version", Text),
        ("live_version", Text),
        ("live_output", Text),
        ("output", Text),
        ("agree", Bool),
        ("latency_ms", Real),
        ("live_latency_ms", Real),
        ("error", Text),
        ("created_at_ms", Int),
    ],
    key: None,
};

impl Table {
    /// The column names, comma-separated (for `SELECT` and `INSERT`).
    pub(super) fn column_list(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(name, _)| *name).collect();
        names.join(", ")
    }

    /// `ON CONFLICT` clause replacing every column but the key ("" when
    /// the table has none).
    fn on_conflict(&self) -> String {
        let Some(key) = self.key else {
            return String::new();
        };
        let updates: Vec<String> = self
            .columns
            .iter()
            .filter(|(c, _)| *c != key)
            .map(|(c, _)| format!("{c} = excluded.{c}"))
            .collect();
        format!(" ON CONFLICT ({key}) DO UPDATE SET {}", updates.join(", "))
    }

    /// `INSERT` of one row, its values as `$1`, `$2`, ...; a row whose key
    /// exists is replaced (a record written again keeps its last version).
    pub(super) fn upsert(&self) -> String {
        let params: Vec<String> = (1..=self.columns.len()).map(|i| format!("${i}")).collect();
        format!(
            "INSERT INTO {} ({}) VALUES ({}){}",
            self.name,
            self.column_list(),
            params.join(", "),
            self.on_conflict()
        )
    }

    /// PostgreSQL: `INSERT` of many rows at once, parameter `$i` holding
    /// column `i`'s values as an array (one statement per batch).
    pub(super) fn upsert_arrays(&self) -> String {
        let arrays: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, kind))| {
                let ty = match kind {
                    Text => "text",
                    Int => "bigint",
                    Real => "double precision",
                    Bool => "boolean",
                };
                format!("${}::{ty}[]", i + 1)
            })
            .collect();
        format!(
            "INSERT INTO {} ({}) SELECT * FROM UNNEST({}){}",
            self.name,
            self.column_list(),
            arrays.join(", "),
            self.on_conflict()
        )
    }
}

/// The JSON columns of one record (buffers a writer may reuse from one
/// record to the next).
#[derive(Debug, Default)]
pub(super) struct JsonColumns {
    guardrails: String,
    scores: Option<String>,
    retrieved: String,
}

impl JsonColumns {
    /// Serialize `r`'s JSON columns.
    pub(super) fn of(r: &RequestRecord) -> Self {
        let mut json = Self::default();
        json.fill(r);
        json
    }

    /// Serialize `r`'s JSON columns into these buffers (their old content
    /// replaced, their allocations kept).
    pub(super) fn fill(&mut self, r: &RequestRecord) {
        json_into(&mut self.guardrails, &r.guardrails);
        match r.route.as_ref() {
            Some(d) => json_into(self.scores.get_or_insert_with(String::new), &d.scores),
            None => self.scores = None,
        }
        json_into(&mut self.retrieved, &r.retrieved);
    }
}

fn json_into<T: serde::Serialize>(buf: &mut String, v: &T) {
    buf.clear();
    // Serializing these plain structs cannot fail, and serde_json writes
    // UTF-8 only; `null` stands in should either ever change.
    let mut bytes = std::mem::take(buf).into_bytes();
    let ok = serde_json::to_writer(&mut bytes, v).is_ok();
    *buf = String::from_utf8(bytes).unwrap_or_default();
    if !ok || buf.is_empty() {
        buf.clear();
        buf.push_str("null");
    }
}

fn parse<T: serde::de::DeserializeOwned + Default>(s: Option<String>) -> T {
    s.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
}

/// `r`'s values in [`REQUESTS`] order (`json` from [`JsonColumns::of`]).
pub(super) fn record_values<'a>(r: &'a RequestRecord, json: &'a JsonColumns) -> Vec<Value<'a>> {
    let route = r.route.as_ref();
    vec![
        Value::Text(&r.request_id),
        Value::Text(&r.kind),
        r.session_id.as_deref().into(),
        r.user_id.as_deref().into(),
        Value::Int(r.received_at_ms),
        Value::Int(r.finished_at_ms),
        Value::Text(&r.query),
        Value::Text(&r.status),
        r.error.as_deref().into(),
        Value::Text(&json.guardrails),
        route.map(|d| d.expert.as_str()).into(),
        route.map(|d| d.top_expert.as_str()).into(),
        route.map(|d| f64::from(d.confidence)).into(),
        json.scores.as_deref().into(),
        route.map(|d| d.forced).into(),
        route.map(|d| d.fallback).into(),
        route.map(|d| d.router_model_version.as_str()).into(),
        route.map(|d| d.latency_ms).into(),
        r.expert.as_deref().into(),
        r.expert_model_version.as_deref().into(),
        Value::Text(&json.retrieved),
        r.answer.as_deref().into(),
        r.prompt_tokens.map(i64::from).into(),
        r.completion_tokens.map(i64::from).into(),
        r.ttft_ms.into(),
        r.total_ms.into(),
        r.finish_reason.as_deref().into(),
        r.api_key_id.as_deref().into(),
        route
            .and_then(|d| d.router_kind)
            .map(crate::engine::ModelKind::as_str)
            .into(),
        r.replica.as_deref().into(),
    ]
}

/// A request record from a row holding [`REQUESTS`]' columns.
pub(super) fn record_from_row(row: &dyn ColumnRead) -> Result<RequestRecord, LogError> {
    let route = match row.text("route_expert")? {
        Some(expert) => Some(RouteDecision {
            expert,
            top_expert: row.required_text("route_top_expert")?,
            confidence: row.real("route_confidence")?.unwrap_or_default() as f32,
            scores: parse(row.text("route_scores")?),
            router_model_version: row.required_text("router_model_version")?,
            latency_ms: row.real("route_latency_ms")?.unwrap_or_default(),
            forced: row.flag("route_forced")?.unwrap_or_default(),
            fallback: row.flag("route_fallback")?.unwrap_or_default(),
            prompt_tokens: 0,
            router_kind: row.text("router_kind")?.and_then(|k| k.parse().ok()),
        }),
        None => None,
    };
    Ok(RequestRecord {
        request_id: row.required_text("request_id")?,
        kind: row.required_text("kind")?,
        session_id: row.text("session_id")?,
        user_id: row.text("user_id")?,
        received_at_ms: row.required_int("received_at_ms")?,
        finished_at_ms: row.required_int("finished_at_ms")?,
        query: row.required_text("query")?,
        status: row.required_text("status")?,
        error: row.text("error")?,
        guardrails: parse(row.text("guardrails")?),
        route,
        expert: row.text("expert")?,
        expert_model_version: row.text("expert_model_version")?,
        retrieved: parse(row.text("retrieved")?),
        answer: row.text("answer")?,
        prompt_tokens: row.count("prompt_tokens")?,
        completion_tokens: row.count("completion_tokens")?,
        ttft_ms: row.real("ttft_ms")?,
        total_ms: row.real("total_ms")?,
        finish_reason: row.text("finish_reason")?,
        api_key_id: row.text("api_key_id")?,
        replica: row.text("replica")?,
    })
}

/// `f`'s values in [`FEEDBACK`] order.
pub(super) fn feedback_values(f: &FeedbackRecord) -> Vec<Value<'_>> {
    let stored = f.rating.map(Rating::stored);
    vec![
        Value::Text(&f.feedback_id),
        Value::Text(&f.request_id),
        Value::Int(f.created_at_ms),
        Value::Text(f.kind.as_str()),
        stored.map(|(scale, _)| scale).into(),
        stored.map(|(_, v)| v).into(),
        f.rating.map(Rating::score).into(),
        f.corrected_expert.as_deref().into(),
        f.comment.as_deref().into(),
        f.reviewer_id.as_deref().into(),
        f.detail.as_deref().into(),
    ]
}

/// A feedback row from a row holding [`FEEDBACK`]'s columns.
pub(super) fn feedback_from_row(row: &dyn ColumnRead) -> Result<FeedbackRecord, LogError> {
    let kind = row.required_text("kind")?;
    let scale = row.text("rating_scale")?;
    let value = row.int("rating")?;
    Ok(FeedbackRecord {
        feedback_id: row.required_text("feedback_id")?,
        request_id: row.required_text("request_id")?,
        created_at_ms: row.required_int("created_at_ms")?,
        // Rows are only written by this module, so an unknown kind means a
        // newer writer; treat it as explicit rather than fail the read.
        kind: FeedbackKind::parse(&kind).unwrap_or(FeedbackKind::Explicit),
        rating: scale.zip(value).and_then(|(s, v)| Rating::from_stored(&s, v)),
        corrected_expert: row.text("corrected_expert")?,
        comment: row.text("comment")?,
        reviewer_id: row.text("reviewer_id")?,
        detail: row.text("detail")?,
    })
}

/// `r`'s values in [`SHADOW`] order.
pub(super) fn shadow_values(r: &ShadowRecord) -> Vec<Value<'_>> {
    vec![
        Value::Text(&r.request_id),
        Value::Text(&r.slot),
        Value::Text(&r.version),
        Value::Text(&r.live_version),
        Value::Text(&r.live_output),
        r.output.as_deref().into(),
        r.agree.into(),
        r.latency_ms.into(),
        r.live_latency_ms.into(),
        r.error.as_deref().into(),
        Value::Int(r.created_at_ms),
    ]
}

/// A shadow run from a row holding [`SHADOW`]'s columns.
pub(super) fn shadow_from_row(row: &dyn ColumnRead) -> Result<ShadowRecord, LogError> {
    Ok(ShadowRecord {
        request_id: row.required_text("request_id")?,
        slot: row.required_text("slot")?,
        version: row.required_text("version")?,
        live_version: row.required_text("live_version")?,
        live_output: row.required_text("live_output")?,
        output: row.text("output")?,
        agree: row.flag("agree")?,
        latency_ms: row.real("latency_ms")?,
        live_latency_ms: row.real("live_latency_ms")?,
        error: row.text("error")?,
        created_at_ms: row.required_int("created_at_ms")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upsert_replaces_every_column_but_its_key() {
        let t = Table {
            name: "t",
            columns: &[("id", Text), ("n", Int), ("x", Real)],
            key: Some("id"),
        };
        let replace = " ON CONFLICT (id) DO UPDATE SET n = excluded.n, x = excluded.x";
        assert_eq!(
            t.upsert(),
            format!("INSERT INTO t (id, n, x) VALUES ($1, $2, $3){replace}")
        );
        assert_eq!(
            t.upsert_arrays(),
            format!(
                "INSERT INTO t (id, n, x) SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::double precision[]){replace}"
            )
        );
        let log = Table { key: None, ..t };
        assert_eq!(log.upsert(), "INSERT INTO t (id, n, x) VALUES ($1, $2, $3)");
    }

    #[test]
    fn every_value_fits_its_columns_kind() {
        let record = RequestRecord {
            route: Some(RouteDecision::forced("hr")),
            session_id: Some("s".into()),
            prompt_tokens: Some(3),
            ttft_ms: Some(1.0),
            ..RequestRecord::default()
        };
        let json = JsonColumns::of(&record);
        let kinds_match = |table: &Table, values: &[Value<'_>]| {
            assert_eq!(values.len(), table.columns.len(), "{}", table.name);
            for ((name, kind), value) in table.columns.iter().zip(values) {
                let fits = matches!(
                    (kind, value),
                    (_, Value::Null)
                        | (Text, Value::Text(_))
                        | (Int, Value::Int(_))
                        | (Real, Value::Real(_))
                        | (Bool, Value::Bool(_))
                );
                assert!(fits, "{}.{name} is {kind:?}, given {value:?}", table.name);
            }
        };
        kinds_match(&REQUESTS, &record_values(&record, &json));
        let mut feedback = FeedbackRecord::new("r", FeedbackKind::Explicit);
        feedback.rating = Some(Rating::Stars(4));
        kinds_match(&FEEDBACK, &feedback_values(&feedback));
        let shadow = ShadowRecord::fixture("r", "router", 1);
        kinds_match(&SHADOW, &shadow_values(&shadow));
    }
}
