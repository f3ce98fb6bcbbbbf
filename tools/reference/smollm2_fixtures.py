"""Reference fixtures for the SmolLM2-135M-Instruct GGUF model (Llama architecture, Q4_1), from llama.cpp.

Runs SmolLM2-135M-Instruct.Q4_1.gguf in llama.cpp through its Python binding and writes a JSON fixture
(tokenization of varied strings and per-position logits of a few prompts) that the Rust tests of
crates/retro-model compare against. This is for generating fixtures by hand, never for CI.

Dependency (in a separate venv; it compiles llama.cpp):
    pip install llama-cpp-python==0.3.36 numpy

Usage:
    python tools/reference/smollm2_fixtures.py [GGUF] [OUT] [--threads 2]

GGUF defaults to $RETRO_SHARED/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf when
RETRO_SHARED is set, else /work/shared/models/...; OUT defaults to
crates/retro-model/tests/fixtures/smollm2_llama_cpp.json in this repository.

Tokenization uses llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) (special=True only for
the entry marked "special": true). Logits come from llm.reset(); llm.eval(ids) with logits_all=True, no BOS
prepended (the GGUF says add_bos_token = false). Logit values are rounded to 5 decimals.

The context keeps its KV cache in F32 (type_k = type_v = GGML_TYPE_F32; llama.cpp's default is F16) and
runs with flash attention disabled, so that the remaining differences from an exact f32/f64 forward pass
come from llama.cpp's quantised matmuls (activations rounded to Q8 for the Q4_1/Q8_0 dot products), not
from the cache. --kv-type f16 gives llama.cpp's default cache, for comparison only.
"""

import argparse
import os
import shlex
import sys

import numpy as np
import llama_cpp
from llama_cpp import Llama

from logit_fixture import default_gguf, logit_entry, sha256_file, write_fixture

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
DEFAULT_OUT = os.path.join(REPO, 'crates', 'retro-model', 'tests', 'fixtures', 'smollm2_llama_cpp.json')

KV_TYPES = {'f32': llama_cpp.GGML_TYPE_F32, 'f16': llama_cpp.GGML_TYPE_F16}
FLASH_ATTN = False

N_PROBES = 64

TOKENIZATION_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    " leading space",
    "trailing space ",
    "multiple   spaces    between  words",
    "   ",
    "line one\nline two\n\nline four",
    "tab\tseparated\tvalues\n",
    "\r\nWindows line ending",
    "12345 3.14 1,000,000",
    "In 2024, 7 of 10 people paid $19.99.",
    "don't I'll we've they're it's",
    "Wait... what?!? (yes) -- no; [ok] {x} <tag> @#%&*",
    "def f(x):\n    return x**2",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "café naïve Zürich",
    "日本語のテキスト",
    "Hello 👋 world 🌍!",
    "",
    "a",
    "HELLO World hELLO",
    "https://example.com/path?q=1&r=two",
]
SPECIAL_TEXT = "<|im_start|>user\nHi there<|im_end|>"

LOGIT_PROMPTS = [
    # English sentence, ~30 tokens
    "The small village at the edge of the forest was quiet in the early morning, and the baker had "
    "already lit the ovens before the sun rose.",
    # KJV verse, ~40 tokens
    "For God so loved the world, that he gave his only begotten Son, that whosoever believeth in him "
    "should not perish, but have everlasting life.",
    # Python snippet
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    # numbers
    "In 1969, 3 astronauts flew 384,400 km to the Moon in about 76 hours.",
]


def load(path, n_threads, kv_type='f32'):
    return Llama(model_path=path, n_ctx=512, logits_all=True, n_threads=n_threads, n_batch=512,
                 type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type], flash_attn=FLASH_ATTN, verbose=False)


def run_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def ggml_commit():
    """The llama.cpp/ggml commit the binding was built from (ggml_commit() of libggml-base), or None."""
    try:
        import ctypes
        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib', 'libggml-base.so'))
        out = {}
        for name in ('ggml_commit', 'ggml_version'):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_char_p
            out[name] = fn().decode()
        return out
    except Exception:  # noqa: BLE001 - informational only
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('gguf', nargs='?', default=default_gguf())
    ap.add_argument('out', nargs='?', default=DEFAULT_OUT)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--kv-type', choices=sorted(KV_TYPES), default='f32',
                    help='KV cache type (default f32; f16 is llama.cpp\'s own default)')
    ap.add_argument('--no-checks', action='store_true',
                    help='skip the determinism and thread-count checks (printed to stderr, not stored)')
    args = ap.parse_args()

    llm = load(args.gguf, args.threads, args.kv_type)
    n_vocab = llm.n_vocab()

    tokenization = []
    for text in TOKENIZATION_TEXTS:
        ids = llm.tokenize(text.encode('utf-8'), add_bos=False, special=False)
        tokenization.append({'text': text, 'special': False, 'ids': list(map(int, ids))})
    for special in (False, True):
        ids = llm.tokenize(SPECIAL_TEXT.encode('utf-8'), add_bos=False, special=special)
        tokenization.append({'text': SPECIAL_TEXT, 'special': special, 'ids': list(map(int, ids))})

    rng = np.random.default_rng(0)
    probe_ids = sorted(int(i) for i in rng.choice(n_vocab, size=N_PROBES, replace=False))

    logits_out = []
    all_logits = []
    for text in LOGIT_PROMPTS:
        ids = llm.tokenize(text.encode('utf-8'), add_bos=False, special=False)
        x = run_logits(llm, ids)
        assert x.shape == (len(ids), n_vocab), x.shape
        all_logits.append((ids, x))
        logits_out.append(logit_entry(text, ids, x, probe_ids, digits=5))

    fixture = {
        'reference': {
            'llama_cpp_python': llama_cpp.__version__,
            'ggml': ggml_commit(),
            'gguf_sha256': sha256_file(args.gguf),
            'gguf_file': os.path.basename(args.gguf),
            'n_threads': args.threads,
            'n_ctx': 512,
            'n_batch': 512,
            'type_k': args.kv_type,
            'type_v': args.kv_type,
            'flash_attn': FLASH_ATTN,
            'add_bos': False,
            'n_vocab': n_vocab,
            'command': ' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
        },
        'probe_ids': probe_ids,
        'tokenization': tokenization,
        'logits': logits_out,
    }

    write_fixture(args.out, fixture)

    # Summary and checks (stderr only).
    cat = np.concatenate([x for _, x in all_logits])
    margins = [m for e in logits_out for m in e['margin']]
    print(f'wrote {args.out} ({os.path.getsize(args.out)} bytes); llama_cpp_python {llama_cpp.__version__}',
          file=sys.stderr)
    print(f'logits: std {cat.std():.4f} mean {cat.mean():.4f} min {cat.min():.4f} max {cat.max():.4f}; '
          f'min margin {min(margins)}', file=sys.stderr)
    if not args.no_checks:
        rerun = max(float(np.abs(run_logits(llm, ids) - x).max()) for ids, x in all_logits)
        print(f'same process rerun (n_threads={args.threads}): max abs diff {rerun}', file=sys.stderr)
        llm2 = load(args.gguf, args.threads, args.kv_type)
        fresh = max(float(np.abs(run_logits(llm2, ids) - x).max()) for ids, x in all_logits)
        print(f'fresh instance (n_threads={args.threads}): max abs diff {fresh}', file=sys.stderr)
        del llm2
        other = 1 if args.threads != 1 else 2
        llm1 = load(args.gguf, other, args.kv_type)
        diff = max(float(np.abs(run_logits(llm1, ids) - x).max()) for ids, x in all_logits)
        print(f'n_threads={other} vs {args.threads}: max abs diff {diff}', file=sys.stderr)


if __name__ == '__main__':
    main()
