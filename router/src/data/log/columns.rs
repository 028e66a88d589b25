//! The log's rows as column values, written once for every store.
//!
//! A record becomes a list of [`Value`]s in [`COLUMNS`] order (both stores
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

/// The `requests` table's columns, in the order of [`record_values`].
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

/// The `feedback` table's columns, in the order of [`feedback_values`].
pub(super) const FEEDBACK_COLUMNS: &[&str] = &[
    "feedback_id",
    "request_id",
    "created_at_ms",
    "kind",
    "rating_scale",
    "rating",
    "score",
    "corrected_expert",
    "comment",
    "reviewer_id",
    "detail",
];

/// The `shadow` table's columns, in the order of [`shadow_values`].
pub(super) const SHADOW_COLUMNS: &[&str] = &[
    "request_id",
    "slot",
    "version",
    "live_version",
    "live_output",
    "output",
    "agree",
    "latency_ms",
    "live_latency_ms",
    "error",
    "created_at_ms",
];

/// `INSERT` of `columns` into `table`; a row whose `key` exists is replaced
/// (a request's record can be written again, e.g. a review import's feedback).
pub(super) fn upsert(table: &str, columns: &[&str], key: Option<&str>) -> String {
    let params: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
    let mut sql = format!(
        "INSERT INTO {table} ({}) VALUES ({})",
        columns.join(", "),
        params.join(", ")
    );
    if let Some(key) = key {
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| **c != key)
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        sql.push_str(&format!(" ON CONFLICT ({key}) DO UPDATE SET {}", updates.join(", ")));
    }
    sql
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

/// `r`'s values in [`COLUMNS`] order (`json` from [`JsonColumns::of`]).
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
    ]
}

/// A request record from a row holding [`COLUMNS`].
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
    })
}

/// `f`'s values in [`FEEDBACK_COLUMNS`] order.
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

/// A feedback row from a row holding [`FEEDBACK_COLUMNS`].
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

/// `r`'s values in [`SHADOW_COLUMNS`] order.
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

/// A shadow run from a row holding [`SHADOW_COLUMNS`].
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
        let sql = upsert("t", &["id", "a", "b"], Some("id"));
        assert_eq!(
            sql,
            "INSERT INTO t (id, a, b) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET a = excluded.a, b = excluded.b"
        );
        assert_eq!(upsert("t", &["a"], None), "INSERT INTO t (a) VALUES ($1)");
    }

    #[test]
    fn every_table_lists_as_many_values_as_columns() {
        let record = RequestRecord {
            route: Some(RouteDecision::forced("hr")),
            ..RequestRecord::default()
        };
        let json = JsonColumns::of(&record);
        assert_eq!(record_values(&record, &json).len(), COLUMNS.len());
        let feedback = FeedbackRecord::new("r", FeedbackKind::Explicit);
        assert_eq!(feedback_values(&feedback).len(), FEEDBACK_COLUMNS.len());
        let shadow = ShadowRecord {
            request_id: "r".into(),
            slot: "router".into(),
            version: "v2".into(),
            live_version: "v1".into(),
            live_output: "hr".into(),
            output: None,
            agree: None,
            latency_ms: None,
            live_latency_ms: None,
            error: None,
            created_at_ms: 1,
        };
        assert_eq!(shadow_values(&shadow).len(), SHADOW_COLUMNS.len());
    }
}
