//! Documents of a corpus folder (Markdown, plain text, HTML) and their
//! chunks: split along the document's structure (sections under headings,
//! then paragraphs), packed up to a size cap, with an overlap only where a
//! section is too long for one chunk.

use std::path::{Path, PathBuf};

use pulldown_cmark::{Event, HeadingLevel, Parser, Tag, TagEnd};
use serde::{Deserialize, Serialize};

pub use crate::config::retrieval::{DEFAULT_CHUNK_CHARS, DEFAULT_OVERLAP_CHARS};

/// A section: its heading path and its paragraphs.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    /// Headings above it, outermost first, joined with ` > ` (empty before the first heading).
    pub heading: String,
    /// Paragraphs, list items and code blocks, in order.
    pub paragraphs: Vec<String>,
}

/// A parsed document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// `<expert>/<path without extension>`.
    pub id: String,
    /// First top-level heading, else the file name.
    pub title: String,
    /// Sections in order.
    pub sections: Vec<Section>,
}

/// One retrievable piece of a document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// Document id.
    pub doc_id: String,
    /// Document title.
    pub title: String,
    /// `<doc id>#<n>`.
    pub chunk_id: String,
    /// Heading path of its section.
    pub heading: String,
    /// The text (section heading first, then the paragraphs).
    pub text: String,
}

/// Errors reading a corpus.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// A file or folder cannot be read.
    #[error("cannot read {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An HTML file could not be converted to text.
    #[error("cannot convert {path} to text: {reason}")]
    Html {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CorpusError + '_ {
    move |source| CorpusError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file kinds read, by extension.
fn kind(path: &Path) -> Option<&'static str> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "md" | "markdown" => Some("md"),
        "txt" | "text" => Some("txt"),
        "html" | "htm" => Some("html"),
        _ => None,
    }
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), CorpusError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|e| e.map(|e| e.path()).map_err(io(dir)))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files(&path, out)?;
        } else if kind(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// Read every Markdown, text and HTML file under `dir` (recursively, in
/// path order) as documents of `expert`.
///
/// # Errors
/// Unreadable files or folders.
pub fn load_corpus(dir: &Path, expert: &str) -> Result<Vec<Document>, CorpusError> {
    let mut paths = Vec::new();
    files(dir, &mut paths)?;
    let mut docs = Vec::with_capacity(paths.len());
    for path in paths {
        let rel = path.strip_prefix(dir).unwrap_or(&path).with_extension("");
        let id = format!("{expert}/{}", rel.to_string_lossy().replace('\\', "/"));
        let stem = rel
            .file_name()
            .map_or_else(|| id.clone(), |s| s.to_string_lossy().replace(['-', '_'], " "));
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let doc = match kind(&path) {
            Some("md") => parse_markdown(&id, &stem, &text),
            Some("html") => {
                let md = html2text::from_read(text.as_bytes(), 10_000).map_err(|e| CorpusError::Html {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                parse_markdown(&id, &stem, &md)
            }
            _ => parse_text(&id, &stem, &text),
        };
        if doc.sections.iter().any(|s| !s.paragraphs.is_empty()) {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// Plain text: paragraphs are separated by blank lines; one section.
pub fn parse_text(id: &str, fallback_title: &str, text: &str) -> Document {
    let paragraphs = text
        .split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect();
    Document {
        id: id.into(),
        title: fallback_title.into(),
        sections: vec![Section {
            heading: String::new(),
            paragraphs,
        }],
    }
}

fn level(l: HeadingLevel) -> usize {
    l as usize
}

/// Markdown: headings open sections; paragraphs, list items and code
/// blocks are the units a chunk packs.
pub fn parse_markdown(id: &str, fallback_title: &str, text: &str) -> Document {
    let mut title: Option<String> = None;
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut sections = vec![Section {
        heading: String::new(),
        paragraphs: Vec::new(),
    }];
    let mut buf = String::new();
    let mut in_heading: Option<usize> = None;
    // Depth of open blocks whose text is collected (paragraph, item, code).
    let mut depth = 0usize;
    let flush = |buf: &mut String, sections: &mut Vec<Section>| {
        let p = buf.split_whitespace().collect::<Vec<_>>().join(" ");
        if !p.is_empty()
            && let Some(s) = sections.last_mut()
        {
            s.paragraphs.push(p);
        }
        buf.clear();
    };
    for event in Parser::new(text) {
        match event {
            Event::Start(Tag::Heading { level: l, .. }) => {
                flush(&mut buf, &mut sections);
                in_heading = Some(level(l));
            }
            Event::End(TagEnd::Heading(_)) => {
                let l = in_heading.take().unwrap_or(1);
                let h = buf.split_whitespace().collect::<Vec<_>>().join(" ");
                buf.clear();
                if l == 1 && title.is_none() {
                    title = Some(h.clone());
                }
                path.retain(|(pl, _)| *pl < l);
                path.push((l, h));
                let heading = path
                    .iter()
                    .filter(|(pl, _)| *pl > 1)
                    .map(|(_, h)| h.as_str())
                    .collect::<Vec<_>>()
                    .join(" > ");
                sections.push(Section {
                    heading,
                    paragraphs: Vec::new(),
                });
            }
            Event::Start(Tag::Paragraph | Tag::Item | Tag::CodeBlock(_) | Tag::TableRow) => {
                if depth == 0 {
                    flush(&mut buf, &mut sections);
                }
                depth += 1;
            }
            Event::End(TagEnd::Paragraph | TagEnd::Item | TagEnd::CodeBlock | TagEnd::TableRow) => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    flush(&mut buf, &mut sections);
                }
            }
            Event::Text(t) | Event::Code(t) => {
                buf.push_str(&t);
            }
            Event::SoftBreak | Event::HardBreak => buf.push(' '),
            Event::End(TagEnd::TableCell) => buf.push_str(" | "),
            _ => {}
        }
    }
    flush(&mut buf, &mut sections);
    sections.retain(|s| !s.paragraphs.is_empty());
    Document {
        id: id.into(),
        title: title.unwrap_or_else(|| fallback_title.into()),
        sections,
    }
}

/// How documents are cut.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChunkSpec {
    /// Largest chunk in characters.
    pub max_chars: usize,
    /// Characters of the previous chunk repeated at the start of the next
    /// one, when a section spans several chunks.
    pub overlap_chars: usize,
}

impl Default for ChunkSpec {
    fn default() -> Self {
        Self {
            max_chars: DEFAULT_CHUNK_CHARS,
            overlap_chars: DEFAULT_OVERLAP_CHARS,
        }
    }
}

/// Split `text` into pieces of at most `max` characters, at sentence ends,
/// else at spaces, else anywhere.
fn pieces(text: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while rest.chars().count() > max {
        let limit = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
        let head = &rest[..limit];
        let cut = head
            .rfind(". ")
            .map(|i| i + 1)
            .filter(|&i| i > limit / 3)
            .or_else(|| head.rfind(' ').filter(|&i| i > 0))
            .unwrap_or(limit);
        out.push(rest[..cut].trim().to_string());
        rest = rest[cut..].trim_start();
    }
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

/// The last `n` characters of `text`, starting at a word.
fn tail(text: &str, n: usize) -> &str {
    let count = text.chars().count();
    if count <= n {
        return text;
    }
    let start = text.char_indices().nth(count - n).map_or(0, |(i, _)| i);
    match text[start..].find(' ') {
        Some(sp) => text[start + sp..].trim_start(),
        None => &text[start..],
    }
}

/// The chunks of `doc`: each section's paragraphs packed up to
/// `spec.max_chars` (a paragraph too long alone is split at sentences);
/// chunks never span two sections; consecutive chunks of one section share
/// `spec.overlap_chars` characters.
pub fn chunk(doc: &Document, spec: ChunkSpec) -> Vec<Chunk> {
    let max = spec.max_chars.max(40);
    let overlap = spec.overlap_chars.min(max / 2);
    let mut out: Vec<Chunk> = Vec::new();
    for section in &doc.sections {
        let prefix = if section.heading.is_empty() {
            String::new()
        } else {
            format!("{}\n", section.heading)
        };
        let budget = max.saturating_sub(prefix.chars().count()).max(20);
        let units: Vec<String> = section.paragraphs.iter().flat_map(|p| pieces(p, budget)).collect();
        let mut body = String::new();
        let push = |body: &str, out: &mut Vec<Chunk>| {
            out.push(Chunk {
                doc_id: doc.id.clone(),
                title: doc.title.clone(),
                chunk_id: format!("{}#{}", doc.id, out.len()),
                heading: section.heading.clone(),
                text: format!("{prefix}{body}"),
            });
        };
        for unit in units {
            let joined = body.chars().count() + unit.chars().count() + 1;
            if !body.is_empty() && joined > budget {
                push(&body, &mut out);
                let carried = tail(&body, overlap).to_string();
                body = if carried.is_empty() || carried.chars().count() + unit.chars().count() + 1 > budget {
                    String::new()
                } else {
                    carried
                };
            }
            if !body.is_empty() {
                body.push('\n');
            }
            body.push_str(&unit);
        }
        if !body.is_empty() {
            push(&body, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Vacation policy\n\nIntro paragraph.\n\n## Allowance\n\nYou get 25 days.\n\n- item one\n- item two\n\n## Carry-over\n\nFive days carry over.\n";

    #[test]
    fn markdown_sections_follow_headings_and_the_title_is_the_first_h1() {
        let d = parse_markdown("hr/vacation", "vacation", DOC);
        assert_eq!(d.title, "Vacation policy");
        let headings: Vec<&str> = d.sections.iter().map(|s| s.heading.as_str()).collect();
        assert_eq!(headings, ["", "Allowance", "Carry-over"]);
        assert_eq!(d.sections[1].paragraphs, ["You get 25 days.", "item one", "item two"]);
    }

    #[test]
    fn chunks_never_span_sections_and_carry_their_heading() {
        let d = parse_markdown("hr/vacation", "vacation", DOC);
        let c = chunk(&d, ChunkSpec::default());
        assert_eq!(c.len(), 3);
        assert_eq!(c[1].text, "Allowance\nYou get 25 days.\nitem one\nitem two");
        assert_eq!(c[2].chunk_id, "hr/vacation#2");
        assert!(c.iter().all(|c| c.title == "Vacation policy"));
    }

    #[test]
    fn long_sections_split_under_the_cap_with_overlap() {
        let sentence = "Every employee earns vacation days each month of the year. ";
        let text = format!("# T\n\n## S\n\n{}\n\n{}\n", sentence.repeat(10), sentence.repeat(10));
        let d = parse_markdown("x/t", "t", &text);
        let spec = ChunkSpec {
            max_chars: 300,
            overlap_chars: 80,
        };
        let c = chunk(&d, spec);
        assert!(c.len() >= 4, "{}", c.len());
        for w in c.windows(2) {
            assert!(w[0].text.chars().count() <= 300, "{}", w[0].text.len());
            // The next chunk starts with the end of the previous one.
            let next_body = w[1].text.strip_prefix("S\n").unwrap();
            let first_words: String = next_body.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
            assert!(
                w[0].text.contains(&first_words),
                "{first_words:?} not in {:?}",
                w[0].text
            );
        }
        // Every sentence of the document is in some chunk.
        let all: String = c.iter().map(|c| c.text.clone()).collect();
        assert!(all.matches("each month").count() >= 20);
    }

    #[test]
    fn text_and_html_files_become_documents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a.txt"), "First para\nwraps.\n\nSecond para.").unwrap();
        std::fs::write(
            dir.path().join("sub/b.html"),
            "<html><body><h1>Printer guide</h1><h2>Jams</h2><p>Open tray <b>2</b>.</p><script>x()</script></body></html>",
        )
        .unwrap();
        std::fs::write(dir.path().join("skip.pdf"), "binary").unwrap();
        let docs = load_corpus(dir.path(), "it").unwrap();
        let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["it/a", "it/sub/b"]);
        assert_eq!(docs[0].sections[0].paragraphs, ["First para wraps.", "Second para."]);
        assert_eq!(docs[1].title, "Printer guide");
        let text: String = chunk(&docs[1], ChunkSpec::default())
            .iter()
            .map(|c| c.text.clone())
            .collect();
        assert!(text.contains("Jams") && text.contains("Open tray 2."), "{text}");
        assert!(!text.contains("x()"), "{text}");
    }
}
