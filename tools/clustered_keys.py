"""Clustered synthetic keys as .npy, for comparisons on keys that fall outside the caches: n unit
vectors of `dim` around sqrt(n) Gaussian centres with Gaussian noise (0.6 per component before
normalising), as `retro bench index --synthetic` draws them, from NumPy's generator.

python tools/clustered_keys.py 100000 OUT.npy [--dim 384] [--seed 42]
"""
import argparse
import numpy as np

p = argparse.ArgumentParser()
p.add_argument("n", type=int)
p.add_argument("out")
p.add_argument("--dim", type=int, default=384)
p.add_argument("--seed", type=int, default=42)
a = p.parse_args()
rng = np.random.default_rng(a.seed)
centres = rng.standard_normal((max(1, int(a.n ** 0.5)), a.dim), dtype=np.float32)
x = centres[rng.integers(0, len(centres), a.n)] + 0.6 * rng.standard_normal((a.n, a.dim), dtype=np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
np.save(a.out, x.astype(np.float32))
print(f"wrote {a.n} x {a.dim} clustered keys to {a.out}")
