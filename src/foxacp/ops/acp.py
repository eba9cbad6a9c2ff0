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

A tighter bound, the "local" rule (``rule="local"``). Keep the same target (pruned share of
every row's mass <= eps) but bound both sides from the data, per tile:

* denominator: any subset of row i's visible keys gives ``sum_j w_ij >= e^lambda_i`` with
  ``lambda_i = ln sum_{j in W_i} exp(s_ij + c_i - c_j)`` over ``W_i`` = the ~32..63 most recent
  visible keys (:func:`local_log_mass`: one small banded product), instead of ``e^-U``;
* numerator: with key tiles ``0..n`` of query tile m pruned (keys ``j <= J``, the last key of
  tile n), ``s_ij <= Q_m K_n sm_scale`` (``Q_m`` the tile's largest query norm, ``K_n`` the largest
  key norm in tiles ``0..n``) and ``c_i <= c_F`` (F the tile's first query), so the pruned mass is
  at most ``e^(Q_m K_n sm_scale + c_F) sum_{j <= J} e^(-c_j)``: the decays themselves are summed
  (a ``logcumsumexp``), which for a head that forgets in ~tau tokens is ~tau terms, not ``L``.

So pruning key tiles ``0..n`` for query tile m removes at most ``eps`` of each row's mass when
``Q_m K_n sm_scale + c_F + ln sum_{j <= J} e^(-c_j) - min_{i in m} lambda_i <= ln eps``. Each
term grows with n, so the passing tiles form a prefix; the tile holding the query tile's first
position is never pruned. The local plan keeps the longer of the two rules' prefixes (each is a
proof on its own) and takes a suffix minimum over query tiles, so the begins never decrease: the
backward then walks exactly the forward's pairs. With QK-norm and unit scales ``Q K sm_scale`` is
the paper's ``U``; the gains are the denominator (``lambda`` instead of ``-U``) and the count
(the decayed sum instead of ``ln L``).

The plan. Because ``c`` is monotone, the kept key tiles of a query tile form a contiguous range
ending at the diagonal, and the kept query tiles of a key tile form a contiguous range starting at
the diagonal. :class:`TilePlan` holds the ACP part of those ranges, which is what the kernels read,
built once per call by the backend's planner (one ``searchsorted`` here, a Triton pre-pass on GPU),
consumed by the forward, saved for the backward and reported by :class:`AcpStats`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import torch

__all__ = [
    "MaskSpec",
    "TilePlan",
    "AcpStats",
    "threshold_from_qk_norm",
    "threshold_from_data",
    "tile_bounds",
    "plan_tiles",
    "paper_ranges",
    "local_log_mass",
    "local_kv_begin",
    "key_side_bounds",
    "ACP_RULES",
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
    float32, from float32 norms in PyTorch (:func:`foxacp.forgetting_attention` uses the Triton
    backend's fused two-launch version for half-precision CUDA inputs).
    """
    batch, heads = q.shape[0], q.shape[1]
    kv_heads = k.shape[1]
    q_max = _row_norms(q).amax(dim=-1)  # [B, H]
    k_max = _row_norms(k).amax(dim=-1)  # [B, Hkv]
    group = heads // kv_heads
    q_max = q_max.view(batch, kv_heads, group).amax(dim=-1, keepdim=True).expand(-1, -1, group)
    bound = q_max.reshape(batch, heads) * k_max.repeat_interleave(group, dim=1) * sm_scale
    return -(2.0 * bound + math.log(max(seq_len, 1))) + log_eps


def _row_norms(t: torch.Tensor) -> torch.Tensor:
    """float32 norms over the last dim; half inputs accumulate in float32 without a float32 copy."""
    t = t.detach()
    if t.dtype not in (torch.float16, torch.bfloat16):
        return t.float().norm(dim=-1)
    if t.dim() == 4 and t.transpose(1, 2).is_contiguous():  # (B, T, H, D) memory: reduce it as laid out
        return torch.linalg.vector_norm(t.transpose(1, 2), dim=-1, dtype=torch.float32).transpose(1, 2)
    return torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32)


ACP_RULES = ("paper", "local")


@dataclass(frozen=True)
class MaskSpec:
    """Which (query, key) pairs exist and which ACP may prune; independent of tile sizes.

    Positions are key positions ``0..Tk-1``; query ``i`` sits at position ``q_offset + i`` with
    ``q_offset = Tk - Tq``. Query position ``p`` sees keys ``key_lo[b, p] <= j <= p``; key ``j``
    is seen by query positions up to ``key_hi[b, j]``. ``None`` means plain causal
    (``key_lo = 0``, ``key_hi = Tk - 1``).

    ``decay`` is a non-increasing cumulative log-gate ``(B, H, Tk)`` (float64, global across
    packed sequences so it stays monotone; differences inside a sequence are exact) and
    ``delta`` the paper rule's threshold ``(B, H)``; both ``None`` for dense attention.
    ``rule`` picks the ACP bound (module docstring): ``"paper"`` or ``"local"``, which needs the
    data (``q``, ``k``, ``sm_scale`` passed to :func:`plan_tiles`) and ``log_eps``.
    """

    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    key_lo: torch.Tensor | None = None
    key_hi: torch.Tensor | None = None
    decay: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    rule: str = "paper"
    log_eps: float = -10.0

    @property
    def q_offset(self) -> int:
        return self.seqlen_k - self.seqlen_q

    @property
    def has_acp(self) -> bool:
        return self.delta is not None

    def plan(self, block_m: int, block_n: int) -> "TilePlan":
        """The paper rule's plan (no data needed); see :func:`plan_tiles` for the local rule."""
        return tile_bounds(self, block_m, block_n)


@dataclass(frozen=True, eq=False)
class TilePlan:
    """Which tiles one attention call computes, per (batch, head, tile); int32 on the inputs' device.

    What the kernels consume is the ACP part alone: ``acp_kv_begin[b, h, m]``, the first key tile
    that query tile ``m`` keeps, and ``acp_q_end[b, h, n]``, one past the last query tile that keeps
    key tile ``n`` (``None`` without ACP). The two describe the same pairs: ``acp_kv_begin`` is
    non-decreasing in ``m`` and tile ``(m, n)`` is kept iff ``n >= acp_kv_begin[m]`` iff
    ``m < acp_q_end[n]``, so a backward that walks key tiles computes the forward's pairs.

    The full ranges (causal and sequence structure with ACP) are derived on first use:
    query tile ``m`` computes key tiles ``kv_begin <= n < kv_end``, key tile ``n`` is used by query
    tiles ``q_begin <= m < q_end``; ``dense_kv_begin`` is the begin without ACP. ``paper_kv_begin``
    is what the paper's rule alone keeps, so the gain of a tighter rule is visible on every run.
    """

    spec: MaskSpec
    block_m: int
    block_n: int
    acp_kv_begin: torch.Tensor | None = None
    acp_q_end: torch.Tensor | None = None
    paper_kv_begin: torch.Tensor | None = None

    @property
    def seqlen_q(self) -> int:
        return self.spec.seqlen_q

    @property
    def seqlen_k(self) -> int:
        return self.spec.seqlen_k

    @property
    def num_q_tiles(self) -> int:
        return -(-self.seqlen_q // self.block_m)

    @property
    def num_k_tiles(self) -> int:
        return -(-self.seqlen_k // self.block_n)

    @cached_property
    def _ranges(self) -> tuple[torch.Tensor, ...]:
        kv_begin, kv_end, q_begin, q_end = _structure_ranges(self.spec, self.block_m, self.block_n)
        dense_kv_begin = kv_begin
        paper_kv_begin = kv_begin
        if self.acp_kv_begin is not None:
            kv_begin = torch.minimum(torch.maximum(kv_begin, self.acp_kv_begin), kv_end)
            q_end = torch.maximum(torch.minimum(q_end, self.acp_q_end), q_begin)
            paper_kv_begin = torch.minimum(torch.maximum(dense_kv_begin, self.paper_kv_begin), kv_end)
        return kv_begin, kv_end, q_begin, q_end, dense_kv_begin, paper_kv_begin

    kv_begin = property(lambda self: self._ranges[0])
    kv_end = property(lambda self: self._ranges[1])
    q_begin = property(lambda self: self._ranges[2])
    q_end = property(lambda self: self._ranges[3])
    dense_kv_begin = property(lambda self: self._ranges[4])

    def kept_tiles(self) -> torch.Tensor:
        """Tiles computed per (batch, head)."""
        return (self.kv_end - self.kv_begin).clamp_min(0).sum(-1)

    def paper_kept_tiles(self) -> torch.Tensor:
        """Tiles the paper's rule alone would compute per (batch, head)."""
        return (self.kv_end - self._ranges[5]).clamp_min(0).sum(-1)

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


def _spec_device(spec: MaskSpec):
    for t in (spec.decay, spec.key_lo, spec.delta):
        if t is not None:
            return t.device
    return torch.device("cpu")


def _structure_ranges(spec: MaskSpec, block_m: int, block_n: int) -> tuple[torch.Tensor, ...]:
    """Causal and sequence ranges ``kv_begin, kv_end (B, H, nqt)``, ``q_begin, q_end (B, H, nkt)``."""
    device = _spec_device(spec)
    B, H, Tq, Tk, off = spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k, spec.q_offset
    q_start, q_last = _tile_edges(Tq, block_m, device)
    k_start, k_last = _tile_edges(Tk, block_n, device)
    pos_first, pos_last = q_start + off, q_last + off  # key positions of tile corner queries
    num_qt, num_kt = q_start.numel(), k_start.numel()
    kv_end = (pos_last // block_n + 1).expand(B, num_qt)
    if spec.key_lo is None:
        kv_begin = torch.zeros(B, num_qt, dtype=torch.long, device=device)
        q_end = torch.full((B, num_kt), num_qt, dtype=torch.long, device=device)
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
    expand = lambda t: t[:, None, :].expand(B, H, t.shape[-1]).to(torch.int32).contiguous()  # noqa: E731
    return tuple(map(expand, (kv_begin, kv_end, q_begin, q_end)))


def paper_ranges(spec: MaskSpec, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's rule: ``acp_kv_begin (B, H, nqt)``, ``acp_q_end (B, H, nkt)`` int32.

    ``e = -decay`` is non-decreasing; tile ``(m, n)`` is kept iff its largest decay
    ``decay[pos_first(m)] - decay[k_last(n)] = e[k_last(n)] - e[pos_first(m)] >= delta``, a
    suffix of ``n`` and a prefix of ``m``, found by two ``searchsorted`` in float64 (NaN-free
    inputs: :func:`foxacp.forgetting_attention` plans NaN decays as ``-inf`` and NaN data
    thresholds as ``-inf``).
    """
    B, H, Tq, Tk, off = spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k, spec.q_offset
    device = spec.decay.device
    q_start, _ = _tile_edges(Tq, block_m, device)
    _, k_last = _tile_edges(Tk, block_n, device)
    e = (-spec.decay).double().reshape(B * H, Tk)
    delta = spec.delta.double().reshape(B * H, 1)
    e_k_last = e[:, k_last].contiguous()  # [BH, num_kt], non-decreasing
    e_q_first = e[:, q_start + off].contiguous()  # [BH, num_qt], non-decreasing
    acp_kv = torch.searchsorted(e_k_last, e_q_first + delta, side="left")
    acp_q = torch.searchsorted(e_q_first, e_k_last - delta, side="right")
    return (acp_kv.view(B, H, -1).to(torch.int32).contiguous(),
            acp_q.view(B, H, -1).to(torch.int32).contiguous())


def tile_bounds(spec: MaskSpec, block_m: int, block_n: int) -> TilePlan:
    """The paper rule's :class:`TilePlan` of ``spec`` for ``block_m x block_n`` tiles (no data needed)."""
    if block_m < 1 or block_n < 1:
        raise ValueError(f"tile sizes must be >= 1, got block_m={block_m}, block_n={block_n}")
    return plan_tiles(replace(spec, rule="paper"), block_m, block_n)


def plan_tiles(spec: MaskSpec, block_m: int, block_n: int, *, q: torch.Tensor | None = None,
               k: torch.Tensor | None = None, sm_scale: float | None = None,
               paper: tuple[torch.Tensor, torch.Tensor] | None = None, local_first=None) -> TilePlan:
    """The :class:`TilePlan` of ``spec`` under its rule. ``paper``: the paper rule's ranges if a
    backend already computed them (the Triton pre-pass); the local rule also needs ``q``
    ``(B, H, Tq, D)``, ``k`` ``(B, Hkv, Tk, D)`` and ``sm_scale``. ``local_first``: a backend's
    version of :func:`local_kv_begin` (same arguments plus the key-side bounds), e.g. one kernel."""
    if not spec.has_acp:
        return TilePlan(spec, block_m, block_n)
    paper_kv, paper_q = paper if paper is not None else paper_ranges(spec, block_m, block_n)
    if spec.rule == "paper":
        return TilePlan(spec, block_m, block_n, paper_kv, paper_q, paper_kv)
    key_bounds = key_side_bounds(spec, k, block_n)
    local_kv = (local_first or local_kv_begin)(spec, q, k, sm_scale, block_m, block_n, key_bounds)
    # either proof covers a prefix of key tiles; the longer prefix is proved by one of them. The
    # suffix minimum keeps the begin non-decreasing in m (keeping more is always safe), which
    # makes each key tile's query tiles a prefix: what the backward walks.
    acp_kv = torch.maximum(local_kv, paper_kv).flip(-1).cummin(-1).values.flip(-1).contiguous()
    n = torch.arange(-(-spec.seqlen_k // block_n), dtype=acp_kv.dtype, device=acp_kv.device)
    acp_q = torch.searchsorted(acp_kv, n.expand(*acp_kv.shape[:2], -1).contiguous(), right=True, out_int32=True)
    return TilePlan(spec, block_m, block_n, acp_kv, acp_q, paper_kv)


LOCAL_WINDOW = 32  # rows per block of the local log-sum-exp; each row sums over >= this many recent keys
LOCAL_MARGIN = 1e-3  # nats off the local log-mass: covers float32 rounding of its scores and decays


def key_side_bounds(spec: MaskSpec, k: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The local rule's per-key-tile terms: ``K_n`` ``(B, Hkv, nkt)``, the largest key norm in tiles
    ``0..n`` (float32, float64 for float64 keys), and ``ln sum_{j <= last key of n} e^(-c_j)``
    ``(B, H, nkt)`` float64."""
    k_norm = torch.linalg.vector_norm(k.detach(), dim=-1, dtype=_compute_dtype(k))  # [B, Hkv, Tk]
    k_prefix_max = _tile_reduce(k_norm, block_n, torch.amax).cummax(-1).values
    _, k_last = _tile_edges(spec.seqlen_k, block_n, k.device)
    decayed_keys = torch.logcumsumexp(-spec.decay.double(), dim=-1)[..., k_last]
    return k_prefix_max.contiguous(), decayed_keys.contiguous()


def local_kv_begin(spec: MaskSpec, q: torch.Tensor, k: torch.Tensor, sm_scale: float,
                   block_m: int, block_n: int, key_bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The local rule's first kept key tile per query tile, ``(B, H, nqt)`` int32 (module docstring).

    ``n0(m)`` counts the key tiles ``n`` below query tile m's first position's tile with
    ``g(m, n) = Q_m K_n sm_scale + c[first query of m] + ln sum_{j <= last key of n} e^(-c_j)
    - Lambda_m <= log_eps``, where ``Q_m`` is the largest query norm of the tile, ``K_n`` the largest
    key norm in tiles ``0..n`` and ``Lambda_m`` the smallest :func:`local_log_mass` of the tile's
    rows (``key_bounds``: :func:`key_side_bounds`). Every term is non-decreasing in ``n``, so the
    tiles that pass form a prefix. NaN anywhere makes ``g`` NaN, which never passes.
    """
    B, H, Tq, off = spec.batch, spec.heads, spec.seqlen_q, spec.q_offset
    device = q.device
    q_start, _ = _tile_edges(Tq, block_m, device)
    k_max, decayed_keys = key_bounds
    k_max = k_max.repeat_interleave(H // k.shape[1], 1)  # [B, H, nkt]
    q_max = _tile_reduce(torch.linalg.vector_norm(q.detach(), dim=-1, dtype=_compute_dtype(q)), block_m, torch.amax)
    lam = _tile_reduce(local_log_mass(spec, q, k, sm_scale), block_m, torch.amin)  # [B, H, nqt]
    c = spec.decay.double()
    g = (q_max[..., :, None] * k_max[..., None, :]).double() * sm_scale \
        + c[..., q_start + off, None] + decayed_keys[..., None, :] - lam[..., :, None].double()
    below_diag = torch.arange(k_max.shape[-1], device=device)[None, :] < ((q_start + off) // block_n)[:, None]
    passes = (g <= spec.log_eps) & below_diag  # NaN compares False
    return passes.sum(-1, dtype=torch.int32)  # a prefix, so its length is the count


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tile_reduce(x: torch.Tensor, block: int, reduce) -> torch.Tensor:
    """``reduce`` over consecutive blocks of the last dim (a partial last block included)."""
    T = x.shape[-1]
    pad = -T % block
    if pad:
        fill = x[..., -1:].expand(*x.shape[:-1], pad)  # repeating an element changes no max/min
        x = torch.cat([x, fill], dim=-1)
    return reduce(x.reshape(*x.shape[:-1], -1, block), dim=-1)


def local_log_mass(spec: MaskSpec, q: torch.Tensor, k: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """``lambda_i = ln sum_{j in W_i} exp(s_ij + c_i - c_j)`` per query row, ``(B, H, Tq)`` float32.

    ``W_i``: the visible keys among the ``LOCAL_WINDOW - 1`` keys before the first row of
    ``i``'s block of ``LOCAL_WINDOW`` rows and the keys up to ``i`` (so at least ``LOCAL_WINDOW``
    recent keys when the sequence has them, and always ``i`` itself). A subset of row i's visible
    keys, so ``e^lambda_i`` is a lower bound of its softmax denominator. Rows that see no key get
    ``+inf`` (they output 0 and constrain nothing). Scores in float32 (float64 for float64
    inputs), decays as float64 differences.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk, off, r = k.shape[1], k.shape[2], spec.q_offset, LOCAL_WINDOW
    group = H // Hkv
    device = q.device
    nb = -(-Tq // r)
    rows = torch.arange(nb * r, device=device).view(nb, r)  # query rows (padded)
    cols = rows[:, :1] + off - (r - 1) + torch.arange(2 * r - 1, device=device)  # [nb, 2r-1] key positions
    pos = rows + off  # key positions of the rows
    visible = (cols[:, None, :] <= pos[:, :, None]) & (cols[:, None, :] >= 0) & (rows[:, :, None] < Tq)
    cols_c = cols.clamp(0, Tk - 1)
    compute = _compute_dtype(q)
    qf = torch.nn.functional.pad(q.detach().to(compute), (0, 0, 0, nb * r - Tq)).view(B, Hkv, group, nb, r, D)
    kf = k.detach().to(compute)[:, :, cols_c.flatten()].view(B, Hkv, 1, nb, 2 * r - 1, D)
    scores = torch.matmul(qf, kf.transpose(-1, -2)).view(B, H, nb, r, 2 * r - 1) * sm_scale
    # decays relative to each block's first key: float64 differences, then small enough for float32
    e = spec.decay.double()
    pos_c = pos.clamp_max(Tk - 1)
    e_ref = e[:, :, cols_c[:, 0]][..., None]  # [B, H, nb, 1]
    e_rows = (e[:, :, pos_c.flatten()].view(B, H, nb, r) - e_ref).to(compute)
    e_cols = (e[:, :, cols_c.flatten()].view(B, H, nb, 2 * r - 1) - e_ref).to(compute)
    scores = scores + (e_rows[..., :, None] - e_cols[..., None, :])
    if spec.key_lo is not None:
        lo = spec.key_lo.long()[:, pos_c.flatten()].view(B, 1, nb, r, 1)
        visible = visible & (cols[None, None, :, None, :] >= lo)
    lam = torch.logsumexp(scores.masked_fill(~visible, -math.inf), dim=-1).reshape(B, H, nb * r)[..., :Tq]
    return torch.where(torch.isneginf(lam), math.inf, lam - LOCAL_MARGIN)


@dataclass
class AcpStats:
    """What ACP pruned in one forward call, per (batch, head).

    ``kept_tiles``/``causal_tiles``: tiles computed vs tiles a dense causal kernel computes;
    ``paper_kept_tiles``: what the paper's rule alone would compute (equal to ``kept_tiles`` under
    that rule); ``flops_done``/``flops_dense``: forward attention FLOPs (``4 D`` per computed score,
    QK^T and PV) at tile granularity; ``threshold``: the paper rule's delta (``None`` when dense);
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
    paper_kept_tiles: torch.Tensor | None = None

    @classmethod
    def from_plan(cls, plan: TilePlan, head_dim: int, threshold: torch.Tensor | None) -> "AcpStats":
        kept = plan.kept_tiles().long()
        causal = plan.causal_tiles().long()
        per_tile = 4 * head_dim * plan.block_m * plan.block_n
        return cls(kept, causal, kept * per_tile, causal * per_tile,
                   None if threshold is None else threshold.detach(), plan.block_m, plan.block_n, plan,
                   plan.paper_kept_tiles().long())

    @property
    def kept_fraction(self) -> float:
        causal = int(self.causal_tiles.sum())
        return int(self.kept_tiles.sum()) / causal if causal else 1.0

    @property
    def paper_kept_fraction(self) -> float:
        """Kept fraction under the paper's rule on the same call (the baseline of a tighter rule)."""
        kept = self.kept_tiles if self.paper_kept_tiles is None else self.paper_kept_tiles
        causal = int(self.causal_tiles.sum())
        return int(kept.sum()) / causal if causal else 1.0

    @property
    def flops_saved_fraction(self) -> float:
        dense = int(self.flops_dense.sum())
        return 1.0 - int(self.flops_done.sum()) / dense if dense else 0.0

    def summary(self) -> dict:
        return {
            "kept_fraction": self.kept_fraction,
            "paper_kept_fraction": self.paper_kept_fraction,
            "flops_saved_fraction": self.flops_saved_fraction,
            "flops_done": int(self.flops_done.sum()),
            "flops_dense": int(self.flops_dense.sum()),
        }
