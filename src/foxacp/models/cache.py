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

Two variants: :class:`StaticFoxCache` preallocates the buffers so that a decoding step has fixed
shapes (``generate(cache_implementation="static")``; captured as a CUDA graph on GPUs), and
:class:`EvictingFoxCache` drops the keys ACP prunes for good (``model.acp_eviction_cache``).
"""

from __future__ import annotations

import functools
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


class _LayerCaches(Cache):
    """A ``transformers.Cache`` whose layers foxacp's attention fills itself: indexing and
    iteration give the per-layer caches; ``Cache.update`` is not the way in."""

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int):
        return self.layers[layer_idx]

    def __iter__(self):
        return iter(self.layers)

    def update(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is filled by FoxForCausalLM's attention layers, "
                        "not through Cache.update")


class FoxCache(_LayerCaches):
    """Decode cache of a :class:`~foxacp.models.FoxForCausalLM`, a ``transformers.Cache``.

    ``crop(-n)`` removes the newest ``n`` positions (at most ``max_crop``) and ``crop(n)`` with
    ``n > 0`` keeps the first ``n`` (transformers 4 passes the length to keep, 5 the negative count
    to remove, so both mean what each version's ``generate()`` asks); ``crop(0)`` changes nothing.
    """

    def __init__(self, num_layers: int, max_crop: int = DEFAULT_MAX_CROP):
        self.num_layers, self.max_crop = num_layers, max_crop
        super().__init__(layers=self._new_layers())
        self.seq_start: torch.Tensor | None = None
        self.seen_tokens = 0

    def _new_layers(self) -> list[LayerCache]:
        return [LayerCache(self.max_crop) for _ in range(self.num_layers)]

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
        self.layers = self._new_layers()
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


class EvictingLayerCache(LayerCache):
    """A forgetting-attention layer's cache that drops the keys ACP prunes for good.

    ACP prunes key ``j`` for query ``t`` when ``c_t - c_j < delta``. With QK-norm ``delta`` (per
    query head) depends only on the weights and the maximum context length, and ``c`` never
    increases, so a key pruned for the newest query stays pruned for every later one. Keys,
    values and ``c`` are kept per kv head (``(B, T_h, D)``, ``(B, T_h, G)``: heads forget at very
    different rates), and every ``evict_every`` new positions each kv head drops the oldest keys
    that all its query heads prune in every batch row. Attention runs per kv head over what is
    kept (dense: what ACP would still prune there is kept and attended exactly).
    """

    owns_attention = True  # ForgettingAttentionLayer calls attend()

    def __init__(self, threshold: torch.Tensor, num_kv_heads: int, evict_every: int, max_crop: int):
        super().__init__(max_crop)
        self.threshold = threshold  # [H] delta per query head
        self.evict_every = evict_every
        self.keys: list[torch.Tensor] = []  # per kv head [B, T_h, D]
        self.values: list[torch.Tensor] = []
        self.decays: list[torch.Tensor] = []  # per kv head [B, T_h, G] float32
        self.start = [0] * num_kv_heads  # position of each kv head's oldest kept key
        self.new_since_eviction = 0

    def attend(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, log_f: torch.Tensor, ctx) -> torch.Tensor:
        """Append this call's positions, attend per kv head, evict when due. q ``(B, T, H, D)``."""
        from ..ops import forgetting_attention  # ops sits below models; imported here to keep cache.py light

        B, T, H, D = q.shape
        Hkv = key.shape[2]
        G = H // Hkv
        if ctx.padding is not None:  # padded positions do not decay
            log_f = log_f.masked_fill(ctx.padding[:, :, None], 0.0)
        c = torch.cumsum(log_f.double(), dim=1)
        if self.decays:
            c = c + torch.cat([decay[:, -1:] for decay in self.decays], dim=-1).double()
        c = c.float().view(B, T, Hkv, G)
        outputs = []
        for h in range(Hkv):
            self._append_head(h, key[:, :, h], value[:, :, h], c[:, :, h])
            seq_start = None if ctx.seq_start is None else (ctx.seq_start - self.start[h]).clamp_min(0)
            outputs.append(forgetting_attention(q[:, :, h * G:(h + 1) * G], self.keys[h][:, :, None],
                                                self.values[h][:, :, None], self.decays[h], seq_start=seq_start,
                                                cumulative_gate=True))
        self.new_since_eviction += T
        if self.new_since_eviction >= self.evict_every:
            self.evict()
        return torch.cat(outputs, dim=2)

    def _append_head(self, h: int, key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor) -> None:
        if len(self.keys) <= h:  # own copies: a view would keep the whole (B, T, Hkv, D) tensor alive
            self.keys.append(key.contiguous())
            self.values.append(value.contiguous())
            self.decays.append(decay.contiguous())
        else:
            self.keys[h] = torch.cat([self.keys[h], key], dim=1)
            self.values[h] = torch.cat([self.values[h], value], dim=1)
            self.decays[h] = torch.cat([self.decays[h], decay], dim=1)

    def evict(self) -> None:
        """Drop, per kv head, the oldest keys pruned for the newest query in every row and query head."""
        G = self.threshold.shape[0] // len(self.keys)
        for h, decay in enumerate(self.decays):
            delta = self.threshold[h * G:(h + 1) * G].to(decay.device)
            pruned = (decay[:, -1:] - decay < delta).sum(dim=1)  # [B, G]: a prefix, as c never increases
            drop = int(pruned.min())
            if drop:
                self.keys[h] = self.keys[h][:, drop:].clone()
                self.values[h] = self.values[h][:, drop:].clone()
                self.decays[h] = self.decays[h][:, drop:].clone()
                self.start[h] += drop
        self.new_since_eviction = 0

    def kept(self) -> list[int]:
        """Keys kept per kv head."""
        return [k.shape[1] for k in self.keys]

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for stored in (self.keys, self.values, self.decays):
            stored[:] = [fn(t) for t in stored]
        self.shift_keys.apply(fn)
        self.shift_values.apply(fn)

    def drop_last(self, n: int) -> None:
        raise NotImplementedError("an evicting cache cannot be cropped: keys were dropped for queries being removed")

    def memory_bytes(self) -> int:
        tensors = [*self.keys, *self.values, *self.decays, *self.shift_keys.chunks, *self.shift_values.chunks]
        return sum(t.numel() * t.element_size() for t in tensors)


class EvictingFoxCache(FoxCache):
    """A :class:`FoxCache` whose forgetting-attention layers evict ACP-pruned keys
    (:class:`EvictingLayerCache`; ``thresholds[i]`` is layer i's ``(H,)`` delta, None for a layer
    that keeps everything). Built by :meth:`FoxForCausalLM.acp_eviction_cache`. Not croppable."""

    def __init__(self, thresholds: list[torch.Tensor | None], num_kv_heads: int, evict_every: int = 64,
                 max_crop: int = DEFAULT_MAX_CROP):
        if evict_every < 1:
            raise ValueError(f"evict_every must be >= 1, got {evict_every}")
        self.thresholds, self.num_kv_heads, self.evict_every = thresholds, num_kv_heads, evict_every
        super().__init__(len(thresholds), max_crop)

    def _new_layers(self) -> list[LayerCache]:
        return [LayerCache(self.max_crop) if t is None
                else EvictingLayerCache(t, self.num_kv_heads, self.evict_every, self.max_crop)
                for t in self.thresholds]

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, length: int) -> None:
        if length != 0:
            raise NotImplementedError("an EvictingFoxCache cannot be cropped (it drops keys for good)")


def _bmm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` in float32. Half-precision CUDA inputs are multiplied as they are, with
    float32 accumulation and output (no float32 copy of the cache), where this torch can."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.is_cuda and _bmm_has_out_dtype(a.device, a.dtype):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


@functools.cache
def _bmm_has_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` runs for ``dtype`` on ``device`` (asked
    once, during the uncaptured first step)."""
    try:
        x = torch.zeros(1, 1, 1, device=device, dtype=dtype)
        return torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class StaticLayerCache:
    """One layer's preallocated decoding buffers (see :class:`StaticFoxCache`). It implements the
    :class:`LayerCache` calls of the attention layers for single-token steps, writing in place at
    the shared ``position``, so a step has fixed shapes and addresses (CUDA-graph capturable)."""

    owns_attention = True  # ForgettingAttentionLayer calls attend() (fixed shapes, capturable)

    def __init__(self, owner: StaticFoxCache, num_heads: int, num_kv_heads: int, head_dim: int,
                 forget_gate: bool, kv_shift: bool, dtype: torch.dtype):
        B, L, device = owner.seq_start.shape[0], owner.max_length, owner.position.device
        self.owner = owner
        # head-major, so that one batched matmul per step reads each head's keys as they lie
        self.key = torch.zeros(B, num_kv_heads, L, head_dim, device=device, dtype=dtype)
        self.value = torch.zeros_like(self.key)
        # c = cumsum(log f) of every position [B, H, L], and of the newest one [B, 1, H]; FoX only
        self.decay = torch.zeros(B, num_heads, L, device=device) if forget_gate else None
        self.last_decay = torch.zeros(B, 1, num_heads, device=device) if forget_gate else None
        self._shift_key = torch.zeros(B, num_kv_heads, head_dim, device=device, dtype=dtype) if kv_shift else None
        self._shift_value = torch.zeros_like(self._shift_key) if kv_shift else None

    @property
    def shift_key(self) -> torch.Tensor | None:
        # a copy: the layer reads the state, then overwrites the buffer, then uses what it read
        return None if self._shift_key is None else self._shift_key.clone()

    @property
    def shift_value(self) -> torch.Tensor | None:
        return None if self._shift_value is None else self._shift_value.clone()

    def keep_shift_inputs(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self._shift_key.copy_(key[:, -1])
        self._shift_value.copy_(value[:, -1])

    def append(self, key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor | None = None):
        """Write one position (``(B, 1, Hkv, D)``, decay ``(B, 1, H)``) at ``position``; return the
        whole key and value buffers as ``(B, L, Hkv, D)`` views and the decay buffer (the step
        masks the positions not written yet with :attr:`StaticFoxCache.visible`)."""
        at = self.owner.position.view(1)
        self.key.index_copy_(2, at, key.transpose(1, 2))
        self.value.index_copy_(2, at, value.transpose(1, 2))
        if decay is not None:
            self.decay.index_copy_(2, at, decay.transpose(1, 2))
            self.last_decay.copy_(decay)
        return self.key.transpose(1, 2), self.value.transpose(1, 2), self.decay

    def attend(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, log_f: torch.Tensor,
               ctx=None) -> torch.Tensor:
        """Forgetting attention of one new token ``q`` ``(B, 1, H, D)`` over the filled positions
        (float32 scores ``q.k / sqrt(D) + c_t - c_j``), after appending ``key``, ``value`` and
        ``c_t = c_{t-1} + log_f``. Query head ``h`` reads key head ``h // (H / Hkv)``."""
        c = self.last_decay + log_f  # [B, 1, H]
        self.append(key, value, c)
        B, _, H, D = q.shape
        Hkv, L = self.key.shape[1], self.key.shape[2]
        G = H // Hkv
        scores = _bmm_float32(q.reshape(B * Hkv, G, D), self.key.view(B * Hkv, L, D).transpose(1, 2))
        scores = scores.view(B, Hkv, G, L) * D ** -0.5 + (c.transpose(1, 2) - self.decay).view(B, Hkv, G, L)
        scores = scores.masked_fill(~self.owner.visible[:, None, None, :], float("-inf"))
        weights = scores.softmax(-1).view(B * Hkv, G, L).to(self.value.dtype)
        return _bmm_float32(weights, self.value.view(B * Hkv, L, D)).view(B, 1, H, D).to(q.dtype)

    def buffers(self) -> list[torch.Tensor]:
        return [t for t in (self.key, self.value, self.decay, self.last_decay, self._shift_key, self._shift_value)
                if t is not None]


class StaticFoxCache(_LayerCaches):
    """Preallocated decoding cache of ``max_length`` positions for a batch of ``batch_size``.

    The prompt is prefilled through a :class:`FoxCache` and copied in (:meth:`load`); every later
    step feeds one token per row, writes it at ``position`` (a device tensor, advanced in place)
    and attends over the whole buffers with the positions not yet written (and left padding)
    masked, so all steps have the same shapes: :class:`~foxacp.models.FoxForCausalLM` records one
    as a CUDA graph and replays it. ``generate(cache_implementation="static")`` uses it.
    Beam-search reordering works; cropping does not (the KV-shift state is not kept per position).
    """

    def __init__(self, config, batch_size: int, max_length: int, device=None, dtype=torch.float32):
        self.max_length = max_length
        self.position = torch.zeros((), dtype=torch.long, device=device)  # next position to write
        self.seq_start = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.visible = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        layer = dict(num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                     head_dim=config.head_dim, forget_gate=config.uses_forget_gate, kv_shift=config.use_kv_shift,
                     dtype=dtype)
        super().__init__(layers=[StaticLayerCache(self, **layer) for _ in range(config.num_hidden_layers)])
        self.seen_tokens = 0
        self.warmed_up = False  # FoxForCausalLM: a step ran (on CUDA: on a side stream, before the capture)
        self.decode_graph = None  # FoxForCausalLM: the captured step (CUDA)

    @property
    def batch_size(self) -> int:
        return self.seq_start.shape[0]

    max_batch_size = batch_size  # the name in transformers 4

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length

    @property
    def is_compileable(self) -> bool:
        return False  # FoxForCausalLM captures its steps itself; transformers must not compile forward

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, length: int) -> None:
        raise NotImplementedError("StaticFoxCache cannot be cropped; use a FoxCache (the default cache)")

    def load(self, cache: FoxCache) -> None:
        """Copy a prefilled :class:`FoxCache` (same batch size) into the buffers."""
        T = cache.get_seq_length()
        if T + 1 > self.max_length:
            raise ValueError(f"a prompt of {T} positions leaves no room in a StaticFoxCache of max_length "
                             f"{self.max_length}")
        for static, layer in zip(self.layers, cache.layers):
            static.key[:, :, :T] = layer.key.transpose(1, 2)
            static.value[:, :, :T] = layer.value.transpose(1, 2)
            if static.decay is not None:
                static.decay[:, :, :T] = layer.decay.transpose(1, 2)
                static.last_decay.copy_(layer.decay[:, -1:])
            if static._shift_key is not None:
                static.keep_shift_inputs(layer.shift_key[:, None], layer.shift_value[:, None])
        self.seq_start.copy_(cache.seq_start if cache.seq_start is not None else torch.zeros_like(self.seq_start))
        self.position.fill_(T)
        self.seen_tokens = T

    def begin_step(self) -> None:
        """Mark the positions the coming step attends to: written ones, the new one, no padding."""
        j = torch.arange(self.max_length, device=self.position.device)
        self.visible.copy_((j[None, :] <= self.position) & (j[None, :] >= self.seq_start[:, None]))

    def end_step(self) -> None:
        self.position.add_(1)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Select batch rows ``beam_idx`` in place (the buffers keep their addresses)."""
        for buffer in [t for layer in self.layers for t in layer.buffers()] + [self.seq_start]:
            buffer.copy_(buffer.index_select(0, beam_idx.to(buffer.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.buffers())
