"""LongCrawl64 read straight from its zarr layout.

LongCrawl64 is a 2-D array ``(n_docs, 65536)`` of GPT-2 token ids (uint16; uint32 accepted),
one document per row, every row full. Its training recipe uses EOT (50256) as BOS; the loader
adds it, the array holds none. Point :class:`LongCrawlStore` at the array (``train.zarr``,
``heldout.zarr``) or at a group plus ``array=NAME``. Works with zarr 3 and zarr 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .tokenizer import GPT2_EOT_ID, GPT2_VOCAB_SIZE


class LongCrawlStore:
    """The token-store document interface over a zarr ``(docs, doc_len)`` array.

    ``n_docs``, ``doc_lengths``, ``read(doc, start, stop)``, ``doc(i)``, ``vocab_size``,
    ``eot_id``/``bos_id``, ``tokenizer_name`` (``"gpt2"``), as :class:`~foxacp.data.store.TokenStore`.
    """

    def __init__(self, path: str | os.PathLike, *, array: str | None = None,
                 vocab_size: int = GPT2_VOCAB_SIZE, eot_id: int = GPT2_EOT_ID, tokenizer_name: str = "gpt2"):
        try:
            import zarr
        except ImportError as err:  # pragma: no cover
            raise ImportError("LongCrawl64 needs zarr: pip install 'foxacp[data]'") from err
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no zarr store at {self.path}")
        node = zarr.open(str(self.path), mode="r")
        if not hasattr(node, "shape"):  # a group
            names = sorted(node.array_keys())
            if array is None:
                if len(names) != 1:
                    raise ValueError(f"{self.path} is a zarr group with arrays {names}; pass array=NAME")
                array = names[0]
            node = node[array]
        elif array is not None:
            raise ValueError(f"{self.path} is an array; array={array!r} applies to groups only")
        if len(node.shape) != 2:
            raise ValueError(f"{self.path}: expected a 2-D (docs, tokens) array, got shape {node.shape}")
        dtype = np.dtype(node.dtype)
        if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int32), np.dtype(np.int64)):
            raise ValueError(f"{self.path}: token ids must be uint16/uint32/int32/int64, got {dtype}")
        self.array = node
        self.dtype = dtype
        self.n_docs, self.doc_len = (int(s) for s in node.shape)
        self.n_tokens = self.n_docs * self.doc_len
        self.doc_lengths = np.full(self.n_docs, self.doc_len, dtype=np.int64)
        self.vocab_size = int(vocab_size)
        self.eot_id = int(eot_id)
        self.tokenizer_name = tokenizer_name
        self.manifest = {"format": "longcrawl64-zarr", "tokenizer": tokenizer_name, "vocab_size": self.vocab_size,
                         "eot_id": self.eot_id, "dtype": dtype.name, "n_docs": self.n_docs,
                         "n_tokens": self.n_tokens, "doc_len": self.doc_len,
                         "chunks": list(getattr(node, "chunks", ()))}

    @property
    def bos_id(self) -> int:
        return self.eot_id

    def __len__(self) -> int:
        return self.n_docs

    def read(self, doc: int, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, min(start, self.doc_len)), max(0, min(stop, self.doc_len))
        return np.asarray(self.array[int(doc), start:stop])

    def doc(self, i: int) -> np.ndarray:
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range (n_docs={self.n_docs})")
        return self.read(i % self.n_docs, 0, self.doc_len)

    __getitem__ = doc

    def tokenizer(self):
        from .tokenizer import get_tokenizer

        return get_tokenizer(self.tokenizer_name)

    def verify(self) -> None:
        """Nothing to check beyond what zarr checks on read."""

    def __repr__(self) -> str:
        return f"LongCrawlStore({str(self.path)!r}, n_docs={self.n_docs}, doc_len={self.doc_len}, dtype={self.dtype.name})"


def is_zarr(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix == ".zarr" or (p / "zarr.json").is_file() or (p / ".zarray").is_file() or (p / ".zgroup").is_file()
