//! The LM tokenizer on real tokenizer files: padding never collides with a real token, bytes are
//! counted from the text itself, and a WordPiece (BERT) tokenizer is refused as an LM tokenizer.

use retro_index::testdata::shared_path;
use retro_index::LmTokenizer;

fn gpt2_json() -> Option<serde_json::Value> {
    let p = shared_path("models/gpt2-tokenizer/tokenizer.json")?;
    Some(serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
}

#[test]
fn a_tokenizer_without_a_pad_token_pads_outside_its_vocabulary_and_bang_round_trips() {
    let Some(mut j) = gpt2_json() else { return };
    // GPT-2 less its one special token: no pad-like token is left.
    j["added_tokens"] = serde_json::json!([]);
    j["model"]["vocab"]
        .as_object_mut()
        .unwrap()
        .remove("<|endoftext|>");
    let t = LmTokenizer::from_json(&j.to_string()).unwrap();
    let real = t.hf().unwrap().get_vocab_size(true) as u32;
    assert!(
        t.pad_id() >= real,
        "pad {} is a real token (vocab {real})",
        t.pad_id()
    );
    assert!(t.vocab_size() > t.pad_id() as usize);
    let text = "Wow! Stop!! Is it \"!\"?\n!";
    let ids = t.encode(text).unwrap();
    assert!(!ids.contains(&t.pad_id()));
    assert_eq!(t.decode(&ids).unwrap(), text);
    // Padding decodes to nothing.
    let mut padded = ids.clone();
    padded.extend([t.pad_id(); 3]);
    assert_eq!(t.decode(&padded).unwrap(), text);
}

#[test]
fn per_token_bytes_add_up_to_the_text_with_byte_level_bpe_and_multi_byte_characters() {
    let Some(j) = gpt2_json() else { return };
    let t = LmTokenizer::from_json(&j.to_string()).unwrap();
    // Characters GPT-2 splits over several byte-level tokens.
    let text = "naïve café — 東京の夜, Ελληνικά 🎭 ok";
    let (ids, bytes) = t.encode_with_bytes(text).unwrap();
    assert_eq!(ids, t.encode(text).unwrap());
    assert_eq!(ids.len(), bytes.len());
    assert_eq!(bytes.iter().sum::<usize>(), text.len());
    // Decoding a cut window would invent U+FFFD bytes; the per-token counts never do.
    let cut = ids.iter().position(|_| true).unwrap() + 9;
    let decoded = t.decode(&ids[..cut]).unwrap();
    let counted: usize = bytes[..cut].iter().sum();
    assert!(counted <= text.len());
    if decoded.contains('\u{FFFD}') {
        assert_ne!(decoded.len(), counted);
    }
    // The character tokenizer: one char, its UTF-8 length.
    let c = LmTokenizer::Char(retro_index::CharTokenizer::from_chars(
        text.chars().collect(),
    ));
    let (_, b) = c.encode_with_bytes(text).unwrap();
    assert_eq!(b.iter().sum::<usize>(), text.len());
}

#[test]
fn a_wordpiece_tokenizer_is_refused_as_the_lm_tokenizer() {
    let Some(p) = shared_path("models/all-MiniLM-L6-v2/tokenizer.json") else {
        return;
    };
    let e = LmTokenizer::from_file(&p).unwrap_err().to_string();
    assert!(
        e.contains("WordPiece") && e.contains("tokenizer.json"),
        "{e}"
    );
}
