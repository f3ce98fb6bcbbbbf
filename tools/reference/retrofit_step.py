"""A RETRO-fit training step in PyTorch, the reference for `retro bench retrofit`.

    python tools/reference/retrofit_step.py --base BASE [--threads 2] [--iters 5] [--warmup 1]

BASE is a folder written by `retro base import` (`model.safetensors` under Hugging Face's Llama
names, `config.json`). The model is the one `retro train --base BASE --retrofit` trains, at its
default settings: the frozen Llama base (RMSNorm, grouped-query attention with rotate-half RoPE,
SwiGLU, tied embeddings), labml's chunked cross-attention after the attention of layers 6, 9, ...,
27, and labml's 2-layer neighbour encoder (cross-attention to the decoder's chunk in its last layer,
d_ff twice the base's width) reading each neighbour as the base's residual stream after 6 layers
(computed without gradients), then `norm_e`. The CCA and encoder are `retro_reference.py`'s classes,
copied from labml. Only the new blocks have gradients; the base's parameters have
`requires_grad=False`, so PyTorch computes no weight gradient for them.

The step: forward, cross-entropy over the vocabulary, backward, AdamW, zero_grad, on random ids:
B 2, T 256, chunk 64, K 2, neighbours of 128 tokens (chunk + continuation), as `retro bench
retrofit`'s defaults. Prints one JSON object.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import timed  # noqa: E402
from retro_reference import ChunkedCrossAttention, NearestNeighborEncoder  # noqa: E402


class Llama(nn.Module):
    """The frozen base, Hugging Face's Llama computation on `model.safetensors`."""

    def __init__(self, cfg, weights):
        super().__init__()
        self.cfg = cfg
        self.w = {k: v.float() for k, v in weights.items()}
        for v in self.w.values():
            v.requires_grad_(False)
        self.n_layers = cfg["num_hidden_layers"]
        self.h, self.hk = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd = cfg["hidden_size"] // self.h
        self.eps = cfg["rms_norm_eps"]
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, self.hd, 2).float() / self.hd))
        t = torch.arange(4096).float()[:, None] * inv[None]
        self.cos, self.sin = torch.cat([t, t], -1).cos(), torch.cat([t, t], -1).sin()

    def norm(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def rope(self, x):
        t, d2 = x.shape[2], self.hd // 2
        rot = torch.cat([-x[..., d2:], x[..., :d2]], -1)
        return x * self.cos[:t] + rot * self.sin[:t]

    def attention(self, i, x):
        p = f"model.layers.{i}.self_attn."
        b, t, _ = x.shape
        q = (x @ self.w[p + "q_proj.weight"].T).view(b, t, self.h, self.hd).transpose(1, 2)
        k = (x @ self.w[p + "k_proj.weight"].T).view(b, t, self.hk, self.hd).transpose(1, 2)
        v = (x @ self.w[p + "v_proj.weight"].T).view(b, t, self.hk, self.hd).transpose(1, 2)
        q, k = self.rope(q), self.rope(k)
        rep = self.h // self.hk
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, t, -1) @ self.w[p + "o_proj.weight"].T

    def mlp(self, i, x):
        p = f"model.layers.{i}.mlp."
        g = F.silu(x @ self.w[p + "gate_proj.weight"].T)
        return (g * (x @ self.w[p + "up_proj.weight"].T)) @ self.w[p + "down_proj.weight"].T

    def layer(self, i, h, hook=None):
        p = f"model.layers.{i}."
        h = h + self.attention(i, self.norm(h, self.w[p + "input_layernorm.weight"]))
        if hook is not None:
            h = hook(i, h)
        return h + self.mlp(i, self.norm(h, self.w[p + "post_attention_layernorm.weight"]))

    def embed(self, ids):
        return self.w["model.embed_tokens.weight"][ids]

    def logits(self, h):
        return self.norm(h, self.w["model.norm.weight"]) @ self.w["model.embed_tokens.weight"].T


class RetroFitted(nn.Module):
    def __init__(self, base, chunk_len=64, ca_start=6, ca_every=3, enc_layers=2, enc_input_layers=6):
        super().__init__()
        d, h = base.cfg["hidden_size"], base.h
        self.base, self.chunk_len, self.enc_input_layers = base, chunk_len, enc_input_layers
        self.ca_layers = list(range(ca_start, base.n_layers, ca_every))
        self.encoder = NearestNeighborEncoder(chunk_len, enc_layers, {enc_layers - 1}, d, h, d // h, 2 * d)
        self.cca = nn.ModuleList([ChunkedCrossAttention(d, h, d // h, chunk_len) for _ in self.ca_layers])
        self.norm_e = nn.LayerNorm(d)

    def forward(self, x, ret):
        b, c, k, n = ret.shape
        with torch.no_grad():
            e = self.base.embed(ret.reshape(b * c * k, n))
            for i in range(self.enc_input_layers):
                e = self.base.layer(i, e)
            e = e.view(b, c, k, n, -1)
        state = {}

        def hook(i, h):
            if i not in self.ca_layers:
                return h
            if "e" not in state:
                state["e"] = self.norm_e(self.encoder(e, h))
            return self.cca[self.ca_layers.index(i)](h, state["e"])

        h = self.base.embed(x)
        for i in range(self.base.n_layers):
            h = self.base.layer(i, h, hook)
        return self.base.logits(h)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(os.path.join(args.base, "config.json")) as f:
        cfg = json.load(f)
    base = Llama(cfg, load_file(os.path.join(args.base, "model.safetensors")))
    model = RetroFitted(base)
    V, L, K = cfg["vocab_size"], model.chunk_len, 2
    B, T = args.batch, args.seq_len
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    ret = torch.randint(0, V, (B, T // L, K, 2 * L))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = F.cross_entropy(model(x, ret).reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()

    ms = timed(step, args.warmup, args.iters) * 1e3
    print(json.dumps(dict(
        torch_version=torch.__version__, threads=args.threads, B=B, T=T, K=K, neighbour_len=2 * L,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        train_step_ms=ms,
        train_step_tokens_per_s=B * T / (ms / 1e3))))


if __name__ == "__main__":
    main()
