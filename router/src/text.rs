//! What the server accepts in the short strings users send, and how it
//! quotes them back: ids are bounded and free of control characters, free
//! text may hold line breaks and tabs but no other control character, and an
//! error that names user input quotes a bounded, escaped prefix of it (a
//! 1 MB name must not make a 1 MB error, or a status too large to send).

/// Longest session, user, request or reviewer id (characters); each one is
/// stored with every row it belongs to.
pub const MAX_ID_CHARS: usize = 256;

/// Characters of user input an error message quotes at most.
pub const MAX_QUOTE_CHARS: usize = 64;

/// `Err(reason)` when `value` is not a usable id: longer than
/// [`MAX_ID_CHARS`] or holding a control character.
///
/// # Errors
/// The reason, saying what to fix.
pub fn check_id(value: &str) -> Result<(), String> {
    let len = value.chars().count();
    if len > MAX_ID_CHARS {
        return Err(format!(
            "is {len} characters long; the limit is {MAX_ID_CHARS} characters"
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!(
            "holds the control character {}; ids are printable text",
            c.escape_unicode()
        ));
    }
    Ok(())
}

/// `Err(reason)` when free text holds a control character other than a
/// line break or a tab.
///
/// # Errors
/// The reason, saying what to fix.
pub fn check_free_text(value: &str) -> Result<(), String> {
    match value
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        Some(c) => Err(format!(
            "holds the control character {}; only line breaks and tabs are accepted",
            c.escape_unicode()
        )),
        None => Ok(()),
    }
}

/// `value` with its control characters escaped (`\u{0}`, `\n`, ...).
pub fn escaped(value: &str) -> String {
    escape(value.chars())
}

fn escape(chars: impl Iterator<Item = char>) -> String {
    chars
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// `value` as an error message may quote it: at most [`MAX_QUOTE_CHARS`]
/// characters (then `…`), control characters escaped.
pub fn quote(value: &str) -> String {
    let mut out = escape(value.chars().take(MAX_QUOTE_CHARS));
    if value.chars().nth(MAX_QUOTE_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bounded_and_printable() {
        assert!(check_id("session-1").is_ok());
        assert!(check_id(&"x".repeat(MAX_ID_CHARS)).is_ok());
        assert!(
            check_id(&"x".repeat(MAX_ID_CHARS + 1))
                .unwrap_err()
                .contains("limit is 256")
        );
        assert!(check_id("a\u{0}b").unwrap_err().contains("\\u{0}"));
        assert!(check_id("a\u{1b}[31m").is_err());
    }

    #[test]
    fn free_text_keeps_line_breaks_and_tabs_only() {
        assert!(check_free_text("line one\nline two\tend\r\n").is_ok());
        assert!(check_free_text("bell\u{7}").is_err());
        assert!(check_free_text("nul\u{0}").is_err());
    }

    #[test]
    fn quotes_are_short_and_escaped() {
        assert_eq!(quote("hr"), "hr");
        let long = "é".repeat(1_000_000);
        let q = quote(&long);
        assert_eq!(q.chars().count(), MAX_QUOTE_CHARS + 1);
        assert!(q.ends_with('…'));
        assert_eq!(quote("a\u{1b}b\nc"), "a\\u{1b}b\\nc");
    }
}
