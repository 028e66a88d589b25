//! One expert's index: BM25 over its chunks with tantivy (in memory,
//! English stemming), exact dense search over their sentence embeddings,
//! and reciprocal rank fusion of the two.

use std::collections::HashMap;

use tantivy::collector::TopDocs;
use tantivy::query::QueryParser;
use tantivy::schema::{IndexRecordOption, STORED, Schema, TextFieldIndexing, TextOptions, Value};
use tantivy::{Index, IndexReader, TantivyDocument, doc};

use super::chunk::Chunk;
pub use crate::config::retrieval::{DEFAULT_RRF_K, Mode};

/// Errors building or querying an index.
#[derive(Debug, thiserror::Error)]
#[error("search index failure")]
pub struct IndexError(#[from] tantivy::TantivyError);

/// Chunks, their BM25 index and their embeddings.
pub struct ExpertIndex {
    chunks: Vec<Chunk>,
    index: Index,
    reader: IndexReader,
    parser: QueryParser,
    ord: tantivy::schema::Field,
    /// Row-major `chunks.len() x dim` unit vectors.
    vectors: Vec<f32>,
    dim: usize,
}

impl std::fmt::Debug for ExpertIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertIndex")
            .field("chunks", &self.chunks.len())
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

/// Tantivy's smallest indexing memory budget per thread.
const WRITER_BYTES: usize = 15_000_000;

impl ExpertIndex {
    /// Index `chunks` whose embeddings are `vectors` (`dim` each, in order;
    /// empty `vectors` = no dense search).
    ///
    /// # Errors
    /// Tantivy failures.
    pub fn build(chunks: Vec<Chunk>, vectors: Vec<f32>, dim: usize) -> Result<Self, IndexError> {
        let mut schema = Schema::builder();
        let text_options = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("en_stem")
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        );
        let title = schema.add_text_field("title", text_options.clone());
        let body = schema.add_text_field("body", text_options);
        let ord = schema.add_u64_field("ord", STORED);
        let index = Index::create_in_ram(schema.build());
        let mut writer: tantivy::IndexWriter = index.writer_with_num_threads(1, WRITER_BYTES)?;
        for (i, c) in chunks.iter().enumerate() {
            writer.add_document(doc!(title => c.title.as_str(), body => c.text.as_str(), ord => i as u64))?;
        }
        writer.commit()?;
        let reader = index.reader()?;
        let mut parser = QueryParser::for_index(&index, vec![title, body]);
        parser.set_field_boost(title, 0.5);
        Ok(Self {
            chunks,
            index,
            reader,
            parser,
            ord,
            vectors,
            dim,
        })
    }

    /// The chunks, in index order.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Whether dense search is available.
    pub fn has_vectors(&self) -> bool {
        self.dim > 0 && self.vectors.len() == self.chunks.len() * self.dim
    }

    /// Best `k` chunks by BM25: (chunk position, score). Query syntax
    /// errors are ignored (the query is user text, not a query language).
    ///
    /// # Errors
    /// Tantivy failures.
    pub fn bm25(&self, query: &str, k: usize) -> Result<Vec<(usize, f32)>, IndexError> {
        let (q, _ignored) = self.parser.parse_query_lenient(query);
        let searcher = self.reader.searcher();
        let top = searcher.search(&q, &TopDocs::with_limit(k.max(1)).order_by_score())?;
        let mut out = Vec::with_capacity(top.len());
        for (score, address) in top {
            let d: TantivyDocument = searcher.doc(address)?;
            if let Some(i) = d.get_first(self.ord).and_then(|v| v.as_u64()) {
                out.push((i as usize, score));
            }
        }
        Ok(out)
    }

    /// Best `k` chunks by cosine similarity to the unit vector `query`.
    pub fn dense(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        if !self.has_vectors() || query.len() != self.dim {
            return Vec::new();
        }
        let mut scored: Vec<(usize, f32)> = self
            .vectors
            .chunks_exact(self.dim)
            .map(|v| v.iter().zip(query).map(|(a, b)| a * b).sum::<f32>())
            .enumerate()
            .collect();
        let k = k.min(scored.len());
        if k == 0 {
            return Vec::new();
        }
        scored.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        scored.truncate(k);
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored
    }

    /// The index's tantivy handle (for statistics).
    pub fn tantivy(&self) -> &Index {
        &self.index
    }
}

/// Reciprocal rank fusion: each list adds `1 / (k + rank)` (rank from 1)
/// to its items; best first, ties by first appearance.
pub fn rrf(lists: &[&[(usize, f32)]], k: f32) -> Vec<(usize, f32)> {
    let mut score: HashMap<usize, (f32, usize)> = HashMap::new();
    let mut seen = 0usize;
    for list in lists {
        for (rank, (item, _)) in list.iter().enumerate() {
            let e = score.entry(*item).or_insert_with(|| {
                seen += 1;
                (0.0, seen)
            });
            e.0 += 1.0 / (k + rank as f32 + 1.0);
        }
    }
    let mut out: Vec<(usize, f32, usize)> = score.into_iter().map(|(i, (s, first))| (i, s, first)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
    out.into_iter().map(|(i, s, _)| (i, s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: usize, text: &str) -> Chunk {
        Chunk {
            doc_id: format!("d{i}"),
            title: format!("Doc {i}"),
            chunk_id: format!("d{i}#0"),
            heading: String::new(),
            text: text.into(),
        }
    }

    #[test]
    fn rrf_rewards_items_both_lists_rank_high() {
        let bm25 = [(1, 9.0), (2, 5.0), (3, 1.0)];
        let dense = [(3, 0.9), (1, 0.8), (4, 0.1)];
        let fused = rrf(&[&bm25, &dense], 60.0);
        let order: Vec<usize> = fused.iter().map(|(i, _)| *i).collect();
        // 1: ranks 1 and 2; 3: ranks 3 and 1; 2 and 4 appear once.
        assert_eq!(order, [1, 3, 2, 4]);
        assert!((fused[0].1 - (1.0 / 61.0 + 1.0 / 62.0)).abs() < 1e-6);
        // One list alone keeps its order.
        let alone: Vec<usize> = rrf(&[&bm25], 60.0).iter().map(|(i, _)| *i).collect();
        assert_eq!(alone, [1, 2, 3]);
    }

    #[test]
    fn bm25_stems_and_ranks_the_matching_chunk_first() {
        let idx = ExpertIndex::build(
            vec![
                chunk(0, "Printers on every floor release jobs with your badge."),
                chunk(1, "Vacation days accrue monthly; 25 days per year."),
                chunk(2, "Expense claims are paid with payroll."),
            ],
            Vec::new(),
            0,
        )
        .unwrap();
        let hits = idx.bm25("how many vacation day do I get?", 3).unwrap();
        assert_eq!(hits[0].0, 1);
        // Query-language characters in user text are not errors.
        assert!(idx.bm25("printer AND (jam OR \"", 3).is_ok());
        assert!(idx.dense(&[1.0], 3).is_empty());
    }

    #[test]
    fn dense_search_is_exact_cosine_order() {
        let v = vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8];
        let idx = ExpertIndex::build(vec![chunk(0, "a"), chunk(1, "b"), chunk(2, "c")], v, 2).unwrap();
        let hits = idx.dense(&[0.0, 1.0], 2);
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), [1, 2]);
        assert!((hits[1].1 - 0.8).abs() < 1e-6);
    }
}
