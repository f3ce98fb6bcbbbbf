"""PyTorch reference of the labml.ai RETRO model.

A faithful copy of labml's `labml_nn/transformers/retro/model.py` (the listing in
`../shared/seeds/000_6de235ab6b173520.txt`), with the lines the listing dropped restored
(`self.n_heads = n_heads`, `h.shape[1]`, `h_res.shape[1]`) and the labml logger import removed.
Module names are exactly labml's, so `state_dict()` names are the checkpoint names the Rust
port uses (`emb.weight`, `attn.3.query.weight`, `attn.0.rotary_pe.theta`, `cca.1.output.weight`,
`encoder.ca.0.norm.bias`, `encoder.norm_h.weight`, `norm_e.weight`, `read.bias`, ...).

The only addition is `RetroModel.forward(x, ret, retrieval=True)`:
- `retrieval=False` skips the encoder and every chunked cross-attention (the paper's RETRO[OFF],
  i.e. the model computed as if `ca_layers` were empty);
- when `ret` has zero chunks (input shorter than one chunk, C == 0) the encoder and every CCA are
  skipped too. labml's code crashes there (`e.view(-1, neighbor_len, d_model)` of an empty tensor
  is ambiguous), while its CCA already returns `h` unchanged for `chunks == 0`; skipping is what the
  reference computes when there is nothing to attend to.
"""

import math
from typing import Set

import torch
from torch import nn


class RotaryPositionalEmbeddings(nn.Module):
    def __init__(self, d: int, base: int = 10_000):
        super().__init__()
        self.theta = nn.Parameter(1. / (base ** (torch.arange(0, d, 2).float() / d)), requires_grad=False)

    def forward(self, x: torch.Tensor):
        batch_size, seq_len, n_heads, d = x.shape
        d_2 = d // 2
        seq_idx = torch.arange(seq_len, device=x.device).type_as(self.theta)
        idx_theta = torch.einsum('n,d->nd', seq_idx, self.theta)
        idx_theta2 = torch.cat([idx_theta, idx_theta], dim=1)
        neg_half_x = torch.cat([-x[:, :, :, d_2:], x[:, :, :, :d_2]], dim=-1)
        rx = (x * idx_theta2.cos()[None, :, None, :]) + (neg_half_x * idx_theta2.sin()[None, :, None, :])
        return rx


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_k: int, is_causal: bool):
        super().__init__()

        self.is_causal = is_causal
        self.n_heads = n_heads
        self.d_k = d_k
        self.scale = 1 / math.sqrt(self.d_k)

        self.query = nn.Linear(d_model, n_heads * d_k)
        self.key = nn.Linear(d_model, n_heads * d_k)
        self.value = nn.Linear(d_model, n_heads * d_k)
        self.norm = nn.LayerNorm(d_model)
        self.softmax = nn.Softmax(dim=-1)
        self.rotary_pe = RotaryPositionalEmbeddings(self.d_k)
        self.output = nn.Linear(n_heads * d_k, d_model)

    def mask_attention(self, attn: torch.Tensor):
        if not self.is_causal:
            return attn
        mask = torch.tril(attn.new_ones(attn.shape[-2:]))
        return attn.masked_fill(mask == 0, float('-inf'))

    def forward(self, h: torch.Tensor):
        h_res = h
        h = self.norm(h)
        mh_shape = (*h.shape[:-1], self.n_heads, self.d_k)
        q = self.query(h).view(mh_shape)
        k = self.key(h).view(mh_shape)
        v = self.value(h).view(mh_shape)
        q = self.rotary_pe(q)
        k = self.rotary_pe(k)
        attn = torch.einsum('bihd,bjhd->bhij', q, k)
        attn = attn * self.scale
        attn = self.mask_attention(attn)
        attn = self.softmax(attn)
        h = torch.einsum("bhij,bjhd->bihd", attn, v)
        h = h.reshape(*h.shape[:-2], -1)
        h = self.output(h)
        return h + h_res


class CrossAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_k: int):
        super().__init__()

        self.n_heads = n_heads
        self.d_k = d_k
        self.scale = 1 / math.sqrt(self.d_k)

        self.query = nn.Linear(d_model, n_heads * d_k)
        self.key = nn.Linear(d_model, n_heads * d_k)
        self.value = nn.Linear(d_model, n_heads * d_k)
        self.norm = nn.LayerNorm(d_model)
        self.softmax = nn.Softmax(dim=-1)
        self.output = nn.Linear(n_heads * d_k, d_model)

    def forward(self, e: torch.Tensor, h: torch.Tensor):
        e_res = e
        e = self.norm(e)
        q = self.query(e).view(*e.shape[:-1], self.n_heads, self.d_k)
        k = self.key(h).view(*h.shape[:-1], self.n_heads, self.d_k)
        v = self.value(h).view(*h.shape[:-1], self.n_heads, self.d_k)
        attn = torch.einsum('bcnihd,bcjhd->bcnhij', q, k)
        attn = attn * self.scale
        attn = self.softmax(attn)
        e = torch.einsum("bcnhij,bcjhd->bcnihd", attn, v)
        e = e.reshape(*e.shape[:-2], -1)
        e = self.output(e)
        return e + e_res


class ChunkedCrossAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_k: int, chunk_len: int):
        super().__init__()

        self.chunk_len = chunk_len
        self.n_heads = n_heads
        self.d_k = d_k
        self.scale = 1 / math.sqrt(self.d_k)

        self.query = nn.Linear(d_model, n_heads * d_k)
        self.key = nn.Linear(d_model, n_heads * d_k)
        self.value = nn.Linear(d_model, n_heads * d_k)
        self.norm = nn.LayerNorm(d_model)
        self.softmax = nn.Softmax(dim=-1)
        self.output = nn.Linear(n_heads * d_k, d_model)

    def forward(self, h: torch.Tensor, e: torch.Tensor):
        batch_size, chunks, neighbors, neighbor_len, d_model = e.shape
        if chunks == 0:
            return h
        h_res = h
        h = h[:, self.chunk_len - 1:]
        h = self.norm(h)
        if h.shape[1] < chunks * self.chunk_len:
            h = torch.cat((h, h.new_zeros(batch_size, chunks * self.chunk_len - h.shape[1], d_model)), dim=1)
        h = h.reshape(batch_size, chunks, self.chunk_len, d_model)
        q = self.query(h).view(*h.shape[:-1], self.n_heads, self.d_k)
        k = self.key(e).view(*e.shape[:-1], self.n_heads, self.d_k)
        v = self.value(e).view(*e.shape[:-1], self.n_heads, self.d_k)
        attn = torch.einsum('bcihd,bcnjhd->bchinj', q, k)
        attn = attn * self.scale
        attn = self.softmax(attn.view(*attn.shape[:-2], -1)).view(attn.shape)
        h = torch.einsum("bchinj,bcnjhd->bcihd", attn, v)
        h = h.reshape(batch_size, chunks * self.chunk_len, -1)
        h = self.output(h)
        h = torch.cat((h.new_zeros(batch_size, self.chunk_len - 1, d_model), h), dim=1)
        return h[:, :h_res.shape[1]] + h_res


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.lin1 = nn.Linear(d_model, d_ff)
        self.lin2 = nn.Linear(d_ff, d_model)
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(d_model)

    def forward(self, h: torch.Tensor):
        h_res = h
        h = self.norm(h)
        h = self.lin1(h)
        h = self.act(h)
        h = self.lin2(h)
        return h + h_res


class NearestNeighborEncoder(nn.Module):
    def __init__(self, chunk_len: int, n_layers: int, ca_layers: Set[int],
                 d_model: int, n_heads: int, d_k: int, d_ff: int):
        super().__init__()
        self.ca_layers = ca_layers
        self.chunk_len = chunk_len
        self.ca = nn.ModuleList([CrossAttention(d_model, n_heads, d_k) for _ in range(len(ca_layers))])
        self.attn = nn.ModuleList([SelfAttention(d_model, n_heads, d_k, is_causal=False) for _ in range(n_layers)])
        self.ffw = nn.ModuleList([FeedForward(d_model, d_ff) for _ in range(n_layers)])
        self.norm_h = nn.LayerNorm(d_model)

    def forward(self, e: torch.Tensor, h: torch.Tensor):
        batch_size, chunks, neighbors, neighbor_len, d_model = e.shape
        h_split = h[:, :self.chunk_len * chunks, :].reshape(batch_size, chunks, self.chunk_len, d_model)
        h_split = self.norm_h(h_split)
        p_ca = 0
        for p in range(len(self.attn)):
            e = self.attn[p](e.view(-1, neighbor_len, d_model)).view(e.shape)
            if p in self.ca_layers:
                e = self.ca[p_ca](e, h_split)
                p_ca += 1
            e = self.ffw[p](e)
        return e


class RetroModel(nn.Module):
    def __init__(self, n_vocab: int, d_model: int, n_layers: int, ca_layers: Set[int], chunk_len: int,
                 n_heads: int, d_k: int, d_ff: int, encoder: NearestNeighborEncoder):
        super().__init__()

        self.ca_layers = ca_layers
        self.encoder = encoder
        self.emb = nn.Embedding(n_vocab, d_model)
        self.cca = nn.ModuleList(
            [ChunkedCrossAttention(d_model, n_heads, d_k, chunk_len) for _ in range(len(ca_layers))])
        self.attn = nn.ModuleList([SelfAttention(d_model, n_heads, d_k, is_causal=True) for _ in range(n_layers)])
        self.ffw = nn.ModuleList([FeedForward(d_model, d_ff) for _ in range(n_layers)])
        self.read = nn.Linear(d_model, n_vocab)
        self.norm_e = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, ret: torch.Tensor, retrieval: bool = True):
        # Addition to labml: RETRO[OFF] and C == 0 run as if ca_layers were empty.
        ca_layers = self.ca_layers if (retrieval and ret.shape[1] > 0) else set()

        h = self.emb(x)
        ret_emb = self.emb(ret) if ca_layers else None
        p_ca = 0
        for p in range(len(self.attn)):
            h = self.attn[p](h)
            if ca_layers and p == min(ca_layers):
                e = self.encoder(ret_emb, h)
                e = self.norm_e(e)
            if p in ca_layers:
                h = self.cca[p_ca](h, e)
                p_ca += 1
            h = self.ffw[p](h)
        return self.read(h)


def build_model(n_vocab, d_model, n_layers, ca_layers, chunk_len, n_heads, d_k, d_ff,
                enc_n_layers, enc_ca_layers):
    """Builds the model the way labml's training script does."""
    encoder = NearestNeighborEncoder(chunk_len, enc_n_layers, set(enc_ca_layers), d_model, n_heads, d_k, d_ff)
    return RetroModel(n_vocab, d_model, n_layers, set(ca_layers), chunk_len, n_heads, d_k, d_ff, encoder)


def _test():
    chunk_len = 4
    d_model = 8
    d_ff = 32
    n_heads = 2
    d_k = 4

    m = RetroModel(5, d_model, 6, {2, 5}, chunk_len, n_heads, d_k, d_ff,
                   encoder=NearestNeighborEncoder(chunk_len, 2, {1}, d_model, n_heads, d_k, d_ff))
    x = [1, 2, 4, 4, 0, 1, 2, 3, 4, 3]
    ret = [
        [[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
        [[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
    ]
    res = m(torch.tensor([x] * 10), torch.tensor([ret] * 10))
    print(res.shape)


if __name__ == '__main__':
    _test()
