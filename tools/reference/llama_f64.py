"""Float64 reference logits for the SmolLM2-135M-Instruct GGUF model (Llama architecture), in plain numpy.

An implementation of the Llama forward pass independent of llama.cpp and of the Rust crate: it reads the
GGUF with the `gguf` package, dequantises every weight exactly (float64) and does all the arithmetic in
float64, so its logits are what the quantised model means without any rounding of activations, of the KV
cache or of the accumulations. It writes a JSON fixture for the prompts of the llama.cpp fixture
(crates/retro-model/tests/fixtures/smollm2_llama_cpp.json, whose "ids" and "probe_ids" it reads), with the
same per-position fields ("argmax", "margin", "top" [[id, logit] x 8], "probe_logits"), values rounded to
6 decimals. This is for generating fixtures by hand, never for CI.

Dependency (in a separate venv):
    pip install gguf numpy

Usage:
    python tools/reference/llama_f64.py [GGUF] [--ids FIXTURE] [--out OUT] [--npy DIR]

GGUF defaults to $RETRO_SHARED/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf when
RETRO_SHARED is set, else /work/shared/models/...; FIXTURE to the llama.cpp fixture above; OUT to
crates/retro-model/tests/fixtures/smollm2_f64.json. --npy DIR also saves each prompt's full logits
(float64, [T, n_vocab]) as DIR/prompt{i}.npy, for comparisons.

Model, as llama.cpp runs LLM_ARCH_LLAMA:
  - GGUF tensors: a tensor of GGUF shape [ne0, ne1] is stored row-major as ne1 rows of ne0 values, so the
    numpy arrays are [ne1, ne0] = [out, in] (token_embd: [n_vocab, d]); y = x @ W.T.
  - Dequantisation: Q8_0 blocks of 32: d (f16) * q (int8); Q4_1 blocks of 32: d (f16) * q (low nibbles give
    elements 0..15, high nibbles 16..31) + m (f16); both evaluated exactly in float64 and checked against
    gguf.quants.dequantize (which evaluates them in float32). Other types go through gguf.quants.dequantize.
  - x = token_embd[ids]; per layer: h = rmsnorm(x) * attn_norm; q, k, v = h @ Wq.T, h @ Wk.T, h @ Wv.T;
    RoPE on q and k per head in the interleaved form (GGML_ROPE_TYPE_NORM: pairs (x[2i], x[2i+1]) rotated by
    pos * base^(-2i/n_rot)); the converter permuted the rows of attn_q/attn_k for this, so it is applied to
    the weights as stored; grouped-query attention (query head h uses KV head h // (n_head / n_head_kv)),
    causal, scale 1/sqrt(head_dim); x += attn @ Wo.T; h = rmsnorm(x) * ffn_norm;
    x += (silu(h @ Wgate.T) * (h @ Wup.T)) @ Wdown.T; logits = (rmsnorm(x) * output_norm) @ output.T, where
    output is token_embd when the GGUF has no output.weight (tied embeddings).
  - rmsnorm(x) = x / sqrt(mean(x^2) + eps) with eps from llama.attention.layer_norm_rms_epsilon (its float32
    value widened to float64).
"""

import argparse
import importlib.metadata
import json
import os
import shlex
import sys
import time

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

from logit_fixture import default_gguf, logit_entry, sha256_file, write_fixture

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
FIXTURES = os.path.join(REPO, 'crates', 'retro-model', 'tests', 'fixtures')
DEFAULT_IDS = os.path.join(FIXTURES, 'smollm2_llama_cpp.json')
DEFAULT_OUT = os.path.join(FIXTURES, 'smollm2_f64.json')



def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def dequant_f64(t):
    """Exact float64 values of tensor t, shaped [ne1, ne0] (row-major, reversed GGUF shape)."""
    ne = [int(n) for n in t.shape]
    shape = tuple(reversed(ne))
    raw = np.asarray(t.data)
    if t.tensor_type == QT.F32:
        return raw.astype(np.float64).reshape(shape)
    if t.tensor_type == QT.F16:
        return raw.view(np.float16).astype(np.float64).reshape(shape)
    if t.tensor_type == QT.Q8_0:
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float64)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float64)
        return (d * q).reshape(shape)
    if t.tensor_type == QT.Q4_1:
        blocks = raw.reshape(-1, 20)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
        qs = blocks[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64)
        return (d * q + m).reshape(shape)
    return gguf.quants.dequantize(raw, t.tensor_type).astype(np.float64).reshape(shape)


class Model:
    def __init__(self, path):
        reader = gguf.GGUFReader(path)
        arch = field(reader, 'general.architecture')
        assert arch == 'llama', arch
        self.n_layer = int(field(reader, 'llama.block_count'))
        self.d = int(field(reader, 'llama.embedding_length'))
        self.n_ff = int(field(reader, 'llama.feed_forward_length'))
        self.n_head = int(field(reader, 'llama.attention.head_count'))
        self.n_head_kv = int(field(reader, 'llama.attention.head_count_kv'))
        self.eps = float(field(reader, 'llama.attention.layer_norm_rms_epsilon'))
        self.rope_base = float(field(reader, 'llama.rope.freq_base'))
        self.head_dim = self.d // self.n_head
        self.n_rot = int(field(reader, 'llama.rope.dimension_count'))
        assert self.n_rot == self.head_dim, (self.n_rot, self.head_dim)
        assert 'llama.rope.scaling.type' not in reader.fields

        self.w = {}
        self.dequant_check = 0.0  # max |f64 exact - gguf.quants.dequantize (f32)| over quantised tensors
        self.types = {}
        for t in reader.tensors:
            w = dequant_f64(t)
            if t.tensor_type in (QT.Q8_0, QT.Q4_1):
                ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
                diff = np.abs(w - ref.astype(np.float64))
                # the float32 evaluation may only differ by its own rounding
                assert np.all(diff <= np.abs(w) * 2.0 ** -24 + 1e-45), t.name
                self.dequant_check = max(self.dequant_check, float(diff.max()))
            self.w[t.name] = w
            self.types[t.tensor_type.name] = self.types.get(t.tensor_type.name, 0) + 1
        self.n_vocab = self.w['token_embd.weight'].shape[0]
        assert self.w['token_embd.weight'].shape == (self.n_vocab, self.d), self.w['token_embd.weight'].shape
        assert self.w['blk.0.attn_q.weight'].shape == (self.d, self.d)
        assert self.w['blk.0.attn_k.weight'].shape == (self.n_head_kv * self.head_dim, self.d)
        assert self.w['blk.0.ffn_gate.weight'].shape == (self.n_ff, self.d)
        assert self.w['blk.0.ffn_down.weight'].shape == (self.d, self.n_ff)
        self.tied = 'output.weight' not in self.w
        self.output = self.w['token_embd.weight'] if self.tied else self.w['output.weight']

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x):
        """Interleaved RoPE on x [T, n_heads, head_dim] at positions 0..T-1."""
        T = x.shape[0]
        i = np.arange(self.n_rot // 2, dtype=np.float64)
        inv_freq = self.rope_base ** (-2.0 * i / self.n_rot)
        ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, n_rot/2]
        cos = np.cos(ang)[:, None, :]
        sin = np.sin(ang)[:, None, :]
        x0 = x[..., 0::2]
        x1 = x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def forward(self, ids):
        T = len(ids)
        hd, nh, nkv = self.head_dim, self.n_head, self.n_head_kv
        group = nh // nkv
        x = self.w['token_embd.weight'][np.asarray(ids)]
        mask = np.triu(np.ones((T, T), dtype=bool), k=1)
        scale = 1.0 / np.sqrt(float(hd))
        for l in range(self.n_layer):
            p = f'blk.{l}.'
            h = self.rmsnorm(x, self.w[p + 'attn_norm.weight'])
            q = (h @ self.w[p + 'attn_q.weight'].T).reshape(T, nh, hd)
            k = (h @ self.w[p + 'attn_k.weight'].T).reshape(T, nkv, hd)
            v = (h @ self.w[p + 'attn_v.weight'].T).reshape(T, nkv, hd)
            q = self.rope(q)
            k = self.rope(k)
            att = np.empty((T, nh, hd))
            for hh in range(nh):
                kv = hh // group
                s = (q[:, hh, :] @ k[:, kv, :].T) * scale
                s[mask] = -np.inf
                s = s - s.max(axis=1, keepdims=True)
                e = np.exp(s)
                pr = e / e.sum(axis=1, keepdims=True)
                att[:, hh, :] = pr @ v[:, kv, :]
            x = x + att.reshape(T, nh * hd) @ self.w[p + 'attn_output.weight'].T
            h = self.rmsnorm(x, self.w[p + 'ffn_norm.weight'])
            g = h @ self.w[p + 'ffn_gate.weight'].T
            u = h @ self.w[p + 'ffn_up.weight'].T
            x = x + (g / (1.0 + np.exp(-g)) * u) @ self.w[p + 'ffn_down.weight'].T
        h = self.rmsnorm(x, self.w['output_norm.weight'])
        return h @ self.output.T


def main():
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('gguf', nargs='?', default=default_gguf())
    ap.add_argument('--ids', default=DEFAULT_IDS, help='fixture to take the prompts\' "ids" and "probe_ids" from')
    ap.add_argument('--out', default=DEFAULT_OUT)
    ap.add_argument('--npy', default=None, help='also save full float64 logits per prompt in this folder')
    args = ap.parse_args()

    with open(args.ids, encoding='utf-8') as f:
        src = json.load(f)
    probe_ids = src['probe_ids']

    model = Model(args.gguf)
    t_load = time.perf_counter() - t0

    logits_out = []
    for n, e in enumerate(src['logits']):
        ids = e['ids']
        x = model.forward(ids)
        assert x.shape == (len(ids), model.n_vocab) and x.dtype == np.float64
        if args.npy:
            os.makedirs(args.npy, exist_ok=True)
            np.save(os.path.join(args.npy, f'prompt{n}.npy'), x)
        logits_out.append(logit_entry(e['text'], ids, x, probe_ids, digits=6))

    reference = {
        'implementation': 'tools/reference/llama_f64.py (numpy, independent of llama.cpp)',
        'dtype': 'float64',
        'numpy': np.__version__,
        'gguf': importlib.metadata.version('gguf'),
        'gguf_sha256': sha256_file(args.gguf),
        'gguf_file': os.path.basename(args.gguf),
        'tensor_types': model.types,
        'dequantisation': 'exact in float64 (Q8_0: d*q; Q4_1: d*q+m)',
        'rope': 'interleaved pairs (2i, 2i+1) (GGML_ROPE_TYPE_NORM), theta = pos * base^(-2i/n_rot)',
        'rope_freq_base': model.rope_base,
        'rms_norm_eps': model.eps,
        'tied_embeddings': model.tied,
        'ids_from': os.path.basename(args.ids),
        'add_bos': False,
        'n_vocab': model.n_vocab,
        'command': ' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
    }
    fixture = {'reference': reference, 'probe_ids': probe_ids, 'logits': logits_out}

    write_fixture(args.out, fixture)

    margins = [m for e in logits_out for m in e['margin']]
    print(f'wrote {args.out} ({os.path.getsize(args.out)} bytes); load {t_load:.1f}s, total '
          f'{time.perf_counter() - t0:.1f}s; dequant f64 vs gguf.quants max |diff| {model.dequant_check:.3g}; '
          f'min margin {min(margins)}', file=sys.stderr)


if __name__ == '__main__':
    main()
