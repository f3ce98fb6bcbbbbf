"""What the Llama reference scripts (smollm2_fixtures.py, llama_f64.py) share: where the model is,
file checksums, and the logit fixture's per-position entries and layout (one line per list entry or
position, so the file stays diffable at a small size)."""

import hashlib
import json
import os

import numpy as np

MODEL_REL = os.path.join('models', 'smollm2-135m-instruct-q4_1', 'SmolLM2-135M-Instruct.Q4_1.gguf')
TOP_K = 8


def default_gguf():
    shared = os.environ.get('RETRO_SHARED')
    if shared:
        return os.path.join(shared, MODEL_REL)
    return os.path.join('/work/shared', MODEL_REL)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def logit_entry(text, ids, x, probe_ids, digits):
    """A prompt's entry: per position the argmax, the TOP_K largest [id, logit], the margin between
    the first two (computed before rounding) and the logits at `probe_ids`, rounded to `digits`."""
    r = lambda v: round(float(v), digits)  # noqa: E731
    order = np.argsort(-x, axis=1, kind='stable')[:, :TOP_K]
    entry = {'text': text, 'ids': list(map(int, ids)), 'argmax': [], 'top': [], 'margin': [],
             'probe_logits': []}
    for p in range(len(ids)):
        row = x[p]
        top = order[p]
        entry['argmax'].append(int(top[0]))
        entry['top'].append([[int(t), r(row[t])] for t in top])
        entry['margin'].append(r(row[top[0]] - row[top[1]]))
        entry['probe_logits'].append([r(row[t]) for t in probe_ids])
    return entry


def write_fixture(path, fixture):
    """Writes `fixture` ("reference", "probe_ids", optionally "tokenization", "logits") and checks
    that it reads back equal."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write('{\n')
        f.write(f' "reference": {json.dumps(fixture["reference"], ensure_ascii=False)},\n')
        f.write(f' "probe_ids": {json.dumps(fixture["probe_ids"])},\n')
        if 'tokenization' in fixture:
            f.write(' "tokenization": [\n')
            f.write(',\n'.join('  ' + json.dumps(t, ensure_ascii=False) for t in fixture['tokenization']))
            f.write('\n ],\n')
        f.write(' "logits": [\n')
        parts = []
        for e in fixture['logits']:
            s = '  {\n'
            s += f'   "text": {json.dumps(e["text"], ensure_ascii=False)},\n'
            s += f'   "ids": {json.dumps(e["ids"])},\n'
            s += f'   "argmax": {json.dumps(e["argmax"])},\n'
            s += f'   "margin": {json.dumps(e["margin"])},\n'
            s += '   "top": [\n' + ',\n'.join('    ' + json.dumps(t) for t in e['top']) + '\n   ],\n'
            s += '   "probe_logits": [\n' + ',\n'.join('    ' + json.dumps(t) for t in e['probe_logits']) + '\n   ]\n'
            s += '  }'
            parts.append(s)
        f.write(',\n'.join(parts))
        f.write('\n ]\n}\n')
    with open(path, encoding='utf-8') as f:
        assert json.load(f) == json.loads(json.dumps(fixture))
