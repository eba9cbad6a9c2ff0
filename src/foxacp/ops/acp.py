"""Adaptive Computation Pruning (ACP): thresholds, tile plans and statistics.

Forgetting attention weighs key j for query i by ``exp(s_ij + c_i - c_j)`` with
``s_ij = sm_scale * q_i . k_j`` and ``c = cumsum(log f)`` non-increasing. ACP
(Lin et al., 2025, arXiv 2504.06949) skips a (query tile, key tile) pair when the
largest decay inside it, ``c[first query] - c[last key]``, is below ``delta``.

The bound. Let ``|s_ij| <= U`` for all pairs and ``L`` the number of keys.
The softmax denominator of row i holds its diagonal term ``exp(s_ii) >= e^-U``
(decay 0). Each pruned term is ``< e^(U + delta)`` and there are at most ``L``
of them, so the pruned share of row i's attention mass is at most
``L e^(U + delta) / e^-U = L e^(2U + delta)``. With
``delta = -2U - ln L + ln eps`` this is ``eps``; the output moves by at most
``2 eps max|v|`` elementwise (the kept weights renormalise by ``<= eps``).

``U`` comes either from the data, ``U = max_i |q_i| * max_j |k_j| * sm_scale``
per (batch, head) (Cauchy-Schwarz), or, for models with per-head QK-norm, from
the norm weights alone: ``|q_i| <= max|gamma_q| sqrt(D)`` and likewise for k,
so ``U = max|gamma_q| max|gamma_k| sqrt(D)`` with ``sm_scale = 1/sqrt(D)``.

The plan. Because ``c`` is monotone, the kept key tiles of a query tile form a
contiguous range ending at the diagonal, and the kept query tiles of a key tile
form a contiguous range starting at the diagonal. :class:`TilePlan` stores those
ranges per (batch, head, tile), found with one vectorised ``searchsorted``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "MaskSpec",
    "TilePlan",
    "AcpStats",
    "threshold_from_qk_norm",
    "threshold_from_data",
    "tile_bounds",
]


def threshold_from_qk_norm(q_norm_weight, k_norm_weight, head_dim: int, seq_len: int,
                           log_eps: float = -10.0) -> torch.Tensor:
    """ACP threshold per head for per-head QK-normed queries and keys.

    ``q_norm_weight``/``k_norm_weight``: ``(H, D)`` (or ``(D,)``) RMSNorm scales. For GQA pass
    ``k_norm_weight`` of shape ``(Hkv, D)``; query head ``h`` uses key head ``h // (H // Hkv)``.
    Returns ``delta = -(2U + ln seq_len) + log_eps`` with ``U = max|g_q| max|g_k| sqrt(D)``,
    shape ``(H,)`` (a 0-d tensor for 1-D weights). Uses no activations.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if log_eps >= 0 or math.isnan(log_eps):
        raise ValueError(f"log_eps must be a negative number, got {log_eps}")
    gq = q_norm_weight.detach().float().abs().amax(dim=-1)
    gk = k_norm_weight.detach().float().abs().amax(dim=-1)
    if gq.dim() == 1 and gk.dim() == 1 and gq.shape[0] != gk.shape[0]:
        if gq.shape[0] % gk.shape[0] != 0:
            raise ValueError(
                f"q_norm_weight has {gq.shape[0]} heads, not a multiple of k_norm_weight's {gk.shape[0]}")
        gk = gk.repeat_interleave(gq.shape[0] // gk.shape[0])
    bound = gq * gk * math.sqrt(head_dim)
    return -(2.0 * bound + math.log(seq_len)) + log_eps


def threshold_from_data(q: torch.Tensor, k: torch.Tensor, sm_scale: float, seq_len: int,
                        log_eps: float = -10.0) -> torch.Tensor:
    """ACP threshold per (batch, head) from the data: ``U = max|q_i| max|k_j| sm_scale``.

    ``q``: ``(B, H, Tq, D)``, ``k``: ``(B, Hkv, Tk, D)`` (any strides). With GQA the bound is
    taken per kv group (the largest query norm among the group's heads). Returns ``(B, H)``
    float32. Half-precision CUDA inputs take one fused Triton pass (two launches) when Triton is
    installed; otherwise float32 norms in PyTorch.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype:
        fused = _fused_threshold()
        if fused is not None:
            return fused(q.detach(), k.detach(), float(sm_scale), int(seq_len), float(log_eps))
    batch, heads = q.shape[0], q.shape[1]
    kv_heads = k.shape[1]
    q_max = _row_norms(q).amax(dim=-1)  # [B, H]
    k_max = _row_norms(k).amax(dim=-1)  # [B, Hkv]
    group = heads // kv_heads
    q_max = q_max.view(batch, kv_heads, group).amax(dim=-1, keepdim=True).expand(-1, -1, group)
    bound = q_max.reshape(batch, heads) * k_max.repeat_interleave(group, dim=1) * sm_scale
    return -(2.0 * bound + math.log(max(seq_len, 1))) + log_eps


def _fused_threshold():
    """The Triton custom op for the data threshold, or None without Triton."""
    try:
        from .triton_attention import acp_data_threshold, triton
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return None if triton is None else acp_data_threshold


def _row_norms(t: torch.Tensor) -> torch.Tensor:
    """float32 norms over the last dim; half inputs accumulate in float32 without a float32 copy."""
    t = t.detach()
    if t.dtype not in (torch.float16, torch.bfloat16):
        return t.float().norm(dim=-1)
    if t.dim() == 4 and t.transpose(1, 2).is_contiguous():  # (B, T, H, D) memory: reduce it as laid out
        return torch.linalg.vector_norm(t.transpose(1, 2), dim=-1, dtype=torch.float32).transpose(1, 2)
    return torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32)


@dataclass(frozen=True)
class MaskSpec:
    """Which (query, key) pairs exist and which ACP may prune; independent of tile sizes.

    Positions are key positions ``0..Tk-1``; query ``i`` sits at position ``q_offset + i`` with
    ``q_offset = Tk - Tq``. Query position ``p`` sees keys ``key_lo[b, p] <= j <= p``; key ``j``
    is seen by query positions up to ``key_hi[b, j]``. ``None`` means plain causal
    (``key_lo = 0``, ``key_hi = Tk - 1``).

    ``decay`` is a non-increasing cumulative log-gate ``(B, H, Tk)`` (float64, global across
    packed sequences so it stays monotone; differences inside a sequence are exact) and
    ``delta`` the ACP threshold ``(B, H)``; both ``None`` for dense attention.
    """

    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    key_lo: torch.Tensor | None = None
    key_hi: torch.Tensor | None = None
    decay: torch.Tensor | None = None
    delta: torch.Tensor | None = None

    @property
    def q_offset(self) -> int:
        return self.seqlen_k - self.seqlen_q

    @property
    def has_acp(self) -> bool:
        return self.delta is not None

    def plan(self, block_m: int, block_n: int) -> "TilePlan":
        return tile_bounds(self, block_m, block_n)


@dataclass(frozen=True)
class TilePlan:
    """Tile ranges to compute, per (batch, head, tile); all int32 on the inputs' device.

    Query tile ``m`` (queries ``[m*block_m, (m+1)*block_m)``) computes key tiles
    ``kv_begin[b, h, m] <= n < kv_end[b, h, m]``; key tile ``n`` is used by query tiles
    ``q_begin[b, h, n] <= m < q_end[b, h, n]``. An empty range means nothing to compute.
    ``dense_*`` are the same ranges without ACP (causal and sequence structure only).
    """

    block_m: int
    block_n: int
    seqlen_q: int
    seqlen_k: int
    kv_begin: torch.Tensor
    kv_end: torch.Tensor
    q_begin: torch.Tensor
    q_end: torch.Tensor
    dense_kv_begin: torch.Tensor
    head_dim: int = 0

    @property
    def num_q_tiles(self) -> int:
        return self.kv_begin.shape[-1]

    @property
    def num_k_tiles(self) -> int:
        return self.q_begin.shape[-1]

    def kept_tiles(self) -> torch.Tensor:
        """Tiles computed per (batch, head)."""
        return (self.kv_end - self.kv_begin).clamp_min(0).sum(-1)

    def causal_tiles(self) -> torch.Tensor:
        """Tiles a dense kernel computes per (batch, head)."""
        return (self.kv_end - self.dense_kv_begin).clamp_min(0).sum(-1)

    def kept_fraction(self) -> float:
        causal = self.causal_tiles().sum().item()
        return self.kept_tiles().sum().item() / causal if causal else 1.0

    def to_dense(self) -> torch.Tensor:
        """Boolean map ``(B, H, num_q_tiles, num_k_tiles)``: True where a tile is computed."""
        n = torch.arange(self.num_k_tiles, device=self.kv_begin.device)
        return (n >= self.kv_begin[..., None]) & (n < self.kv_end[..., None])

    def to_element_mask(self) -> torch.Tensor:
        """Boolean ``(B, H, Tq, Tk)``: pairs inside computed tiles (before the causal mask)."""
        tiles = self.to_dense()
        rows = tiles.repeat_interleave(self.block_m, dim=2)[:, :, : self.seqlen_q]
        return rows.repeat_interleave(self.block_n, dim=3)[..., : self.seqlen_k]


def _tile_edges(length: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(0, length, block, device=device)
    end = (start + block).clamp_max(length) - 1
    return start, end


def tile_bounds(spec: MaskSpec, block_m: int, block_n: int) -> TilePlan:
    """Compute the :class:`TilePlan` of ``spec`` for ``block_m x block_n`` tiles.

    Vectorised over (batch, head, tile): causal/sequence ranges come from ``key_lo``/``key_hi``
    at the tile corners; ACP ranges from ``searchsorted`` over the monotone ``decay``.
    """
    if block_m < 1 or block_n < 1:
        raise ValueError(f"tile sizes must be >= 1, got block_m={block_m}, block_n={block_n}")
    device = spec.decay.device if spec.decay is not None else (
        spec.key_lo.device if spec.key_lo is not None else torch.device("cpu"))
    B, H, Tq, Tk, off = spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k, spec.q_offset
    q_start, q_last = _tile_edges(Tq, block_m, device)
    k_start, k_last = _tile_edges(Tk, block_n, device)
    pos_first, pos_last = q_start + off, q_last + off  # key positions of tile corner queries
    num_qt, num_kt = q_start.numel(), k_start.numel()

    # Causal and sequence structure, shape [B, tiles].
    kv_end = (pos_last // block_n + 1).expand(B, num_qt)
    if spec.key_lo is None:
        kv_begin = torch.zeros(B, num_qt, dtype=torch.long, device=device)
        q_end = torch.full((B, num_kt), num_qt, dtype=torch.long, device=device)
        first_seen = torch.zeros(B, num_kt, dtype=torch.long, device=device)
    else:
        lo, hi = spec.key_lo.long(), spec.key_hi.long()
        kv_begin = lo[:, pos_first] // block_n
        # a query tile whose last row sees nothing (left padding) computes nothing
        kv_end = torch.where(lo[:, pos_last] > pos_last, kv_begin, kv_end)
        q_end = ((hi[:, k_last] - off).clamp_min(-1) // block_m + 1).clamp(0, num_qt)
        first_seen = lo.gather(1, hi)[:, k_last]  # earliest key any query of the sequence sees
        q_end = torch.where(first_seen > k_last, torch.zeros_like(q_end), q_end)
    q_begin = ((k_start - off).clamp_min(0) // block_m).expand(B, num_kt)
    q_end = torch.maximum(q_end, q_begin)

    expand = lambda t: t[:, None, :].expand(B, H, t.shape[-1]).contiguous()  # noqa: E731
    kv_begin, kv_end, q_begin, q_end = map(expand, (kv_begin, kv_end, q_begin, q_end))
    dense_kv_begin = kv_begin

    if spec.delta is not None:
        # e = -decay is non-decreasing; tile (m, n) is kept iff its largest decay
        # decay[pos_first(m)] - decay[k_last(n)] = e[k_last(n)] - e[pos_first(m)] >= delta.
        e = (-spec.decay).double().reshape(B * H, Tk).contiguous()
        delta = spec.delta.double().reshape(B * H, 1)
        e_k_last = e[:, k_last].contiguous()  # [BH, num_kt], non-decreasing
        e_q_first = e[:, pos_first].contiguous()  # [BH, num_qt], non-decreasing
        acp_kv_begin = torch.searchsorted(e_k_last, e_q_first + delta, side="left")
        acp_q_end = torch.searchsorted(e_q_first, e_k_last - delta, side="right")
        kv_begin = torch.maximum(kv_begin, acp_kv_begin.view(B, H, num_qt))
        q_end = torch.minimum(q_end, acp_q_end.view(B, H, num_kt))
        kv_begin = torch.minimum(kv_begin, kv_end)
        q_end = torch.maximum(q_end, q_begin)

    as_i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return TilePlan(block_m, block_n, Tq, Tk, as_i32(kv_begin), as_i32(kv_end), as_i32(q_begin),
                    as_i32(q_end), as_i32(dense_kv_begin))


@dataclass
class AcpStats:
    """What ACP pruned in one forward call, per (batch, head).

    ``kept_tiles``/``causal_tiles``: tiles computed vs tiles a dense causal kernel computes;
    ``flops_done``/``flops_dense``: forward attention FLOPs (``4 D`` per computed score,
    QK^T and PV) at tile granularity; ``threshold``: delta used (``None`` when dense);
    ``plan``: the forward's :class:`TilePlan` (tile maps for analyses).
    """

    kept_tiles: torch.Tensor
    causal_tiles: torch.Tensor
    flops_done: torch.Tensor
    flops_dense: torch.Tensor
    threshold: torch.Tensor | None
    block_m: int
    block_n: int
    plan: TilePlan | None = None

    @classmethod
    def from_plan(cls, plan: TilePlan, head_dim: int, threshold: torch.Tensor | None) -> "AcpStats":
        kept = plan.kept_tiles().long()
        causal = plan.causal_tiles().long()
        per_tile = 4 * head_dim * plan.block_m * plan.block_n
        return cls(kept, causal, kept * per_tile, causal * per_tile,
                   None if threshold is None else threshold.detach(), plan.block_m, plan.block_n, plan)

    @property
    def kept_fraction(self) -> float:
        causal = int(self.causal_tiles.sum())
        return int(self.kept_tiles.sum()) / causal if causal else 1.0

    @property
    def flops_saved_fraction(self) -> float:
        dense = int(self.flops_dense.sum())
        return 1.0 - int(self.flops_done.sum()) / dense if dense else 0.0

    def summary(self) -> dict:
        return {
            "kept_fraction": self.kept_fraction,
            "flops_saved_fraction": self.flops_saved_fraction,
            "flops_done": int(self.flops_done.sum()),
            "flops_dense": int(self.flops_dense.sum()),
        }
