"""Data: tokenizers, token stores, built-in corpora, LongCrawl64, and the training-window loader.

Typical use::

    from foxacp.data import open_store, WindowLoader
    store = open_store("shakespeare", tokenizer="gpt2")   # or a store folder, or a .zarr
    loader = WindowLoader(store, seq_len=4096, batch_size=8, mode="document", seed=0,
                          split="train", val_fraction=0.05)
    batch = next(loader)   # {"input_ids": (8, 4096) int64, "labels": (8, 4096) int64}
"""

from __future__ import annotations

import os
from pathlib import Path

from .builtin import BUILTIN_CORPORA, cache_dir, prepare_builtin
from .loader import IGNORE_INDEX, WindowLoader, flatten_packed, split_documents
from .longcrawl import LongCrawlStore, is_zarr
from .store import StoreError, TokenStore, is_token_store, prepare_store, token_dtype, write_store
from .tokenizer import GPT2_EOT_ID, Tokenizer, get_tokenizer, train_tokenizer


def open_store(source: str | os.PathLike, *, tokenizer: str | os.PathLike = "gpt2", **builtin_kwargs):
    """A document store from a name or a path.

    ``source``: a built-in corpus name (``"shakespeare"``, ``"python-code"``, ``"python-packages"``:
    prepared on first use with ``tokenizer``; ``builtin_kwargs`` go to :func:`prepare_builtin`), a token-store
    folder, or a LongCrawl64 zarr array (``path.zarr`` or ``path.zarr:ARRAY`` for a group).
    """
    text = str(source)
    if text in BUILTIN_CORPORA:
        return prepare_builtin(text, tokenizer, **builtin_kwargs)
    path, _, array = text.partition(".zarr:")
    if array:
        return LongCrawlStore(path + ".zarr", array=array)
    if is_token_store(text):
        return TokenStore(text)
    if is_zarr(text):
        return LongCrawlStore(text)
    if Path(text).exists():
        raise StoreError(f"{text} is neither a token store (no manifest.json) nor a zarr array")
    raise FileNotFoundError(f"{text}: no such store; built-in corpora are {BUILTIN_CORPORA}")


__all__ = [
    "BUILTIN_CORPORA", "GPT2_EOT_ID", "IGNORE_INDEX", "LongCrawlStore", "StoreError", "TokenStore", "Tokenizer",
    "WindowLoader", "cache_dir", "flatten_packed", "get_tokenizer", "is_token_store", "open_store",
    "prepare_builtin", "prepare_store", "split_documents", "token_dtype", "train_tokenizer", "write_store",
]
