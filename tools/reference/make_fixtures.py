"""Writes the numeric fixtures of the RETRO model under tests/fixtures/model/<case>/.

Run from anywhere with the reference venv:
    /work/venv-ref/bin/python tools/reference/make_fixtures.py
Deterministic: every case seeds torch with its own seed. See tests/fixtures/model/README.md.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from retro_reference import build_model  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

PLAIN = dict(n_vocab=23, d_model=16, n_layers=4, ca_layers=[1, 3], chunk_len=4, n_heads=2, d_k=8, d_ff=32,
             enc_n_layers=2, enc_ca_layers=[1], B=2, T=16, K=2, N=8)

CASES = {
    'plain': dict(PLAIN, seed=1, grads=True),
    't_not_multiple': dict(PLAIN, seed=2, T=18),
    'single_cca': dict(PLAIN, seed=3, ca_layers=[2], T=13),
    'no_cca': dict(PLAIN, seed=4, ca_layers=[], T=12),
    'short': dict(PLAIN, seed=5, T=3),
    'heads_ne_dmodel': dict(PLAIN, seed=6, n_heads=3, d_k=6),
    'labml_layout': dict(n_vocab=65, d_model=32, n_layers=6, ca_layers=[3, 5], chunk_len=8, n_heads=4, d_k=8,
                         d_ff=64, enc_n_layers=6, enc_ca_layers=[3], B=2, T=24, K=2, N=16, seed=7, grads=True),
}

MODEL_KEYS = ['n_vocab', 'd_model', 'n_layers', 'ca_layers', 'chunk_len', 'n_heads', 'd_k', 'd_ff',
              'enc_n_layers', 'enc_ca_layers']


def make_case(name, c, out_root):
    torch.manual_seed(c['seed'])
    model = build_model(**{k: c[k] for k in MODEL_KEYS})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
        # nn.Embedding starts N(0, 1); scale it down so logits stay O(1).
        model.emb.weight.mul_(0.5)

    # The stored weights are float32 (the model was built in float32); the forward runs in float64.
    weights = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    model = model.double()

    B, T, K, N, L = c['B'], c['T'], c['K'], c['N'], c['chunk_len']
    C = T // L
    x = torch.randint(0, c['n_vocab'], (B, T), dtype=torch.int64)
    y = torch.randint(0, c['n_vocab'], (B, T), dtype=torch.int64)
    ret = torch.randint(0, c['n_vocab'], (B, C, K, N), dtype=torch.int64)

    logits = model(x, ret)
    loss = F.cross_entropy(logits.reshape(B * T, -1), y.reshape(-1))
    with torch.no_grad():
        logits_off = model(x, ret, retrieval=False)

    # Self-checks of the semantics the Rust tests rely on.
    assert logits.dtype == torch.float64 and logits.shape == (B, T, c['n_vocab'])
    # Positions 0 .. chunk_len-2 never see retrieval.
    assert torch.equal(logits[:, :L - 1], logits_off[:, :L - 1])
    if not c['ca_layers'] or C == 0:
        assert torch.equal(logits, logits_off)
    else:
        assert (logits - logits_off).abs().max() > 1e-3

    d = os.path.join(out_root, name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    config = {k: (sorted(c[k]) if k.endswith('ca_layers') else c[k]) for k in MODEL_KEYS}
    config.update(layer_norm_eps=1e-5, rope_base=10000.0)
    with open(os.path.join(d, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
        f.write('\n')
    save_file(weights, os.path.join(d, 'weights.safetensors'))
    save_file({'x': x, 'y': y, 'ret': ret.contiguous()}, os.path.join(d, 'inputs.safetensors'))
    save_file({'logits': logits.detach().contiguous(), 'logits_off': logits_off.contiguous(),
               'loss': loss.detach().reshape(())}, os.path.join(d, 'expected.safetensors'))

    if c.get('grads'):
        loss.backward()
        grads = {}
        for k, p in model.named_parameters():
            if not p.requires_grad:
                continue
            assert p.grad is not None, f'{name}: no gradient for {k}'
            assert p.grad.abs().max() > 0, f'{name}: zero gradient for {k}'
            grads[k] = p.grad.detach().to(torch.float64).contiguous()
        save_file(grads, os.path.join(d, 'grads.safetensors'))

    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f'{name}: T={T} C={C} loss={loss.item():.6f} |logits|max={logits.abs().max().item():.3f} '
          f'logits std={logits.std().item():.3f} max|on-off|={(logits - logits_off).abs().max().item():.3g} '
          f'params={sum(v.numel() for v in weights.values())} size={size / 1024:.0f} KiB')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=os.path.join(REPO, 'tests', 'fixtures', 'model'))
    ap.add_argument('cases', nargs='*', default=list(CASES))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for name in args.cases:
        make_case(name, CASES[name], args.out)


if __name__ == '__main__':
    main()
