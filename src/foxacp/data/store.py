"""The token store: one memory-mapped token array, a document index and a JSON manifest.

Layout of a store directory::

    tokens.bin      all documents' token ids back to back (uint16 if vocab_size <= 65536, else uint32)
    docs.npy        int64 offsets, (n_docs + 1,): document i is tokens[docs[i]:docs[i+1]]
    manifest.json   tokenizer, vocab_size, eot_id, dtype, n_docs, n_tokens, checksum, sources
    tokenizer.json  a copy of the tokenizer when it is a trained one (gpt2/bytes are built in)

No separator tokens are stored; the loader adds BOS/EOT. :func:`write_store` streams documents
in, tokenises them in batches (``tokenizers`` encodes a batch on all cores, in a background
thread while the next batch is read), and builds everything in ``DIR.tmp-...`` next to ``DIR``,
writing ``manifest.json`` last and renaming the folder into place: a killed run leaves only a
``.tmp-`` folder (cleaned up by the next run on the same host) and never a ``DIR`` that loads.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .sources import expand_sources, iter_documents
from .tokenizer import HFTokenizer, Tokenizer, get_tokenizer

FORMAT = "foxacp-token-store"
VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
DOCS = "docs.npy"
TOKENIZER_COPY = "tokenizer.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class StoreError(RuntimeError):
    """A token store folder that is missing, incomplete or corrupt."""


class TokenStore:
    """Read access to a token store (see the module docstring); documents are memmap views.

    Loading checks the manifest against the files' sizes (cheap); ``verify=True`` (or
    :meth:`verify`) also recomputes the checksum over all tokens.

    The document interface shared with :class:`~foxacp.data.longcrawl.LongCrawlStore`:
    ``n_docs``, ``doc_lengths`` (int64 array), ``read(doc, start, stop)``, ``doc(i)``,
    ``vocab_size``, ``eot_id``/``bos_id``, ``tokenizer_name``.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"{self.path} is not a complete token store (no {MANIFEST}); "
                             "prepare it with `foxacp data prepare`")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{manifest_path}: unreadable manifest ({err})") from None
        m = self.manifest
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise StoreError(f"{self.path}: not a {FORMAT} v{VERSION} store "
                             f"(format={m.get('format')!r}, version={m.get('version')!r})")
        self.dtype = np.dtype(m["dtype"])
        self.n_docs = int(m["n_docs"])
        self.n_tokens = int(m["n_tokens"])
        self.vocab_size = int(m["vocab_size"])
        self.eot_id = int(m["eot_id"])
        tokens_path = self.path / TOKENS
        expected = self.n_tokens * self.dtype.itemsize
        actual = tokens_path.stat().st_size if tokens_path.is_file() else -1
        if actual != expected:
            raise StoreError(f"{tokens_path}: {actual} bytes, the manifest says {expected}")
        self.doc_offsets = np.load(self.path / DOCS, mmap_mode="r")
        if (self.doc_offsets.shape != (self.n_docs + 1,) or self.doc_offsets.dtype != np.int64
                or int(self.doc_offsets[0]) != 0 or int(self.doc_offsets[-1]) != self.n_tokens):
            raise StoreError(f"{self.path / DOCS}: document index does not match the manifest")
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
        """Recompute the checksum of all tokens; raise :class:`StoreError` if it differs."""
        algorithm = self.manifest["checksum"]["algorithm"]
        digest = hashlib.new(algorithm)
        chunk = 1 << 24
        for start in range(0, self.n_tokens, chunk):
            digest.update(np.ascontiguousarray(self.tokens[start:start + chunk]).tobytes())
        if digest.hexdigest() != self.manifest["checksum"]["tokens"]:
            raise StoreError(f"{self.path}: checksum mismatch, the token file is corrupt")

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


def _batches(documents: Iterable[tuple[str, int]], batch_bytes: int) -> Iterator[tuple[list[str], int]]:
    texts: list[str] = []
    size = consumed = 0
    for text, nbytes in documents:
        consumed += nbytes
        if text and not text.isspace():
            texts.append(text)
            size += len(text)
        if size >= batch_bytes:
            yield texts, consumed
            texts, size, consumed = [], 0, 0
    if texts or consumed:
        yield texts, consumed


def write_store(
    documents: Iterable[tuple[str, int]],
    tokenizer: str | os.PathLike | Tokenizer,
    out: str | os.PathLike,
    *,
    total_bytes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    batch_bytes: int = 4 << 20,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    sources: list[str] | None = None,
    metadata: dict | None = None,
) -> TokenStore:
    """Tokenise ``(text, bytes consumed)`` pairs into a store at ``out``, atomically.

    Empty (or whitespace-only) documents are skipped. ``max_docs``/``max_tokens`` stop early (whole documents).
    ``total_bytes`` sizes the progress bar (bytes of input). Returns the loaded store.
    """
    from tqdm.auto import tqdm

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
        digest = hashlib.blake2b()
        lengths = array.array("q")  # compact: one int64 per document
        n_tokens = n_docs = 0
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing -> {out.name}",
                   disable=not progress, dynamic_ncols=True)
        limit_docs = max_docs if max_docs is not None else float("inf")
        limit_tokens = max_tokens if max_tokens is not None else float("inf")

        def write(arrays: list[np.ndarray], consumed: int) -> bool:
            """Append documents; True once a limit is reached."""
            nonlocal n_docs, n_tokens
            for a in arrays:
                if n_docs >= limit_docs or n_tokens >= limit_tokens:
                    return True
                data = a.tobytes()
                f.write(data)
                digest.update(data)
                lengths.append(len(a))
                n_docs += 1
                n_tokens += len(a)
            bar.update(consumed)
            bar.set_postfix(docs=n_docs, tokens=n_tokens, refresh=False)
            return n_docs >= limit_docs or n_tokens >= limit_tokens

        with open(tmp / TOKENS, "wb") as f, ThreadPoolExecutor(max_workers=1) as pool:
            # Encode batch k+1 in the background (tokenizers releases the GIL) while writing k.
            batches = _batches(documents, batch_bytes)
            pending = None
            while True:
                batch = next(batches, None)
                submitted = None if batch is None else (pool.submit(tok.encode_batch_np, batch[0], dtype), batch[1])
                if pending is not None and write(pending[0].result(), pending[1]):
                    if submitted is not None:
                        submitted[0].cancel()
                    break
                if submitted is None:
                    break
                pending = submitted
        bar.close()
        if n_tokens == 0:
            raise ValueError("no tokens: the sources hold no non-empty documents")
        offsets = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(lengths, dtype=np.int64) if n_docs else np.zeros(0, np.int64), out=offsets[1:])
        np.save(tmp / DOCS, offsets)
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
            "n_docs": n_docs,
            "n_tokens": n_tokens,
            "checksum": {"algorithm": "blake2b", "tokens": digest.hexdigest()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sources": (sources or [])[:1000],
            "n_sources": len(sources or []),
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

    Keyword arguments go to :func:`write_store` (``overwrite``, ``progress``, ``max_docs``, ...).
    """
    files = expand_sources(sources, extensions=extensions)
    if not files:
        raise ValueError(f"no input files found in {list(map(str, sources))}")
    total = sum(f.size for f in files)
    return write_store(iter_documents(files, text_field=text_field), tokenizer, out, total_bytes=total,
                       sources=[str(f.path) for f in files], **kwargs)
