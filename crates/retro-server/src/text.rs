//! The text a request receives as its tokens come: whole characters only (a byte-level BPE token
//! may end inside one), and never a byte of a stop sequence or past it. Text that could still
//! become a stop sequence is held back until it cannot.

use retro_index::LmTokenizer;

pub(crate) struct TextStream {
    stops: Vec<String>,
    /// Bytes of the decoded text already sent.
    sent: usize,
    /// Set once a stop sequence is found: nothing more is sent.
    stopped: bool,
}

impl TextStream {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.to_vec(),
            sent: 0,
            stopped: false,
        }
    }

    /// The text of `tokens` (everything generated so far) not yet sent, and whether a stop
    /// sequence ended it. With `finished`, everything left is sent.
    pub fn update(
        &mut self,
        tokenizer: &LmTokenizer,
        tokens: &[u32],
        finished: bool,
    ) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        let full = tokenizer.decode(tokens).unwrap_or_default();
        // The earliest stop sequence in the text; it starts after what was sent, since text that
        // could begin one is held back.
        let search_from = floor_char(&full, self.sent.saturating_sub(self.hold()));
        let stop_at = self
            .stops
            .iter()
            .filter_map(|s| {
                full[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        let end = match stop_at {
            Some(at) => {
                self.stopped = true;
                at.max(self.sent)
            }
            None if finished => full.len(),
            None => {
                // A character cut in the middle decodes as U+FFFD: wait for its other bytes.
                let whole = full.trim_end_matches('\u{FFFD}').len();
                floor_char(&full, whole.saturating_sub(self.hold())).max(self.sent)
            }
        };
        let end = floor_char(&full, end).max(self.sent);
        let delta = full.get(self.sent..end).unwrap_or_default().to_string();
        self.sent = end;
        (delta, self.stopped)
    }

    /// Bytes held back: one less than the longest stop sequence.
    fn hold(&self) -> usize {
        self.stops.iter().map(|s| s.len()).max().unwrap_or(1) - 1
    }
}

/// The largest char boundary of `s` at or before `i`.
fn floor_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use retro_index::{Corpus, Document};

    fn tok() -> LmTokenizer {
        LmTokenizer::char_from_corpus(&Corpus::from_documents([Document {
            id: "a".into(),
            source: "m".into(),
            text: "abcdefgh END é".into(),
        }]))
    }

    /// Feeds `text` one token at a time; returns what was sent and whether it stopped.
    fn stream(text: &str, stops: &[&str]) -> (Vec<String>, bool) {
        let t = tok();
        let ids = t.encode(text).unwrap();
        let mut s = TextStream::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = vec![];
        let mut stopped = false;
        for n in 1..=ids.len() {
            let (d, st) = s.update(&t, &ids[..n], n == ids.len());
            out.push(d);
            if st {
                stopped = true;
                break;
            }
        }
        (out, stopped)
    }

    #[test]
    fn text_is_sent_whole_up_to_the_stop_sequence_and_never_past_it() {
        let (out, stopped) = stream("abc ENDdef", &["END"]);
        assert!(stopped);
        assert_eq!(out.concat(), "abc ");
        // Held back while "E", "EN" could begin the stop sequence.
        assert!(out.iter().all(|d| !d.contains('E')), "{out:?}");
        let (out, stopped) = stream("abc ENdef", &["END"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "abc ENdef");
        let (out, _) = stream("abé", &[]);
        assert_eq!(out, ["a", "b", "é"]);
        // The earliest of several stop sequences wins.
        let (out, stopped) = stream("abcdefgh", &["fg", "cd"]);
        assert!(stopped);
        assert_eq!(out.concat(), "ab");
    }
}
