"""Generation cache: per layer keys, values, the cumulative forget gate and the KV-shift state.

For forgetting attention the cache keeps ``c = cumsum(log f)`` per query head (float32) next to
the keys, so a decode step appends ``c_last + cumsum(log f_new)`` and calls
:func:`foxacp.forgetting_attention` with ``cumulative_gate=True``: nothing is re-summed over the
whole cache. The KV-shift state is the last *pre-shift* key/value token ``k~_{T-1}``, ``v~_{T-1}``.

All tensors are batch-first: k, v ``(B, T, Hkv, D)``, c ``(B, T, H)``, shift states
``(B, Hkv, D)``. ``seq_start`` ``(B,)`` counts the left-padding tokens of each row (or is None).
The cache is updated in place by the model; ``get_seq_length()`` is the number of cached positions.

:class:`FoxCache` is a ``transformers.Cache``, so ``generate()`` reorders it for beam search and
crops it for assisted decoding and prompt lookup. Cropping rolls the KV-shift state back too, which
needs the pre-shift tokens of the removed positions: each layer keeps those of the last
``max_crop`` positions (without copying: the chunks the model produced are kept as they are).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch
from transformers import Cache

DEFAULT_MAX_CROP = 256  # positions crop() can remove; assisted decoding drafts far fewer per step


class RecentRows:
    """The last ``keep`` (or more) rows along dim 1 of a stream of ``(B, t, ...)`` chunks.

    Chunks are kept as given, so adding one copies nothing (a decoding step adds one row); only a
    chunk longer than ``keep`` is cut and copied, so that a prefill does not stay alive whole.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self.chunks: deque[torch.Tensor] = deque()
        self.rows = 0

    def push(self, chunk: torch.Tensor) -> None:
        if chunk.shape[1] > self.keep:
            chunk = chunk[:, -self.keep:].clone()
        self.chunks.append(chunk.detach())
        self.rows += chunk.shape[1]
        while self.rows - self.chunks[0].shape[1] >= self.keep:
            self.rows -= self.chunks.popleft().shape[1]

    def last(self) -> torch.Tensor | None:
        """The newest row ``(B, ...)``, or None before the first chunk."""
        return self.chunks[-1][:, -1] if self.chunks else None

    def drop(self, n: int) -> None:
        """Forget the newest ``n`` rows (fewer than are kept)."""
        self.apply(lambda rows: rows[:, :self.rows - n])
        self.rows -= n

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the rows by ``fn(rows)`` (as one chunk), e.g. a selection of batch rows."""
        if self.chunks:
            self.chunks = deque([fn(torch.cat(tuple(self.chunks), dim=1))])


class LayerCache:
    """One attention layer's state (every tensor None until the first forward)."""

    def __init__(self, max_crop: int = DEFAULT_MAX_CROP):
        self.key: torch.Tensor | None = None  # [B, T, Hkv, D] (after shift, norm, RoPE: as attended)
        self.value: torch.Tensor | None = None  # [B, T, Hkv, D]
        self.decay: torch.Tensor | None = None  # [B, T, H] float32, c = cumsum(log f); FoX only
        # pre-shift keys/values [B, t, Hkv, D] of the last positions; KV-shift only
        self.shift_keys = RecentRows(max_crop + 1)
        self.shift_values = RecentRows(max_crop + 1)

    @property
    def shift_key(self) -> torch.Tensor | None:
        """``(B, Hkv, D)``: the last pre-shift key (the KV-shift state), None before the first forward."""
        return self.shift_keys.last()

    @property
    def shift_value(self) -> torch.Tensor | None:
        return self.shift_values.last()

    def keep_shift_inputs(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Record this call's pre-shift keys and values ``(B, T, Hkv, D)`` (the next state is their last row)."""
        self.shift_keys.push(key)
        self.shift_values.push(value)

    def append(self, key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor | None):
        """Append new positions and return the full (key, value, decay)."""
        if self.key is None:
            self.key, self.value, self.decay = key, value, decay
        else:
            self.key = torch.cat([self.key, key], dim=1)
            self.value = torch.cat([self.value, value], dim=1)
            if decay is not None:
                self.decay = torch.cat([self.decay, decay], dim=1)
        return self.key, self.value, self.decay

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-position tensors (key, value, decay) that exist."""
        return {name: t for name in ("key", "value", "decay") if (t := getattr(self, name)) is not None}

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every tensor ``t`` (all batch-first, positions on dim 1) by ``fn(t)``."""
        for name, t in self.tensors().items():
            setattr(self, name, fn(t))
        self.shift_keys.apply(fn)
        self.shift_values.apply(fn)

    def drop_last(self, n: int) -> None:
        """Forget the newest ``n`` positions."""
        for name, t in self.tensors().items():
            setattr(self, name, t[:, :t.shape[1] - n])
        if self.shift_keys.chunks:
            self.shift_keys.drop(n)
            self.shift_values.drop(n)

    def memory_bytes(self) -> int:
        tensors = [*self.tensors().values(), *self.shift_keys.chunks, *self.shift_values.chunks]
        return sum(t.numel() * t.element_size() for t in tensors)


class FoxCache(Cache):
    """Decode cache of a :class:`~foxacp.models.FoxForCausalLM`, a ``transformers.Cache``.

    ``crop(-n)`` removes the newest ``n`` positions (at most ``max_crop``) and ``crop(n)`` with
    ``n > 0`` keeps the first ``n`` (transformers 4 passes the length to keep, 5 the negative count
    to remove, so both mean what each version's ``generate()`` asks); ``crop(0)`` changes nothing.
    """

    def __init__(self, num_layers: int, max_crop: int = DEFAULT_MAX_CROP):
        super().__init__(layers=[LayerCache(max_crop) for _ in range(num_layers)])
        self.max_crop = max_crop
        self.seq_start: torch.Tensor | None = None
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> LayerCache:
        return self.layers[layer_idx]

    def __iter__(self):
        return iter(self.layers)

    def update(self, *args, **kwargs):
        raise TypeError("FoxCache is filled by FoxForCausalLM's attention layers (LayerCache.append), "
                        "not through Cache.update")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Cached positions (including left padding), as Hugging Face's caches report it."""
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1  # grows without a limit (transformers 4 name)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows without a limit (transformers 5 name)

    @property
    def is_compileable(self) -> bool:
        return False  # the tensors grow every step

    @property
    def is_croppable(self) -> bool:
        return True

    def reset(self) -> None:
        """Empty the cache (same layers, same ``max_crop``)."""
        self.layers = [LayerCache(self.max_crop) for _ in self.layers]
        self.seq_start = None
        self.seen_tokens = 0

    def crop(self, length: int) -> None:
        """Remove the newest ``-length`` positions (``length < 0``) or keep the first ``length``
        (``length > 0``); see the class docstring."""
        remove = -length if length <= 0 else max(self.seen_tokens - length, 0)
        if remove == 0:
            return
        if remove >= self.seen_tokens:
            self.reset()
            return
        if remove > self.max_crop:
            raise ValueError(f"FoxCache can remove at most max_crop={self.max_crop} positions (the KV-shift "
                             f"state of older ones is not kept), asked to remove {remove}")
        for layer in self.layers:
            layer.drop_last(remove)
        self.seen_tokens -= remove

    def _select_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for layer in self.layers:
            layer.apply(fn)
        if self.seq_start is not None:
            self.seq_start = fn(self.seq_start)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Select batch rows ``beam_idx`` in place (beam search)."""
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only batch rows ``indices``."""
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (as ``torch.repeat_interleave``)."""
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self.layers)
