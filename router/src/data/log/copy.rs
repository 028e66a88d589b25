//! Copying a whole log from one store to another (e.g. a server's SQLite
//! file into the PostgreSQL store its replicas will share), page by page so
//! that a log of any size fits in memory. The target must be empty (shadow
//! runs have no id of their own, so a second copy would repeat them).

use super::columns::{self, Value};
use super::writer::{Batch, Sink};
use super::{LogError, LogLocation, LogReader, RequestRecord, open_sink};

/// Rows read and written at a time.
const PAGE: i64 = 5_000;

/// What a copy moved; the target's counts after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Request records copied.
    pub records: u64,
    /// Feedback rows copied.
    pub feedback: u64,
    /// Shadow runs copied.
    pub shadows: u64,
    /// Request records in the target afterwards.
    pub target_records: u64,
}

/// Copy every request record, feedback row and shadow run of `from` into
/// `to` (created and migrated when new), calling `progress` with the rows
/// copied so far.
///
/// # Errors
/// Either store cannot be opened, read or written.
pub fn copy_log(from: &LogLocation, to: &LogLocation, mut progress: impl FnMut(u64)) -> Result<CopyReport, LogError> {
    // A SQLite log of an older schema is brought up to date first, as a
    // server starting on it would.
    if let LogLocation::Sqlite(_) = from {
        drop(open_sink(from, 0)?);
    }
    let reader = LogReader::open(from.clone())?;
    let mut sink = open_sink(to, 0)?;
    let target = LogReader::open(to.clone())?;
    let held = target.rows(
        "SELECT (SELECT COUNT(*) FROM requests) + (SELECT COUNT(*) FROM feedback) \
         + (SELECT COUNT(*) FROM shadow) AS n",
        &[],
        |r| r.required_int("n"),
    )?;
    if held.first().copied().unwrap_or_default() > 0 {
        return Err(LogError::TargetNotEmpty { target: to.to_string() });
    }
    let mut report = CopyReport::default();
    // Records by (arrival, id): a keyset that pages in a stable order.
    let mut after: (i64, String) = (i64::MIN, String::new());
    loop {
        let page: Vec<Box<RequestRecord>> = reader
            .records(
                "WHERE received_at_ms > $1 OR (received_at_ms = $1 AND request_id > $2) \
                 ORDER BY received_at_ms, request_id LIMIT $3",
                &[Value::Int(after.0), Value::Text(&after.1), Value::Int(PAGE)],
            )?
            .into_iter()
            .map(Box::new)
            .collect();
        let Some(last) = page.last() else { break };
        after = (last.received_at_ms, last.request_id.clone());
        write(sink.as_mut(), &page, &[], &[])?;
        report.records += page.len() as u64;
        progress(report.records);
    }
    let mut after = String::new();
    loop {
        let page = reader.feedback_page(&after, PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.feedback_id.clone();
        write(sink.as_mut(), &[], &page, &[])?;
        report.feedback += page.len() as u64;
        progress(report.records + report.feedback);
    }
    // Shadow runs have no id of their own: (request, slot) names one.
    let mut after = (String::new(), String::new());
    loop {
        let sql = format!(
            "SELECT {} FROM shadow WHERE request_id > $1 OR (request_id = $1 AND slot > $2) \
             ORDER BY request_id, slot LIMIT $3",
            columns::SHADOW.column_list()
        );
        let page = reader.rows(
            &sql,
            &[Value::Text(&after.0), Value::Text(&after.1), Value::Int(PAGE)],
            columns::shadow_from_row,
        )?;
        let Some(last) = page.last() else { break };
        after = (last.request_id.clone(), last.slot.clone());
        write(sink.as_mut(), &[], &[], &page)?;
        report.shadows += page.len() as u64;
        progress(report.records + report.feedback + report.shadows);
    }
    sink.close();
    report.target_records = target.count()?;
    Ok(report)
}

fn write(
    sink: &mut dyn Sink,
    records: &[Box<RequestRecord>],
    feedback: &[crate::data::feedback::FeedbackRecord],
    shadows: &[super::ShadowRecord],
) -> Result<(), LogError> {
    sink.write(&Batch {
        records,
        feedback,
        shadows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::RouteDecision;
    use crate::data::feedback::{FeedbackKind, FeedbackRecord};
    use crate::data::log::ShadowRecord;

    /// More records than a page, many arriving in the same millisecond
    /// (the keyset's tie-break on the id is exercised across pages).
    fn fill(location: &LogLocation) -> (Vec<RequestRecord>, Vec<FeedbackRecord>, Vec<ShadowRecord>) {
        let records: Vec<RequestRecord> = (0..12_000)
            .map(|i| RequestRecord {
                request_id: format!("r{i:05}"),
                kind: "route".into(),
                query: format!("question {i}"),
                status: "ok".into(),
                received_at_ms: i / 1_000,
                finished_at_ms: i / 1_000 + 1,
                route: Some(RouteDecision::forced("hr")),
                ..RequestRecord::default()
            })
            .collect();
        let feedback: Vec<FeedbackRecord> = (0..7_000)
            .map(|i| {
                let mut f = FeedbackRecord::new(format!("r{i:05}"), FeedbackKind::Explicit);
                f.corrected_expert = Some("it".into());
                f
            })
            .collect();
        let shadows: Vec<ShadowRecord> = (0..6_000)
            .flat_map(|i| ["router", "expert:hr"].map(|slot| ShadowRecord::fixture(&format!("r{i:05}"), slot, i)))
            .collect();
        let boxed: Vec<Box<RequestRecord>> = records.iter().cloned().map(Box::new).collect();
        let mut sink = open_sink(location, 0).unwrap();
        write(sink.as_mut(), &boxed, &feedback, &shadows).unwrap();
        (records, feedback, shadows)
    }

    fn assert_same(to: &LogLocation, expected: &(Vec<RequestRecord>, Vec<FeedbackRecord>, Vec<ShadowRecord>)) {
        let reader = LogReader::open(to.clone()).unwrap();
        let (records, feedback, shadows) = expected;
        assert_eq!(&reader.records_between(i64::MIN, i64::MAX).unwrap(), records);
        let mut copied = Vec::new();
        let mut after = String::new();
        loop {
            let page = reader.feedback_page(&after, 1_000).unwrap();
            let Some(last) = page.last() else { break };
            after = last.feedback_id.clone();
            copied.extend(page);
        }
        let mut expected_feedback = feedback.clone();
        expected_feedback.sort_by(|a, b| a.feedback_id.cmp(&b.feedback_id));
        assert_eq!(copied, expected_feedback);
        for slot in ["router", "expert:hr"] {
            let expected: Vec<&ShadowRecord> = shadows.iter().filter(|s| s.slot == slot).collect();
            let got = reader.shadow_records(slot).unwrap();
            assert_eq!(got.iter().collect::<Vec<_>>(), expected, "{slot}");
        }
    }

    #[test]
    fn every_row_is_copied_page_by_page_into_an_empty_log_only() {
        let dir = tempfile::tempdir().unwrap();
        let from = LogLocation::Sqlite(dir.path().join("from.db"));
        let expected = fill(&from);
        let mut targets = vec![LogLocation::Sqlite(dir.path().join("to.db"))];
        targets.extend(crate::testing::postgres_database().map(LogLocation::Postgres));
        for to in targets {
            let mut seen = Vec::new();
            let report = copy_log(&from, &to, |n| seen.push(n)).unwrap();
            assert_eq!(
                (report.records, report.feedback, report.shadows, report.target_records),
                (12_000, 7_000, 12_000, 12_000),
                "{to}"
            );
            assert_eq!(seen.last(), Some(&31_000));
            assert!(seen.len() > 3, "progress is reported per page: {seen:?}");
            assert_same(&to, &expected);
            // Copying again would repeat the shadow runs: refused.
            let again = copy_log(&from, &to, |_| {}).unwrap_err();
            assert!(matches!(again, LogError::TargetNotEmpty { .. }), "{again:?}");
            assert_same(&to, &expected);
        }
    }

    #[test]
    fn an_old_sqlite_log_is_upgraded_and_copied() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("v1.db");
        {
            let conn = rusqlite::Connection::open(&old).unwrap();
            conn.execute_batch(super::super::sqlite::first_schema()).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO requests (request_id, kind, received_at_ms, finished_at_ms, query, status) \
                 VALUES ('old', 'route', 1, 2, 'q', 'ok')",
                [],
            )
            .unwrap();
        }
        let mut targets = vec![LogLocation::Sqlite(dir.path().join("to.db"))];
        targets.extend(crate::testing::postgres_database().map(LogLocation::Postgres));
        for to in targets {
            let report = copy_log(&LogLocation::Sqlite(old.clone()), &to, |_| {}).unwrap();
            assert_eq!(report.target_records, 1, "{to}");
            let record = LogReader::open(to.clone()).unwrap().get("old").unwrap().unwrap();
            assert_eq!((record.query.as_str(), record.api_key_id), ("q", None));
        }
    }
}
