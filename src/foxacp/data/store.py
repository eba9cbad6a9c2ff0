"""The token store: one memory-mapped token array, a document index and a JSON manifest.

Layout of a store directory::

    tokens.bin      all documents' token ids back to back (uint16 if vocab_size <= 65536, else uint32)
    docs.npy        int64 offsets, (n_docs + 1,): document i is tokens[docs[i]:docs[i+1]]
    manifest.json   tokenizer, vocab_size, eot_id, dtype, n_docs, n_tokens, max_id, checksum,
                    sources, input_report (files left out or decoded as Windows-1252)
    tokenizer.json  a copy of the tokenizer when it is a trained one (gpt2/bytes are built in)

No separator tokens are stored; the loader adds BOS/EOT. :func:`write_store` streams documents
in, tokenises them in batches (``tokenizers`` encodes a batch on all cores, in a background
thread while the next batch is read), and builds everything in ``DIR.tmp-...`` next to ``DIR``,
writing ``manifest.json`` last and renaming the folder into place: a killed run leaves only a
``.tmp-`` folder (cleaned up by the next run on the same host) and never a ``DIR`` that loads.
A long document is tokenised in pieces of 64k characters, so memory stays bounded (a 15 MB
one-line file peaked at 2.9 GB RSS when tokenised whole, 0.4 GB in pieces, same ids).

Opening a store checks what is cheap (manifest keys and values, file sizes, strictly rising
document offsets, ``max_id < vocab_size``); ``verify`` reads every token (checksum, ids).
Stores written before ``max_id`` was recorded open too; ``verify`` checks their ids.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .sources import SourceReport, expand_sources, iter_documents
from .tokenizer import HFTokenizer, Tokenizer, get_tokenizer, split_text

FORMAT = "foxacp-token-store"
VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
DOCS = "docs.npy"
TOKENIZER_COPY = "tokenizer.json"



def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict:
    """The JSON object in ``path``; ``error`` naming the file when it is not valid JSON or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class StoreError(ValueError):
    """A token store folder that is missing, incomplete or corrupt (the message names the file)."""


# The manifest keys every store has: (type, what the value is).
MANIFEST_KEYS = {
    "tokenizer": (str, "the tokenizer's name or path"),
    "vocab_size": (int, "the number of token ids, >= 1"),
    "eot_id": (int, "the end-of-text id, in [0, vocab_size)"),
    "dtype": (str, "the token dtype, 'uint16' or 'uint32'"),
    "n_docs": (int, "the number of documents, >= 1"),
    "n_tokens": (int, f"the number of tokens in {TOKENS}, >= n_docs"),
}


def read_manifest(path: Path) -> dict:
    """The manifest of the store folder ``path``, its keys and values checked (no data read)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise StoreError(f"{path} is not a complete token store (no {MANIFEST}); "
                         "prepare it with `foxacp data prepare`")
    m = read_json_object(manifest_path, StoreError)
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise StoreError(f"{manifest_path}: not a {FORMAT} v{VERSION} store "
                         f"(format={m.get('format')!r}, version={m.get('version')!r})")
    for key, (kind, what) in MANIFEST_KEYS.items():
        if key not in m:
            raise StoreError(f"{manifest_path}: missing key {key!r} ({what})")
        if not isinstance(m[key], kind) or isinstance(m[key], bool):
            raise StoreError(f"{manifest_path}: {key!r} must be {what}, got {m[key]!r}")

    def bad(key: str, what: str) -> StoreError:
        return StoreError(f"{manifest_path}: {key!r} must be {what}, got {m[key]!r}")

    if m["vocab_size"] < 1:
        raise bad("vocab_size", MANIFEST_KEYS["vocab_size"][1])
    if not 0 <= m["eot_id"] < m["vocab_size"]:
        raise bad("eot_id", f"in [0, vocab_size={m['vocab_size']})")
    if m["dtype"] not in ("uint16", "uint32") or np.dtype(m["dtype"]).itemsize < token_dtype(m["vocab_size"]).itemsize:
        raise bad("dtype", f"'uint16' or 'uint32', wide enough for vocab_size={m['vocab_size']}")
    if m["n_docs"] < 1:
        raise bad("n_docs", MANIFEST_KEYS["n_docs"][1])
    if m["n_tokens"] < m["n_docs"]:
        raise bad("n_tokens", f">= n_docs={m['n_docs']} (every document holds a token)")
    max_id = m.get("max_id")
    if max_id is not None and (not isinstance(max_id, int) or isinstance(max_id, bool)
                               or not 0 <= max_id < m["vocab_size"]):
        raise bad("max_id", f"the largest token id, in [0, vocab_size={m['vocab_size']})")
    return m


def load_offsets(path: Path, n_docs: int, n_tokens: int) -> np.ndarray:
    """``docs.npy`` of the store ``path`` (memory-mapped), checked: ``n_docs + 1`` int64 offsets
    rising strictly from 0 to ``n_tokens`` (every document holds at least one token)."""
    docs_path = path / DOCS
    expected = f"{n_docs + 1} int64 offsets rising from 0 to n_tokens={n_tokens}"
    if not docs_path.is_file():
        raise StoreError(f"{docs_path}: missing (the document index: {expected})")
    try:
        offsets = np.load(docs_path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:  # truncated, not .npy, an object array
        raise StoreError(f"{docs_path}: unreadable document index ({err}); expected {expected}") from None
    if offsets.shape != (n_docs + 1,) or offsets.dtype != np.int64:
        raise StoreError(f"{docs_path}: {offsets.shape} {offsets.dtype} array; expected {expected}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != n_tokens:
        raise StoreError(f"{docs_path}: offsets run from {int(offsets[0])} to {int(offsets[-1])}; expected {expected}")
    lengths = np.diff(np.asarray(offsets))
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        i = int(bad[0])
        raise StoreError(f"{docs_path}: offsets do not rise at document {i} ({int(offsets[i])} -> "
                         f"{int(offsets[i + 1])}, {bad.size} such documents); expected {expected}")
    return offsets


class TokenStore:
    """Read access to a token store (see the module docstring); documents are memmap views.

    Opening checks what is cheap: the manifest's keys and values, the token file's size, the
    document index (length, dtype, strictly rising offsets), and the manifest's ``max_id``
    against ``vocab_size``. ``verify=True`` (or :meth:`verify`) also reads every token: the
    checksum, and every id < ``vocab_size``. Problems raise :class:`StoreError` naming the file.

    The document interface shared with :class:`~foxacp.data.longcrawl.LongCrawlStore`:
    ``n_docs``, ``doc_lengths`` (int64 array), ``read(doc, start, stop)``, ``doc(i)``,
    ``vocab_size``, ``eot_id``/``bos_id``, ``tokenizer_name``.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        self.dtype = np.dtype(m["dtype"])
        self.n_docs = m["n_docs"]
        self.n_tokens = m["n_tokens"]
        self.vocab_size = m["vocab_size"]
        self.eot_id = m["eot_id"]
        tokens_path = self.path / TOKENS
        expected = self.n_tokens * self.dtype.itemsize
        if not tokens_path.is_file():
            raise StoreError(f"{tokens_path}: missing; the manifest says {self.n_tokens} tokens ({expected} bytes)")
        actual = tokens_path.stat().st_size
        if actual != expected:
            raise StoreError(f"{tokens_path}: {actual} bytes, the manifest says {expected} "
                             f"({self.n_tokens} {self.dtype.name} tokens)")
        self.doc_offsets = load_offsets(self.path, self.n_docs, self.n_tokens)
        self.tokens = np.memmap(tokens_path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        self.doc_lengths = np.diff(np.asarray(self.doc_offsets)).astype(np.int64)
        if verify:
            self.verify()

    # -- the document interface -------------------------------------------------------------
    @property
    def bos_id(self) -> int:
        return self.eot_id

    @property
    def tokenizer_name(self) -> str:
        return self.manifest["tokenizer"]

    def __len__(self) -> int:
        return self.n_docs

    def doc(self, i: int) -> np.ndarray:
        """Document ``i`` (a read-only memmap view)."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range (n_docs={self.n_docs})")
        i %= self.n_docs
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]

    __getitem__ = doc

    def read(self, doc: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of document ``doc`` (clipped to the document)."""
        base, end = int(self.doc_offsets[doc]), int(self.doc_offsets[doc + 1])
        return self.tokens[min(base + start, end):min(base + stop, end)]

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the store was made with (a trained one from the store's own copy)."""
        copy = self.path / TOKENIZER_COPY
        return get_tokenizer(copy if copy.is_file() else self.tokenizer_name)

    def verify(self) -> None:
        """Read every token: the checksum must match the manifest's and every id be < ``vocab_size``
        (and equal the manifest's ``max_id`` at most); raise :class:`StoreError` otherwise."""
        manifest_path, tokens_path = self.path / MANIFEST, self.path / TOKENS
        checksum = self.manifest.get("checksum")
        if not (isinstance(checksum, dict) and isinstance(checksum.get("algorithm"), str)
                and isinstance(checksum.get("tokens"), str)):
            raise StoreError(f"{manifest_path}: no checksum to verify (expected 'checksum': "
                             "{'algorithm': ..., 'tokens': hex digest})")
        try:
            digest = hashlib.new(checksum["algorithm"])
        except ValueError:
            raise StoreError(f"{manifest_path}: unknown checksum algorithm {checksum['algorithm']!r}") from None
        max_id, first_bad, chunk = 0, None, 1 << 24
        for start in range(0, self.n_tokens, chunk):
            block = np.ascontiguousarray(self.tokens[start:start + chunk])
            digest.update(block.tobytes())
            max_id = max(max_id, int(block.max()))
            if first_bad is None and max_id >= self.vocab_size:
                first_bad = start + int(np.argmax(block >= self.vocab_size))
        if digest.hexdigest() != checksum["tokens"]:
            raise StoreError(f"{tokens_path}: checksum mismatch, the token file is corrupt")
        if first_bad is not None:
            raise StoreError(f"{tokens_path}: token {first_bad} is id {int(self.tokens[first_bad])}, not below "
                             f"vocab_size={self.vocab_size} of {manifest_path}")
        if self.manifest.get("max_id", max_id) != max_id:
            raise StoreError(f"{manifest_path}: max_id={self.manifest['max_id']}, but the largest id in "
                             f"{tokens_path} is {max_id}")

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.path)!r}, tokenizer={self.tokenizer_name!r}, n_docs={self.n_docs}, "
                f"n_tokens={self.n_tokens}, dtype={self.dtype.name})")


def is_token_store(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


# -- writing ----------------------------------------------------------------------------------

def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-{socket.gethostname()}-"


def _remove_stale_tmp(out: Path) -> None:
    """Remove ``.tmp-`` folders that killed runs on this host left beside ``out``."""
    prefix = _tmp_prefix(out)
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _document_pieces(document: str | Iterable[str], piece_chars: int) -> Iterator[tuple[str, bool]]:
    """``(piece, is last)`` of a document (a ``str`` or a stream of ``str``), in pieces of about
    ``piece_chars`` characters (:func:`~foxacp.data.tokenizer.split_text`); nothing for a
    document of only whitespace. Leading whitespace is held until the first other character."""
    pieces = split_text((document,) if isinstance(document, str) else document, piece_chars)
    held = ""
    for piece in pieces:
        if not piece.isspace():
            current = held + piece
            break
        held += piece
    else:
        return
    for piece in pieces:
        yield current, False
        current = piece
    yield current, True


def _batches(documents: Iterable[tuple[str | Iterable[str], int]], batch_chars: int,
             piece_chars: int) -> Iterator[tuple[list[str], list[bool], int]]:
    """Document pieces in groups of about ``batch_chars`` characters: ``(pieces, is last, bytes consumed)``."""
    pieces: list[str] = []
    lasts: list[bool] = []
    size = consumed = 0
    for document, nbytes in documents:
        for piece, last in _document_pieces(document, piece_chars):
            pieces.append(piece)
            lasts.append(last)
            size += len(piece)
            if size >= batch_chars:
                yield pieces, lasts, consumed
                pieces, lasts, size, consumed = [], [], 0, 0
        consumed += nbytes
    if pieces or consumed:
        yield pieces, lasts, consumed


class _TokenWriter:
    """Appends the token ids of document pieces to an open file; counts documents and tokens,
    hashes the ids, tracks the largest, and refuses ids outside the tokenizer's vocabulary."""

    def __init__(self, f, tok: Tokenizer, max_docs: int | None, max_tokens: int | None):
        self.f, self.tok = f, tok
        self.max_docs = float("inf") if max_docs is None else max_docs
        self.max_tokens = float("inf") if max_tokens is None else max_tokens
        self.digest = hashlib.blake2b()
        self.lengths = array.array("q")  # compact: one int64 per document
        self.n_docs = self.n_tokens = self.max_id = 0
        self.doc_tokens = 0  # of the document being written

    def full(self) -> bool:
        """A limit is reached (counts change only at the end of a document)."""
        return self.n_docs >= self.max_docs or self.n_tokens >= self.max_tokens

    def add(self, ids: np.ndarray, last: bool) -> None:
        if ids.size:
            top = int(ids.max())
            if top >= self.tok.vocab_size:
                raise ValueError(f"tokenizer {self.tok.name!r} gave id {top}, not below its "
                                 f"vocab_size={self.tok.vocab_size}")
            self.max_id = max(self.max_id, top)
            data = ids.tobytes()
            self.f.write(data)
            self.digest.update(data)
            self.doc_tokens += len(ids)
        if last and self.doc_tokens:
            self.lengths.append(self.doc_tokens)
            self.n_docs += 1
            self.n_tokens += self.doc_tokens
        if last:
            self.doc_tokens = 0

    def offsets(self) -> np.ndarray:
        """The document index: ``n_docs + 1`` int64 offsets."""
        offsets = np.zeros(self.n_docs + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self.lengths, dtype=np.int64), out=offsets[1:])
        return offsets


def write_store(
    documents: Iterable[tuple[str | Iterable[str], int]],
    tokenizer: str | os.PathLike | Tokenizer,
    out: str | os.PathLike,
    *,
    total_bytes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    batch_bytes: int = 1 << 20,
    piece_chars: int = 1 << 16,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    sources: list[str] | None = None,
    metadata: dict | None = None,
    report: SourceReport | None = None,
) -> TokenStore:
    """Tokenise ``(document, bytes consumed)`` pairs into a store at ``out``, atomically.

    A document is a ``str`` or an iterable of ``str`` (streamed: never joined). Empty (or
    whitespace-only) documents are skipped. A document is tokenised in pieces of at most
    ``piece_chars`` characters, ``batch_bytes`` characters of pieces at a time, so memory stays
    bounded whatever the length of a document or line; the pieces are cut where the GPT-2-style
    tokenizers give the ids of the whole document (see :func:`~foxacp.data.tokenizer.split_text`).
    ``max_docs``/``max_tokens`` stop early (whole documents). ``total_bytes`` sizes the progress
    bar (bytes of input). ``report``: the files the sources left out or re-decoded; printed to
    stderr at the end and kept in the manifest (``input_report``). Returns the loaded store.
    """
    from tqdm.auto import tqdm

    for name, limit in (("max_docs", max_docs), ("max_tokens", max_tokens)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1 (or None for no limit), got {limit}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else get_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = out.parent / f"{_tmp_prefix(out)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing -> {out.name}",
                   disable=not progress, dynamic_ncols=True)
        with open(tmp / TOKENS, "wb") as f, ThreadPoolExecutor(max_workers=1) as pool:
            writer = _TokenWriter(f, tok, max_docs, max_tokens)

            def write(ids: list[np.ndarray], lasts: list[bool], consumed: int) -> bool:
                """Append a batch's pieces; True once a limit is reached (at the end of a document)."""
                for piece_ids, last in zip(ids, lasts, strict=True):
                    if writer.full():
                        return True
                    writer.add(piece_ids, last)
                bar.update(consumed)
                bar.set_postfix(docs=writer.n_docs, tokens=writer.n_tokens, refresh=False)
                return writer.full()

            # Encode batch k+1 in the background (tokenizers releases the GIL) while writing k.
            batches = _batches(documents, batch_bytes, piece_chars)
            pending = None
            while True:
                batch = next(batches, None)
                submitted = None if batch is None else (pool.submit(tok.encode_batch_np, batch[0], dtype), *batch[1:])
                if pending is not None and write(pending[0].result(), *pending[1:]):
                    if submitted is not None:
                        submitted[0].cancel()
                    break
                if submitted is None:
                    break
                pending = submitted
        bar.close()
        if report:
            print(report.summary(), file=sys.stderr)
        if writer.n_tokens == 0:
            raise ValueError("no tokens: the sources hold no non-empty documents"
                             + (f" ({' '.join(line.strip() for line in report.lines(max_names=3))})" if report else ""))
        np.save(tmp / DOCS, writer.offsets())
        tokenizer_name = tok.name
        if isinstance(tok, HFTokenizer) and tok.name != "gpt2":
            tok.backend.save(str(tmp / TOKENIZER_COPY))
            tokenizer_name = os.path.abspath(tok.name)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": tokenizer_name,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": dtype.name,
            "n_docs": writer.n_docs,
            "n_tokens": writer.n_tokens,
            "max_id": writer.max_id,
            "checksum": {"algorithm": "blake2b", "tokens": writer.digest.hexdigest()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sources": (sources or [])[:1000],
            "n_sources": len(sources or []),
            "input_report": (report or SourceReport()).to_json(),
            "metadata": metadata or {},
        }
        # The manifest goes last: only a folder with every file complete can load.
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore(out)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} appeared while preparing (another process?)")
        old = out.parent / f"{_tmp_prefix(out)}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(tmp, out)
        except OSError as err:  # lost a race: another process renamed its store into place first
            if out.exists():
                raise FileExistsError(f"{out} appeared while preparing (another process?)") from err
            raise


def prepare_store(
    sources: Iterable[str | os.PathLike],
    tokenizer: str | os.PathLike | Tokenizer,
    out: str | os.PathLike,
    *,
    text_field: str = "text",
    extensions: Iterable[str] | None = None,
    **kwargs,
) -> TokenStore:
    """``foxacp data prepare``: text files, directories, JSONL and Parquet -> a token store.

    Which files count as text, and how non-UTF-8 bytes are read: :mod:`foxacp.data.sources`.
    Files left out (binary, unreadable, whitespace only, an extension not taken) or decoded as
    Windows-1252 are printed to stderr, counted with their names, and kept in the manifest's
    ``input_report``. Keyword arguments go to :func:`write_store` (``overwrite``, ``progress``,
    ``max_docs``, ...).
    """
    sources = list(sources)
    report = SourceReport()
    files = expand_sources(sources, extensions=extensions, report=report)
    if not files:
        detail = f" ({' '.join(line.strip() for line in report.lines(max_names=3))})" if report else ""
        raise ValueError(f"no input files found in {list(map(str, sources))}{detail}")
    total = sum(f.size for f in files)
    return write_store(iter_documents(files, text_field=text_field, report=report), tokenizer, out,
                       total_bytes=total, sources=[str(f.path) for f in files], report=report, **kwargs)
