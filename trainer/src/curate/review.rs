//! The human review queue: export uncertain and judge-flagged requests as
//! CSV or JSONL, let subject-matter experts fill in `reviewed_expert`, and
//! import their labels back into the request log as `review` feedback,
//! which outranks every other label source.

use std::path::{Path, PathBuf};

use flywheel_router::data::feedback::{FeedbackKind, FeedbackRecord};
use flywheel_router::data::log::{LogReader, append_feedback};
use serde::{Deserialize, Serialize};

use super::{CurateError, io};

/// One row of the review queue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReviewItem {
    /// The request to review.
    pub request_id: String,
    /// Its query.
    pub query: String,
    /// Where it was routed.
    pub routed_expert: String,
    /// The router's confidence.
    pub router_confidence: Option<f32>,
    /// Why it is in the queue: `judge_wrong_route`, `judge_uncertain`, `judge_malformed` or `unjudged`.
    pub reason: String,
    /// The judge's cause, if it gave one.
    pub judge_cause: Option<String>,
    /// The judge's confidence, 1-10.
    pub judge_score: Option<u8>,
    /// The expert the judge suggests.
    pub suggested_expert: Option<String>,
    /// The user's comment.
    pub comment: Option<String>,
    /// To fill in: the expert that should answer (empty = no label).
    pub reviewed_expert: Option<String>,
    /// To fill in: who reviewed.
    pub reviewer_id: Option<String>,
}

fn is_csv(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// Write the queue to `path` (`.csv`, otherwise JSONL).
///
/// # Errors
/// I/O failures.
pub fn write_queue(path: &Path, items: &[ReviewItem]) -> Result<(), CurateError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    if is_csv(path) {
        let mut w = csv::Writer::from_path(path).map_err(|e| csv_error(path, e))?;
        for item in items {
            w.serialize(item).map_err(|e| csv_error(path, e))?;
        }
        w.flush().map_err(io(path))?;
    } else {
        let mut text = String::new();
        for item in items {
            text.push_str(&serde_json::to_string(item).map_err(|e| parse(path, 0, e.to_string()))?);
            text.push('\n');
        }
        std::fs::write(path, text).map_err(io(path))?;
    }
    Ok(())
}

fn csv_error(path: &Path, e: csv::Error) -> CurateError {
    let line = e.position().map_or(0, |p| p.line() as usize);
    parse(path, line, e.to_string())
}

fn parse(path: &Path, line: usize, reason: String) -> CurateError {
    CurateError::Parse {
        path: path.to_path_buf(),
        line,
        reason,
    }
}

/// Read a (reviewed) queue file.
///
/// # Errors
/// I/O failures or malformed rows (with their line).
pub fn read_queue(path: &Path) -> Result<Vec<ReviewItem>, CurateError> {
    if is_csv(path) {
        let mut r = csv::Reader::from_path(path).map_err(|e| csv_error(path, e))?;
        r.deserialize().map(|row| row.map_err(|e| csv_error(path, e))).collect()
    } else {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| parse(path, i + 1, e.to_string())))
            .collect()
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    /// The file read.
    pub file: PathBuf,
    /// Labels written to the log.
    pub imported: usize,
    /// Rows left without a reviewed expert.
    pub unreviewed: usize,
}

/// Import reviewed labels from `path` into the log at `log`. Every labelled
/// row must name a logged request and, when `labels` is given, one of them;
/// otherwise nothing is imported.
///
/// # Errors
/// Unreadable files, unknown request ids or labels (all listed), log failures.
pub fn import(
    log: &Path,
    path: &Path,
    default_reviewer: Option<&str>,
    labels: Option<&[String]>,
) -> Result<ImportReport, CurateError> {
    let items = read_queue(path)?;
    let reader = LogReader::open(log)?;
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let mut unreviewed = 0;
    for item in items {
        let Some(label) = item.reviewed_expert.as_deref().map(str::trim).filter(|l| !l.is_empty()) else {
            unreviewed += 1;
            continue;
        };
        if reader.get(&item.request_id)?.is_none() {
            problems.push(format!("request `{}` is not in the log", item.request_id));
            continue;
        }
        if let Some(known) = labels
            && !known.iter().any(|k| k == label)
        {
            problems.push(format!(
                "request `{}`: `{label}` is not one of {}",
                item.request_id,
                known.join(", ")
            ));
            continue;
        }
        let mut row = FeedbackRecord::new(item.request_id, FeedbackKind::Review);
        row.corrected_expert = Some(label.to_string());
        row.reviewer_id = item
            .reviewer_id
            .filter(|r| !r.trim().is_empty())
            .or_else(|| default_reviewer.map(str::to_string));
        rows.push(row);
    }
    if !problems.is_empty() {
        return Err(CurateError::Review {
            path: path.to_path_buf(),
            problems,
        });
    }
    append_feedback(log, &rows)?;
    Ok(ImportReport {
        file: path.to_path_buf(),
        imported: rows.len(),
        unreviewed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_jsonl_queues_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let items = vec![ReviewItem {
            request_id: "r1".into(),
            query: "reset, my \"password\"".into(),
            routed_expert: "finance".into(),
            router_confidence: Some(0.4),
            reason: "judge_wrong_route".into(),
            judge_cause: Some("wrong_route".into()),
            judge_score: Some(10),
            suggested_expert: Some("it".into()),
            ..ReviewItem::default()
        }];
        for name in ["q.csv", "q.jsonl"] {
            let p = dir.path().join(name);
            write_queue(&p, &items).unwrap();
            assert_eq!(read_queue(&p).unwrap(), items, "{name}");
        }
    }
}
