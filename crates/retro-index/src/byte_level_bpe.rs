//! A byte-level BPE tokenizer from its parts (vocabulary, merges, pre-tokenizer name), as a GGUF
//! file lists them, turned into a Hugging Face `tokenizers` tokenizer that tokenizes as llama.cpp
//! does with `special = false`: control tokens in the text are text, never parsed as specials.

use crate::error::{IndexError, Result};
use crate::tokenizer::LmTokenizer;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;

/// The parts of a byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct ByteLevelBpe {
    /// Token strings in id order, in GPT-2's byte-to-character alphabet.
    pub tokens: Vec<String>,
    /// `"left right"` merges, highest priority first.
    pub merges: Vec<String>,
    /// llama.cpp's pre-tokenizer name: `gpt2` or `default` (GPT-2's split), `smollm` (digits one
    /// by one, then GPT-2's split).
    pub pre: String,
}

/// The pre-tokenizer names this build knows.
pub const PRE_TOKENIZERS: [&str; 3] = ["default", "gpt2", "smollm"];

impl ByteLevelBpe {
    /// The `tokenizers` tokenizer (no padding, no truncation, nothing added around the text).
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        let err = |field: &str, why: String| {
            IndexError::Tokenizer(format!("byte-level BPE `{field}`: {why}"))
        };
        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (id, t) in self.tokens.iter().enumerate() {
            if vocab.insert(t.clone(), id as u32).is_some() {
                return Err(err(
                    "tokens",
                    format!("token {t:?} is listed twice (again at id {id})"),
                ));
            }
        }
        let merges = self
            .merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (a, b) = m.split_once(' ').ok_or_else(|| {
                    err("merges", format!("merge {i} ({m:?}) is not `left right`"))
                })?;
                for part in [a, b] {
                    if !vocab.contains_key(part) {
                        return Err(err(
                            "merges",
                            format!("merge {i} ({m:?}) names {part:?}, not a token"),
                        ));
                    }
                }
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err("tokens", e.to_string()))?;
        let split = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = match self.pre.as_str() {
            "default" | "gpt2" => split.into(),
            "smollm" => Sequence::new(vec![Digits::new(true).into(), split.into()]).into(),
            p => {
                return Err(err(
                    "pre",
                    format!(
                        "pre-tokenizer `{p}` is not supported (expected one of {PRE_TOKENIZERS:?})"
                    ),
                ))
            }
        };
        let mut t = tokenizers::Tokenizer::new(bpe);
        t.with_pre_tokenizer(Some(pre));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(t)
    }
}

impl LmTokenizer {
    /// The LM tokenizer of a byte-level BPE vocabulary (see [`ByteLevelBpe`]).
    pub fn from_byte_level_bpe(parts: &ByteLevelBpe) -> Result<Self> {
        let t = parts.tokenizer()?;
        Self::from_json(
            &t.to_string(false)
                .map_err(|e| IndexError::Tokenizer(e.to_string()))?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(pre: &str) -> ByteLevelBpe {
        let tokens = ["<|endoftext|>", "a", "b", "Ġ", "1", "2", "ab", "Ġab", "12"];
        ByteLevelBpe {
            tokens: tokens.iter().map(|s| s.to_string()).collect(),
            merges: vec!["a b".into(), "Ġ ab".into(), "1 2".into()],
            pre: pre.into(),
        }
    }

    #[test]
    fn merges_apply_and_smollm_splits_digits() {
        let gpt2 = LmTokenizer::from_byte_level_bpe(&tiny("gpt2")).unwrap();
        assert_eq!(gpt2.encode("ab ab12").unwrap(), vec![6, 7, 8]);
        assert_eq!(gpt2.decode(&[6, 7, 8]).unwrap(), "ab ab12");
        let smollm = LmTokenizer::from_byte_level_bpe(&tiny("smollm")).unwrap();
        assert_eq!(smollm.encode("ab ab12").unwrap(), vec![6, 7, 4, 5]);
    }

    #[test]
    fn bad_parts_name_the_field() {
        let mut p = tiny("gpt2");
        p.merges.push("a zz".into());
        assert!(p.tokenizer().unwrap_err().to_string().contains("merges"));
        let mut p = tiny("gpt2");
        p.tokens.push("a".into());
        assert!(p
            .tokenizer()
            .unwrap_err()
            .to_string()
            .contains("listed twice"));
        let e = tiny("llama3").tokenizer().unwrap_err().to_string();
        assert!(e.contains("llama3") && e.contains("pre"), "{e}");
    }
}
