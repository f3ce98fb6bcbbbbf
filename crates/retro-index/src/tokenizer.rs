//! The language model's tokenizer: the labml character tokenizer or any Hugging Face `tokenizer.json`,
//! plus offline BPE training. The database records its fingerprint and refuses another.

use crate::corpus::Corpus;
use crate::error::{IndexError, Result};
use retro_format::{read_json, sha256_bytes, write_json_atomic};
use std::collections::HashMap;
use std::path::Path;

/// File name of the LM tokenizer inside a database directory.
pub const TOKENIZER_FILE: &str = "lm_tokenizer.json";
const FORMAT_VERSION: u32 = 1;

/// The labml character tokenizer: the vocabulary is the sorted set of the corpus' characters;
/// one extra id (`vocab_size() - 1`) is the pad token and decodes to nothing.
#[derive(Debug, Clone)]
pub struct CharTokenizer {
    chars: Vec<char>,
    ids: HashMap<char, u32>,
}

impl CharTokenizer {
    /// The sorted set of characters of all documents.
    pub fn from_corpus(corpus: &Corpus) -> Self {
        let mut set = std::collections::BTreeSet::new();
        for d in &corpus.documents {
            set.extend(d.text.chars());
        }
        Self::from_chars(set.into_iter().collect())
    }
    /// From a list of characters (sorted and deduplicated here).
    pub fn from_chars(mut chars: Vec<char>) -> Self {
        chars.sort_unstable();
        chars.dedup();
        let ids = chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        Self { chars, ids }
    }
    pub fn chars(&self) -> &[char] {
        &self.chars
    }
}

/// A Hugging Face tokenizer with the pad id it uses.
#[derive(Clone)]
pub struct HfTokenizer {
    inner: Box<tokenizers::Tokenizer>,
    json: String,
    pad_id: u32,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// The LM tokenizer: what turns documents into the token ids that are chunked and stored.
#[derive(Debug, Clone)]
pub enum LmTokenizer {
    Char(CharTokenizer),
    Hf(HfTokenizer),
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    format_version: u32,
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chars: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pad_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokenizer: Option<serde_json::Value>,
}

fn tok_err(e: impl std::fmt::Display) -> IndexError {
    IndexError::Tokenizer(e.to_string())
}

impl LmTokenizer {
    /// The labml character tokenizer built from a corpus.
    pub fn char_from_corpus(corpus: &Corpus) -> Self {
        LmTokenizer::Char(CharTokenizer::from_corpus(corpus))
    }

    /// What a build names: `char` (labml's characters, from `corpus`) or a `tokenizer.json` path.
    pub fn from_spec(spec: &str, corpus: &Corpus) -> Result<Self> {
        if spec == "char" {
            Ok(Self::char_from_corpus(corpus))
        } else {
            Self::from_file(Path::new(spec))
        }
    }

    /// Any Hugging Face `tokenizer.json` (e.g. GPT-2 byte-level BPE). Padding and truncation are turned off.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| IndexError::io(path, e))?;
        Self::from_json(&json)
            .map_err(|e| IndexError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// From the JSON text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        // tokenizers panics on some malformed files (nested decoders) instead of failing.
        let mut t: tokenizers::Tokenizer = crate::panic_guard::catch(|| json.parse())
            .map_err(|why| IndexError::Tokenizer(format!("malformed tokenizer.json: {why}")))?
            .map_err(tok_err)?;
        let pad_from_params = t.get_padding().map(|p| p.pad_id);
        t.with_padding(None);
        t.with_truncation(None).map_err(tok_err)?;
        let pad_id = pad_from_params
            .or_else(|| {
                [
                    "<pad>",
                    "[PAD]",
                    "<|pad|>",
                    "<|endoftext|>",
                    "</s>",
                    "<eos>",
                ]
                .iter()
                .find_map(|s| t.token_to_id(s))
            })
            // No pad-like token: pad with the first id past the vocabulary, never a real token.
            .unwrap_or(t.get_vocab_size(true) as u32);
        if is_wordpiece(&t) {
            return Err(IndexError::Tokenizer(
                "a WordPiece (BERT) tokenizer is not a language model's tokenizer: it lowercases \
                 and drops newlines and spacing, so generated text cannot be decoded faithfully; \
                 use a byte-level BPE tokenizer.json (e.g. GPT-2's), `char`, or `retro tokenizer \
                 train`"
                    .into(),
            ));
        }
        let json = t.to_string(false).map_err(tok_err)?;
        Ok(LmTokenizer::Hf(HfTokenizer {
            inner: Box::new(t),
            json,
            pad_id,
        }))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            LmTokenizer::Char(_) => "char",
            LmTokenizer::Hf(_) => "tokenizer.json",
        }
    }

    /// Token ids of a text (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            LmTokenizer::Char(c) => text
                .chars()
                .map(|ch| {
                    c.ids.get(&ch).copied().ok_or_else(|| {
                        IndexError::Tokenizer(format!(
                            "character {ch:?} is not in the character vocabulary"
                        ))
                    })
                })
                .collect(),
            LmTokenizer::Hf(h) => Ok(h
                .inner
                .encode_fast(text, false)
                .map_err(tok_err)?
                .get_ids()
                .to_vec()),
        }
    }

    /// Token ids of a text and the UTF-8 bytes of the text each token covers, so that per-token
    /// byte counts add up to the text's own length (a character split across byte-level BPE tokens
    /// is counted once, on its first token). Bits per byte are counted with these, never by decoding.
    pub fn encode_with_bytes(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>)> {
        match self {
            LmTokenizer::Char(_) => Ok((
                self.encode(text)?,
                text.chars().map(char::len_utf8).collect(),
            )),
            LmTokenizer::Hf(h) => {
                let enc = h.inner.encode(text, false).map_err(tok_err)?;
                let mut covered = 0usize;
                let mut lens = enc
                    .get_offsets()
                    .iter()
                    .map(|&(_, end)| {
                        let n = end.saturating_sub(covered);
                        covered = covered.max(end);
                        n
                    })
                    .collect::<Vec<_>>();
                // Bytes no token's offsets reach (e.g. stripped whitespace) go to the last token.
                if let Some(last) = lens.last_mut() {
                    *last += text.len().saturating_sub(covered);
                }
                Ok((enc.get_ids().to_vec(), lens))
            }
        }
    }

    /// Text of token ids; pad ids decode to nothing.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            LmTokenizer::Char(c) => {
                let mut s = String::with_capacity(ids.len());
                for &id in ids {
                    match c.chars.get(id as usize) {
                        Some(&ch) => s.push(ch),
                        None if id as usize == c.chars.len() => {}
                        None => {
                            return Err(IndexError::Tokenizer(format!(
                                "token id {id} is outside the vocabulary of {}",
                                c.chars.len() + 1
                            )))
                        }
                    }
                }
                Ok(s)
            }
            LmTokenizer::Hf(h) => {
                let ids: Vec<u32> = ids.iter().copied().filter(|&i| i != h.pad_id).collect();
                h.inner.decode(&ids, false).map_err(tok_err)
            }
        }
    }

    /// Number of ids, pad included.
    pub fn vocab_size(&self) -> usize {
        match self {
            LmTokenizer::Char(c) => c.chars.len() + 1,
            LmTokenizer::Hf(h) => h.inner.get_vocab_size(true).max(h.pad_id as usize + 1),
        }
    }

    /// The id used to pad chunks and continuations.
    pub fn pad_id(&self) -> u32 {
        match self {
            LmTokenizer::Char(c) => c.chars.len() as u32,
            LmTokenizer::Hf(h) => h.pad_id,
        }
    }

    /// Stable content hash (hex SHA-256) of the vocabulary and rules.
    pub fn fingerprint(&self) -> String {
        match self {
            LmTokenizer::Char(c) => {
                sha256_bytes(format!("char-v1:{}", c.chars.iter().collect::<String>()).as_bytes())
            }
            LmTokenizer::Hf(h) => sha256_bytes(format!("hf-v1:{}:{}", h.pad_id, h.json).as_bytes()),
        }
    }

    /// Saves into `dir/lm_tokenizer.json` (versioned, atomic).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let saved = match self {
            LmTokenizer::Char(c) => Saved {
                format_version: FORMAT_VERSION,
                kind: "char".into(),
                chars: Some(c.chars.iter().collect()),
                pad_id: None,
                tokenizer: None,
            },
            LmTokenizer::Hf(h) => Saved {
                format_version: FORMAT_VERSION,
                kind: "hf".into(),
                chars: None,
                pad_id: Some(h.pad_id),
                tokenizer: Some(serde_json::from_str(&h.json).map_err(tok_err)?),
            },
        };
        Ok(write_json_atomic(&dir.join(TOKENIZER_FILE), &saved)?)
    }

    /// Loads what [`LmTokenizer::save`] wrote.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        let s: Saved = read_json(&path)?;
        if s.format_version != FORMAT_VERSION {
            return Err(IndexError::version(&path, s.format_version, FORMAT_VERSION));
        }
        match (s.kind.as_str(), s.chars, s.tokenizer) {
            ("char", Some(chars), _) => Ok(LmTokenizer::Char(CharTokenizer::from_chars(
                chars.chars().collect(),
            ))),
            ("hf", _, Some(t)) => {
                let mut tok = Self::from_json(&t.to_string())
                    .map_err(|e| IndexError::corrupt(&path, e.to_string()))?;
                if let (LmTokenizer::Hf(h), Some(p)) = (&mut tok, s.pad_id) {
                    h.pad_id = p;
                }
                Ok(tok)
            }
            (k, _, _) => Err(IndexError::corrupt(
                &path,
                format!("unknown or incomplete tokenizer kind {k:?}"),
            )),
        }
    }

    /// The underlying Hugging Face tokenizer, if any.
    pub fn hf(&self) -> Option<&tokenizers::Tokenizer> {
        match self {
            LmTokenizer::Hf(h) => Some(&h.inner),
            LmTokenizer::Char(_) => None,
        }
    }
}

/// Whether the tokenizer's model is WordPiece (BERT's): lossy for a decoder.
fn is_wordpiece(t: &tokenizers::Tokenizer) -> bool {
    matches!(t.get_model(), tokenizers::ModelWrapper::WordPiece(_))
}

/// Trains a byte-level BPE tokenizer (GPT-2 style) on a corpus, offline, and writes it as a
/// `tokenizer.json` to `out` (atomically). `<pad>` is id 0 and `<|endoftext|>` id 1.
pub fn train_bpe(corpus: &Corpus, vocab_size: usize, out: &Path) -> Result<LmTokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, NormalizerWrapper, TokenizerBuilder};
    if vocab_size < 256 + 2 {
        return Err(IndexError::invalid(
            "vocab_size",
            vocab_size,
            "a byte-level BPE needs at least 258 ids (256 bytes + 2 special tokens)",
        ));
    }
    let specials = vec![
        AddedToken::from("<pad>", true),
        AddedToken::from("<|endoftext|>", true),
    ];
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_normalizer(None)
            .with_model(BPE::default())
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_decoder(Some(ByteLevel::default()))
            .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
            .build()
            .map_err(tok_err)?;
    tok.train(
        &mut trainer,
        corpus.documents.iter().map(|d| d.text.as_str()),
    )
    .map_err(tok_err)?;
    let json = tok.to_string(true).map_err(tok_err)?;
    retro_format::write_atomic(out, |w| w.write_all(json.as_bytes()))?;
    LmTokenizer::from_json(&json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::Document;

    fn corpus() -> Corpus {
        Corpus::from_documents((0..20).map(|i| Document {
            id: i.to_string(),
            source: String::new(),
            text: format!("the quick brown fox {i} jumps over the lazy dog. "),
        }))
    }

    #[test]
    fn char_roundtrip_and_save() {
        let c = corpus();
        let t = LmTokenizer::char_from_corpus(&c);
        let ids = t.encode("the fox").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "the fox");
        let mut padded = ids.clone();
        padded.push(t.pad_id());
        assert_eq!(t.decode(&padded).unwrap(), "the fox");
        assert!(t.encode("Z").is_err());
        let dir = tempfile::tempdir().unwrap();
        t.save(dir.path()).unwrap();
        let u = LmTokenizer::load(dir.path()).unwrap();
        assert_eq!(t.fingerprint(), u.fingerprint());
        assert_eq!(t.vocab_size(), u.vocab_size());
    }

    #[test]
    fn bpe_train_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok.json");
        let t = train_bpe(&corpus(), 300, &path).unwrap();
        assert_eq!(t.pad_id(), 0);
        let text = "the lazy dog jumps, é!";
        assert_eq!(t.decode(&t.encode(text).unwrap()).unwrap(), text);
        let u = LmTokenizer::from_file(&path).unwrap();
        assert_eq!(u.fingerprint(), t.fingerprint());
        t.save(dir.path()).unwrap();
        assert_eq!(
            LmTokenizer::load(dir.path()).unwrap().fingerprint(),
            t.fingerprint()
        );
    }
}
