//! Stop strings for streamed generation, backend-independent: the answer
//! ends before the first occurrence of any stop string, and no part of a
//! stop string is ever streamed (a delta that may be the start of one is
//! held back until the next delta says whether it is).
//!
//! mistral.rs 0.8.1 has stop strings of its own, but in streaming it sends
//! the text as it comes and notices a stop string a token late, so the
//! client would see the stop string and more; engines filter their deltas
//! through [`StopFilter`] instead.

/// Filters one answer's deltas against its stop strings.
#[derive(Debug, Clone)]
pub struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    /// A filter for `stops`; `None` when there are none.
    pub fn new(stops: &[String]) -> Option<Self> {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        (!stops.is_empty()).then(|| Self {
            stops,
            held: String::new(),
        })
    }

    /// Take a delta: the text that may be released now, and whether a stop
    /// string was reached (then the answer ends with that text).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.held.push_str(delta);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let text = self.held[..at].to_string();
            self.held.clear();
            return (text, true);
        }
        // Hold back the longest tail that could start a stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(i, _)| &s[..i]))
            .filter(|prefix| self.held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let release = self.held.len() - keep;
        let text = self.held[..release].to_string();
        self.held.drain(..release);
        (text, false)
    }

    /// The answer ended without a stop string: the text still held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopFilter::new(&stops).unwrap();
        let mut out = Vec::new();
        for d in deltas {
            let (text, stopped) = f.push(d);
            out.push(text);
            if stopped {
                return (out, true);
            }
        }
        out.push(f.finish());
        (out, false)
    }

    #[test]
    fn the_answer_ends_before_a_stop_string_split_across_deltas() {
        let (out, stopped) = run(&["\n\nUser:"], &["Hello", " there.\n", "\nUs", "er: more"]);
        assert!(stopped);
        assert_eq!(out.concat(), "Hello there.");
        // Nothing of the stop string was released on the way.
        assert_eq!(out, ["Hello", " there.", "", ""]);
    }

    #[test]
    fn text_that_only_looked_like_a_stop_string_is_released_and_the_earliest_stop_wins() {
        let (out, stopped) = run(&["END"], &["the EN", "D", "X"]);
        assert!(stopped);
        assert_eq!(out, ["the ", ""]);
        let (out, stopped) = run(&["END"], &["an EN", "gine", " ran"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "an ENgine ran");
        let (out, _) = run(&["cd", "b"], &["abcd"]);
        assert_eq!(out.concat(), "a");
        let (out, _) = run(&["é!"], &["café", "!"]);
        assert_eq!(out.concat(), "caf");
        assert!(StopFilter::new(&[String::new()]).is_none());
    }
}
