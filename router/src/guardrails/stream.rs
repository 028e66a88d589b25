//! The output rail's PII filter: redacts entities in a streamed answer,
//! holding back only the trailing word and any run of number-like groups
//! that could still grow into an entity.

use std::time::Instant;

use super::pii::Redactor;
use super::settings::PiiSpec;
use super::{OutputFilter, RailDecision, RailVerdict};

/// Whether a number-like group (card, phone, IBAN, SSN) may hold `c`.
fn group_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "()+-.:/".contains(c)
}

/// Whether `word` could be one group of a spaced number-like entity
/// (card, phone, IBAN, SSN): it has a digit, or is a short upper-case
/// alphanumeric group inside an IBAN.
fn numberish(word: &str) -> bool {
    let allowed = word.chars().all(group_char);
    allowed
        && (word.chars().any(|c| c.is_ascii_digit())
            || (word.len() <= 4 && word.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())))
}

/// Where the leading run of characters a number-like group may hold ends.
fn numberish_head(word: &str) -> usize {
    word.char_indices()
        .find(|(_, c)| !group_char(*c))
        .map_or(word.len(), |(i, _)| i)
}

/// Where the number-like end of `word` starts: after its last character
/// that no number-like group holds, when no entity can hold that character
/// either (not a letter or digit of any script, not `_ % @` of an e-mail
/// address): an entity can start there and none can span it. `word.len()`
/// when there is none.
fn numberish_tail(word: &str) -> usize {
    let Some((i, c)) = word.char_indices().rev().find(|(_, c)| !group_char(*c)) else {
        return word.len();
    };
    let start = i + c.len_utf8();
    if c.is_alphanumeric() || "_%@".contains(c) || start >= word.len() || !numberish(&word[start..]) {
        return word.len();
    }
    start
}

/// Start of the tail of `buf` that must be held back: the unfinished last
/// word, and any run of number-like groups before it.
fn hold_start(buf: &str) -> usize {
    let mut start = buf.len();
    // The last word is unfinished unless the buffer ends in whitespace.
    if !buf.ends_with(char::is_whitespace) {
        match buf.rfind(char::is_whitespace) {
            Some(i) => start = i + 1,
            None => return 0,
        }
        // A finished run of number groups cannot grow after a plain word;
        // it can after one that begins number-like (`0100<`: the run
        // `+1 415 555 0100` may be an entity that ends inside it).
        let word = &buf[start..];
        if !numberish(word) && !numberish(&word[..numberish_head(word)]) {
            return start;
        }
    }
    // Extend back over number-like groups separated by single spaces.
    loop {
        let before = buf[..start].trim_end_matches(' ');
        if before.len() + 1 != start && start != buf.len() {
            break; // more than one space: a new run
        }
        let word_start = before.rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let word = &before[word_start..];
        if word.is_empty() {
            break;
        }
        if !numberish(word) {
            // An entity may start inside a word, after punctuation
            // (`>DE89 3704 ...`): hold back the number-like end of it.
            let tail = numberish_tail(word);
            if tail < word.len() {
                start = word_start + tail;
            }
            break;
        }
        start = word_start;
        if start == 0 {
            break;
        }
    }
    start
}

/// Redacts PII in a streamed answer: releases text as soon as no entity can
/// still be forming in it.
pub struct PiiStreamFilter {
    spec: PiiSpec,
    buf: String,
    redactor: Redactor,
    redacted: usize,
    spent_ms: f64,
}

impl PiiStreamFilter {
    /// A filter with `spec`'s policies.
    pub fn new(spec: PiiSpec) -> Self {
        Self {
            spec,
            buf: String::new(),
            redactor: Redactor::default(),
            redacted: 0,
            spent_ms: 0.0,
        }
    }

    fn release(&mut self, upto: usize) -> String {
        let start = Instant::now();
        let head: String = self.buf.drain(..upto).collect();
        let allow = &self.spec.output_allow;
        let (out, spans) = self.redactor.redact(&head, |s| !allow.contains(&s.kind));
        self.redacted += spans.len();
        self.spent_ms += start.elapsed().as_secs_f64() * 1e3;
        out
    }
}

impl OutputFilter for PiiStreamFilter {
    fn push(&mut self, delta: &str) -> String {
        self.buf.push_str(delta);
        let upto = hold_start(&self.buf);
        if upto == 0 {
            return String::new();
        }
        self.release(upto)
    }

    fn finish(&mut self) -> String {
        let n = self.buf.len();
        self.release(n)
    }

    fn verdicts(&self) -> Vec<RailVerdict> {
        vec![RailVerdict {
            rail: "pii_output".into(),
            decision: if self.redacted > 0 {
                RailDecision::Redact
            } else {
                RailDecision::Allow
            },
            score: Some(self.redacted as f32),
            latency_ms: self.spent_ms,
        }]
    }
}
