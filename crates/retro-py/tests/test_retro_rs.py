"""retro_rs against the `retro` CLI on the same database: search, neighbours, the retrieve array
and the dataset's precomputed neighbours, a few steps of a PyTorch-free model on its batches, and
errors. `RETRO_BIN` names the `retro` binary (tests/python.rs sets it)."""

import json
import os
import random
import re
import signal
import subprocess

import numpy as np
import pytest

import retro_rs

RETRO = os.environ["RETRO_BIN"]
SENTENCES = [
    "The cat sat on the mat and looked at the door. ",
    "A dog ran in the park after a red ball. ",
    "Rain fell on the old town all night long. ",
    "She read the letter twice and then burned it. ",
]


def retro(*args):
    return subprocess.run([RETRO, *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("retro")
    # Words in a random order per document, and the sentences once each: chunks that repeat
    # would tie in distance, and ties may come in either order.
    words = " ".join(SENTENCES).split()
    with open(d / "corpus.jsonl", "w") as f:
        for i in range(4):
            rng = random.Random(i)
            text = SENTENCES[i] + " ".join(rng.choice(words) for _ in range(150))
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    retro("index", "build", "--corpus", str(d / "corpus.jsonl"), "--tokenizer", "char",
          "--lexical-embedder", "64", "--chunk-len", "16", "--out", str(d / "db"))
    retro("dataset", "build", "--db", str(d / "db"), "--seq-len", "64", "--k", "2",
          "--out", str(d / "ds"))
    return d


def test_search_and_neighbours_equal_the_cli(built):
    db = retro_rs.Database.open(built / "db")
    info = json.loads(retro("index", "info", str(built / "db"), "--json"))
    assert db.chunk_len == 16 and db.id == info["database_id"]
    assert db.vocab_size == info["tokenizer"]["vocab_size"]
    assert db.num_chunks == info["counts"]["chunks"] == db.info()["chunks"]
    query = "A dog ran in the park"
    cli = json.loads(retro("index", "query", str(built / "db"), query, "-k", "3", "--json"))[0]
    ids, dist = db.search_texts([query], k=3)
    assert ids.shape == (1, 3) and ids.dtype == np.int64 and dist.dtype == np.float32
    assert ids[0].tolist() == [h["chunk"] for h in cli["hits"]]
    np.testing.assert_allclose(dist[0], [h["distance"] for h in cli["hits"]], rtol=1e-6)
    assert db.documents_of(ids[0]) == [h["document"] for h in cli["hits"]]
    keys = db.keys()
    assert keys.shape == (db.num_chunks, db.dim) and keys.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, rtol=1e-5)
    # A stored key's nearest chunk is its own (the lexical keys of these chunks are distinct).
    own, _ = db.search(keys[[0, 5, 9]], k=1)
    assert own[:, 0].tolist() == [0, 5, 9]
    n = db.neighbours(ids[0])
    assert n.shape == (3, 32)
    for row, h in zip(n, cli["hits"]):
        text = db.decode([t for t in row.tolist() if t != db.pad_id])
        assert text == h["chunk_text"] + h["continuation_text"]


def test_a_database_and_dataset_built_from_python_equal_the_clis(built, tmp_path):
    stages = []
    db = retro_rs.Database.build(
        built / "corpus.jsonl", tmp_path / "db", tokenizer="char", lexical_dim=64, chunk_len=16,
        progress=lambda stage, done, total: stages.append(stage))
    cli = retro_rs.Database.open(built / "db")
    # Content ids: the same chunks, keys, tokenizer and parameters as `retro index build`.
    assert db.id == cli.id and db.num_chunks == cli.num_chunks
    assert {"tokenizing", "embedding", "inserting"} <= set(stages)
    done = []
    # On the CLI's database: the graph is built in parallel, so two builds of the same content
    # may link it differently, and an approximate search may then answer a rare query otherwise.
    ds = retro_rs.Dataset.build(cli, tmp_path / "ds", seq_len=64, k=2,
                                progress=lambda d, t: done.append((d, t)))
    assert ds.id == retro_rs.Dataset.open(built / "ds", cli).id
    assert done and done[-1][0] == done[-1][1]
    np.testing.assert_array_equal(ds.batch([0, 1])["neighbours"],
                                  retro_rs.Dataset.open(built / "ds", cli).batch([0, 1])["neighbours"])
    # Rebuilding needs overwrite, and a folder of someone's files is never replaced.
    with pytest.raises(retro_rs.RetroError, match="overwrite"):
        retro_rs.Dataset.build(db, tmp_path / "ds", seq_len=64)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(retro_rs.RetroError, match="is not a retro database"):
        retro_rs.Database.build(built / "corpus.jsonl", mine, tokenizer="char", lexical_dim=64,
                                overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(retro_rs.RetroError, match="lexical_features"):
        retro_rs.Database.build(built / "corpus.jsonl", tmp_path / "x", tokenizer="char",
                                lexical_dim=64, lexical_features="bogus")
    with pytest.raises(retro_rs.RetroError, match="choose an embedder"):
        retro_rs.Database.build(built / "corpus.jsonl", tmp_path / "x", tokenizer="char")
    with pytest.raises(retro_rs.RetroError, match="nope.jsonl"):
        retro_rs.Database.build(tmp_path / "nope.jsonl", tmp_path / "x", tokenizer="char",
                                lexical_dim=64)
    assert not (tmp_path / "x").exists()


def test_ctrl_c_stops_a_build_and_leaves_nothing(built, tmp_path):
    # What Python raises in a callback running on the main thread when Ctrl-C comes.
    def ctrl_c(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        retro_rs.Database.build(built / "corpus.jsonl", tmp_path / "db", tokenizer="char",
                                lexical_dim=64, chunk_len=16, progress=ctrl_c)
    db = retro_rs.Database.open(built / "db")
    with pytest.raises(KeyboardInterrupt):
        retro_rs.Dataset.build(db, tmp_path / "ds", seq_len=64, progress=ctrl_c)
    # Neither the folders nor their staged copies (hidden siblings) stay.
    assert list(tmp_path.iterdir()) == []
    # A progress callback that fails is reported, not fatal.
    def broken(*_):
        raise ValueError("broken progress bar")

    ds = retro_rs.Dataset.build(db, tmp_path / "ds", seq_len=64, progress=broken)
    assert len(ds) > 0


def test_a_sigint_during_a_build_raises_and_leaves_nothing_half_written(built, tmp_path):
    # A real signal: it may reach the build before the database is in place (nothing stays) or
    # just after (the database is complete); it is raised either way, never swallowed, and no
    # staged copy (a hidden sibling) stays.
    def sigint(*_):
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own Ctrl-C handler, even where the process inherited SIGINT ignored (as a
    # background job of a shell without job control does).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for _ in range(3):
            with pytest.raises(KeyboardInterrupt):
                retro_rs.Database.build(built / "corpus.jsonl", tmp_path / "db", tokenizer="char",
                                        lexical_dim=64, chunk_len=16, overwrite=True,
                                        progress=sigint)
            assert [p.name for p in tmp_path.iterdir()] in ([], ["db"])
            if (tmp_path / "db").exists():
                assert retro_rs.Database.open(tmp_path / "db").num_chunks > 0
    finally:
        signal.signal(signal.SIGINT, previous)


def test_progress_bar_draws_a_tqdm_bar_per_stage_to_the_end(built, tmp_path):
    import io

    out = io.StringIO()
    with retro_rs.progress_bar(file=out, mininterval=0) as bar:
        db = retro_rs.Database.build(built / "corpus.jsonl", tmp_path / "db", tokenizer="char",
                                     lexical_dim=64, chunk_len=16, progress=bar)
    text = out.getvalue()
    for stage in ["tokenizing", "embedding", "inserting"]:
        # Each stage's bar ends full: "stage: 100%|...| n/n".
        last = [line for line in text.replace("\r", "\n").splitlines() if line.startswith(stage)]
        assert last and "100%" in last[-1], (stage, last[-1:])
    out = io.StringIO()
    with retro_rs.progress_bar("sequences", file=out, mininterval=0) as bar:
        ds = retro_rs.Dataset.build(db, tmp_path / "ds", seq_len=64, progress=bar)
    last = out.getvalue().replace("\r", "\n").splitlines()[-1]
    assert last.startswith("sequences: 100%") and re.search(r" (\d+)/\1 ", last), last
    assert len(ds) > 0


def test_a_build_on_a_terminal_draws_a_bar_unasked(built, tmp_path):
    import fcntl
    import pty
    import struct
    import sys
    import termios

    code = ("import retro_rs, sys; retro_rs.Database.build(sys.argv[1], sys.argv[2], "
            "tokenizer='char', lexical_dim=64, chunk_len=16)")

    def run(out, on_terminal):
        args = [sys.executable, "-c", code, str(built / "corpus.jsonl"), str(out)]
        if not on_terminal:
            return subprocess.run(args, stderr=subprocess.PIPE, check=True).stderr
        main, sub = pty.openpty()
        # A new pseudo-terminal is 0 columns wide, and tqdm then draws nothing: give it a size.
        fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        subprocess.run(args, stderr=sub, check=True)
        os.close(sub)
        drawn = b""
        while True:
            try:
                part = os.read(main, 1 << 16)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not part:
                break
            drawn += part
        os.close(main)
        return drawn

    drawn = run(tmp_path / "a", on_terminal=True).decode()
    assert "embedding" in drawn and "100%" in drawn, drawn[-300:]
    # Piped (a log file, CI): nothing drawn.
    assert run(tmp_path / "b", on_terminal=False) == b""


@pytest.mark.parametrize("kind", ["db", "ds"])
def test_damaged_files_raise_retro_error_and_never_crash(built, tmp_path, kind):
    """Seeded mutations of every file of a database or a dataset (bits flipped, the file cut
    short, emptied, removed): opening raises RetroError, never another exception (a Rust panic
    would be pyo3's PanicException), and a damaged binary file is never opened as if whole."""
    import shutil

    rng = random.Random(7)
    folder = built / kind
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert len(files) >= 6
    refused = 0
    for rel in files:
        for mutation in ["flip", "cut", "empty", "remove"]:
            work = tmp_path / f"{rel.name}-{mutation}"
            shutil.copytree(built / "db", work / "db")
            shutil.copytree(built / "ds", work / "ds")
            target = work / kind / rel
            data = bytearray(target.read_bytes())
            if mutation == "flip":
                for _ in range(4):
                    i = rng.randrange(len(data))
                    data[i] ^= 1 << rng.randrange(8)
                target.write_bytes(data)
            elif mutation == "cut":
                target.write_bytes(data[: rng.randrange(len(data))])
            elif mutation == "empty":
                target.write_bytes(b"")
            else:
                target.unlink()
            try:
                db = retro_rs.Database.open(work / "db")
                if kind == "ds":
                    retro_rs.Dataset.open(work / "ds", db)
            except retro_rs.RetroError as e:
                refused += 1
                assert str(e), (rel, mutation)
            else:
                # Only a JSON file whose flipped bits still parse to the values it had may open.
                assert mutation == "flip" and rel.suffix == ".json", (rel, mutation)
            shutil.rmtree(work)
    assert refused >= 4 * len(files) - len([f for f in files if f.suffix == ".json"])


def test_retrieve_equals_the_datasets_precomputed_neighbours(built):
    db = retro_rs.Database.open(built / "db")
    ds = retro_rs.Dataset.open(built / "ds", db)
    assert len(ds) == ds.len("train") > 2
    b = ds.batch([0, 1, 2])
    assert b["x"].shape == (3, 64) and b["y"].shape == (3, 64)
    assert b["neighbours"].shape == (3, 4, 2, 32) and b["neighbours"].dtype == np.int64
    np.testing.assert_array_equal(b["x"][:, 1:], b["y"][:, :-1])
    # The dataset never retrieves from its held-out documents either.
    r = retro_rs.Retriever(db, k=2, exclude_documents=ds.held_out_documents)
    got = r.retrieve(b["x"], documents=b["documents"])
    np.testing.assert_array_equal(got, b["neighbours"])
    # Without the filter a row finds its own document's chunks.
    own = r.retrieve(b["x"])
    assert own.shape == got.shape and not np.array_equal(own, got)


def test_batches_train_a_model_a_few_steps(built):
    """A bag-of-neighbours bigram model in numpy: the loss falls on the dataset's batches."""
    db = retro_rs.Database.open(built / "db")
    ds = retro_rs.Dataset.open(built / "ds", db)
    vocab = int(max(b.max() for b in (ds.batch(list(range(len(ds))))["x"],))) + 1
    w = np.zeros((vocab, vocab))
    losses = []
    for step in range(20):
        b = ds.batch([step % len(ds)])
        x, y = b["x"].ravel(), b["y"].ravel()
        logits = w[x]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        losses.append(-np.log(p[np.arange(len(y)), y]).mean())
        g = p
        g[np.arange(len(y)), y] -= 1
        np.add.at(w, x, -0.5 * g)
    assert losses[-1] < 0.7 * losses[0], losses


def test_bad_input_raises_retro_error_with_the_message(built, tmp_path):
    with pytest.raises(retro_rs.RetroError, match="nothing"):
        retro_rs.Database.open(tmp_path / "nothing")
    db = retro_rs.Database.open(built / "db")
    with pytest.raises(retro_rs.RetroError, match="columns"):
        db.search(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(retro_rs.RetroError, match="out of range"):
        db.neighbours(np.array([db.num_chunks], dtype=np.int64))
    with pytest.raises(retro_rs.RetroError, match="k"):
        retro_rs.Retriever(db, k=0)
    r = retro_rs.Retriever(db)
    with pytest.raises(retro_rs.RetroError, match="vocabulary"):
        r.retrieve(np.full((1, 16), 10**6, dtype=np.int64))
    with pytest.raises(retro_rs.RetroError, match="no document"):
        r.retrieve(np.zeros((1, 16), dtype=np.int64), documents=["nope"])
    ds = retro_rs.Dataset.open(built / "ds", db)
    with pytest.raises(retro_rs.RetroError, match="out of range"):
        ds.batch([len(ds)])
    with pytest.raises(retro_rs.RetroError, match="split"):
        ds.len("test")
    # A damaged database file is refused by name, not a crash.
    damaged = tmp_path / "db"
    subprocess.run(["cp", "-r", str(built / "db"), str(damaged)], check=True)
    manifest = damaged / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"chunk_len": 16', '"chunk_len": 17'))
    with pytest.raises(retro_rs.RetroError):
        retro_rs.Database.open(damaged)
