//! The output rail's PII filter: redacts entities in a streamed answer,
//! holding back only the trailing word and any run of number-like groups
//! that could still grow into an entity.

use std::time::Instant;

use super::pii::{self, PiiSpan, Redactor};
use super::settings::PiiSpec;
use super::{OutputFilter, RailDecision, RailVerdict};

/// Whether `word` could be one group of a spaced number-like entity
/// (card, phone, IBAN, SSN): it has a digit, or is a short upper-case
/// alphanumeric group inside an IBAN.
fn numberish(word: &str) -> bool {
    let allowed = word.chars().all(|c| c.is_ascii_alphanumeric() || "()+-.:/".contains(c));
    allowed
        && (word.chars().any(|c| c.is_ascii_digit())
            || (word.len() <= 4 && word.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())))
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
        // A finished run of number groups cannot grow after a plain word.
        if !numberish(&buf[start..]) {
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
        if word.is_empty() || !numberish(word) {
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
        let spans: Vec<PiiSpan> = pii::detect(&head)
            .into_iter()
            .filter(|s| !self.spec.output_allow.contains(&s.kind))
            .collect();
        self.redacted += spans.len();
        let out = self.redactor.apply(&head, &spans);
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
