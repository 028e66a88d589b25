//! Labelled examples and their file formats: JSONL and CSV with `text` and
//! `label` columns (any label set), read for imports and frozen test sets.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CurateError, io};

/// Where an example's label came from, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSource {
    /// A human reviewer's label from the review queue.
    Review,
    /// A corrected expert given with feedback.
    Correction,
    /// The logged route, confirmed by positive feedback.
    PositiveFeedback,
    /// An external labelled dataset.
    Import,
    /// A teacher model's top label for an unlabelled query (`distill`).
    Teacher,
}

impl LabelSource {
    /// Name used in manifests and files.
    pub fn as_str(self) -> &'static str {
        match self {
            LabelSource::Review => "review",
            LabelSource::Correction => "correction",
            LabelSource::PositiveFeedback => "positive_feedback",
            LabelSource::Import => "import",
            LabelSource::Teacher => "teacher",
        }
    }
}

/// One labelled text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// The query.
    pub text: String,
    /// Its label (an expert name for the router task).
    pub label: String,
    /// Where the label came from.
    pub source: LabelSource,
    /// The logged request it came from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

#[derive(Deserialize)]
struct Row {
    text: Option<String>,
    label: Option<serde_json::Value>,
    /// A label source written by curation; other values (free-text
    /// provenance of external files) are ignored.
    #[serde(default)]
    source: Option<serde_json::Value>,
    #[serde(default)]
    request_id: Option<String>,
}

fn parse_error(path: &Path, line: usize, reason: impl Into<String>) -> CurateError {
    CurateError::Parse {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

fn label_string(v: serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Which columns (CSV) or fields (JSONL) hold the text and the label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Columns {
    /// Text column.
    pub text: String,
    /// Label column.
    pub label: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            text: "text".into(),
            label: "label".into(),
        }
    }
}

/// Read labelled examples from a `.jsonl` or `.csv` file with `text` and
/// `label` columns; rows without a source are tagged `default_source`.
///
/// # Errors
/// A missing file, a row without `text` or `label` (with its line), an
/// unsupported extension.
pub fn read_examples(path: &Path, default_source: LabelSource) -> Result<Vec<Example>, CurateError> {
    read_examples_with(path, default_source, &Columns::default())
}

/// [`read_examples`] with other column names (e.g. HWU64's `scenario` as the label).
///
/// # Errors
/// As [`read_examples`].
pub fn read_examples_with(
    path: &Path,
    default_source: LabelSource,
    columns: &Columns,
) -> Result<Vec<Example>, CurateError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut out = Vec::new();
    match ext.as_str() {
        "jsonl" | "json" => {
            for (i, line) in BufReader::new(file).lines().enumerate() {
                let line = line.map_err(io(path))?;
                if line.trim().is_empty() {
                    continue;
                }
                let mut value: serde_json::Value =
                    serde_json::from_str(&line).map_err(|e| parse_error(path, i + 1, e.to_string()))?;
                if let Some(obj) = value.as_object_mut() {
                    // Copied before any is moved: one column may serve as both.
                    let moved: Vec<(&str, Option<serde_json::Value>)> =
                        [(&columns.text, "text"), (&columns.label, "label")]
                            .into_iter()
                            .filter(|(from, to)| from.as_str() != *to)
                            .map(|(from, to)| (to, obj.get(from.as_str()).cloned()))
                            .collect();
                    for from in [&columns.text, &columns.label] {
                        if from != "text" && from != "label" {
                            obj.remove(from.as_str());
                        }
                    }
                    for (to, v) in moved {
                        if let Some(v) = v {
                            obj.insert(to.into(), v);
                        }
                    }
                }
                let row: Row = serde_json::from_value(value).map_err(|e| parse_error(path, i + 1, e.to_string()))?;
                out.push(example(path, i + 1, row, default_source)?);
            }
        }
        "csv" | "tsv" => {
            let mut reader = csv::ReaderBuilder::new()
                .delimiter(if ext == "tsv" { b'\t' } else { b',' })
                .from_reader(file);
            let headers = reader
                .headers()
                .map_err(|e| parse_error(path, 1, e.to_string()))?
                .clone();
            for name in [&columns.text, &columns.label] {
                if !headers.iter().any(|h| h == name) {
                    return Err(parse_error(path, 1, format!("no `{name}` column in the header")));
                }
            }
            for (i, record) in reader.records().enumerate() {
                let record = record.map_err(|e| parse_error(path, i + 2, e.to_string()))?;
                let get = |name: &str| {
                    headers
                        .iter()
                        .position(|h| h == name)
                        .and_then(|p| record.get(p))
                        .map(str::to_string)
                        .filter(|s| !s.is_empty())
                };
                let row = Row {
                    text: get(&columns.text),
                    label: get(&columns.label).map(serde_json::Value::String),
                    source: None,
                    request_id: get("request_id"),
                };
                out.push(example(path, i + 2, row, default_source)?);
            }
        }
        other => {
            return Err(parse_error(
                path,
                0,
                format!("unsupported file type `.{other}`; use .jsonl or .csv with `text` and `label` columns"),
            ));
        }
    }
    Ok(out)
}

fn example(path: &Path, line: usize, row: Row, default_source: LabelSource) -> Result<Example, CurateError> {
    let text = row
        .text
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| parse_error(path, line, "missing or empty `text`"))?;
    let label = row
        .label
        .and_then(label_string)
        .filter(|l| !l.trim().is_empty())
        .ok_or_else(|| parse_error(path, line, "missing or empty `label`"))?;
    Ok(Example {
        text,
        label: label.trim().to_string(),
        source: row
            .source
            .and_then(|v| serde_json::from_value::<LabelSource>(v).ok())
            .unwrap_or(default_source),
        request_id: row.request_id,
    })
}

/// The `text_column` of every row of a JSONL or CSV file (other columns,
/// labels included, are ignored): unlabelled queries.
///
/// # Errors
/// An unreadable file, or a row without the column.
pub fn read_texts(path: &Path, text_column: &str) -> Result<Vec<String>, CurateError> {
    let columns = Columns {
        text: text_column.into(),
        label: text_column.into(),
    };
    Ok(read_examples_with(path, LabelSource::Import, &columns)?
        .into_iter()
        .map(|e| e.text)
        .collect())
}

/// Examples per label.
pub fn label_counts<'a>(examples: impl IntoIterator<Item = &'a Example>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for e in examples {
        *counts.entry(e.label.clone()).or_default() += 1;
    }
    counts
}

/// Examples per label source.
pub fn source_counts<'a>(examples: impl IntoIterator<Item = &'a Example>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for e in examples {
        *counts.entry(e.source.as_str().to_string()).or_default() += 1;
    }
    counts
}

/// A file written by curation, for the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WrittenFile {
    /// Path relative to the output folder.
    pub path: PathBuf,
    /// Rows written.
    pub rows: usize,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_jsonl_and_csv_with_any_labels() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("a.jsonl");
        std::fs::write(
            &j,
            "{\"text\":\"hi\",\"label\":\"greet\"}\n\n{\"text\":\"x\",\"label\":7}\n",
        )
        .unwrap();
        let rows = read_examples(&j, LabelSource::Import).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].label, "7");
        let c = dir.path().join("b.csv");
        std::fs::write(&c, "id,text,label\n1,\"hello, world\",greet\n").unwrap();
        let rows = read_examples(&c, LabelSource::Import).unwrap();
        assert_eq!(rows[0].text, "hello, world");
        assert_eq!(rows[0].source, LabelSource::Import);
        let other = Columns {
            text: "text".into(),
            label: "id".into(),
        };
        assert_eq!(
            read_examples_with(&c, LabelSource::Import, &other).unwrap()[0].label,
            "1"
        );
        std::fs::write(&j, "{\"query\":\"hi\",\"scenario\":\"greet\"}\n").unwrap();
        let hwu = Columns {
            text: "query".into(),
            label: "scenario".into(),
        };
        let rows = read_examples_with(&j, LabelSource::Import, &hwu).unwrap();
        assert_eq!((rows[0].text.as_str(), rows[0].label.as_str()), ("hi", "greet"));
        // Texts alone, from any column, of JSONL (a curated split) and CSV alike.
        std::fs::write(&j, "{\"text\":\"hi\",\"label\":\"greet\",\"source\":\"review\"}\n").unwrap();
        assert_eq!(read_texts(&j, "text").unwrap(), ["hi"]);
        std::fs::write(&j, "{\"query\":\"yo\"}\n").unwrap();
        assert_eq!(read_texts(&j, "query").unwrap(), ["yo"]);
        assert_eq!(read_texts(&c, "text").unwrap(), ["hello, world"]);
    }

    #[test]
    fn bad_rows_say_where_and_what() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("a.jsonl");
        std::fs::write(&j, "{\"text\":\"hi\",\"label\":\"greet\"}\n{\"text\":\"no label\"}\n").unwrap();
        let err = read_examples(&j, LabelSource::Import).unwrap_err().to_string();
        assert!(err.contains(":2") && err.contains("label"), "{err}");
        let c = dir.path().join("b.csv");
        std::fs::write(&c, "query,intent\nq,i\n").unwrap();
        let err = read_examples(&c, LabelSource::Import).unwrap_err().to_string();
        assert!(err.contains("no `text` column"), "{err}");
    }
}
