//! Structured PII detection: e-mail addresses, phone numbers, credit-card
//! numbers (Luhn-checked), US SSNs, IBANs (mod-97-checked) and IP addresses.
//!
//! Detection is pattern + checksum, so it is fast (microseconds per query)
//! and precise on the entity types that have a checkable structure. Spans
//! are byte ranges into the text; overlapping matches resolve to the more
//! specific type (an IBAN or card number is not also reported as a phone).
//! Typed placeholders written by redaction (`<EMAIL_1>`) are not PII.

use std::net::Ipv6Addr;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// A kind of personal data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    /// E-mail address.
    Email,
    /// International bank account number (checksum-valid).
    Iban,
    /// Payment card number (Luhn-valid, 13-19 digits).
    CreditCard,
    /// US social security number (dashed or spaced, valid ranges).
    Ssn,
    /// IPv4 or IPv6 address.
    IpAddress,
    /// Phone number (7-15 digits with separators or a country code).
    Phone,
}

impl PiiKind {
    /// Placeholder tag, e.g. `EMAIL` for `<EMAIL_1>`.
    pub fn tag(self) -> &'static str {
        match self {
            PiiKind::Email => "EMAIL",
            PiiKind::Iban => "IBAN",
            PiiKind::CreditCard => "CREDIT_CARD",
            PiiKind::Ssn => "SSN",
            PiiKind::IpAddress => "IP_ADDRESS",
            PiiKind::Phone => "PHONE",
        }
    }
}

/// One detected entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PiiSpan {
    /// What it is.
    pub kind: PiiKind,
    /// Byte offset of its first character.
    pub start: usize,
    /// Byte offset after its last character.
    pub end: usize,
}

#[allow(clippy::expect_used)]
fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("PII patterns are valid regexes")
}

static EMAIL: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)\b[a-z0-9][a-z0-9._%+\-]*@[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,}\b"));
static IBAN: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"));
static CARD: LazyLock<Regex> = LazyLock::new(|| re(r"\b\d(?:[ \-]?\d){11,18}\b"));
static SSN: LazyLock<Regex> = LazyLock::new(|| re(r"\b(\d{3})([ \-])(\d{2})([ \-])(\d{4})\b"));
static IPV4: LazyLock<Regex> = LazyLock::new(|| re(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"));
static IPV6: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}"));
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)(?:\+\d{1,3}[ .\-]?(?:\(\d{1,4}\)[ .\-]?)?|\(\d{1,4}\)[ .\-]?|\b)(?:\d{7,15}|\d{1,5}(?:[ .\-]\d{1,4}){1,5})(?:\s?(?:x|ext\.?)\s?\d{1,5})?\b",
    )
});
/// Words that make a shorter digit group a phone number when they come just before it.
static PHONE_CUE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(phone|tel|telephone|mobile|cell|call|fax|number|contact|reach|dial|whatsapp|sms|text|messages?|answering|office|home)\b",
    )
});
/// Dates and timestamps (`2024-01-31 10`), which the phone pattern would
/// otherwise take for numbers.
static DATE_LIKE: LazyLock<Regex> = LazyLock::new(|| re(r"^(?:19|20)\d{2}[-./](?:0?[1-9]|1[0-2])[-./]\d{1,2}\b"));
/// How far before a number a cue word may be (characters).
const PHONE_CUE_WINDOW: usize = 40;

/// Luhn checksum over the digits of `s` (separators ignored).
pub fn luhn_valid(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if digits.len() < 2 {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616 IBAN check: length 15-34, country letters, mod 97 == 1.
pub fn iban_valid(s: &str) -> bool {
    let compact: String = s
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    if !(15..=34).contains(&compact.len()) || !compact.is_ascii() {
        return false;
    }
    let bytes = compact.as_bytes();
    if !bytes[..2].iter().all(u8::is_ascii_uppercase) || !bytes[2..4].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let rearranged = compact[4..].chars().chain(compact[..4].chars());
    let mut rem: u32 = 0;
    for c in rearranged {
        let v = match c {
            '0'..='9' => c as u32 - '0' as u32,
            'A'..='Z' => c as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn ssn_valid(area: &str, group: &str, serial: &str) -> bool {
    let area: u32 = area.parse().unwrap_or(0);
    area != 0 && area != 666 && area < 900 && group != "00" && serial != "0000"
}

fn ipv4_valid(s: &str) -> bool {
    s.split('.')
        .all(|o| o.parse::<u32>().is_ok_and(|v| v <= 255) && (o == "0" || !o.starts_with('0')))
}

/// Card numbers in `text`: runs of 12-19 digits written with one kind of
/// separator (or none) that pass Luhn. A longer run is tried group by
/// group (two cards side by side, a card followed by other digits): the
/// longest valid card from each group start is taken, and the scan goes on
/// after it; a run that mixes spaces and hyphens is several numbers side by
/// side (an address's last octet, an SSN, ...), not one card.
fn cards(text: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut pos = 0;
    while let Some(m) = CARD.find_at(text, pos) {
        let run = m.as_str();
        // Byte offsets (in `run`) after each digit, and where groups start.
        let ends: Vec<usize> = run
            .char_indices()
            .filter(|(_, c)| c.is_ascii_digit())
            .map(|(i, c)| i + c.len_utf8())
            .collect();
        let starts: Vec<usize> = run
            .char_indices()
            .filter(|&(i, c)| c.is_ascii_digit() && (i == 0 || !run.as_bytes()[i - 1].is_ascii_digit()))
            .map(|(i, _)| i)
            .collect();
        let mut next = m.end();
        'groups: for &g in &starts {
            let first_digit = ends.iter().position(|&e| e > g).unwrap_or(ends.len());
            for n in (12..=19).rev() {
                let Some(&end) = ends.get(first_digit + n - 1) else {
                    continue;
                };
                // A card ends at the end of a group.
                if run.as_bytes().get(end).is_some_and(u8::is_ascii_digit) {
                    continue;
                }
                let candidate = &run[g..end];
                let mut separators = candidate.chars().filter(|c| !c.is_ascii_digit());
                let one_kind = separators.next().is_none_or(|first| separators.all(|c| c == first));
                if one_kind && luhn_valid(candidate) {
                    found.push((m.start() + g, m.start() + end));
                    next = m.start() + end;
                    break 'groups;
                }
            }
        }
        if next >= m.end() {
            pos = m.end();
        } else {
            pos = next;
        }
    }
    found
}

/// Every PII entity in `text`, in text order, without overlaps.
pub fn detect(text: &str) -> Vec<PiiSpan> {
    let mut spans: Vec<PiiSpan> = Vec::new();
    let mut add = |kind: PiiKind, start: usize, end: usize| {
        if !spans.iter().any(|s| start < s.end && s.start < end) {
            spans.push(PiiSpan { kind, start, end });
        }
    };
    for m in EMAIL.find_iter(text) {
        add(PiiKind::Email, m.start(), m.end());
    }
    for m in IBAN.find_iter(text) {
        if iban_valid(m.as_str()) {
            add(PiiKind::Iban, m.start(), m.end());
        }
    }
    for (start, end) in cards(text) {
        add(PiiKind::CreditCard, start, end);
    }
    for c in SSN.captures_iter(text) {
        let (Some(all), Some(a), Some(s1), Some(g), Some(s2), Some(n)) =
            (c.get(0), c.get(1), c.get(2), c.get(3), c.get(4), c.get(5))
        else {
            continue;
        };
        if s1.as_str() == s2.as_str() && ssn_valid(a.as_str(), g.as_str(), n.as_str()) {
            add(PiiKind::Ssn, all.start(), all.end());
        }
    }
    for m in IPV4.find_iter(text) {
        if ipv4_valid(m.as_str()) {
            add(PiiKind::IpAddress, m.start(), m.end());
        }
    }
    for m in IPV6.find_iter(text) {
        let candidate = m.as_str();
        let hex = candidate.chars().filter(char::is_ascii_hexdigit).count();
        // `std::vec` has a `::` that parses as an address; ask for real groups.
        if candidate.matches(':').count() >= 2 && hex >= 4 && candidate.parse::<Ipv6Addr>().is_ok() {
            add(PiiKind::IpAddress, m.start(), m.end());
        }
    }
    for m in PHONE.find_iter(text) {
        let number = m.as_str().split(['x', 'X']).next().unwrap_or_default();
        let digits = number.chars().filter(char::is_ascii_digit).count();
        let marked = m.as_str().starts_with('+') || m.as_str().contains('(');
        let window_start = text[..m.start()]
            .char_indices()
            .rev()
            .nth(PHONE_CUE_WINDOW - 1)
            .map_or(0, |(i, _)| i);
        let cued = PHONE_CUE.is_match(&text[window_start..m.start()]);
        // Dates (2024-01-31), times, amounts and short ids are not phones:
        // ask for 10+ digits (a national number with area code), or 7+ with
        // a country code, a bracketed area code, or a cue word just before.
        if DATE_LIKE.is_match(number) {
            continue;
        }
        if (10..=15).contains(&digits) || ((marked || cued) && (7..=15).contains(&digits)) {
            add(PiiKind::Phone, m.start(), m.end());
        }
    }
    spans.sort_by_key(|s| s.start);
    spans
}

/// Whether `text` contains any detectable PII.
pub fn contains_pii(text: &str) -> bool {
    !detect(text).is_empty()
}

/// Replace every entity by a typed, numbered placeholder (`<EMAIL_1>`,
/// `<PHONE_2>`...); the same value gets the same placeholder.
pub fn redact(text: &str) -> (String, Vec<PiiSpan>) {
    Redactor::default().redact(text, |_| true)
}

/// Most detection passes of [`Redactor::redact`]; each pass that finds
/// something replaces it, so a few always suffice.
const MAX_PASSES: usize = 4;

/// Numbers placeholders per kind, the same value always getting the same one.
#[derive(Debug, Default)]
pub struct Redactor {
    seen: Vec<(PiiKind, String)>,
}

impl Redactor {
    /// Replace the entities of `text` that `select` picks until detection
    /// finds none left: a placeholder can give a neighbour the word boundary
    /// it lacked (`a@b.com2001:db8::1` -> `a@b.com<IP_ADDRESS_1>`, where the
    /// address now ends), so detection runs again on its own output. The
    /// result is a fixed point: redacting it again changes nothing. Returns
    /// the text and the entities replaced (offsets of the pass that found
    /// them).
    pub fn redact(&mut self, text: &str, select: impl Fn(&PiiSpan) -> bool) -> (String, Vec<PiiSpan>) {
        let mut out = text.to_string();
        let mut replaced = Vec::new();
        for _ in 0..MAX_PASSES {
            let spans: Vec<PiiSpan> = detect(&out).into_iter().filter(|s| select(s)).collect();
            if spans.is_empty() {
                break;
            }
            out = self.apply(&out, &spans);
            replaced.extend(spans);
        }
        (out, replaced)
    }

    /// Replace `spans` (sorted, non-overlapping) of `text` by placeholders.
    pub fn apply(&mut self, text: &str, spans: &[PiiSpan]) -> String {
        let mut out = String::with_capacity(text.len());
        let mut pos = 0;
        for s in spans {
            out.push_str(&text[pos..s.start]);
            let value = &text[s.start..s.end];
            let n = match self
                .seen
                .iter()
                .filter(|(k, _)| *k == s.kind)
                .position(|(_, v)| v == value)
            {
                Some(i) => i + 1,
                None => {
                    self.seen.push((s.kind, value.to_string()));
                    self.seen.iter().filter(|(k, _)| *k == s.kind).count()
                }
            };
            out.push_str(&format!("<{}_{}>", s.kind.tag(), n));
            pos = s.end;
        }
        out.push_str(&text[pos..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<PiiKind> {
        detect(text).into_iter().map(|s| s.kind).collect()
    }

    #[test]
    fn luhn_accepts_valid_cards_and_rejects_near_misses() {
        assert!(luhn_valid("4111 1111 1111 1111"));
        assert!(luhn_valid("5500-0000-0000-0004"));
        assert!(!luhn_valid("4111 1111 1111 1112"));
        assert!(!luhn_valid("0"));
        assert_eq!(kinds("card 4111111111111111 thanks"), [PiiKind::CreditCard]);
        assert_eq!(kinds("order 4111111111111112"), Vec::<PiiKind>::new());
        // Eleven digits are too short for a card, even when Luhn-valid.
        assert!(luhn_valid("00000000000"));
        assert!(!kinds("ref 00000000000").contains(&PiiKind::CreditCard));
    }

    #[test]
    fn iban_checksum_decides() {
        assert!(iban_valid("GB82 WEST 1234 5698 7654 32"));
        assert!(iban_valid("DE89370400440532013000"));
        assert!(iban_valid("gb82 west 1234 5698 7654 32"));
        assert!(!iban_valid("DE89370400440532013001"));
        assert!(!iban_valid("DE8937040044"));
        assert_eq!(kinds("pay to DE89 3704 0044 0532 0130 00 today"), [PiiKind::Iban]);
        assert!(
            kinds("pay to DE89 3704 0044 0532 0130 01")
                .iter()
                .all(|k| *k != PiiKind::Iban)
        );
    }

    #[test]
    fn ssn_ranges_and_separators_are_checked() {
        assert_eq!(kinds("ssn 123-45-6789"), [PiiKind::Ssn]);
        assert_eq!(kinds("ssn 123 45 6789"), [PiiKind::Ssn]);
        assert!(kinds("ssn 666-45-6789").is_empty());
        assert!(kinds("ssn 123-00-6789").is_empty());
        assert!(kinds("ssn 123-45 6789").iter().all(|k| *k != PiiKind::Ssn));
    }

    #[test]
    fn emails_ips_and_phones_are_found_but_dates_are_not() {
        assert_eq!(kinds("mail jane.doe+x@example.co.uk now"), [PiiKind::Email]);
        assert_eq!(kinds("from 192.168.1.20"), [PiiKind::IpAddress]);
        assert!(kinds("version 1.2.3.400").is_empty());
        assert_eq!(kinds("host 2001:db8::8a2e:370:7334 down"), [PiiKind::IpAddress]);
        assert_eq!(kinds("call +1 415-555-0134"), [PiiKind::Phone]);
        assert_eq!(kinds("call (415) 555-0134 x"), [PiiKind::Phone]);
        assert!(kinds("due 2024-01-31 at 10:30").is_empty());
        assert!(kinds("we sold 1 250 000 units").is_empty());
        assert!(kinds("logged at 2000-04-16 11:32").is_empty());
        assert_eq!(kinds("mobile 07700 063 966"), [PiiKind::Phone]);
        assert_eq!(kinds("maestro 6304 2737 3398"), [PiiKind::CreditCard]);
        assert_eq!(kinds("my phone number is 467 3395"), [PiiKind::Phone]);
        assert_eq!(kinds("ring +46 (0)8 928 571 38 today"), [PiiKind::Phone]);
        assert_eq!(kinds("office 345-899-3560x4587"), [PiiKind::Phone]);
    }

    #[test]
    fn redaction_uses_typed_numbered_placeholders() {
        let (out, spans) = redact("mail a@b.com or c@d.org, again a@b.com; card 4111 1111 1111 1111");
        assert_eq!(spans.len(), 4);
        assert_eq!(
            out,
            "mail <EMAIL_1> or <EMAIL_2>, again <EMAIL_1>; card <CREDIT_CARD_1>"
        );
        assert!(!contains_pii(&out));
    }
}
