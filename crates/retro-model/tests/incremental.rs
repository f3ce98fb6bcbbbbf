//! Incremental decoding against the full forward: at every step the cached logits equal the logits of
//! `forward(x[:, :t+1], ret[:, :(t+1)/chunk_len])` at position t (retrieval on), and of
//! `forward_without_retrieval` (off); prefill then step likewise; the error cases; one PyTorch fixture.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use retro_model::{DecodeEngine, DecodeState, ModelError, RetroConfig, RetroModel};
use std::collections::HashMap;
use std::path::PathBuf;

const B: usize = 2;

/// Two layouts: CCA at {1, 3} with d_attn != d_model, and CCA at the very first layer.
fn configs() -> Vec<RetroConfig> {
    vec![
        RetroConfig {
            n_vocab: 13,
            d_model: 16,
            n_layers: 4,
            ca_layers: [1, 3].into(),
            chunk_len: 4,
            n_heads: 3,
            d_k: 6,
            d_ff: 24,
            enc_n_layers: 2,
            enc_ca_layers: [1].into(),
            layer_norm_eps: 1e-5,
            rope_base: 10_000.0,
        },
        RetroConfig {
            n_vocab: 11,
            d_model: 12,
            n_layers: 2,
            ca_layers: [0].into(),
            chunk_len: 3,
            n_heads: 2,
            d_k: 6,
            d_ff: 16,
            enc_n_layers: 2,
            enc_ca_layers: [0, 1].into(),
            layer_norm_eps: 1e-5,
            rope_base: 10_000.0,
        },
    ]
}

fn ids(shape: &[usize], n_vocab: usize, salt: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<u32> = (0..n as u64)
        .map(|i| {
            let mut z = (i + 1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(salt.wrapping_mul(0xBF58_476D_1CE4_E5B9));
            z = (z ^ (z >> 29)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 32)) % n_vocab as u64) as u32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `x [B, 4 chunks + 3]`, `ret [B, C, K 3, N 5]`.
fn inputs(c: &RetroConfig) -> (Tensor, Tensor) {
    let t = 4 * c.chunk_len + 3;
    (
        ids(&[B, t], c.n_vocab, 1),
        ids(&[B, t / c.chunk_len, 3, 5], c.n_vocab, 2),
    )
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-9
    } else {
        1e-4
    }
}

/// The neighbours to pass with the token at position t: `ret[:, t / cl]` at a chunk end.
fn neighbours_at(ret: &Tensor, t: usize, cl: usize) -> Option<Tensor> {
    (t % cl == cl - 1).then(|| ret.i((.., t / cl)).unwrap())
}

/// Full-forward logits `[B, V]` at position t, from the first t + 1 tokens only.
fn full(m: &RetroModel, x: &Tensor, ret: Option<&Tensor>, t: usize) -> Tensor {
    let cl = m.config().chunk_len;
    let xs = x.narrow(1, 0, t + 1).unwrap();
    let logits = match ret {
        Some(r) => m
            .forward(&xs, &r.narrow(1, 0, (t + 1) / cl).unwrap())
            .unwrap(),
        None => m.forward_without_retrieval(&xs).unwrap(),
    };
    logits.i((.., t)).unwrap()
}

fn step_all(
    m: &RetroModel,
    state: &mut DecodeState,
    x: &Tensor,
    ret: Option<&Tensor>,
    from: usize,
) {
    let cl = m.config().chunk_len;
    let dtype = m.dtype();
    for t in from..x.dim(1).unwrap() {
        assert_eq!(state.position(), t);
        let nb = ret.and_then(|r| neighbours_at(r, t, cl));
        let got = m.step(state, &x.i((.., t)).unwrap(), nb.as_ref()).unwrap();
        assert_eq!(got.dims(), &[B, m.config().n_vocab]);
        let d = max_abs(&got, &full(m, x, ret, t));
        assert!(
            d < tol(dtype),
            "{dtype:?} retrieval {}: step logits at t = {t} differ from the full forward by {d}",
            ret.is_some()
        );
    }
}

/// Both implementations of decoding, each checked against the full forward.
const ENGINES: [DecodeEngine; 2] = [DecodeEngine::Rows, DecodeEngine::Tensors];

fn start(m: &RetroModel, retrieval: bool, engine: DecodeEngine) -> DecodeState {
    let state = m.start_decoding_with(B, retrieval, engine).unwrap();
    assert_eq!(state.engine(), engine);
    state
}

#[test]
fn every_step_equals_the_full_forward() {
    for (ci, c) in configs().iter().enumerate() {
        for (dtype, engine) in [DType::F32, DType::F64]
            .into_iter()
            .flat_map(|d| ENGINES.map(|e| (d, e)))
        {
            let m = RetroModel::new(c, 7 + ci as u64, dtype, &Device::Cpu).unwrap();
            let (x, ret) = inputs(c);
            // Retrieval on: crosses at least 4 chunk boundaries.
            let mut state = start(&m, true, engine);
            step_all(&m, &mut state, &x, Some(&ret), 0);
            assert_eq!(state.completed_chunks(), ret.dim(1).unwrap());
            assert!(state.completed_chunks() >= 4);
            assert_eq!(state.cached_positions(0).unwrap(), x.dim(1).unwrap());
            // Retrieval off (RETRO[OFF]).
            let mut state = start(&m, false, engine);
            step_all(&m, &mut state, &x, None, 0);
            assert_eq!(state.completed_chunks(), 0);
        }
    }
}

/// The default engine on the CPU is the rows one, and it is an error elsewhere than f32 and f64.
#[test]
fn the_rows_engine_runs_on_the_cpu_in_f32_and_f64() {
    let c = &configs()[0];
    for dtype in [DType::F32, DType::F64] {
        let m = RetroModel::new(c, 1, dtype, &Device::Cpu).unwrap();
        assert_eq!(m.start_decoding(B, true).engine(), DecodeEngine::Rows);
    }
    let m = RetroModel::new(c, 1, DType::BF16, &Device::Cpu).unwrap();
    assert!(m.start_decoding_with(B, true, DecodeEngine::Rows).is_err());
    assert_eq!(m.start_decoding(B, true).engine(), DecodeEngine::Tensors);
}

/// 150 positions: each layer's cache grows past its first allocation (64 positions) and twice
/// more, and the logits still equal the full forward's.
#[test]
fn long_decoding_equals_the_full_forward_across_cache_growth() {
    let c = &configs()[0];
    let m = RetroModel::new(c, 5, DType::F64, &Device::Cpu).unwrap();
    let t = 150;
    let (x, ret) = (
        ids(&[B, t], c.n_vocab, 3),
        ids(&[B, t / c.chunk_len, 2, 6], c.n_vocab, 4),
    );
    let mut state = m.start_decoding(B, true);
    let all = m.forward(&x, &ret).unwrap();
    for p in 0..t {
        let nb = neighbours_at(&ret, p, c.chunk_len);
        let got = m
            .step(&mut state, &x.i((.., p)).unwrap(), nb.as_ref())
            .unwrap();
        let d = max_abs(&got, &all.i((.., p)).unwrap());
        assert!(
            d < 1e-9,
            "t = {p}: the step differs from the full forward by {d}"
        );
    }
}

/// `keep [B, C]`: a mix of kept and gated chunks, different in each row.
fn keep_mix(b: usize, c: usize, dtype: DType) -> Tensor {
    let v: Vec<f64> = (0..b * c)
        .map(|i| {
            if (i / c + i % c).is_multiple_of(2) {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (b, c), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn gated_neighbours_compute_retro_off_where_gated() {
    for (ci, c) in configs().iter().enumerate() {
        for dtype in [DType::F32, DType::F64] {
            let m = RetroModel::new(c, 11 + ci as u64, dtype, &Device::Cpu).unwrap();
            let (x, ret) = inputs(c);
            let cl = c.chunk_len;
            let chunks = ret.dim(1).unwrap();
            let ones = Tensor::ones((B, chunks), dtype, &Device::Cpu).unwrap();
            let zeros = ones.zeros_like().unwrap();
            let on = m.forward(&x, &ret).unwrap();
            let off = m.forward_without_retrieval(&x).unwrap();
            // All kept: the plain forward. All gated: RETRO[OFF], exactly.
            let d = max_abs(&m.forward_gated(&x, &ret, &ones).unwrap(), &on);
            assert!(
                d < tol(dtype),
                "{dtype:?}: all kept differs from forward by {d}"
            );
            let d = max_abs(&m.forward_gated(&x, &ret, &zeros).unwrap(), &off);
            assert!(
                d == 0.0,
                "{dtype:?}: all gated differs from RETRO[OFF] by {d}"
            );
            // A mix: positions before the first kept chunk's rows are RETRO[OFF]'s; row 1 gates
            // chunk 0, so its first 2 * cl - 1 positions (up to chunk 1's CCA rows) are OFF's.
            let keep = keep_mix(B, chunks, dtype);
            let mixed = m.forward_gated(&x, &ret, &keep).unwrap();
            let head = |t: &Tensor| t.i((1, ..2 * cl - 1)).unwrap();
            assert!(max_abs(&head(&mixed), &head(&off)) == 0.0);
            assert!(max_abs(&mixed, &on) > 1e-3 && max_abs(&mixed, &off) > 1e-3);
            // Step by step with the same gates: the gated full forward at every position.
            for engine in ENGINES {
                let mut state = start(&m, true, engine);
                for t in 0..x.dim(1).unwrap() {
                    let nb = neighbours_at(&ret, t, cl);
                    let k = nb.as_ref().map(|_| keep.i((.., t / cl)).unwrap());
                    let got = m
                        .step_gated(&mut state, &x.i((.., t)).unwrap(), nb.as_ref(), k.as_ref())
                        .unwrap();
                    let d = max_abs(&got, &mixed.i((.., t)).unwrap());
                    assert!(
                        d < tol(dtype),
                        "{dtype:?} {engine:?}: gated step at t = {t} differs by {d}"
                    );
                }
            }
        }
    }
}

#[test]
fn malformed_gates_are_errors() {
    let c = &configs()[0];
    let m = RetroModel::new(c, 3, DType::F32, &Device::Cpu).unwrap();
    let (x, ret) = inputs(c);
    let chunks = ret.dim(1).unwrap();
    let wrong = Tensor::ones((B, chunks + 1), DType::F32, &Device::Cpu).unwrap();
    shape_err(m.forward_gated(&x, &ret, &wrong), "keep", "must be [B, C]");
    let ints = Tensor::ones((B, chunks), DType::U32, &Device::Cpu).unwrap();
    shape_err(m.forward_gated(&x, &ret, &ints), "keep", "floats");
    let mut state = m.start_decoding(B, true);
    let one = Tensor::ones(B, DType::F32, &Device::Cpu).unwrap();
    shape_err(
        m.step_gated(&mut state, &x.i((.., 0)).unwrap(), None, Some(&one)),
        "keep",
        "without neighbours",
    );
    assert_eq!(
        state.position(),
        0,
        "a failed check leaves the state as it was"
    );
}

#[test]
fn retrieval_changes_the_logits_after_the_first_chunk() {
    // Guards against a test that passes because CCA does nothing.
    let c = &configs()[0];
    let m = RetroModel::new(c, 3, DType::F64, &Device::Cpu).unwrap();
    let (x, ret) = inputs(c);
    let (mut on, mut off) = (m.start_decoding(B, true), m.start_decoding(B, false));
    let cl = c.chunk_len;
    for t in 0..x.dim(1).unwrap() {
        let tok = x.i((.., t)).unwrap();
        let a = m
            .step(&mut on, &tok, neighbours_at(&ret, t, cl).as_ref())
            .unwrap();
        let b = m.step(&mut off, &tok, None).unwrap();
        let d = max_abs(&a, &b);
        if t < cl - 1 {
            assert!(
                d < 1e-12,
                "t = {t}: no neighbour yet, yet on/off differ by {d}"
            );
        } else {
            assert!(d > 1e-6, "t = {t}: retrieval on and off agree ({d})");
        }
    }
}

#[test]
fn prefill_then_step_equals_the_full_forward() {
    for (ci, c) in configs().iter().enumerate() {
        for (dtype, engine) in [DType::F32, DType::F64]
            .into_iter()
            .flat_map(|d| ENGINES.map(|e| (d, e)))
        {
            let m = RetroModel::new(c, 11 + ci as u64, dtype, &Device::Cpu).unwrap();
            let cl = c.chunk_len;
            let (x, ret) = inputs(c);
            for retrieval in [true, false] {
                let r = retrieval.then_some(&ret);
                // A prompt that ends mid-chunk, then the rest step by step.
                let p = 2 * cl + 1;
                let mut state = start(&m, retrieval, engine);
                let got = m
                    .prefill(
                        &mut state,
                        &x.narrow(1, 0, p).unwrap(),
                        r.map(|r| r.narrow(1, 0, p / cl).unwrap()).as_ref(),
                    )
                    .unwrap();
                let xs = x.narrow(1, 0, p).unwrap();
                let want = match r {
                    Some(r) => m.forward(&xs, &r.narrow(1, 0, p / cl).unwrap()).unwrap(),
                    None => m.forward_without_retrieval(&xs).unwrap(),
                };
                let d = max_abs(&got, &want);
                assert!(d < tol(dtype), "{dtype:?} prefill logits differ by {d}");
                assert_eq!(state.position(), p);
                step_all(&m, &mut state, &x, r, p);

                // Two prefills: the second starts mid-chunk, its ret holds the chunks it completes.
                let mut state = start(&m, retrieval, engine);
                let (p1, p2) = (cl + 2, 2 * cl);
                m.prefill(
                    &mut state,
                    &x.narrow(1, 0, p1).unwrap(),
                    r.map(|r| r.narrow(1, 0, 1).unwrap()).as_ref(),
                )
                .unwrap();
                let got = m
                    .prefill(
                        &mut state,
                        &x.narrow(1, p1, p2).unwrap(),
                        r.map(|r| r.narrow(1, 1, 2).unwrap()).as_ref(),
                    )
                    .unwrap();
                let t_end = p1 + p2 - 1;
                let d = max_abs(&got.i((.., p2 - 1)).unwrap(), &full(&m, &x, r, t_end));
                assert!(d < tol(dtype), "{dtype:?} second prefill differs by {d}");
                step_all(&m, &mut state, &x, r, p1 + p2);
            }
        }
    }
}

/// A shape error about `input` whose message holds `needle`.
fn shape_err(r: retro_model::Result<Tensor>, input: &str, needle: &str) {
    match r {
        Err(e @ ModelError::Shape { input: got, .. }) => {
            assert_eq!(got, input, "{e}");
            let msg = e.to_string();
            assert!(msg.contains(needle), "error `{msg}` lacks `{needle}`")
        }
        Err(e) => panic!("expected a shape error of `{input}` naming `{needle}`, got {e}"),
        Ok(_) => panic!("expected a shape error of `{input}` naming `{needle}`, got Ok"),
    }
}

#[test]
fn misplaced_or_missing_neighbours_are_errors() {
    let c = &configs()[0];
    let cl = c.chunk_len;
    let m = RetroModel::new(c, 5, DType::F32, &Device::Cpu).unwrap();
    let (x, ret) = inputs(c);
    let nb = ret.i((.., 0)).unwrap();
    let mut state = m.start_decoding(B, true);
    // Neighbours at t = 0, which completes no chunk.
    shape_err(
        m.step(&mut state, &x.i((.., 0)).unwrap(), Some(&nb)),
        "neighbours",
        "t = 0",
    );
    assert_eq!(
        state.position(),
        0,
        "a failed step leaves the state as it was"
    );
    for t in 0..cl - 1 {
        m.step(&mut state, &x.i((.., t)).unwrap(), None).unwrap();
    }
    // The last token of chunk 0 without its neighbours.
    let t = cl - 1;
    shape_err(
        m.step(&mut state, &x.i((.., t)).unwrap(), None),
        "neighbours",
        &format!("t = {t}"),
    );
    // Wrong shapes: tokens [B+1], neighbours [B, K] or with another batch.
    shape_err(
        m.step(&mut state, &ids(&[B + 1], c.n_vocab, 3), Some(&nb)),
        "tokens",
        "must be [B]",
    );
    shape_err(
        m.step(
            &mut state,
            &x.i((.., t)).unwrap(),
            Some(&nb.i((.., .., 0)).unwrap()),
        ),
        "neighbours",
        "[B, K, N]",
    );
    shape_err(
        m.step(
            &mut state,
            &x.i((.., t)).unwrap(),
            Some(&nb.narrow(0, 0, 1).unwrap()),
        ),
        "neighbours",
        "[B, K, N]",
    );
    // Out-of-range neighbour ids.
    let bad = (nb.to_dtype(DType::I64).unwrap() + c.n_vocab as f64).unwrap();
    assert!(matches!(
        m.step(&mut state, &x.i((.., t)).unwrap(), Some(&bad)),
        Err(ModelError::TokenOutOfRange { .. })
    ));
    assert_eq!(state.position(), t);
    // Out-of-range token ids as u32, the dtype the step checks without tensor ops.
    let bad = (x.i((.., t)).unwrap().to_dtype(DType::I64).unwrap() + c.n_vocab as f64)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    assert!(matches!(
        m.step(&mut state, &bad, Some(&nb)),
        Err(ModelError::TokenOutOfRange {
            input: "tokens",
            ..
        })
    ));
    assert_eq!(state.position(), t);
    // Still usable after the errors: the state is exactly as before them.
    let got = m
        .step(&mut state, &x.i((.., t)).unwrap(), Some(&nb))
        .unwrap();
    let d = max_abs(&got, &full(&m, &x, Some(&ret), t));
    assert!(d < 1e-4, "after the errors the step differs by {d}");

    // Retrieval off: neighbours are an error.
    let mut off = m.start_decoding(B, false);
    for t in 0..cl - 1 {
        m.step(&mut off, &x.i((.., t)).unwrap(), None).unwrap();
    }
    shape_err(
        m.step(&mut off, &x.i((.., cl - 1)).unwrap(), Some(&nb)),
        "neighbours",
        "retrieval is off",
    );

    // Prefill: missing ret, ret with the wrong number of chunks, ret with retrieval off.
    let xs = x.narrow(1, 0, 2 * cl).unwrap();
    shape_err(
        m.prefill(&mut m.start_decoding(B, true), &xs, None),
        "ret",
        "t = 0",
    );
    shape_err(
        m.prefill(
            &mut m.start_decoding(B, true),
            &xs,
            Some(&ret.narrow(1, 0, 1).unwrap()),
        ),
        "ret",
        "U = 2",
    );
    shape_err(
        m.prefill(
            &mut m.start_decoding(B, false),
            &xs,
            Some(&ret.narrow(1, 0, 2).unwrap()),
        ),
        "ret",
        "retrieval is off",
    );
    // A prompt shorter than a chunk needs no ret.
    let short = m
        .prefill(
            &mut m.start_decoding(B, true),
            &x.narrow(1, 0, cl - 1).unwrap(),
            None,
        )
        .unwrap();
    assert_eq!(short.dims(), &[B, cl - 1, c.n_vocab]);
}

fn fixture(file: &str) -> HashMap<String, Tensor> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model/labml_layout");
    candle_core::safetensors::load(dir.join(file), &Device::Cpu).unwrap()
}

#[test]
fn cached_decoding_matches_the_pytorch_fixture() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model/labml_layout");
    let cfg = RetroConfig::from_json_file(&dir.join("config.json")).unwrap();
    let (inputs, expected) = (
        fixture("inputs.safetensors"),
        fixture("expected.safetensors"),
    );
    let (x, ret) = (&inputs["x"], &inputs["ret"]);
    let (b, t) = x.dims2().unwrap();
    assert!(t / cfg.chunk_len >= 1);
    for dtype in [DType::F32, DType::F64] {
        let m = RetroModel::from_safetensors(
            &cfg,
            &dir.join("weights.safetensors"),
            dtype,
            &Device::Cpu,
        )
        .unwrap();
        for (retrieval, key) in [(true, "logits"), (false, "logits_off")] {
            let mut state = m.start_decoding(b, retrieval);
            let mut worst = 0f64;
            for p in 0..t {
                let nb = if retrieval {
                    neighbours_at(ret, p, cfg.chunk_len)
                } else {
                    None
                };
                let got = m
                    .step(&mut state, &x.i((.., p)).unwrap(), nb.as_ref())
                    .unwrap();
                worst = worst.max(max_abs(&got, &expected[key].i((.., p)).unwrap()));
            }
            assert!(
                worst < 1e-4,
                "{dtype:?} {key}: cached logits differ from PyTorch by {worst}"
            );
        }
    }
}

/// A config at the widths the rows engine's compiled kernels take (d_k 16, 32-wide panels of
/// outputs), at batch 1 (one row: each block's outputs and heads split across the cores) and
/// batch 3 (three-row GEMM tiles), with K 2 neighbours of N 8 (16 encoder rows a sequence): the
/// prompt prefilled, then every step, equal to the full forward.
#[test]
fn the_compiled_kernel_widths_equal_the_full_forward() {
    let c = RetroConfig {
        n_vocab: 17,
        d_model: 32,
        n_layers: 3,
        ca_layers: [1, 2].into(),
        chunk_len: 4,
        n_heads: 4,
        d_k: 16,
        d_ff: 96,
        enc_n_layers: 2,
        enc_ca_layers: [1].into(),
        layer_norm_eps: 1e-5,
        rope_base: 10_000.0,
    };
    let m = RetroModel::new(&c, 11, DType::F32, &Device::Cpu).unwrap();
    for b in [1, 3] {
        let t = 7 * c.chunk_len + 1;
        let (x, ret) = (
            ids(&[b, t], c.n_vocab, 5),
            ids(&[b, t / c.chunk_len, 2, 8], c.n_vocab, 6),
        );
        let all = m.forward(&x, &ret).unwrap();
        let mut state = m.start_decoding(b, true);
        assert_eq!(state.engine(), DecodeEngine::Rows);
        let p = 2 * c.chunk_len + 1;
        let got = m
            .prefill(
                &mut state,
                &x.narrow(1, 0, p).unwrap(),
                Some(&ret.narrow(1, 0, 2).unwrap()),
            )
            .unwrap();
        let d = max_abs(&got, &all.narrow(1, 0, p).unwrap());
        assert!(
            d < 1e-4,
            "batch {b}: prefill differs from the full forward by {d}"
        );
        for s in p..t {
            let nb = neighbours_at(&ret, s, c.chunk_len);
            let got = m
                .step(&mut state, &x.i((.., s)).unwrap(), nb.as_ref())
                .unwrap();
            let d = max_abs(&got, &all.i((.., s)).unwrap());
            assert!(
                d < 1e-4,
                "batch {b}, t = {s}: the step differs from the full forward by {d}"
            );
        }
    }
}

#[test]
fn these_tests_pass_with_the_avx2_and_baseline_kernels() {
    common::rerun_with_the_instruction_set_capped(
        "these_tests_pass_with_the_avx2_and_baseline_kernels",
    );
}

/// Neighbours passed as a block `[B, 1, K, N]` (what a retriever returns) give the logits the
/// same ids as a tensor give, on both engines; a block of the wrong shape or with an id past the
/// vocabulary is an error that leaves the state as it was.
#[test]
fn neighbours_as_a_block_equal_neighbours_as_a_tensor() {
    use retro_model::NeighbourBlock;
    let c = &configs()[0];
    let cl = c.chunk_len;
    let m = RetroModel::new(c, 9, DType::F32, &Device::Cpu).unwrap();
    let (x, ret) = inputs(c);
    let block_at = |t: usize| {
        neighbours_at(&ret, t, cl)
            .map(|n| NeighbourBlock::from_tensor(&n.unsqueeze(1).unwrap()).unwrap())
    };
    for engine in ENGINES {
        let (mut a, mut b) = (start(&m, true, engine), start(&m, true, engine));
        for t in 0..x.dim(1).unwrap() {
            let tok = x.i((.., t)).unwrap();
            let want = m
                .step(&mut a, &tok, neighbours_at(&ret, t, cl).as_ref())
                .unwrap();
            let got = m
                .step_block(&mut b, &tok, block_at(t).as_ref(), None)
                .unwrap();
            assert_eq!(max_abs(&got, &want), 0.0, "{engine:?} at t = {t}");
        }
        assert_eq!(b.completed_chunks(), ret.dim(1).unwrap());
    }
    let mut state = m.start_decoding(B, true);
    for t in 0..cl - 1 {
        m.step_block(&mut state, &x.i((.., t)).unwrap(), None, None)
            .unwrap();
    }
    let tok = x.i((.., cl - 1)).unwrap();
    let n = ret.i((.., 0)).unwrap(); // [B, K, N]
    let (k, nn) = (n.dim(1).unwrap(), n.dim(2).unwrap());
    let flat: Vec<u32> = n.flatten_all().unwrap().to_vec1().unwrap();
    // [B, K, 1, N]: the chunk axis in the wrong place.
    let wrong = NeighbourBlock::new(flat.clone(), [B, k, 1, nn]).unwrap();
    shape_err(
        m.step_block(&mut state, &tok, Some(&wrong), None),
        "neighbours",
        "[B, 1, K, N]",
    );
    let mut too_big = flat;
    too_big[3] = c.n_vocab as u32;
    let too_big = NeighbourBlock::new(too_big, [B, 1, k, nn]).unwrap();
    match m.step_block(&mut state, &tok, Some(&too_big), None) {
        Err(ModelError::TokenOutOfRange { input, id, .. }) => {
            assert_eq!((input, id), ("neighbours", c.n_vocab as u64))
        }
        other => panic!(
            "expected an id out of range, got {:?}",
            other.map(|t| t.dims().to_vec())
        ),
    }
    assert_eq!(
        state.position(),
        cl - 1,
        "failed steps leave the state as it was"
    );
}
