//! Text similarity for near-duplicate detection: normalisation, character
//! shingles, Jaccard similarity, and a MinHash + LSH index that finds
//! near-duplicate candidates without comparing every pair.
//!
//! Used by the pipeline (a rephrased query within a session is an implicit
//! "unsatisfied" signal) and by curation (near-duplicate removal and the
//! train/test leakage check). Hashes are fixed functions (FNV-1a and
//! splitmix64), so results are the same on every machine and every run.

use std::collections::{BTreeSet, HashMap};

/// Characters per shingle for near-duplicate detection: 5 characters catch
/// reordered or lightly edited sentences while short common words alone do
/// not make two queries similar.
pub const DEFAULT_SHINGLE: usize = 5;
/// MinHash permutations: 64 bands' worth of precision at negligible cost
/// for query-length texts.
const NUM_PERM: usize = 64;
/// LSH rows per band; with 16 bands of 4 rows, pairs at Jaccard 0.5 become
/// candidates with probability ~0.65 and pairs at 0.8 with probability ~0.9999.
const ROWS_PER_BAND: usize = 4;

/// Lowercase, keep letters and digits, collapse everything else to single
/// spaces. Two texts that differ only in case, punctuation or spacing
/// normalise to the same string (exact duplicates for curation).
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.extend(c.to_lowercase());
        } else {
            space = true;
        }
    }
    out
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Hashed character `n`-grams of the normalised text (the whole text when
/// it is shorter than `n`; empty for an empty text).
pub fn shingles(text: &str, n: usize) -> BTreeSet<u64> {
    let norm = normalize(text);
    let chars: Vec<char> = norm.chars().collect();
    let n = n.max(1);
    if chars.is_empty() {
        return BTreeSet::new();
    }
    if chars.len() <= n {
        return BTreeSet::from([fnv1a(norm.as_bytes())]);
    }
    chars
        .windows(n)
        .map(|w| fnv1a(w.iter().collect::<String>().as_bytes()))
        .collect()
}

/// Jaccard similarity of two shingle sets (1.0 for two empty sets).
pub fn jaccard(a: &BTreeSet<u64>, b: &BTreeSet<u64>) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let inter = a.intersection(b).count();
    let union = a.len() + b.len() - inter;
    inter as f64 / union as f64
}

/// Jaccard similarity of two texts over `n`-character shingles.
pub fn text_similarity(a: &str, b: &str, n: usize) -> f64 {
    jaccard(&shingles(a, n), &shingles(b, n))
}

fn signature(set: &BTreeSet<u64>) -> [u64; NUM_PERM] {
    let mut sig = [u64::MAX; NUM_PERM];
    for &x in set {
        for (i, slot) in sig.iter_mut().enumerate() {
            let h = splitmix64(x ^ splitmix64(i as u64 + 1));
            if h < *slot {
                *slot = h;
            }
        }
    }
    sig
}

/// A MinHash LSH index over texts, answering "which indexed texts are at
/// least `threshold` similar to this one" with exact Jaccard verification
/// of the LSH candidates.
#[derive(Debug)]
pub struct NearDupIndex {
    shingle: usize,
    threshold: f64,
    sets: Vec<BTreeSet<u64>>,
    buckets: HashMap<(usize, u64), Vec<usize>>,
}

impl NearDupIndex {
    /// An empty index with `n`-character shingles and a Jaccard `threshold`.
    pub fn new(shingle: usize, threshold: f64) -> Self {
        Self {
            shingle,
            threshold,
            sets: Vec::new(),
            buckets: HashMap::new(),
        }
    }

    /// Number of indexed texts.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    fn band_keys(sig: &[u64; NUM_PERM]) -> impl Iterator<Item = (usize, u64)> + '_ {
        sig.chunks(ROWS_PER_BAND)
            .enumerate()
            .map(|(band, rows)| (band, rows.iter().fold(0u64, |h, r| splitmix64(h ^ r))))
    }

    /// Index `text`; returns its position.
    pub fn insert(&mut self, text: &str) -> usize {
        let set = shingles(text, self.shingle);
        let id = self.sets.len();
        for key in Self::band_keys(&signature(&set)) {
            self.buckets.entry(key).or_default().push(id);
        }
        self.sets.push(set);
        id
    }

    /// Indexed texts whose similarity to `text` is at least the threshold,
    /// with their similarity, best first.
    pub fn matches(&self, text: &str) -> Vec<(usize, f64)> {
        let set = shingles(text, self.shingle);
        let mut seen = BTreeSet::new();
        for key in Self::band_keys(&signature(&set)) {
            if let Some(ids) = self.buckets.get(&key) {
                seen.extend(ids.iter().copied());
            }
        }
        let mut out: Vec<(usize, f64)> = seen
            .into_iter()
            .map(|id| (id, jaccard(&set, &self.sets[id])))
            .filter(|(_, s)| *s >= self.threshold)
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_ignores_case_punctuation_and_spacing() {
        assert_eq!(normalize("  Reset my PASSWORD, please!! "), "reset my password please");
        assert_eq!(
            normalize("Reset my password please"),
            normalize("reset   my password... please")
        );
    }

    #[test]
    fn similarity_separates_rephrasings_from_unrelated_text() {
        let a = "how do i reset my vpn password";
        assert!(text_similarity(a, "how can i reset my vpn password?", 5) > 0.6);
        assert!(text_similarity(a, "when is the next payroll date", 5) < 0.1);
        assert_eq!(text_similarity("", "", 5), 1.0);
        assert_eq!(text_similarity("hi", "hi", 5), 1.0);
    }

    #[test]
    fn index_finds_near_duplicates_and_only_those() {
        let mut idx = NearDupIndex::new(5, 0.7);
        idx.insert("please book a meeting room for tomorrow at ten");
        idx.insert("what is the weather like in paris today");
        idx.insert("set an alarm for seven in the morning");
        let hits = idx.matches("Please book a meeting room for tomorrow at 10");
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].0, 0);
        assert!(idx.matches("order a pizza with extra cheese").is_empty());
    }

    #[test]
    fn lsh_recall_is_high_at_the_threshold() {
        // Every indexed text must find its own light edit (one word changed).
        let texts: Vec<String> = (0..200)
            .map(|i| format!("query number {i} about the quarterly budget review for team {}", i * 7))
            .collect();
        let mut idx = NearDupIndex::new(5, 0.6);
        for t in &texts {
            idx.insert(t);
        }
        let found = texts
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                idx.matches(&t.replace("quarterly", "annual"))
                    .iter()
                    .any(|(id, _)| id == i)
            })
            .count();
        assert!(found >= 198, "found {found} of 200");
    }
}
