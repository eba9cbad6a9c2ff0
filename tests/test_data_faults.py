"""foxacp.data under bad input: binary and non-UTF-8 files, huge lines, corrupt token stores.

Each case goes through the API and, where a command reads it, through the CLI: the error names
the file and what was expected, and the CLI exits non-zero without a traceback.
"""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from foxacp.data import StoreError, TokenStore, WindowLoader, get_tokenizer, prepare_store, write_store
from foxacp.data.sources import not_text_reason
from foxacp.data.tokenizer import Tokenizer, split_text

ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00" + bytes(range(256)) * 4
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256)) * 4


class IdTokenizer(Tokenizer):
    """Text "3 4 5" -> ids [3, 4, 5]."""

    def __init__(self, vocab_size: int = 1000):
        self.name, self.vocab_size, self.eot_id = "ids", vocab_size, 0

    def encode(self, text):
        return [int(t) for t in text.split()]


def decoded_docs(store) -> list[str]:
    """The documents of a ``bytes``-tokenizer store as text."""
    return [store.doc(i).astype(np.uint8).tobytes().decode("utf-8") for i in range(store.n_docs)]


# -- what is text -------------------------------------------------------------------------------


def test_not_text_reason():
    assert not_text_reason(ELF) == not_text_reason(PNG) == "binary (NUL bytes)"
    assert not_text_reason(bytes(range(1, 32)) * 10) == "binary (control bytes)"
    assert "not UTF-8" in not_text_reason(bytes(range(128, 256)) * 10)
    for text in (b"", b"plain\n", "caf\u00e9 \u2713".encode(), "caf\u00e9 na\u00efve".encode("cp1252"),
                 b"\x1b[1mbold\x1b[0m\ttab\r\n"):
        assert not_text_reason(text) is None, text


def test_binary_files_left_out_by_content_and_reported(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello text")
    (src / "fake.txt").write_bytes(PNG)  # a text extension, binary content
    (src / "tool").write_bytes(ELF)  # no extension (like a compiled program)
    named = tmp_path / "picture.png"
    named.write_bytes(PNG)  # named explicitly: still sniffed
    store = prepare_store([src, named], "bytes", tmp_path / "out", progress=False)
    assert decoded_docs(store) == ["hello text"]
    err = capsys.readouterr().err
    assert "skipped 3 files" in err and "binary (NUL bytes): 3:" in err
    for name in ("fake.txt", "tool", "picture.png"):
        assert name in err
    report = store.manifest["input_report"]
    assert report["n_skipped"] == 3
    assert {(p.rsplit("/", 1)[-1], r) for p, r in report["skipped"]} == {
        ("fake.txt", "binary (NUL bytes)"), ("tool", "binary (NUL bytes)"), ("picture.png", "binary (NUL bytes)")}


def test_nothing_but_binary_names_the_files(tmp_path):
    named = tmp_path / "picture.png"
    named.write_bytes(PNG)
    with pytest.raises(ValueError, match=r"no tokens.*skipped 1 file.*binary \(NUL bytes\): 1: .*picture\.png"):
        prepare_store([named], "bytes", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_extensionless_text_taken_other_extensions_reported(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "README").write_text("read me")
    (src / "Makefile").write_text("all:\n\techo hi\n")
    (src / "b.md").write_text("markdown")
    (src / "data.json").write_text('{"not": "taken"}')
    (src / "blank.txt").write_text(" \n\t\n")
    (src / ".hidden").write_text("hidden files are not walked")
    store = prepare_store([src], "bytes", tmp_path / "out", progress=False)
    assert decoded_docs(store) == ["all:\n\techo hi\n", "read me", "markdown"]  # sorted walk
    err = capsys.readouterr().err
    assert "data.json" in err and "extension not a text extension" in err
    assert "blank.txt" in err and "empty or only whitespace" in err
    assert ".hidden" not in err
    # --ext chooses exactly the extensions: files without one are then left out, and reported.
    only_md = prepare_store([src], "bytes", tmp_path / "md", extensions=["md"], progress=False)
    assert decoded_docs(only_md) == ["markdown"]
    assert "README" in capsys.readouterr().err


def test_latin1_decoded_as_cp1252_with_a_note(tmp_path, capsys):
    text = "caf\u00e9 na\u00efve \u2013 \u20ac5, \u00fcber"
    latin = tmp_path / "latin.txt"
    latin.write_bytes(text.encode("cp1252"))
    # Valid UTF-8 with one stray Latin-1 byte far from the start (past the sniffed bytes).
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(("\u2713 " * 5000).encode() + b"d\xe9j\xe0")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(json.dumps({"text": "X"}).replace("X", "\u00e9t\u00e9").encode("utf-8") + b"\n"
                      + b'{"text": "\xe9t\xe9"}\n')
    store = prepare_store([latin, mixed, jsonl], "bytes", tmp_path / "out", progress=False)
    assert decoded_docs(store) == [text, "\u2713 " * 5000 + "d\u00e9j\u00e0", "\u00e9t\u00e9", "\u00e9t\u00e9"]
    assert "\ufffd" not in "".join(decoded_docs(store))
    err = capsys.readouterr().err
    assert "decoded 3 files" in err and "Windows-1252" in err
    for name in ("latin.txt", "mixed.txt", "d.jsonl"):
        assert name in err
    assert store.manifest["input_report"]["n_notes"] == 3


def test_utf8_bom_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello")
    assert decoded_docs(prepare_store([path], "bytes", tmp_path / "out", progress=False)) == ["hello"]


# -- long lines in bounded memory ---------------------------------------------------------------


def test_long_single_line_in_bounded_memory(tmp_path):
    """A 12 MB line (one document) is streamed: Python-side peak far below the file's size."""
    path = tmp_path / "line.txt"
    words = (b"lorem ipsum dolor sit amet " * 40000)[:1 << 20]
    path.write_bytes(words * 12)
    tracemalloc.start()
    try:
        store = prepare_store([path], "bytes", tmp_path / "out", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.n_docs == 1 and store.n_tokens == 12 << 20
    assert peak < 10 << 20, f"peak {peak / 2**20:.1f} MiB while tokenising a 12 MiB line"
    store.verify()


class SpyTokenizer(IdTokenizer):
    """Records the longest text it was asked to encode."""

    longest = 0

    def encode_batch(self, texts):
        self.longest = max([self.longest] + [len(t) for t in texts])
        return super().encode_batch(texts)


def test_tokenizer_never_sees_more_than_a_piece(tmp_path):
    doc = " ".join(str(i % 900 + 1) for i in range(200_000))  # ~ 800k characters, one document
    spy = SpyTokenizer()
    store = write_store([(doc, len(doc))], spy, tmp_path / "out", progress=False, piece_chars=4096)
    assert store.n_docs == 1 and store.doc(0).tolist() == [i % 900 + 1 for i in range(200_000)]
    assert 3000 < spy.longest <= 4096


def test_pieces_give_the_ids_of_the_whole():
    """Cut where GPT-2's pre-tokenizer cuts anyway: the same ids as the whole text."""
    unit = ("Hello,  world!\n\n  indented\tline 12345 caf\u00e9 \u2713 \u65e5\u672c\u8a9e "
            "don't   stop;   x=y+1\r\n   \n")
    text = unit * 120
    tok = get_tokenizer("gpt2")
    pieces = list(split_text([text[i:i + 777] for i in range(0, len(text), 777)], 300))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 300 and len(pieces) > 25
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)
    nospace = "x" * 1000  # no place to cut: cut at the limit, nothing lost
    assert list(split_text([nospace], 300)) == [nospace[:300], nospace[300:600], nospace[600:900], nospace[900:]]


# -- corrupt token stores -----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    docs = [(" ".join(map(str, range(1 + 10 * d, 11 + 10 * d))), 1) for d in range(4)]
    return write_store(docs, IdTokenizer(), tmp_path / "store", progress=False)


def edit_manifest(store, **changes):
    path = store.path / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


def test_manifest_records_max_id(store):
    assert store.manifest["max_id"] == 40
    store.verify()


@pytest.mark.parametrize("key", ["n_tokens", "n_docs", "vocab_size", "dtype", "eot_id"])
def test_manifest_missing_key(store, key):
    edit_manifest(store, **{key: None})
    with pytest.raises(StoreError, match=rf"manifest\.json: missing key '{key}'"):
        TokenStore(store.path)


@pytest.mark.parametrize("changes, message", [
    ({"n_tokens": "40"}, "'n_tokens' must be"),
    ({"eot_id": 1000}, r"'eot_id' must be in \[0, vocab_size=1000\)"),
    ({"dtype": "float32"}, "'dtype' must be 'uint16' or 'uint32'"),
    ({"vocab_size": 100000}, "wide enough for vocab_size=100000"),
    ({"n_docs": 0}, "'n_docs' must be"),
    ({"vocab_size": 30}, r"'max_id' must be the largest token id, in \[0, vocab_size=30\)"),
])
def test_manifest_bad_values(store, changes, message):
    edit_manifest(store, **changes)
    with pytest.raises(StoreError, match=message):
        TokenStore(store.path)


def test_manifest_not_json_object(store):
    (store.path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(StoreError, match="manifest.json: expected a JSON object"):
        TokenStore(store.path)


def test_ids_beyond_vocab(store):
    """A store whose ids do not fit its vocabulary (an older store without max_id): --verify
    names the token; training batches refuse it instead of an IndexError in the embedding."""
    edit_manifest(store, vocab_size=30, max_id=None)
    opened = TokenStore(store.path)  # cheap checks cannot see it
    with pytest.raises(StoreError, match=r"tokens\.bin: token 29 is id 30, not below vocab_size=30"):
        opened.verify()
    with pytest.raises(ValueError, match=r"bos_id must be in \[0, vocab_size=30\), got 30"):
        WindowLoader(opened, 5, 8, mode="packed", bos_id=30)
    loader = WindowLoader(opened, 5, 8, mode="packed", shuffle=False)
    with pytest.raises(StoreError, match=r"store: token id \d+ in window \d+ is not in \[0, vocab_size=30\)"):
        next(loader)


def test_offsets_must_rise(store):
    np.save(store.path / "docs.npy", np.array([0, 10, 25, 20, 40], dtype=np.int64))
    with pytest.raises(StoreError, match=r"docs\.npy: offsets do not rise at document 2 \(25 -> 20"):
        TokenStore(store.path)
    np.save(store.path / "docs.npy", np.array([0, 10, 10, 30, 40], dtype=np.int64))  # an empty document
    with pytest.raises(StoreError, match=r"docs\.npy: offsets do not rise at document 1"):
        TokenStore(store.path)


def test_truncated_or_missing_files(store):
    docs = store.path / "docs.npy"
    data = docs.read_bytes()
    docs.write_bytes(data[:-9])
    with pytest.raises(StoreError, match=r"docs\.npy: unreadable document index .*expected 5 int64 offsets"):
        TokenStore(store.path)
    docs.unlink()
    with pytest.raises(StoreError, match=r"docs\.npy: missing"):
        TokenStore(store.path)
    docs.write_bytes(data)
    (store.path / "tokens.bin").unlink()
    with pytest.raises(StoreError, match=r"tokens\.bin: missing; the manifest says 40 tokens"):
        TokenStore(store.path)


def test_verify_without_checksum(store):
    edit_manifest(store, checksum={})
    opened = TokenStore(store.path)
    with pytest.raises(StoreError, match="manifest.json: no checksum to verify"):
        opened.verify()


def test_bad_limits(tmp_path):
    with pytest.raises(ValueError, match="max_docs must be >= 1"):
        write_store([("1 2", 1)], IdTokenizer(), tmp_path / "out", progress=False, max_docs=0)


# -- through the CLI ----------------------------------------------------------------------------


def run_cli(argv, capsys):
    """``foxacp ARGV`` in-process: ``(exit code, stderr)``. Where the command's error escapes
    ``foxacp.cli.main`` it must be of the kinds the CLI reports as one line (bad input)."""
    from foxacp import cli

    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except (ValueError, FileNotFoundError) as err:
        return 2, capsys.readouterr().err + f"foxacp: error: {err}"
    return code, capsys.readouterr().err


def test_cli_errors_name_the_file(store, tmp_path, capsys):
    np.save(store.path / "docs.npy", np.array([0, 10, 25, 20, 40], dtype=np.int64))
    code, err = run_cli(["data", "info", str(store.path)], capsys)
    assert code != 0 and "docs.npy: offsets do not rise" in err and "Traceback" not in err

    edit_manifest(store, n_tokens=None)
    code, err = run_cli(["data", "info", "--verify", str(store.path)], capsys)
    assert code != 0 and "manifest.json: missing key 'n_tokens'" in err and "Traceback" not in err

    png = tmp_path / "picture.png"
    png.write_bytes(PNG)
    code, err = run_cli(["data", "prepare", str(png), "--tokenizer", "bytes", "--out", str(tmp_path / "o"),
                         "--no-progress"], capsys)
    assert code != 0 and "picture.png" in err and "binary" in err and "Traceback" not in err
