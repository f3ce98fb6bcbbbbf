//! The block against its composition from candle ops: values, and the gradients of the input,
//! the context and every parameter, for each kind of attention and both float types.

use super::*;
use crate::testutil::{max_diff, randn, rel_diff, seed};
use candle_core::{DType, Device, Result, Var, D};

fn rand(shape: &[usize], dt: DType) -> Var {
    Var::from_tensor(&randn(shape, dt)).unwrap()
}

struct Block {
    vars: Vec<Var>,
    heads: usize,
}

impl Block {
    fn new(d: usize, heads: usize, dk: usize, dt: DType) -> Self {
        let da = heads * dk;
        let shapes: [&[usize]; 10] = [
            &[d],
            &[d],
            &[da, d],
            &[da],
            &[da, d],
            &[da],
            &[da, d],
            &[da],
            &[d, da],
            &[d],
        ];
        let vars = shapes.iter().map(|s| rand(s, dt)).collect();
        Self { vars, heads }
    }
    fn params(&self) -> AttentionBlockParams<'_> {
        let v = &self.vars;
        AttentionBlockParams {
            norm_w: &v[0],
            norm_b: &v[1],
            wq: &v[2],
            bq: &v[3],
            wk: &v[4],
            bk: &v[5],
            wv: &v[6],
            bv: &v[7],
            wo: &v[8],
            bo: &v[9],
            eps: 1e-5,
            n_heads: self.heads,
        }
    }
    fn lin(&self, x: &Tensor, i: usize) -> Tensor {
        let (w, b) = (&self.vars[i], &self.vars[i + 1]);
        x.broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(b)
            .unwrap()
    }
    fn norm(&self, x: &Tensor) -> Tensor {
        candle_nn::ops::layer_norm_slow(x, &self.vars[0], &self.vars[1], 1e-5).unwrap()
    }
    /// Plain attention of `q [g, sq, da]`, `k, v [g, sk, da]` over heads, from candle ops.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Tensor {
        let (g, sq, da) = q.dims3().unwrap();
        let sk = k.dim(1).unwrap();
        let dk = da / self.heads;
        let heads = |t: &Tensor, s: usize| {
            t.reshape((g, s, self.heads, dk))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (heads(q, sq), heads(k, sk), heads(v, sk));
        let mut s = (q.matmul(&k.t().unwrap()).unwrap() / (dk as f64).sqrt()).unwrap();
        if causal {
            let m: Vec<f64> = (0..sq * sk)
                .map(|i| {
                    if i % sk <= i / sk {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect();
            let m = Tensor::from_vec(m, (sq, sk), &Device::Cpu)
                .unwrap()
                .to_dtype(s.dtype())
                .unwrap();
            s = s.broadcast_add(&m).unwrap();
        }
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((g, sq, da))
            .unwrap()
    }
}

/// Values and the gradients of `x`, `ctx` and every parameter agree with `want`.
fn check(got: Tensor, want: Tensor, inputs: &[&Var], block: &Block, tol: f64, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}");
    assert!(
        max_diff(&got, &want) < tol,
        "{what}: values {}",
        max_diff(&got, &want)
    );
    let up = randn(got.dims(), got.dtype());
    let g1 = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in inputs.iter().copied().chain(&block.vars).enumerate() {
        let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
        assert_eq!(a.dims(), v.dims());
        // Relative to the gradient's scale: random unit weights make some gradients large.
        let diff = rel_diff(a, b);
        assert!(diff < tol, "{what}: gradient {i} {:?}: {diff}", v.dims());
    }
}

/// The inference op computes the training op's forward: the same values, and no graph.
fn same_for_inference(train: &Tensor, inference: Result<Option<Tensor>>) {
    let inference = inference.unwrap().expect("the op applies");
    assert_eq!(inference.dims(), train.dims());
    assert!(max_diff(&inference, train) == 0.0, "inference differs");
    assert!(!inference.track_op(), "an inference result keeps a graph");
}

const TYPES: [(DType, f64); 2] = [(DType::F64, 1e-9), (DType::F32, 2e-3)];

#[test]
fn self_attention_equals_the_composition() {
    seed(1);
    let (g, s, d, heads, dk) = (3, 7, 8, 2, 4);
    for (dt, tol) in TYPES {
        let block = Block::new(d, heads, dk, dt);
        let x = rand(&[g, s, d], dt);
        let theta: Vec<f64> = (0..s * dk / 2).map(|i| 0.3 * i as f64).collect();
        let theta = Tensor::from_vec(theta, (s, dk / 2), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
        for causal in [false, true] {
            let attend = Attend::SelfAttention {
                cos: &cos,
                sin: &sin,
                causal,
            };
            let got = attention_block(&x, attend, &block.params())
                .unwrap()
                .unwrap();
            let attend = Attend::SelfAttention {
                cos: &cos,
                sin: &sin,
                causal,
            };
            same_for_inference(&got, attention_block_inference(&x, attend, &block.params()));
            let xn = block.norm(&x);
            let rope = |t: Tensor| {
                let t = t.reshape((g, s, heads, dk)).unwrap();
                crate::fused_norm::rope_bshd_slow(&t, &cos, &sin)
                    .unwrap()
                    .reshape((g, s, heads * dk))
                    .unwrap()
            };
            let (q, k) = (rope(block.lin(&xn, 2)), rope(block.lin(&xn, 4)));
            let o = block.attend(&q, &k, &block.lin(&xn, 6), causal);
            let want = (block.lin(&o, 8) + &*x).unwrap();
            check(
                got,
                want,
                &[&x],
                &block,
                tol,
                &format!("{dt:?} causal {causal}"),
            );
        }
    }
}

#[test]
fn cross_attention_equals_the_composition() {
    seed(2);
    // x as the encoder has it, [b, c, k, n, d]; the context [b, c, chunk, d].
    let (b, c, k, n, cl, d, heads, dk) = (2, 3, 2, 4, 5, 8, 2, 4);
    for (dt, tol) in TYPES {
        let block = Block::new(d, heads, dk, dt);
        let x = rand(&[b, c, k, n, d], dt);
        let ctx = rand(&[b, c, cl, d], dt);
        let attend = Attend::Cross {
            ctx: &ctx,
            groups: b * c,
        };
        let got = attention_block(&x, attend, &block.params())
            .unwrap()
            .unwrap();
        let attend = Attend::Cross {
            ctx: &ctx,
            groups: b * c,
        };
        same_for_inference(&got, attention_block_inference(&x, attend, &block.params()));
        let xn = block.norm(&x).reshape((b * c, k * n, d)).unwrap();
        let cg = ctx.reshape((b * c, cl, d)).unwrap();
        let o = block.attend(
            &block.lin(&xn, 2),
            &block.lin(&cg, 4),
            &block.lin(&cg, 6),
            false,
        );
        let want = (block.lin(&o, 8).reshape((b, c, k, n, d)).unwrap() + &*x).unwrap();
        check(got, want, &[&x, &ctx], &block, tol, &format!("{dt:?}"));
    }
}

#[test]
fn chunked_cross_attention_equals_the_composition() {
    seed(3);
    let (b, cl, kn, d, heads, dk) = (2, 3, 4, 8, 2, 4);
    // t a multiple of the chunk, one more, and two more (the last chunk partly cut).
    for t in [6, 7, 8] {
        for (dt, tol) in TYPES {
            let c = t / cl;
            let block = Block::new(d, heads, dk, dt);
            let x = rand(&[b, t, d], dt);
            let e = rand(&[b, c, 2, kn / 2, d], dt);
            let attend = Attend::Chunked {
                ctx: &e,
                chunk_len: cl,
            };
            let got = attention_block(&x, attend, &block.params())
                .unwrap()
                .unwrap();
            let attend = Attend::Chunked {
                ctx: &e,
                chunk_len: cl,
            };
            same_for_inference(&got, attention_block_inference(&x, attend, &block.params()));
            // As the reference: drop cl - 1 rows, norm, pad, attend chunk-wise, shift back.
            let kept = t - (cl - 1);
            let xs = block
                .norm(&x.narrow(1, cl - 1, kept).unwrap())
                .pad_with_zeros(1, 0, c * cl - kept)
                .unwrap()
                .reshape((b * c, cl, d))
                .unwrap();
            let eg = e.reshape((b * c, kn, d)).unwrap();
            let o = block
                .attend(
                    &block.lin(&xs, 2),
                    &block.lin(&eg, 4),
                    &block.lin(&eg, 6),
                    false,
                )
                .reshape((b, c * cl, heads * dk))
                .unwrap()
                .narrow(1, 0, kept)
                .unwrap();
            let want = (block.lin(&o, 8).pad_with_zeros(1, cl - 1, 0).unwrap() + &*x).unwrap();
            check(got, want, &[&x, &e], &block, tol, &format!("{dt:?} t {t}"));
        }
    }
}

#[test]
fn a_context_that_does_not_split_is_an_error() {
    seed(4);
    let block = Block::new(8, 2, 4, DType::F32);
    let x = rand(&[2, 6, 8], DType::F32);
    let e = rand(&[2, 3, 4, 8], DType::F32); // 3 chunks' neighbours for t = 6, chunk 3: c = 2
    let err = attention_block(
        &x,
        Attend::Chunked {
            ctx: &e,
            chunk_len: 3,
        },
        &block.params(),
    );
    assert!(format!("{}", err.err().unwrap()).contains("chunk_len 3"));
    let err = attention_block(&x, Attend::Cross { ctx: &e, groups: 5 }, &block.params());
    assert!(format!("{}", err.err().unwrap()).contains("5 groups"));
}
