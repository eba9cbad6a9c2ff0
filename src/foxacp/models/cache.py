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
import math
from collections import deque
from typing import Callable

import torch
from transformers import Cache

from ..ops import cumulative_decay, forgetting_attention

DEFAULT_MAX_CROP = 256  # positions crop() can remove; assisted decoding drafts far fewer per step


def eviction_page_size(max_length: int) -> int:
    """Positions per page of an evicting cache for contexts up to ``max_length``: the power of two
    nearest above ``max_length / 512``, within [4, 256]. Pages must be long enough that a step's
    batched matmuls stay few (about 512 pages per head at most) and short next to the windows of
    all but the fastest-forgetting heads (a head stores under one page beyond its window)."""
    return min(256, max(4, 1 << max(0, math.ceil(math.log2(max(max_length, 1) / 512)))))


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
    increases, so a key pruned for the newest query stays pruned for every later one.

    Heads forget at very different rates, so storage is paged per kv head: a page holds
    ``page_size`` (``P``) consecutive positions, aligned to multiples of ``P``, of one kv head
    (keys, values, and ``c`` of its ``G`` query heads), and the pages of all heads lie in one pool
    in no particular order, with a page table (``page_head``, ``page_pos``). A decoding step writes
    its position into each head's newest page and attends over all stored pages at once
    (:func:`_paged_attention`: one batched matmul for the scores, one for the values, a softmax
    per head across its pages). Slots not written yet, and left-padded ones, hold ``c = +inf``, so
    their weight is exactly 0 without a mask. The prompt (a call into the empty cache) is attended
    by :func:`foxacp.forgetting_attention` over its own keys, then stored.

    Every ``evict_every`` new positions, a page is dropped when all its keys are pruned for the
    newest query in every batch row and every query head of its kv head; pages of the pool's tail
    move into the holes. Everything a head still stores is attended exactly, so the logits differ
    from the full cache's by no more than the evicted attention mass, which the ACP bound keeps
    below ``e^log_eps`` per query.

    Host syncs: none in a step (the page table lives on the device; the host knows how many pages
    and positions there are). Eviction reads which pages to drop (one sync per layer every
    ``evict_every`` positions): the new pool size is a shape, which the host must know.

    Memory: the pool grows to ``need + need // 16`` pages when full and shrinks to that after an
    eviction leaves it over twice that headroom, so it stays within 1/8 (1/16 after a growth) of
    the pages in use; a head stores under one page of pruned keys beyond what per-position
    eviction would keep, and under one page of slots not written yet.
    """

    owns_attention = True  # ForgettingAttentionLayer calls attend()

    def __init__(self, threshold: torch.Tensor, num_kv_heads: int, evict_every: int, max_crop: int,
                 page_size: int):
        super().__init__(max_crop)
        self.threshold = threshold  # [H] delta per query head
        self.num_kv_heads, self.evict_every, self.page_size = num_kv_heads, evict_every, page_size
        self.keys: torch.Tensor | None = None  # pool [capacity, B, P, D] (page-major: a prefix is a view)
        self.values: torch.Tensor | None = None  # [capacity, B, P, D]
        self.decays: torch.Tensor | None = None  # [capacity, B, G, P] float32 c; +inf where never attended
        self.page_head: torch.Tensor | None = None  # [pages] long: the kv head of each page
        self.page_pos: torch.Tensor | None = None  # [pages] long: the position of each page's first slot
        self.newest: torch.Tensor | None = None  # [Hkv] long: each head's newest page
        self.last_decay: torch.Tensor | None = None  # [B, H] float32 c of the newest position
        self.pages = 0  # pages in use: pool[:pages]
        self.length = 0  # positions appended
        self.new_since_eviction = 0

    def attend(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, log_f: torch.Tensor, ctx) -> torch.Tensor:
        """Append this call's positions and attend: q ``(B, T, H, D)``, key/value ``(B, T, Hkv, D)``,
        log_f ``(B, T, H)``; returns ``(B, T, H, D)``. Evicts when due.

        Feed the prompt in one call: a later call of ``T > 1`` positions (a chunk) scores every new
        query against every stored slot at once (memory ``~ T x`` the stored keys).
        """
        past = self.length
        c, _ = cumulative_decay(log_f.transpose(1, 2), ctx.layout, initial=self.last_decay)
        c = c.transpose(1, 2)  # [B, T, H]
        self.last_decay = c[:, -1].clone()  # not a view that keeps the whole call's c alive
        stored = c if ctx.padding is None else c.masked_fill(ctx.padding[:, :, None], math.inf)
        self._append(key, value, stored)
        if past == 0:
            out = forgetting_attention(q, key, value, c, layout=ctx.layout, cumulative_gate=True)
        else:
            visible = None
            if q.shape[1] > 1:  # the new keys are seen causally by the new queries
                slots = self.page_pos[:, None] + torch.arange(self.page_size, device=q.device)  # [pages, P]
                queries = torch.arange(past, self.length, device=q.device)
                visible = (slots[:, None, None, None, :] <= queries[None, None, :, None, None])
            out = _paged_attention(q, c, self.keys[:self.pages], self.values[:self.pages], self.decays[:self.pages],
                                   self.page_head, visible)
        self.new_since_eviction += q.shape[1]
        if self.new_since_eviction >= self.evict_every:
            self.evict()
        return out

    def _append(self, key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor) -> None:
        """Write positions ``length ..``: key/value ``(B, T, Hkv, D)``, decay ``(B, T, H)`` (+inf: never attended)."""
        B, T, Hkv, D = key.shape
        P, G = self.page_size, decay.shape[2] // Hkv
        fill = self.length % P  # slots already written in each head's newest page
        first = min(T, P - fill) if fill else 0
        if first:  # the rest of the newest pages
            at, slots = self.newest, slice(fill, fill + first)
            self.keys[at, :, slots] = key[:, :first].permute(2, 0, 1, 3)
            self.values[at, :, slots] = value[:, :first].permute(2, 0, 1, 3)
            self.decays[at, :, :, slots] = decay[:, :first].view(B, first, Hkv, G).permute(2, 0, 3, 1)
        if first < T:  # new pages: whole blocks of P positions, one page per (block, head)
            rest = T - first
            blocks = -(-rest // P)
            pad = blocks * P - rest

            def pages(x: torch.Tensor, fill_value: float) -> torch.Tensor:
                """[B, rest, Hkv, E] -> [blocks * Hkv, B, P, E], the tail padded with ``fill_value``."""
                x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad), value=fill_value)
                x = x.view(B, blocks, P, Hkv, -1).permute(1, 3, 0, 2, 4)
                return x.reshape(blocks * Hkv, B, P, x.shape[-1])

            heads = torch.arange(Hkv, device=key.device).repeat(blocks)
            positions = (self.length + first + P * torch.arange(blocks, device=key.device)).repeat_interleave(Hkv)
            self._add_pages(pages(key[:, first:], 0.0), pages(value[:, first:], 0.0),
                            pages(decay[:, first:].view(B, rest, Hkv, G), math.inf).transpose(2, 3), heads, positions)
            self.newest = torch.arange(self.pages - Hkv, self.pages, device=key.device)
        self.length += T

    def _add_pages(self, keys, values, decays, heads, positions) -> None:
        n, m = self.pages, keys.shape[0]
        if self.keys is None:
            self.keys, self.values, self.decays = keys[:0], values[:0], decays[:0]
            self.page_head, self.page_pos = heads[:0], positions[:0]
        if n + m > self.keys.shape[0]:
            self._resize(n + m)
        self.keys[n:n + m], self.values[n:n + m], self.decays[n:n + m] = keys, values, decays
        self.page_head = torch.cat([self.page_head, heads])
        self.page_pos = torch.cat([self.page_pos, positions])
        self.pages = n + m

    @staticmethod
    def _spare(pages: int) -> int:
        """Headroom of a pool holding ``pages``: a pool that grows is copied once per 1/16 of growth."""
        return pages // 16

    def _resize(self, need: int) -> None:
        """Reallocate the pool for ``need`` pages and some headroom, keeping the pages in use."""
        capacity = need + self._spare(need)

        def moved(pool: torch.Tensor) -> torch.Tensor:
            new = pool.new_empty((capacity, *pool.shape[1:]))  # slots past `pages` are never read
            new[:self.pages] = pool[:self.pages]
            return new

        self.keys, self.values, self.decays = moved(self.keys), moved(self.values), moved(self.decays)

    def evict(self) -> None:
        """Drop the pages whose keys are all pruned for the newest query in every row and query head."""
        self.new_since_eviction = 0
        n, Hkv = self.pages, self.num_kv_heads
        if n == 0:
            return
        B, H = self.last_decay.shape
        G = H // Hkv
        newest = self.last_decay.view(B, Hkv, G).transpose(0, 1).index_select(0, self.page_head)  # [n, B, G]
        reach = (newest[..., None] - self.decays[:n]).amax(-1)  # [n, B, G]: largest c_t - c_j over the page
        delta = self.threshold.to(reach.device).view(Hkv, G).index_select(0, self.page_head)[:, None, :]
        gone = (reach < delta).flatten(1).all(1).nonzero().flatten().tolist()  # NaN keeps the page; host sync
        if not gone:
            return
        keep = n - len(gone)
        dropped = set(gone)
        holes = [i for i in gone if i < keep]
        movers = [i for i in range(keep, n) if i not in dropped]  # as many as holes
        if holes:
            to, src = (torch.tensor(i, device=self.page_head.device) for i in (holes, movers))
            for name in ("keys", "values", "decays", "page_head", "page_pos"):
                t = getattr(self, name)
                t[to] = t[src]
            remap = torch.arange(n, device=to.device)
            remap[src] = to
            self.newest = remap[self.newest]
        self.page_head, self.page_pos = self.page_head[:keep].clone(), self.page_pos[:keep].clone()
        self.pages = keep
        if self.keys.shape[0] > keep + 2 * self._spare(keep):
            self._resize(keep)

    @property
    def start(self) -> list[int]:
        """Position of each kv head's oldest stored key (the first slot of its oldest page)."""
        first = torch.full((self.num_kv_heads,), self.length, dtype=torch.long)
        if self.pages:
            first = first.to(self.page_pos.device).scatter_reduce_(0, self.page_head, self.page_pos, "amin")
        return first.tolist()

    def kept(self) -> list[int]:
        """Positions stored per kv head (from its oldest page to the newest position)."""
        return [self.length - s for s in self.start]

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("keys", "values", "decays"):  # page-major pools: batch is dim 1
            if (pool := getattr(self, name)) is not None:
                setattr(self, name, fn(pool.transpose(0, 1)).transpose(0, 1).contiguous())
        if self.last_decay is not None:
            self.last_decay = fn(self.last_decay)
        self.shift_keys.apply(fn)
        self.shift_values.apply(fn)

    def drop_last(self, n: int) -> None:
        raise NotImplementedError("an evicting cache cannot be cropped: keys were dropped for queries being removed")

    def memory_bytes(self) -> int:
        """Bytes allocated: the whole pool (pages in use and headroom), the page table, the shift state."""
        tensors = [t for t in (self.keys, self.values, self.decays, self.page_head, self.page_pos, self.newest,
                               self.last_decay) if t is not None]
        tensors += [*self.shift_keys.chunks, *self.shift_values.chunks]
        return sum(t.numel() * t.element_size() for t in tensors)


def _paged_attention(q: torch.Tensor, c: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, decays: torch.Tensor,
                     page_head: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Forgetting attention of queries ``q`` ``(B, T, H, D)`` with decays ``c`` ``(B, T, H)`` over
    pages of keys: ``keys``, ``values`` ``(N, B, P, D)``, ``decays`` ``(N, B, G, P)`` float32, page
    ``n`` belonging to kv head ``page_head[n]`` (query head ``h`` reads kv head ``h // G``)::

        o_th = sum_j exp(s_tj) v_j / sum_j exp(s_tj),   s_tj = q_th . k_j / sqrt(D) + c_th - c_jh

    over every slot ``j`` of the head's pages (and ``visible[n, 0, t, 0, j]`` where given). A slot
    with ``c_jh = +inf`` weighs 0; a query that sees nothing gets 0. Scores and sums in float32;
    one batched matmul each for scores and values, whatever the number of heads or pages.
    """
    B, T, H, D = q.shape
    N, _, P, _ = keys.shape
    G = decays.shape[2]
    Hkv = H // G
    # query rows of each page's head: [N, B, T, G, D], and their decays [N, B, T, G]
    rows = q.view(B, T, Hkv, G, D).permute(2, 0, 1, 3, 4).index_select(0, page_head)
    c_rows = c.view(B, T, Hkv, G).permute(2, 0, 1, 3).index_select(0, page_head)
    scores = _bmm_float32(rows.view(N * B, T * G, D), keys.view(N * B, P, D).transpose(1, 2))
    scores = scores.view(N, B, T, G, P) * D ** -0.5 + (c_rows[..., None] - decays[:, :, None])
    if visible is not None:
        scores = scores.masked_fill(~visible, -math.inf)
    # softmax over all pages of a head: its largest score, then the sums of exp per head
    page_max = scores.amax(-1)  # [N, B, T, G]
    by_head = page_head.view(N, 1, 1, 1).expand_as(page_max)
    head_max = scores.new_full((Hkv, B, T, G), -math.inf).scatter_reduce_(0, by_head, page_max, "amax")
    head_max = head_max.clamp_min(torch.finfo(torch.float32).min)  # a query that sees nothing: exp(-inf) = 0
    weights = torch.exp(scores - head_max.index_select(0, page_head)[..., None])  # [N, B, T, G, P]
    total = scores.new_zeros((Hkv, B, T, G)).index_add_(0, page_head, weights.sum(-1))
    out = _bmm_float32(weights.view(N * B, T * G, P).to(values.dtype), values.view(N * B, P, D))
    out = scores.new_zeros((Hkv, B, T, G, D)).index_add_(0, page_head, out.view(N, B, T, G, D))
    out = out / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return out.permute(1, 2, 0, 3, 4).reshape(B, T, H, D).to(q.dtype)


class EvictingFoxCache(FoxCache):
    """A :class:`FoxCache` whose forgetting-attention layers evict ACP-pruned keys
    (:class:`EvictingLayerCache`; ``thresholds[i]`` is layer i's ``(H,)`` delta, None for a layer
    that keeps everything). Built by :meth:`FoxForCausalLM.acp_eviction_cache`. Not croppable.

    ``evict_every``: positions between evictions (each costs one host sync per layer);
    ``page_size``: positions per page, the unit a head stores and drops (see :func:`eviction_page_size`).
    """

    def __init__(self, thresholds: list[torch.Tensor | None], num_kv_heads: int, evict_every: int = 64,
                 max_crop: int = DEFAULT_MAX_CROP, page_size: int = 256):
        for name, value in (("evict_every", evict_every), ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.thresholds, self.num_kv_heads = thresholds, num_kv_heads
        self.evict_every, self.page_size = evict_every, page_size
        super().__init__(len(thresholds), max_crop)

    def _new_layers(self) -> list[LayerCache]:
        return [LayerCache(self.max_crop) if t is None
                else EvictingLayerCache(t, self.num_kv_heads, self.evict_every, self.max_crop, self.page_size)
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
