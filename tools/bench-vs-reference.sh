#!/usr/bin/env bash
# Each speed comparison of docs/PERF.md against its reference, alternating the two N times in one
# run and printing medians and ranges. Release build first: `cargo build --release`.
#
#   tools/bench-vs-reference.sh generate [N]      # labml's sampler in PyTorch (tools/reference/bench.py)
#   tools/bench-vs-reference.sh model [N]         # labml's model in PyTorch: forward, train step
#   tools/bench-vs-reference.sh index KEYS.npy [N] # faiss-cpu HNSWFlat (tools/faiss_compare.py)
#   tools/bench-vs-reference.sh retrofit BASE [N] # the same RETRO-fit in PyTorch (tools/reference/retrofit_step.py)
#
# PYTHON names a Python with torch (generate, model) or faiss-cpu (index); default
# /work/venv-ref/bin/python. Threads: 2 (RAYON_NUM_THREADS unset on a 2-core machine; torch and
# faiss are set to 2). Each run's JSON goes to $OUT (default a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
RETRO=${RETRO:-target/release/retro}
PYTHON=${PYTHON:-/work/venv-ref/bin/python}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
what=${1:?usage: tools/bench-vs-reference.sh generate|model|index KEYS.npy|retrofit BASE [N]}
shift
[ -x "$RETRO" ] || { echo "no $RETRO: run cargo build --release first" >&2; exit 2; }
[ -x "$PYTHON" ] || { echo "no Python at $PYTHON: set PYTHON" >&2; exit 2; }

echo "# $(date -u +%FT%TZ), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; runs in $OUT"
case "$what" in
generate)
    n=${1:-3}
    # The bench alternates the reference and its own runs itself, one of each per round.
    "$RETRO" bench generate --reference-python "$PYTHON" --rounds "$n" --json | tee "$OUT/generate.json"
    "$PYTHON" - "$OUT/generate.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
ref = r["reference_runs"]
print(f"reference: {r['reference']}: median {ref['median']:.2f} tokens/s, range {ref['min']:.2f}-{ref['max']:.2f}")
for row in r["cached"]:
    s = row["tokens_per_s"]
    print(f"ours, cached, batch {row['batch']:>2}: median {s['median']:.1f} tokens/s, range {s['min']:.1f}-{s['max']:.1f}, "
          f"{s['median'] / ref['median']:.0f}x the reference")
EOF
    ;;
model)
    n=${1:-5}
    for i in $(seq "$n"); do
        "$RETRO" bench model --json --iters 5 --warmup 2 > "$OUT/rust-$i.json"
        "$PYTHON" tools/reference/bench.py --threads 2 --iters 5 --warmup 2 > "$OUT/torch-$i.json"
    done
    "$PYTHON" - "$OUT" "$n" <<'EOF'
import json, statistics as st, sys
d, n = sys.argv[1], int(sys.argv[2])
runs = [(json.load(open(f"{d}/rust-{i}.json")), json.load(open(f"{d}/torch-{i}.json"))) for i in range(1, n + 1)]
for key, name in [("forward_ms", "forward"), ("train_step_ms", "train step")]:
    ours, ref = [r[key] for r, _ in runs], [t[key] for _, t in runs]
    ratios = [t / r for r, t in zip(ours, ref)]
    print(f"{name} (labml-small, B 4, T 512): ours median {st.median(ours):.0f} ms ({min(ours):.0f}-{max(ours):.0f}), "
          f"labml's model in PyTorch {runs[0][1]['torch_version']} median {st.median(ref):.0f} ms ({min(ref):.0f}-{max(ref):.0f}); "
          f"ratio median {st.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)")
EOF
    ;;
retrofit)
    base=${1:?retrofit needs BASE (retro base import)}
    n=${2:-3}
    for i in $(seq "$n"); do
        "$RETRO" bench retrofit --base "$base" --json --iters 3 --warmup 1 > "$OUT/rust-$i.json"
        "$PYTHON" tools/reference/retrofit_step.py --base "$base" --threads 2 --iters 3 --warmup 1 > "$OUT/torch-$i.json"
    done
    "$PYTHON" - "$OUT" "$n" <<'EOF'
import json, statistics as st, sys
d, n = sys.argv[1], int(sys.argv[2])
runs = [(json.load(open(f"{d}/rust-{i}.json")), json.load(open(f"{d}/torch-{i}.json"))) for i in range(1, n + 1)]
ours, ref = [r["train_step_ms"] for r, _ in runs], [t["train_step_ms"] for _, t in runs]
ratios = [t / r for r, t in zip(ours, ref)]
r0, t0 = runs[0]
assert r0["trainable_parameters"] == t0["trainable"], (r0["trainable_parameters"], t0["trainable"])
tokens = r0["tokens_per_batch"]
print(f"RETRO-fit train step (B {t0['B']} x T {t0['T']}, K {t0['K']}, {t0['trainable']} trainable): "
      f"ours median {st.median(ours):.0f} ms ({min(ours):.0f}-{max(ours):.0f}), {tokens / st.median(ours) * 1e3:.0f} tokens/s; "
      f"PyTorch {t0['torch_version']} median {st.median(ref):.0f} ms ({min(ref):.0f}-{max(ref):.0f}), "
      f"{tokens / st.median(ref) * 1e3:.0f} tokens/s; ratio median {st.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)")
for key in ["base_forward_ms", "neighbour_input_ms", "train_forward_ms"]:
    v = [r[key] for r, _ in runs]
    print(f"  ours, {key}: median {st.median(v):.0f} ms ({min(v):.0f}-{max(v):.0f})")
EOF
    ;;
index)
    keys=${1:?index needs KEYS.npy (retro index export-embeddings)}
    n=${2:-3}
    for i in $(seq "$n"); do
        "$RETRO" bench index --vectors "$keys" --ef 16,32,64,128,256 --sample 1000 --json > "$OUT/rust-$i.json"
        "$PYTHON" tools/faiss_compare.py "$keys" --ef 16,32,64,128,256 --threads 2 > "$OUT/faiss-$i.json"
    done
    "$PYTHON" - "$OUT" "$n" <<'EOF'
import json, statistics as st, sys
d, n = sys.argv[1], int(sys.argv[2])
def hnsw(j):
    # `retro bench index --json` holds the run under "hnsw" or is the run itself.
    return j.get("hnsw", j)
runs = [(hnsw(json.load(open(f"{d}/rust-{i}.json"))), json.load(open(f"{d}/faiss-{i}.json"))) for i in range(1, n + 1)]
ours, ref = [r["inserts_per_s"] for r, _ in runs], [f["inserts_per_s"] for _, f in runs]
print(f"build, {runs[0][0]['points']} keys of {runs[0][0]['dim']}: ours median {st.median(ours):.0f} inserts/s ({min(ours):.0f}-{max(ours):.0f}), "
      f"{runs[0][1]['library']} median {st.median(ref):.0f} ({min(ref):.0f}-{max(ref):.0f}); ratio {st.median(ours) / st.median(ref):.2f}x")
# Queries/s on 2 threads (batched), then on 1; our default walk (8-bit codes, exact re-measure)
# and our walk over the f32 keys, each against faiss HNSWFlat at the same ef.
for mode in ["queries_per_s_parallel", "queries_per_s_one_thread"]:
    print(f"{mode}:")
    for j, row in enumerate(runs[0][0]["per_ef"]):
        fq = [f["per_ef"][j][mode] for _, f in runs]
        fr = runs[0][1]["per_ef"][j]["recall"]
        line = f"  ef {row['ef']:>3}: faiss recall {fr:.3f}, median {st.median(fq):.0f} q/s ({min(fq):.0f}-{max(fq):.0f})"
        for name, get in [("codes walk", lambda r: r["per_ef"][j]), ("f32 walk", lambda r: r["per_ef"][j].get("exact_walk"))]:
            rows = [get(r) for r, _ in runs]
            if any(x is None for x in rows):
                continue
            q = [x[mode] for x in rows]
            line += (f"; ours {name} recall {rows[0]['recall']:.3f}, median {st.median(q):.0f} "
                     f"({min(q):.0f}-{max(q):.0f}), {st.median(q) / st.median(fq):.2f}x")
        print(line)
EOF
    ;;
*)
    echo "unknown comparison '$what' (generate, model or index)" >&2
    exit 2
    ;;
esac
