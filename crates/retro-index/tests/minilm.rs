//! MiniLM against the float64 reference (7 texts): same token ids, every component within 1e-4, for
//! both engines (the packed CPU encoder, the default, and candle-transformers' padded `BertModel`).

use retro_index::bert::BertOptions;
use retro_index::{BertEmbedder, Device, Embedder};

#[test]
fn minilm_matches_reference() {
    for candle_transformers in [false, true] {
        check(BertOptions {
            candle_transformers,
            ..BertOptions::default()
        });
    }
}

fn check(opts: BertOptions) {
    let (Some(model), Some(reference)) = (
        retro_index::testdata::shared_path("models/all-MiniLM-L6-v2"),
        retro_index::testdata::shared_path("data/minilm_reference_embeddings.json"),
    ) else {
        return;
    };
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let items = r["items"].as_array().unwrap();
    let emb = BertEmbedder::load_with(&model, &Device::Cpu, opts.clone()).unwrap();
    assert_eq!(emb.dim(), 384);
    assert!(emb.normalizes());
    let texts: Vec<&str> = items
        .iter()
        .map(|it| it["text"].as_str().unwrap())
        .collect();
    for (it, t) in items.iter().zip(&texts) {
        let ids: Vec<u32> = it["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(emb.token_ids(t).unwrap(), ids, "token ids of {t:?}");
    }
    let got = emb.embed(&texts).unwrap(); // one padded batch: the mask must keep padding out of the mean
    let mut worst = 0f64;
    for (it, g) in items.iter().zip(&got) {
        let want: Vec<f64> = it["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(g.len(), want.len());
        for (a, b) in g.iter().zip(&want) {
            worst = worst.max((*a as f64 - b).abs());
        }
    }
    assert!(worst < 1e-4, "{opts:?}: max abs difference {worst}");
    // one at a time gives the same
    let single = emb.embed(&texts[..1]).unwrap();
    assert!(single[0]
        .iter()
        .zip(&got[0])
        .all(|(a, b)| (a - b).abs() < 1e-5));
}
