//! Incremental detokenization and stop strings.
//!
//! [`Detokenizer`] turns a growing list of token ids into text deltas that never split a UTF-8 character: it
//! decodes a short window of the accumulated ids (from the last two emission points, as text-generation-inference
//! does) and emits only the new suffix once it no longer ends in U+FFFD (an incomplete byte sequence). The
//! concatenation of the deltas plus [`Detokenizer::flush`] equals decoding all ids at once.
//!
//! [`StopMatcher`] holds back text that could still become a stop string, cuts the output at the first stop
//! string, and releases the held text when generation ends for another reason.

use tokenizers::Tokenizer;

#[derive(Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
    tok.decode(ids, true).unwrap_or_default()
}

impl Detokenizer {
    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Add a token; returns the newly stable text (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = decode(tok, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tok, &self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            full[prefix.len()..].to_string()
        } else {
            String::new()
        }
    }

    /// The text not yet emitted (an incomplete character decodes as U+FFFD). Call once at the end.
    pub fn flush(&mut self, tok: &Tokenizer) -> String {
        let prefix = decode(tok, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tok, &self.ids[self.prefix_offset..]);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            None => String::new(),
        }
    }
}

/// What feeding text to a [`StopMatcher`] gives.
pub struct StopOutput {
    /// Text safe to emit now.
    pub text: String,
    /// A stop string was found: `text` ends just before it and generation must stop.
    pub stopped: bool,
}

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn feed(&mut self, delta: &str) -> StopOutput {
        self.pending.push_str(delta);
        if self.stops.is_empty() {
            return StopOutput {
                text: std::mem::take(&mut self.pending),
                stopped: false,
            };
        }
        // The earliest stop string wins.
        if let Some(i) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let text = self.pending[..i].to_string();
            self.pending.clear();
            return StopOutput {
                text,
                stopped: true,
            };
        }
        // Hold back the longest suffix that is a proper prefix of a stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.pending.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutput {
            text,
            stopped: false,
        }
    }

    /// Release held text (generation ended without a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_and_hold() {
        let mut m = StopMatcher::new(vec!["END".into(), "\n\n".into()]);
        let a = m.feed("hello E");
        assert_eq!((a.text.as_str(), a.stopped), ("hello ", false));
        let b = m.feed("N");
        assert_eq!((b.text.as_str(), b.stopped), ("", false));
        let c = m.feed("X more\n");
        assert_eq!((c.text.as_str(), c.stopped), ("ENX more", false));
        let d = m.feed("\nafter");
        assert_eq!((d.text.as_str(), d.stopped), ("", true));
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.feed("café").text, "caf");
        assert_eq!(m.finish(), "é");
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.feed("abc").text, "abc");
    }
}
