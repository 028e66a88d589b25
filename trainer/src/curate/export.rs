//! Writing curated datasets: plain JSONL (`text`, `label`, `source`,
//! `request_id`), chat-format JSONL (system / user / assistant messages, the
//! label as the assistant's answer) and Parquet (same columns as the plain
//! JSONL, Snappy-compressed), each with its SHA-256 for the manifest.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use sha2::{Digest, Sha256};

use super::dataset::{Example, WrittenFile};
use super::{CurateError, io};

/// SHA-256 of a file, hex.
///
/// # Errors
/// The file cannot be read.
pub fn sha256_file(path: &Path) -> Result<String, CurateError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn written(dir: &Path, name: &str, rows: usize) -> Result<WrittenFile, CurateError> {
    Ok(WrittenFile {
        path: name.into(),
        rows,
        sha256: sha256_file(&dir.join(name))?,
    })
}

fn write_lines(dir: &Path, name: &str, lines: impl Iterator<Item = serde_json::Value>) -> Result<usize, CurateError> {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).map_err(io(&path))?;
    let mut w = BufWriter::new(file);
    let mut n = 0;
    for v in lines {
        writeln!(w, "{v}").map_err(io(&path))?;
        n += 1;
    }
    w.flush().map_err(io(&path))?;
    Ok(n)
}

/// `dir/name` as plain JSONL.
///
/// # Errors
/// I/O failures.
pub fn jsonl(dir: &Path, name: &str, examples: &[Example]) -> Result<WrittenFile, CurateError> {
    let rows = write_lines(
        dir,
        name,
        examples.iter().map(|e| {
            serde_json::json!({
                "text": e.text,
                "label": e.label,
                "source": e.source.as_str(),
                "request_id": e.request_id,
            })
        }),
    )?;
    written(dir, name, rows)
}

/// `dir/name` as chat-format JSONL with `system` as the system message.
///
/// # Errors
/// I/O failures.
pub fn chat_jsonl(dir: &Path, name: &str, examples: &[Example], system: &str) -> Result<WrittenFile, CurateError> {
    let rows = write_lines(
        dir,
        name,
        examples.iter().map(|e| {
            serde_json::json!({
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": e.text},
                    {"role": "assistant", "content": e.label},
                ],
                "label": e.label,
            })
        }),
    )?;
    written(dir, name, rows)
}

const PARQUET_SCHEMA: &str = "message example {
    REQUIRED BYTE_ARRAY text (UTF8);
    REQUIRED BYTE_ARRAY label (UTF8);
    REQUIRED BYTE_ARRAY source (UTF8);
    OPTIONAL BYTE_ARRAY request_id (UTF8);
}";

/// `dir/name` as Parquet (one row group).
///
/// # Errors
/// I/O or encoding failures.
pub fn parquet(dir: &Path, name: &str, examples: &[Example]) -> Result<WrittenFile, CurateError> {
    let path = dir.join(name);
    let schema = Arc::new(parse_message_type(PARQUET_SCHEMA)?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by("flywheel-trainer curate".into())
            .build(),
    );
    let file = std::fs::File::create(&path).map_err(io(&path))?;
    let mut writer = SerializedFileWriter::new(file, schema, props)?;
    let column = |f: fn(&Example) -> Option<&str>| -> (Vec<ByteArray>, Vec<i16>) {
        let mut values = Vec::new();
        let mut defs = Vec::new();
        for e in examples {
            match f(e) {
                Some(v) => {
                    values.push(ByteArray::from(v));
                    defs.push(1);
                }
                None => defs.push(0),
            }
        }
        (values, defs)
    };
    let columns = [
        (column(|e| Some(e.text.as_str())), false),
        (column(|e| Some(e.label.as_str())), false),
        (column(|e| Some(e.source.as_str())), false),
        (column(|e| e.request_id.as_deref()), true),
    ];
    let mut group = writer.next_row_group()?;
    for ((values, defs), optional) in &columns {
        let Some(mut col) = group.next_column()? else {
            break;
        };
        let defs = optional.then_some(defs.as_slice());
        col.typed::<ByteArrayType>().write_batch(values, defs, None)?;
        col.close()?;
    }
    group.close()?;
    writer.close()?;
    written(dir, name, examples.len())
}

#[cfg(test)]
mod tests {
    use parquet::file::reader::{FileReader, SerializedFileReader};

    use super::super::dataset::{LabelSource, read_examples};
    use super::*;

    fn examples() -> Vec<Example> {
        vec![
            Example {
                text: "play some jazz".into(),
                label: "music".into(),
                source: LabelSource::Import,
                request_id: None,
            },
            Example {
                text: "wake me at six".into(),
                label: "alarm".into(),
                source: LabelSource::Correction,
                request_id: Some("r1".into()),
            },
        ]
    }

    #[test]
    fn jsonl_round_trips_and_hashes_match_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = jsonl(dir.path(), "train.jsonl", &examples()).unwrap();
        assert_eq!(f.rows, 2);
        assert_eq!(f.sha256, sha256_file(&dir.path().join("train.jsonl")).unwrap());
        let back = read_examples(&dir.path().join("train.jsonl"), LabelSource::Import).unwrap();
        assert_eq!(back, examples());
    }

    #[test]
    fn chat_format_puts_the_label_in_the_assistant_turn() {
        let dir = tempfile::tempdir().unwrap();
        chat_jsonl(dir.path(), "c.jsonl", &examples(), "Route it.").unwrap();
        let text = std::fs::read_to_string(dir.path().join("c.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["messages"][0]["content"], "Route it.");
        assert_eq!(first["messages"][1]["content"], "play some jazz");
        assert_eq!(first["messages"][2]["role"], "assistant");
        assert_eq!(first["messages"][2]["content"], "music");
    }

    #[test]
    fn parquet_holds_every_row_and_column() {
        let dir = tempfile::tempdir().unwrap();
        parquet(dir.path(), "t.parquet", &examples()).unwrap();
        let reader = SerializedFileReader::new(std::fs::File::open(dir.path().join("t.parquet")).unwrap()).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 2);
        let rows: Vec<String> = reader
            .get_row_iter(None)
            .unwrap()
            .map(|r| r.unwrap().to_string())
            .collect();
        assert!(rows[1].contains("wake me at six") && rows[1].contains("r1"), "{rows:?}");
        assert!(rows[0].contains("request_id: null"), "{rows:?}");
    }
}
