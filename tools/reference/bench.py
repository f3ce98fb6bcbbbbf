"""Throughput of the PyTorch reference RETRO model (eager, float32, CPU), "labml-small" preset.

    /work/venv-ref/bin/python tools/reference/bench.py [--threads 2] [--iters 10] [--warmup 3]
    /work/venv-ref/bin/python tools/reference/bench.py --generate [--prompt-len 64] [--new-tokens 512]

Default mode times (a) a forward under torch.no_grad() and (b) a train step (forward, cross-entropy,
backward, AdamW step, zero_grad) on B=4, T=512 and prints JSON. --generate times labml's way of
sampling (its `Sampler` in labml_nn/transformers/retro/train.py): one full forward over the whole
growing sequence per new token (B=1, greedy), with random neighbour tokens for every complete chunk
(no database is involved). It warms up on 4 new tokens, then times one whole generation.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from retro_reference import build_model  # noqa: E402

PRESET = dict(n_vocab=65, d_model=128, n_layers=6, ca_layers=[3, 5], chunk_len=16, n_heads=16, d_k=16, d_ff=512,
              enc_n_layers=6, enc_ca_layers=[3])
B, T, K, N = 4, 512, 2, 32


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--iters', type=int, default=10)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--generate', action='store_true')
    ap.add_argument('--new-tokens', type=int, default=512)
    ap.add_argument('--prompt-len', type=int, default=64)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(**PRESET)
    L, V = PRESET['chunk_len'], PRESET['n_vocab']
    info = dict(threads=args.threads, torch_version=torch.__version__,
                params=sum(p.numel() for p in model.parameters() if p.requires_grad))

    if args.generate:
        model.eval()
        prompt_len = args.prompt_len
        x = torch.randint(0, V, (1, prompt_len))
        ret_all = torch.randint(0, V, (1, (prompt_len + args.new_tokens) // L, K, N))

        def generate(new_tokens=args.new_tokens):
            seq = x
            with torch.no_grad():
                for _ in range(new_tokens):
                    ret = ret_all[:, :seq.shape[1] // L]
                    nxt = model(seq, ret)[:, -1].argmax(-1, keepdim=True)
                    seq = torch.cat([seq, nxt], dim=1)
            return seq

        generate(4)
        t0 = time.perf_counter()
        generate()
        s = time.perf_counter() - t0
        info.update(new_tokens=args.new_tokens, prompt_len=prompt_len, generate_s=s,
                    recompute_tokens_per_s=args.new_tokens / s)
        print(json.dumps(info))
        return

    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))
    ret = torch.randint(0, V, (B, T // L, K, N))

    def forward():
        with torch.no_grad():
            model(x, ret)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        logits = model(x, ret)
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()

    f = timed(forward, args.warmup, args.iters)
    t = timed(train_step, args.warmup, args.iters)
    info.update(B=B, T=T, forward_ms=f * 1e3, forward_tokens_per_s=B * T / f,
                train_step_ms=t * 1e3, train_step_tokens_per_s=B * T / t)
    print(json.dumps(info))


if __name__ == '__main__':
    main()
