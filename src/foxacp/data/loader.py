"""Fixed-length training windows from a token store: deterministic, sharded, resumable.

Each window is ``seq_len + 1`` tokens ``w``; a batch row is ``input_ids = w[:-1]``,
``labels = w[1:]``. Two modes:

``"document"`` (LongCrawl64's recipe): a document of ``n`` tokens is cut into ``n // seq_len``
consecutive pieces of ``seq_len`` tokens; each window is ``[BOS] + piece``, so every row starts a
fresh context and never sees another document. The remainder of a document (and a document
shorter than ``seq_len``) is dropped, unless ``pad_tail=True``: then it becomes one more window,
its input padded with BOS and its labels with -100 (ignored by cross-entropy)::

    doc = [a b c d e f g], seq_len = 3, pad_tail=True
    windows: [BOS a b c] [BOS d e f] [BOS g]
    input_ids: [BOS a b]  [BOS d e]  [BOS g BOS]
    labels:    [a b c]    [d e f]    [g -100 -100]

``"packed"``: the split's documents, each preceded by BOS (= EOT), are one stream cut every
``seq_len`` tokens (windows overlap by the one label token); nothing is dropped but the stream's
last partial window. With ``emit_cu_seqlens=True`` each row also gets its document boundaries::

    stream: BOS a b c BOS d e BOS f g h ..., seq_len = 6
    row 0: input_ids [BOS a b c BOS d], labels [a b c BOS d e], cu_seqlens [0, 4, 6]

``batch["cu_seqlens"]`` is a list of B int32 tensors (rows differ in length). The attention
API takes cu_seqlens only with B == 1: :func:`flatten_packed` turns the batch into one packed
row with global offsets.

Order: the windows of the split are numbered; epoch ``e`` visits them in the order of
``np.random.default_rng([seed, e]).permutation`` (or in order with ``shuffle=False``). Step
``s`` takes the global batch ``perm[s*G:(s+1)*G]`` with ``G = batch_size * world_size``; rank
``r`` gets ``perm[s*G + r*B : s*G + (r+1)*B]``. So the ranks' rows of a step, concatenated by
rank, are exactly the rows a single process with ``batch_size=G`` gets, and the last partial
global batch of an epoch is dropped. ``state_dict()`` is ``(epoch, windows consumed)``; it
resumes exactly, also under another world size.

Held-out split: ``val_fraction`` of the documents (at least one), chosen by ``split_seed``
(independent of ``seed``), form ``split="val"``; the rest ``"train"``; ``"all"`` uses every
document (e.g. LongCrawl64's separate ``heldout.zarr``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .store import StoreError

Mode = Literal["document", "packed"]
Split = Literal["train", "val", "all"]
IGNORE_INDEX = -100


def split_documents(n_docs: int, val_fraction: float, split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train_docs, val_docs)``: sorted int64 document indices; disjoint, together all docs."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return np.arange(n_docs, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n_val = max(1, int(round(val_fraction * n_docs)))
    if n_val >= n_docs:
        raise ValueError(f"val_fraction={val_fraction} leaves no training documents out of {n_docs}")
    perm = np.random.default_rng(split_seed).permutation(n_docs)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


class WindowLoader:
    """Batches ``{"input_ids": (B, L) int64, "labels": (B, L) int64[, "cu_seqlens": [B x int32]]}``.

    ``store``: anything with the document interface (``TokenStore``, ``LongCrawlStore``).
    ``batch_size`` is per rank. ``num_epochs=None`` iterates forever; ``num_epochs=1`` with
    ``shuffle=False`` is one evaluation pass (or use :meth:`iter_epoch`). See the module
    docstring for the window layout, ordering and sharding.
    """

    def __init__(
        self,
        store,
        seq_len: int,
        batch_size: int,
        *,
        mode: Mode = "document",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: Split = "train",
        val_fraction: float = 0.0,
        split_seed: int = 0,
        bos_id: int | None = None,
        emit_cu_seqlens: bool = False,
        shuffle: bool = True,
        num_epochs: int | None = None,
        pad_tail: bool = False,
        pin_memory: bool = False,
    ):
        if mode not in ("document", "packed"):
            raise ValueError(f"mode must be 'document' or 'packed', got {mode!r}")
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if pad_tail and mode == "packed":
            raise ValueError("pad_tail applies to mode='document' only")
        self.store = store
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.mode = mode
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.split = split
        self.bos_id = int(store.eot_id if bos_id is None else bos_id)
        if not 0 <= self.bos_id < store.vocab_size:
            raise ValueError(f"bos_id must be in [0, vocab_size={store.vocab_size}), got {self.bos_id}")
        self.emit_cu_seqlens = emit_cu_seqlens
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.pad_tail = pad_tail
        self.pin_memory = pin_memory

        train, val = split_documents(store.n_docs, val_fraction if split != "all" else 0.0, split_seed)
        self.docs = {"train": train, "val": val, "all": train}[split]
        lengths = np.asarray(store.doc_lengths, dtype=np.int64)[self.docs]
        L = self.seq_len
        if mode == "document":
            per_doc = lengths // L + ((lengths % L > 0) if pad_tail else 0)
            self._cum = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64)
            self.n_windows = int(self._cum[-1])
        else:
            # Virtual stream: document i occupies [vcum[i], vcum[i+1]), its BOS at vcum[i].
            self._cum = np.concatenate([[0], np.cumsum(lengths + 1)]).astype(np.int64)
            self.n_windows = max(int(self._cum[-1]) - 1, 0) // L
        self.global_batch_size = self.batch_size * self.world_size
        if self.n_windows < self.global_batch_size:
            raise ValueError(
                f"split {split!r} has {self.n_windows} windows of {L} tokens ({len(self.docs)} documents, "
                f"mode={mode!r}), fewer than one global batch of {self.global_batch_size}; use a smaller "
                "seq_len or batch, more data, mode='packed' or pad_tail=True")
        self.steps_per_epoch = self.n_windows // self.global_batch_size
        self.epoch = 0
        self.offset = 0  # windows of the current epoch consumed (all ranks)
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    # -- order and position -------------------------------------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        """The window indices of ``epoch`` in visiting order (cached for the current epoch)."""
        if self._perm_epoch != epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            else:
                self._perm = np.arange(self.n_windows, dtype=np.int64)
            self._perm_epoch = epoch
        return self._perm

    def __len__(self) -> int:
        """Steps per epoch."""
        return self.steps_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "seq_len": self.seq_len,
                "mode": self.mode, "split": self.split, "n_windows": self.n_windows, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "mode", "split", "n_windows", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"data state mismatch: checkpoint has {key}={state[key]!r}, "
                                 f"this loader {key}={getattr(self, key)!r}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        G = self.global_batch_size
        if self.offset + G > self.n_windows:
            self.epoch, self.offset = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = self._batch_at(self.epoch, self.offset)
        self.offset += G
        return batch

    def iter_epoch(self, epoch: int = 0):
        """One epoch's batches for this rank, leaving the loader's position alone (evaluation)."""
        for step in range(self.steps_per_epoch):
            yield self._batch_at(epoch, step * self.global_batch_size)

    def _batch_at(self, epoch: int, offset: int) -> dict:
        start = offset + self.rank * self.batch_size
        windows = self.order(epoch)[start:start + self.batch_size]
        return self.make_batch(windows)

    def make_batch(self, windows) -> dict:
        """The batch made of the given window indices (rows in that order)."""
        B, L = len(windows), self.seq_len
        rows = np.empty((B, L + 1), dtype=np.int64)
        labels_valid = np.full(B, L, dtype=np.int64)
        cu_seqlens = []
        for b, k in enumerate(windows):
            if self.mode == "document":
                labels_valid[b] = self._document_window(int(k), rows[b])
                cu = np.array([0, L], dtype=np.int32)
            else:
                cu = self._packed_window(int(k), rows[b])
            cu_seqlens.append(cu)
        self._check_ids(rows, windows)
        input_ids = torch.from_numpy(rows[:, :-1].copy())
        labels = torch.from_numpy(rows[:, 1:].copy())
        if self.pad_tail:
            pad = torch.arange(L)[None, :] >= torch.from_numpy(labels_valid)[:, None]
            labels[pad] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "labels": labels}
        if self.emit_cu_seqlens:
            batch["cu_seqlens"] = [torch.from_numpy(cu) for cu in cu_seqlens]
        if self.pin_memory:
            batch = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else [t.pin_memory() for t in v])
                     for k, v in batch.items()}
        return batch

    def _check_ids(self, rows: np.ndarray, windows) -> None:
        """Refuse ids outside ``[0, vocab_size)``: the model's embedding would fail on them later
        with an IndexError (CPU) or a device-side assert (CUDA) that names no file."""
        vocab, path = self.store.vocab_size, self.store.path
        if rows.size and (int(rows.max()) >= vocab or int(rows.min()) < 0):
            b, j = np.argwhere((rows >= vocab) | (rows < 0))[0]
            raise StoreError(f"{path}: token id {int(rows[b, j])} in window {int(windows[b])} is not in "
                             f"[0, vocab_size={vocab}); the store is corrupt (check it with "
                             f"`foxacp data info --verify {path}`)")

    def _document_window(self, k: int, out: np.ndarray) -> int:
        """Fill ``out`` (L+1) with window ``k``; return how many labels are real."""
        i = int(np.searchsorted(self._cum, k, side="right")) - 1
        start = (k - int(self._cum[i])) * self.seq_len
        piece = self.store.read(int(self.docs[i]), start, start + self.seq_len)
        n = len(piece)
        out[0] = self.bos_id
        out[1:n + 1] = piece
        out[n + 1:] = self.bos_id
        return n

    def _packed_window(self, k: int, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (L+1) with stream positions [kL, kL+L+1); return the row's cu_seqlens."""
        L, vcum = self.seq_len, self._cum
        v = k * L
        i = int(np.searchsorted(vcum, v, side="right")) - 1
        pos = 0
        starts = [0]
        while pos < L + 1:
            local = v - int(vcum[i])  # 0 is the document's BOS
            take = min(int(vcum[i + 1]) - v, L + 1 - pos)
            if local == 0:
                out[pos] = self.bos_id
                if 0 < pos < L:
                    starts.append(pos)
                out[pos + 1:pos + take] = self.store.read(int(self.docs[i]), 0, take - 1)
            else:
                out[pos:pos + take] = self.store.read(int(self.docs[i]), local - 1, local - 1 + take)
            pos += take
            v += take
            i += 1
        starts.append(L)
        return np.asarray(starts, dtype=np.int32)


def flatten_packed(batch: dict) -> dict:
    """``(B, L)`` rows -> one ``(1, B*L)`` packed row with global ``cu_seqlens`` (int32).

    Rows without ``cu_seqlens`` count as one sequence each. Adds ``max_seqlen`` (int) and
    ``position_ids`` ``(1, B*L)`` int64 restarting at 0 in each sequence (for RoPE baselines).
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    B, L = input_ids.shape
    per_row = batch.get("cu_seqlens")
    if per_row is None:
        cu = torch.arange(B + 1, dtype=torch.int32) * L
    else:
        parts = [per_row[0].to(torch.int32)] + [r[1:].to(torch.int32) + b * L for b, r in enumerate(per_row) if b]
        cu = torch.cat(parts)
    out = dict(batch)
    out["input_ids"] = input_ids.reshape(1, B * L)
    out["labels"] = labels.reshape(1, B * L)
    out["cu_seqlens"] = cu
    seqlens = (cu[1:] - cu[:-1]).long()
    out["max_seqlen"] = int(seqlens.max())
    starts = torch.repeat_interleave(cu[:-1].long(), seqlens)
    out["position_ids"] = (torch.arange(B * L) - starts).reshape(1, B * L)
    return out
