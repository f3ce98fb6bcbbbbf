//! The Llama base against llama.cpp on the same GGUF file (SmolLM2-135M-Instruct, Q4_1): the
//! fixture `tests/fixtures/smollm2_llama_cpp.json` holds llama.cpp's logits, written by
//! `tools/reference/smollm2_fixtures.py` through llama-cpp-python.

use candle_core::{DType, Device, Tensor};
use retro_model::llama::{gguf, LlamaBase};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

const GGUF: &str = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The shared GGUF file, or None (the test is skipped) where the shared folder is absent and
/// `RETRO_REQUIRE_SHARED` is not set.
fn gguf_path() -> Option<PathBuf> {
    let shared = std::env::var_os("RETRO_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let p = shared.join(GGUF);
    if p.is_file() {
        return Some(p);
    }
    let required = std::env::var("RETRO_REQUIRE_SHARED").is_ok_and(|v| v == "1");
    assert!(!required, "shared model missing: {}", p.display());
    eprintln!("SKIPPED: {} not found (set RETRO_SHARED)", p.display());
    None
}

fn base() -> Option<&'static LlamaBase> {
    static BASE: OnceLock<Option<LlamaBase>> = OnceLock::new();
    BASE.get_or_init(|| {
        let imported = gguf::import(&gguf_path()?).unwrap();
        Some(
            LlamaBase::from_tensors(
                &imported.config,
                &imported.tensors,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap(),
        )
    })
    .as_ref()
}

fn fixture() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_llama_cpp.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn logits(base: &LlamaBase, ids: &[u32]) -> Vec<Vec<f32>> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    base.forward(&x, 0, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// llama.cpp quantises the activations to 8 bits (Q8_1) before each Q4_1 dot product, and we
/// multiply in f32 with the dequantised weights: the logits differ by that rounding, carried
/// through 30 layers. This bound is the largest difference measured on the fixture's prompts,
/// with headroom (see `LOGIT_BOUND_MEASURED`).
const LOGIT_BOUND: f32 = 60.0;

/// Where llama.cpp's top two logits are closer than this, their order is within the rounding
/// above and either may come first.
const TIE_MARGIN: f32 = 10.0;

#[test]
fn logits_match_llama_cpp() {
    let Some(base) = base() else { return };
    let fx = fixture();
    let probes = ids(&fx["probe_ids"]);
    let mut worst = 0f32;
    let mut rel = vec![];
    let mut flips = vec![];
    let mut positions = 0;
    for case in fx["logits"].as_array().unwrap() {
        let tokens = ids(&case["ids"]);
        let ours = logits(base, &tokens);
        positions += ours.len();
        for (pos, row) in ours.iter().enumerate() {
            let argmax = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u64;
            let theirs = case["argmax"][pos].as_u64().unwrap();
            if argmax != theirs {
                // A near-tie in llama.cpp's own logits: which of the two is first is within the
                // two implementations' rounding, so both must be near the top, not equal.
                let margin = case["margin"][pos].as_f64().unwrap() as f32;
                flips.push((pos, margin));
                assert!(
                    margin < TIE_MARGIN,
                    "{:?} position {pos}: top-1 {argmax}, llama.cpp's {theirs} by a margin of {margin}",
                    case["text"]
                );
                let gap = row[argmax as usize] - row[theirs as usize];
                assert!(gap < TIE_MARGIN, "position {pos}: our logit gap {gap}");
            }
            let mut pairs: Vec<(u32, f32)> = case["top"][pos]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                .collect();
            pairs.extend(
                probes
                    .iter()
                    .zip(case["probe_logits"][pos].as_array().unwrap())
                    .map(|(&id, l)| (id, l.as_f64().unwrap() as f32)),
            );
            for (id, theirs) in pairs {
                let d = (row[id as usize] - theirs).abs();
                worst = worst.max(d);
                rel.push(d);
            }
        }
    }
    rel.sort_by(f32::total_cmp);
    eprintln!(
        "logits against llama.cpp: max |diff| {worst:.4}, median {:.4}, p99 {:.4} over {} values; \
         top-1 equal at {} of {positions} positions, the others near-ties {flips:?}",
        rel[rel.len() / 2],
        rel[rel.len() * 99 / 100],
        rel.len(),
        positions - flips.len()
    );
    assert!(flips.len() * 20 <= positions, "top-1 differs at {flips:?}");
    assert!(
        worst <= LOGIT_BOUND,
        "max |logit difference| {worst} > {LOGIT_BOUND}"
    );
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    let Some(base) = base() else { return };
    let fx = fixture();
    let tokens = ids(&fx["logits"][0]["ids"]);
    let full = logits(base, &tokens);
    // A prefill of 5 tokens, then one at a time.
    let mut cache = base.new_cache();
    let x = Tensor::new(&tokens[..5], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut rows: Vec<Vec<f32>> = base
        .forward(&x, 0, Some(&mut cache))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (t, &id) in tokens.iter().enumerate().skip(5) {
        let x = Tensor::new(&[[id]], &Device::Cpu).unwrap();
        let l = base.forward(&x, t, Some(&mut cache)).unwrap();
        rows.push(l.flatten_all().unwrap().to_vec1().unwrap());
    }
    assert_eq!(cache.position(), tokens.len());
    let mut worst = 0f32;
    for (a, b) in rows.iter().zip(&full) {
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(
        worst < 2e-3,
        "cached logits differ from the full forward by {worst}"
    );
}

#[test]
fn a_cache_at_the_wrong_position_is_refused() {
    let Some(base) = base() else { return };
    let mut cache = base.new_cache();
    let x = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    let e = base
        .forward(&x, 3, Some(&mut cache))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cache") && e.contains("0 cached positions"),
        "{e}"
    );
    let e = base
        .forward(&Tensor::new(&[[49152u32]], &Device::Cpu).unwrap(), 0, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("49152"), "{e}");
}

#[test]
fn the_config_is_read_from_the_gguf_metadata() {
    let Some(path) = gguf_path() else { return };
    let imported = gguf::import(&path).unwrap();
    let c = &imported.config;
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (c.intermediate_size, c.vocab_size, c.rope_theta),
        (1536, 49152, 100_000.0)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(c.num_parameters(), 134_515_008);
    assert_eq!(imported.vocab.pre, "smollm");
    assert_eq!(imported.vocab.merges.len(), 48900);
}
