"""PyTorch (transformers) MiniLM throughput on the same chunks `retro bench index --docs N` embeds:
GPT-2 tokens of the first N Python-docs documents, 64-token chunks decoded to text, batches of 32
sorted by length, attention-masked mean pooling + L2 normalisation, float32 on CPU.

python tools/minilm_torch_throughput.py --shared ../shared --docs 10 --threads 2
"""
import argparse, json, time
import torch
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("--shared", default="../shared")
p.add_argument("--docs", type=int, default=10)
p.add_argument("--chunk-len", type=int, default=64)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
docs = [json.loads(l)["text"] for l in open(f"{a.shared}/data/python-3.11-docs.jsonl")][: a.docs]
lm = Tokenizer.from_file(f"{a.shared}/models/gpt2-tokenizer/tokenizer.json")
chunks = []
for d in docs:
    ids = lm.encode(d, add_special_tokens=False).ids
    for s in range(0, len(ids), a.chunk_len):
        chunks.append(lm.decode(ids[s : s + a.chunk_len]))
mdir = f"{a.shared}/models/all-MiniLM-L6-v2"
tok = AutoTokenizer.from_pretrained(mdir)
model = AutoModel.from_pretrained(mdir).eval()
order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i]))
t = time.time()
with torch.inference_mode():
    for s in range(0, len(order), a.batch):
        batch = [chunks[i] for i in order[s : s + a.batch]]
        enc = tok(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
dt = time.time() - t
print(json.dumps({"torch": torch.__version__, "threads": a.threads, "chunks": len(chunks), "seconds": dt, "chunks_per_s": len(chunks) / dt}))
