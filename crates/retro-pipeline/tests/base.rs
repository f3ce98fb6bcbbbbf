//! A base imported from GGUF: its folder, its tokenizer against llama.cpp's tokenization of the
//! same file (the fixture of retro-model's Llama test), and generation with the base alone.

use retro_index::testdata;
use retro_pipeline::{generate, import_gguf, BaseDir, Event, Sampling};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const GGUF: &str = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf";

/// One import for the whole binary (it writes ~540 MB).
fn imported() -> Option<&'static Path> {
    static DIR: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    DIR.get_or_init(|| {
        let gguf = testdata::shared_path(GGUF)?;
        let dir = tempfile::tempdir().unwrap();
        import_gguf(&gguf, &dir.path().join("base"), false).unwrap();
        Some(dir)
    })
    .as_ref()
    .map(|d| d.path())
}

fn fixture() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../retro-model/tests/fixtures/smollm2_llama_cpp.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn tokenization_equals_llama_cpp() {
    let Some(dir) = imported() else { return };
    let tok = BaseDir::open(&dir.join("base"))
        .unwrap()
        .tokenizer()
        .unwrap();
    let fx = fixture();
    let mut n = 0;
    for case in fx["tokenization"].as_array().unwrap() {
        if case["special"].as_bool() == Some(true) {
            continue; // llama.cpp parsing control tokens in the text: not what a corpus wants
        }
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want).unwrap(), text, "{text:?} decoded");
        n += 1;
    }
    assert!(n >= 20, "only {n} cases");
    for case in fx["logits"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u64> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let got: Vec<u64> = tok
            .encode(text)
            .unwrap()
            .into_iter()
            .map(u64::from)
            .collect();
        assert_eq!(got, want, "{text:?}");
    }
}

#[test]
fn the_folder_lists_and_checks_its_files() {
    let Some(dir) = imported() else { return };
    let base = BaseDir::open(&dir.join("base")).unwrap();
    assert_eq!(base.meta.architecture, "llama");
    assert_eq!(base.meta.source.tensor_types.get("Q4_1"), Some(&210));
    assert_eq!(base.config.num_parameters(), 134_515_008);
    // A damaged copy is refused, naming the file.
    let copy = dir.join("damaged");
    std::fs::create_dir_all(&copy).unwrap();
    for f in [
        "base.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        std::fs::copy(dir.join("base").join(f), copy.join(f)).unwrap();
    }
    let mut t = std::fs::read(copy.join("tokenizer.json")).unwrap();
    let i = t.len() / 2;
    t[i] ^= 1;
    std::fs::write(copy.join("tokenizer.json"), t).unwrap();
    let e = BaseDir::open(&copy).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("SHA-256"), "{e}");
    // Not a base at all.
    let e = BaseDir::open(dir).unwrap_err().to_string();
    assert!(e.contains("base.json"), "{e}");
    // Importing over a folder of other files is refused.
    let gguf = testdata::shared_path(GGUF).unwrap();
    let e = import_gguf(&gguf, &copy, true);
    assert!(e.is_ok(), "a base folder may be replaced with overwrite");
    std::fs::write(dir.join("other.txt"), "x").unwrap();
    let e = import_gguf(&gguf, dir, true).unwrap_err().to_string();
    assert!(e.contains("not a base"), "{e}");
}

#[test]
fn greedy_generation_continues_in_english() {
    let Some(dir) = imported() else { return };
    let base = BaseDir::open(&dir.join("base")).unwrap();
    let model = base.load(&candle_core::Device::Cpu).unwrap();
    let tok = base.tokenizer().unwrap();
    let prompt = "The capital of France is";
    let mut heard = vec![];
    let out = generate(
        &model,
        None,
        &tok,
        prompt,
        8,
        &Sampling::default(),
        &mut |e| {
            if let Event::Token(t) = e {
                heard.push(t)
            }
        },
    )
    .unwrap();
    assert_eq!(out, heard);
    let text = tok.decode(&out).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    // The cached loop predicts what the full forward predicts.
    let mut ids = tok.encode(prompt).unwrap();
    ids.extend(&out[..out.len() - 1]);
    let x = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full = model
        .forward(&x, 0, None)
        .unwrap()
        .argmax(2)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let full: Vec<u32> = full.to_vec1().unwrap();
    assert_eq!(&full[full.len() - out.len()..], out.as_slice());
    // Sampling values out of their domain are refused by name.
    let bad = Sampling {
        temperature: -1.0,
        ..Default::default()
    };
    let e = generate(&model, None, &tok, prompt, 4, &bad, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("temperature"), "{e}");
}

#[test]
fn generations_stepped_together_equal_each_alone() {
    use retro_pipeline::{step_together, Finish, Generation};
    let Some(dir) = imported() else { return };
    let base = BaseDir::open(&dir.join("base")).unwrap();
    let model = base.load(&candle_core::Device::Cpu).unwrap();
    let tok = base.tokenizer().unwrap();
    // Prompts of different lengths, so every batched step mixes positions (and the prompt of
    // one is fed while another samples); one samples, two are greedy.
    let prompts = [
        ("The capital of France is", 10, 0.0),
        ("Water boils at a temperature of", 14, 0.0),
        ("Once upon a time", 12, 0.8),
    ];
    let sampling = |t: f64| Sampling {
        temperature: t,
        top_k: Some(20),
        seed: 3,
        ..Default::default()
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|&(p, n, t)| generate(&model, None, &tok, p, n, &sampling(t), &mut |_| {}).unwrap())
        .collect();
    let mut gens: Vec<_> = prompts
        .iter()
        .map(|&(p, n, t)| Generation::new(&model, None, &tok, p, n, &sampling(t)).unwrap())
        .collect();
    let mut heard = vec![vec![]; 3];
    while step_together(&model, &mut gens, &mut |i, e| {
        if let Event::Token(t) = e {
            heard[i].push(t)
        }
    })
    .unwrap()
        > 0
    {}
    for (i, g) in gens.iter().enumerate() {
        assert_eq!(g.generated(), alone[i].as_slice(), "prompt {i}");
        assert_eq!(heard[i], alone[i]);
        assert_eq!(g.finished(), Some(&Finish::Length));
    }
}
