"""faiss-cpu HNSWFlat on the vectors of `retro index export-embeddings`, measured the way
`retro bench index --vectors` measures hnsw_rs: same M, efConstruction, ef list, k, threads,
queries = stored rows i*n/sample, tie-robust recall against exact inner-product search.

python tools/faiss_compare.py E.npy --m 16 --ef-construction 200 --ef 16,32,64,128,256 --threads 2
"""
import argparse, json, time
import numpy as np
import faiss

p = argparse.ArgumentParser()
p.add_argument("npy")
p.add_argument("--m", type=int, default=16)
p.add_argument("--ef-construction", type=int, default=200)
p.add_argument("--ef", default="16,32,64,128,256")
p.add_argument("-k", type=int, default=10)
p.add_argument("--sample", type=int, default=1000)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
faiss.omp_set_num_threads(a.threads)
x = np.ascontiguousarray(np.load(a.npy).astype(np.float32))
n, d = x.shape
ids = [i * n // min(a.sample, n) for i in range(min(a.sample, n))]
q = x[ids]
index = faiss.IndexHNSWFlat(d, a.m, faiss.METRIC_INNER_PRODUCT)
index.hnsw.efConstruction = a.ef_construction
t = time.time()
index.add(x)
build_s = time.time() - t
flat = faiss.IndexFlatIP(d)
flat.add(x)
ed, _ = flat.search(q, a.k)
kth = 1.0 - ed[:, -1] + 1e-6
rows = []
for ef in [int(e) for e in a.ef.split(",")]:
    index.hnsw.efSearch = ef
    t = time.time()
    D, I = index.search(q, a.k)
    par = len(q) / (time.time() - t)
    faiss.omp_set_num_threads(1)
    t = time.time()
    for i in range(len(q)):
        index.search(q[i : i + 1], a.k)
    one = len(q) / (time.time() - t)
    faiss.omp_set_num_threads(a.threads)
    good = 0
    for r in range(len(q)):
        seen = set()
        for j in range(a.k):
            if I[r, j] >= 0 and 1.0 - D[r, j] <= kth[r] and I[r, j] not in seen:
                seen.add(I[r, j]); good += 1
    rows.append({"ef": ef, "recall": good / (len(q) * a.k), "queries_per_s_parallel": par, "queries_per_s_one_thread": one})
print(json.dumps({"library": "faiss " + faiss.__version__, "points": n, "dim": d, "m": a.m, "ef_construction": a.ef_construction,
                  "threads": a.threads, "build_s": build_s, "inserts_per_s": n / build_s, "k": a.k, "per_ef": rows}, indent=1))
