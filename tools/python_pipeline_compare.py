"""RETRO's retrieval side as a Python user builds it today, against retro_rs, on the same corpus,
keys and machine: every 64-token chunk of a JSONL corpus (GPT-2 tokens) embedded by MiniLM, an
HNSW graph (M 16, efConstruction 200, efSearch 128) over the keys, and each chunk's K nearest
chunks of other documents (the same-document filter).

- today: sentence-transformers (all-MiniLM-L6-v2, batches of 32, normalised), faiss-cpu
  IndexHNSWFlat (inner product), then a search of K + 32 per chunk filtered in Python (searched
  again wider for the rows left short);
- retro_rs: Database.build (tokenise, chunk, embed, graph, all written and checksummed) and
  Dataset.build with seq_len = chunk_len (one chunk per sequence: the neighbours of every chunk
  that has a next token, written as a dataset).

Both sides' recall@K is measured the same way: on a sample of chunks, the filtered neighbours of
the graph against exact filtered search over that side's own keys. Each side runs in a fresh
process per round (alternated), on the threads given.

    python tools/python_pipeline_compare.py --shared ../shared --rounds 2 --threads 2
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

p = argparse.ArgumentParser()
p.add_argument("--shared", default="../shared")
p.add_argument("--docs", type=int, default=0, help="first N documents (0: all)")
p.add_argument("--rounds", type=int, default=2)
p.add_argument("--threads", type=int, default=2)
p.add_argument("-k", type=int, default=2)
p.add_argument("--sample", type=int, default=1000)
p.add_argument("--side", choices=["today", "retro_rs"], help=argparse.SUPPRESS)
p.add_argument("--corpus", help=argparse.SUPPRESS)
a = p.parse_args()
CHUNK = 64
MODEL = os.path.join(a.shared, "models/all-MiniLM-L6-v2")
GPT2 = os.path.join(a.shared, "models/gpt2-tokenizer/tokenizer.json")


def filtered_exact(keys, doc_of, rows, k):
    """Exact top-k of other documents for `rows` (numpy, inner product on unit keys)."""
    import numpy as np

    out = []
    for r in rows:
        s = keys @ keys[r]
        s[doc_of == doc_of[r]] = -np.inf
        out.append(set(np.argsort(-s, kind="stable")[:k].tolist()))
    return out


def recall(found, exact):
    return sum(len(f & e) for f, e in zip(found, exact)) / sum(len(e) for e in exact)


def sample_rows(n, m):
    return [i * n // min(m, n) for i in range(min(m, n))]


def today(corpus):
    import faiss
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    t0 = time.time()
    tok = Tokenizer.from_file(GPT2)
    texts, doc_of = [], []
    for d, line in enumerate(open(corpus)):
        ids = tok.encode(json.loads(line)["text"]).ids
        for s in range(0, len(ids), CHUNK):
            texts.append(tok.decode(ids[s : s + CHUNK]))
            doc_of.append(d)
    doc_of = np.array(doc_of)
    model = SentenceTransformer(MODEL, device="cpu")
    keys = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    keys = np.ascontiguousarray(keys.astype(np.float32))
    t_embed = time.time() - t0
    index = faiss.IndexHNSWFlat(keys.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    index.add(keys)
    index.hnsw.efSearch = 128
    neighbours = np.full((len(keys), a.k), -1, dtype=np.int64)
    wide = a.k + 32
    todo = np.arange(len(keys))
    while len(todo):
        _, ids = index.search(keys[todo], wide)
        short = []
        for row, cand in zip(todo, ids):
            keep = [c for c in cand if c >= 0 and doc_of[c] != doc_of[row]][: a.k]
            if len(keep) < a.k and wide < len(keys):
                short.append(row)
            neighbours[row, : len(keep)] = keep
        todo = np.array(short, dtype=np.int64)
        wide *= 4
    total = time.time() - t0
    rows = sample_rows(len(keys), a.sample)
    found = [set(neighbours[r].tolist()) for r in rows]
    return {
        "side": "sentence-transformers + faiss",
        "chunks": len(keys),
        "queried": len(keys),
        "embed_s": t_embed,
        "total_s": total,
        "recall": recall(found, filtered_exact(keys, doc_of, rows, a.k)),
        "versions": {
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "sentence_transformers": __import__("sentence_transformers").__version__,
        },
    }


def retro_rs_side(corpus):
    import numpy as np
    import retro_rs

    out = tempfile.mkdtemp()
    t0 = time.time()
    db = retro_rs.Database.build(corpus, os.path.join(out, "db"), tokenizer=GPT2, embedder=MODEL,
                                 chunk_len=CHUNK)
    t_db = time.time() - t0
    ds = retro_rs.Dataset.build(db, os.path.join(out, "ds"), seq_len=CHUNK, k=a.k,
                                valid_fraction=0.0)
    total = time.time() - t0
    keys = db.keys()
    names = db.documents_of(np.arange(len(keys), dtype=np.int64))
    index = {n: i for i, n in enumerate(dict.fromkeys(names))}
    doc_of = np.array([index[n] for n in names])
    # Recall measured as on the other side: the graph searched K + 32 wide, filtered in Python,
    # wider again for the rows left short. (Dataset.build filters inside the graph's walk.)
    rows = sample_rows(len(keys), a.sample)
    found, todo, wide = {}, rows, a.k + 32
    while todo:
        ids, _ = db.search(keys[todo], k=min(wide, len(keys)))
        short = []
        for r, cand in zip(todo, ids):
            keep = [c for c in cand.tolist() if c >= 0 and doc_of[c] != doc_of[r]][: a.k]
            found[r] = set(keep)
            if len(keep) < a.k and wide < len(keys):
                short.append(r)
        todo, wide = short, wide * 4
    found = [found[r] for r in rows]
    return {
        "side": "retro_rs",
        "chunks": len(keys),
        "queried": len(ds),
        "database_s": t_db,
        "total_s": total,
        "recall": recall(found, filtered_exact(keys, doc_of, rows, a.k)),
    }


if a.side:
    r = today(a.corpus) if a.side == "today" else retro_rs_side(a.corpus)
    print(json.dumps(r))
    sys.exit(0)

corpus = os.path.join(a.shared, "data/python-3.11-docs.jsonl")
if a.docs:
    corpus_n = os.path.join(tempfile.mkdtemp(), "corpus.jsonl")
    with open(corpus) as f, open(corpus_n, "w") as g:
        for _, line in zip(range(a.docs), f):
            g.write(line)
    corpus = corpus_n
env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
runs = {"today": [], "retro_rs": []}
for i in range(a.rounds):
    for side in ["today", "retro_rs"] if i % 2 == 0 else ["retro_rs", "today"]:
        cmd = [sys.executable, __file__, "--side", side, "--corpus", corpus, "--shared", a.shared,
               "--threads", str(a.threads), "-k", str(a.k), "--sample", str(a.sample)]
        r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        runs[side].append(r)
        print(json.dumps(r), flush=True)
t = [r["total_s"] for r in runs["today"]]
o = [r["total_s"] for r in runs["retro_rs"]]
print(f"today (sentence-transformers + faiss): median {statistics.median(t):.1f} s ({min(t):.1f}-{max(t):.1f}), "
      f"recall@{a.k} {runs['today'][0]['recall']:.3f}, {runs['today'][0]['queried']} chunks queried")
print(f"retro_rs: median {statistics.median(o):.1f} s ({min(o):.1f}-{max(o):.1f}), "
      f"recall@{a.k} {runs['retro_rs'][0]['recall']:.3f}, {runs['retro_rs'][0]['queried']} chunks queried")
print(f"ratio (today / retro_rs): {statistics.median(t) / statistics.median(o):.2f}x")
