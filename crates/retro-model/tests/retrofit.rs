//! RETRO-fitting a frozen Llama base: the new blocks start at the base's predictions, only they
//! train, and RETRO[OFF] stays the base bit for bit.

use candle_core::{DType, Device, Tensor};
use retro_model::llama::{tensor_shapes, LlamaBase, LlamaConfig};
use retro_model::retrofit::{NeighbourStates, RetroFitted, RetrofitConfig};
use retro_model::train::{cross_entropy, AdamW, AdamWParams};

fn small_base(seed: u64) -> LlamaBase {
    let config = LlamaConfig {
        vocab_size: 40,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 5,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    };
    let dev = Device::Cpu;
    let mut rng = seed;
    let tensors = tensor_shapes(&config)
        .into_iter()
        .map(|(name, shape)| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| {
                    let x = (rng ^ (i as u64).wrapping_mul(0x9E3779B97F4A7C15)) >> 40;
                    (x as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
                })
                .collect();
            let t = Tensor::from_vec(v, shape, &dev).unwrap();
            let t = if name.contains("norm") {
                (t + 1.0).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    LlamaBase::from_tensors(&config, &tensors, DType::F32, &dev).unwrap()
}

/// Both ways the CCAs can read the neighbours: every test below runs each.
/// What the CCAs read, whether they have positions and whether their output is gated: every
/// combination is tested.
const FITS: [(NeighbourStates, bool, bool); 8] = {
    use NeighbourStates::{BaseLayers, Encoder};
    [
        (Encoder, false, false),
        (BaseLayers, false, false),
        (Encoder, true, false),
        (BaseLayers, true, false),
        (Encoder, false, true),
        (BaseLayers, false, true),
        (Encoder, true, true),
        (BaseLayers, true, true),
    ]
};

fn fit() -> RetrofitConfig {
    fit_reading(NeighbourStates::Encoder, false, false)
}

fn fit_reading(
    neighbour_states: NeighbourStates,
    cca_positions: bool,
    gated_output: bool,
) -> RetrofitConfig {
    RetrofitConfig {
        chunk_len: 4,
        ca_start: 1,
        ca_every: 2,
        enc_n_layers: 2,
        enc_d_ff: 48,
        enc_input_layers: 1,
        init_from_base: true,
        neighbour_states,
        cca_positions,
        gated_output,
    }
}

fn data(b: usize, t: usize, k: usize, n: usize, seed: u32) -> (Tensor, Tensor, Tensor) {
    let ids = |len: usize, s: u32| -> Vec<u32> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(s * 97)) % 40)
            .collect()
    };
    let dev = Device::Cpu;
    let x = Tensor::from_vec(ids(b * t, seed), (b, t), &dev).unwrap();
    let y = Tensor::from_vec(ids(b * t, seed + 1), (b, t), &dev).unwrap();
    let ret = Tensor::from_vec(ids(b * (t / 4) * k * n, seed + 2), (b, t / 4, k, n), &dev).unwrap();
    (x, y, ret)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_fresh_retrofit_predicts_exactly_what_the_base_predicts() {
    for (states, positions, gated) in FITS {
        let model =
            RetroFitted::new(small_base(1), &fit_reading(states, positions, gated), 3).unwrap();
        let (x, _, ret) = data(2, 14, 2, 8, 5);
        let base = values(&model.base().forward(&x, 0, None).unwrap());
        assert_eq!(values(&model.forward(&x, Some(&ret), None).unwrap()), base);
        assert_eq!(values(&model.forward(&x, None, None).unwrap()), base);
        assert_eq!(model.blocks().ca_layers, [1, 3].into());
        assert_eq!(
            fit_reading(states, positions, gated)
                .num_new_parameters(model.base().config())
                .unwrap(),
            model.num_trainable()
        );
        let names: Vec<String> = model.named_vars().into_iter().map(|(n, _)| n).collect();
        let encoder = names
            .iter()
            .any(|n| n.starts_with("encoder.") || n.starts_with("norm_e."));
        assert_eq!(
            encoder,
            states == NeighbourStates::Encoder,
            "{states:?}: {names:?}"
        );
    }
}

#[test]
fn the_states_of_several_depths_in_one_pass_equal_a_pass_per_depth() {
    // The base-layer CCAs read the neighbours at every CCA layer from one pass that stops at
    // each depth in turn; each must be what a pass stopped at that depth alone computes.
    let base = small_base(11);
    let ids = Tensor::new(&[[3u32, 7, 1, 30, 2]], &Device::Cpu).unwrap();
    let kern = retro_model::Kernels::Fused;
    let at = base.hiddens_after(&ids, &[1, 3, 5], kern).unwrap();
    for (h, depth) in at.iter().zip([1, 3, 5]) {
        assert_eq!(
            values(h),
            values(&base.hidden_after(&ids, depth, kern).unwrap())
        );
    }
    let e = base
        .hiddens_after(&ids, &[3, 1], kern)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ascending"), "{e}");
    let e = base
        .hiddens_after(&ids, &[6], kern)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 5 layers"), "{e}");
}

#[test]
fn only_the_new_blocks_train_and_retro_off_stays_the_base() {
    for (states, positions, gated) in FITS {
        only_the_new_blocks_train(states, positions, gated);
    }
}

fn only_the_new_blocks_train(states: NeighbourStates, positions: bool, gated: bool) {
    let model = RetroFitted::new(small_base(2), &fit_reading(states, positions, gated), 4).unwrap();
    let base_before: Vec<(String, Vec<f32>)> = {
        let mut t: Vec<_> = model
            .base()
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, values(&v)))
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let (x, y, ret) = data(2, 16, 2, 8, 9);
    let off_before = values(&model.forward(&x, None, None).unwrap());
    let on_before = values(&model.forward(&x, Some(&ret), None).unwrap());
    let mut opt = AdamW::new(model.named_vars(), AdamWParams::default()).unwrap();
    let mut losses = vec![];
    for step in 0..30 {
        let loss = cross_entropy(&model.forward_train(&x, Some(&ret)).unwrap(), &y).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        if step == 2 {
            // From the third step on, every new parameter gets a gradient (the first reaches only
            // the CCA's zeroed output projections, the second the blocks they read, and the
            // encoder's own zeroed outputs).
            // A key's bias moves every score of a query alike, and softmax ignores that: its
            // gradient is zero in any attention.
            for (name, v) in model
                .named_vars()
                .into_iter()
                .filter(|(n, _)| !n.ends_with(".key.bias"))
            {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient"));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(norm > 0.0, "{name}: zero gradient");
            }
        }
        opt.step(&grads, 1e-2).unwrap();
    }
    assert!(
        losses[29] < losses[0] - 0.1,
        "loss did not fall: {losses:?}"
    );
    let mut base_after: Vec<_> = model
        .base()
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, values(&v)))
        .collect();
    base_after.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(base_after, base_before, "a base weight changed");
    // RETRO[OFF] is the base bit for bit; retrieval now changes the predictions.
    assert_eq!(values(&model.forward(&x, None, None).unwrap()), off_before);
    let on_after = values(&model.forward(&x, Some(&ret), None).unwrap());
    assert!(on_after
        .iter()
        .zip(&on_before)
        .any(|(a, b)| (a - b).abs() > 1e-3));
    // The training forward computes what the inference forward computes.
    let train = values(&model.forward_train(&x, Some(&ret)).unwrap());
    let worst = train
        .iter()
        .zip(&on_after)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-4,
        "training and inference forwards differ by {worst}"
    );
}

#[test]
fn the_new_blocks_round_trip_through_their_state_dict() {
    let a = RetroFitted::new(small_base(3), &fit(), 5).unwrap();
    let b = RetroFitted::new(small_base(3), &fit(), 6).unwrap();
    b.load_state_dict(&a.state_dict()).unwrap();
    let (x, _, ret) = data(1, 12, 2, 8, 1);
    assert_eq!(
        values(&a.forward(&x, Some(&ret), None).unwrap()),
        values(&b.forward(&x, Some(&ret), None).unwrap())
    );
    let mut sd = a.state_dict();
    sd.remove("cca.0.query.weight");
    let e = b.load_state_dict(&sd).unwrap_err().to_string();
    assert!(
        e.contains("cca.0.query.weight") && e.contains("missing"),
        "{e}"
    );
    let (x, _, _) = data(1, 12, 2, 8, 1);
    let bad = Tensor::zeros((1, 2, 2, 8), DType::U32, &Device::Cpu).unwrap();
    let e = a.forward(&x, Some(&bad), None).unwrap_err().to_string();
    assert!(
        e.contains("ret") && e.contains("C = T / chunk_len = 12 / 4 = 3"),
        "{e}"
    );
}

/// A RETRO-fitted model whose CCA has left zero (trained a few steps), so the cache is tested on
/// blocks that change the logits.
fn trained(seed: u64, (states, positions, gated): (NeighbourStates, bool, bool)) -> RetroFitted {
    let model = RetroFitted::new(
        small_base(seed),
        &fit_reading(states, positions, gated),
        seed + 10,
    )
    .unwrap();
    let (x, y, ret) = data(2, 16, 2, 8, seed as u32);
    let mut opt = AdamW::new(model.named_vars(), AdamWParams::default()).unwrap();
    for _ in 0..5 {
        let loss = cross_entropy(&model.forward_train(&x, Some(&ret)).unwrap(), &y).unwrap();
        opt.step(&loss.backward().unwrap(), 1e-2).unwrap();
    }
    model
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    for (states, positions, gated) in FITS {
        cached_decoding_equals_the_full_forward_reading((states, positions, gated));
    }
}

fn cached_decoding_equals_the_full_forward_reading(fit: (NeighbourStates, bool, bool)) {
    let model = trained(7, fit);
    let (x, _, ret) = data(2, 19, 2, 8, 3); // 4 complete chunks of 4, and 3 tokens more
                                            // Ungated, and gated with chunk 1's neighbours of the first sequence left unread.
    let keep = Tensor::new(&[[1f32, 0., 1., 1.], [1., 1., 1., 1.]], &Device::Cpu).unwrap();
    for gate in [None, Some(&keep)] {
        let full = model.forward(&x, Some(&ret), gate).unwrap();
        // Prefills of several lengths (inside a chunk, at its end, across two), then one token
        // at a time, retrieving with the token that completes each chunk.
        for prefill in [1, 3, 4, 6, 9] {
            let mut cache = model.new_cache(true);
            let mut got = vec![];
            let mut t = 0;
            while t < 19 {
                let p = if t == 0 { prefill } else { 1 };
                let chunks = (t / 4)..((t + p) / 4);
                let some = !chunks.is_empty();
                let r = some.then(|| ret.narrow(1, chunks.start, chunks.len()).unwrap());
                let k = gate
                    .filter(|_| some)
                    .map(|g| g.narrow(1, chunks.start, chunks.len()).unwrap());
                let l = model
                    .forward_cached(
                        &x.narrow(1, t, p).unwrap(),
                        &mut cache,
                        r.as_ref(),
                        k.as_ref(),
                    )
                    .unwrap();
                got.push(l);
                t += p;
            }
            assert_eq!(cache.encoded_chunks(), 4);
            let got = Tensor::cat(&got, 1).unwrap();
            let worst = (got - &full).unwrap().abs().unwrap().max_all().unwrap();
            let worst = worst.to_scalar::<f32>().unwrap();
            assert!(
                worst < 1e-4,
                "{fit:?}, prefill {prefill}, gate {gate:?}: cached logits differ by {worst}"
            );
        }
    }
    // RETRO[OFF] on the cache is the base's cached decoding.
    let mut cache = model.new_cache(false);
    let off = model.forward_cached(&x, &mut cache, None, None).unwrap();
    assert_eq!(
        values(&off),
        values(&model.base().forward(&x, 0, None).unwrap())
    );
}

#[test]
fn the_cache_asks_for_neighbours_exactly_when_a_chunk_completes() {
    let model = trained(8, (NeighbourStates::Encoder, false, false));
    let (x, _, ret) = data(1, 8, 2, 8, 4);
    let mut cache = model.new_cache(true);
    let e = model
        .forward_cached(&x.narrow(1, 0, 4).unwrap(), &mut cache, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ret") && e.contains("1 chunk"), "{e}");
    let e = model
        .forward_cached(&x.narrow(1, 0, 4).unwrap(), &mut cache, Some(&ret), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("U = 1"), "{e}");
    let mut off = model.new_cache(false);
    let e = model
        .forward_cached(
            &x.narrow(1, 0, 4).unwrap(),
            &mut off,
            Some(&ret.narrow(1, 0, 1).unwrap()),
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("retrieval off"), "{e}");
}

#[test]
fn batched_steps_of_sequences_at_different_positions_equal_each_alone() {
    for (states, positions, gated) in FITS {
        batched_steps_equal_each_alone((states, positions, gated));
    }
}

fn batched_steps_equal_each_alone(fit: (NeighbourStates, bool, bool)) {
    let model = trained(9, fit);
    let (x, _, ret) = data(3, 19, 2, 8, 5);
    // Sequence 0 starts at once, 1 three steps later, 2 (RETRO[OFF]) six steps later: every
    // batched step mixes positions, chunk ends and a cache without retrieval.
    let starts = [0usize, 3, 6];
    let retrieval = [true, true, false];
    let mut alone: Vec<_> = retrieval.iter().map(|&r| model.new_cache(r)).collect();
    let mut batched: Vec<_> = retrieval.iter().map(|&r| model.new_cache(r)).collect();
    let inputs = |s: usize, t: usize| {
        let tok: u32 = x.get(s).unwrap().get(t).unwrap().to_scalar().unwrap();
        let r = (retrieval[s] && (t + 1).is_multiple_of(4)).then(|| {
            ret.get(s)
                .unwrap()
                .narrow(0, t / 4, 1)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
        });
        // The second sequence's chunk 2 is gated off.
        let k = r.as_ref().map(|_| {
            let v = if s == 1 && t / 4 == 2 { 0f32 } else { 1. };
            Tensor::new(&[[v]], &Device::Cpu).unwrap()
        });
        (tok, r, k)
    };
    let mut worst = 0f32;
    for step in 0..19 + 6 {
        let live: Vec<usize> = (0..3)
            .filter(|&s| step >= starts[s] && step - starts[s] < 19)
            .collect();
        let (mut toks, mut rets, mut keeps, mut want) = (vec![], vec![], vec![], vec![]);
        for &s in &live {
            let (tok, r, k) = inputs(s, step - starts[s]);
            let one = model
                .forward_cached(
                    &Tensor::new(&[[tok]], &Device::Cpu).unwrap(),
                    &mut alone[s],
                    r.as_ref(),
                    k.as_ref(),
                )
                .unwrap();
            want.push(one.flatten_all().unwrap());
            toks.push(tok);
            rets.push(r);
            keeps.push(k);
        }
        let mut caches: Vec<_> = batched
            .iter_mut()
            .enumerate()
            .filter(|(s, _)| live.contains(s))
            .map(|(_, c)| c)
            .collect();
        let got = model.step_batch(&toks, &mut caches, &rets, &keeps).unwrap();
        assert_eq!(got.dims(), &[live.len(), 40]);
        for (i, w) in want.iter().enumerate() {
            let d = (got.get(i).unwrap() - w).unwrap().abs().unwrap();
            worst = worst.max(d.max_all().unwrap().to_scalar::<f32>().unwrap());
        }
    }
    assert!(worst < 1e-5, "{fit:?}: batched logits differ by {worst}");
    for (a, b) in alone.iter().zip(&batched) {
        assert_eq!(a.position(), b.position());
        assert_eq!(a.encoded_chunks(), b.encoded_chunks());
    }
    // A batch whose parts disagree is refused by name.
    let mut c = [&mut model.new_cache(true)];
    let e = model
        .step_batch(&[1, 2], &mut c, &[None], &[None])
        .unwrap_err()
        .to_string();
    assert!(e.contains("one cache"), "{e}");
}

#[test]
fn positions_and_the_gate_are_part_of_what_the_cca_computes() {
    use NeighbourStates::BaseLayers;
    let (x, _, ret) = data(2, 16, 2, 8, 3);
    // The same trained weights without positions compute something else.
    let with = trained(7, (BaseLayers, true, true));
    let without =
        RetroFitted::new(small_base(7), &fit_reading(BaseLayers, false, true), 1).unwrap();
    without.load_state_dict(&with.state_dict()).unwrap();
    let a = values(&with.forward(&x, Some(&ret), None).unwrap());
    let b = values(&without.forward(&x, Some(&ret), None).unwrap());
    assert!(a.iter().zip(&b).any(|(a, b)| (a - b).abs() > 1e-3));
    // Gated, a fresh CCA's output projection is its layer's own, and its gate is closed.
    let fresh = RetroFitted::new(small_base(1), &fit_reading(BaseLayers, false, true), 3).unwrap();
    let sd = fresh.state_dict();
    let layer = *fresh.blocks().ca_layers.first().unwrap();
    assert_eq!(
        values(&sd["cca.0.output.weight"]),
        values(&fresh.base().block(layer).attn.o)
    );
    assert_eq!(values(&sd["cca.0.gate"]), [0.0]);
    // A gated model's weights do not load into an ungated one: the gate is named.
    let ungated =
        RetroFitted::new(small_base(1), &fit_reading(BaseLayers, false, false), 3).unwrap();
    let e = ungated.load_state_dict(&sd).unwrap_err().to_string();
    assert!(e.contains("cca.0.gate") && e.contains("unexpected"), "{e}");
}
