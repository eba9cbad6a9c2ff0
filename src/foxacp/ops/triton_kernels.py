"""Triton kernels for forgetting attention with ACP tile pruning (kernels only; see triton_attention).

Notation. Query row ``r`` (0..Tq-1) sits at key position ``p = r + OFF`` (``OFF = Tk - Tq``) and sees
keys ``lo[p] <= j <= p`` (``lo = 0`` unless IS_VARLEN). Scores are kept in log2 units::

    s_rj = (sm_scale * q_r . k_j + c_p - c_j) * log2(e)

so ``exp2`` replaces ``exp``; ``lse`` is stored in the same units. Decays enter as
``(c - c_ref) * log2(e)`` with ``c_ref`` the decay at the program's first position, so large
cumulative decays lose no precision (the shift cancels in every score).

ACP (HAS_ACP). The plan is defined on ``PLAN_M x PLAN_N`` tiles (the forward tiles): plan tile
``(m, n)`` is kept iff ``DG[first query position of m] - DG[last key of n] >= delta`` with ``DG`` the
monotone float64 global decay. ``acp_tiles_kernel``, one tiny parallel pre-pass (one program per
plan tile, a vectorised count over the monotone ``DG``; no sequential scan), writes the first kept
key tile of every query tile and the end of the kept query tiles of every key tile; each
attention program then reads one int. The kernels' own blocks divide the plan tiles, so pruning
never cuts through a block. ``_query_block_keys`` and ``_key_block_queries`` are the single
source of the ranges for every kernel here; ``acp_bounds_kernel`` exposes them for tests.

dlog_fgate. Scores hold ``+c_p - c_j``, so ``dc = (row term at query positions) - (column term at
key positions)``: ``dc_p = sum_j dS_pj`` (bwd_dq_kernel, first) and ``dc_j -= sum_r dS_rj``
(bwd_dkdv_kernel, second). The row term is 0 in exact arithmetic, but ``Di = rowsum(dO * O)`` comes from the
rounded bf16/fp16 O, so each row of ``P * (dP - Di)`` sums to ``(true Di - Di)`` instead; the row
term is exactly that error and cancels it. Without it the reverse cumsum that turns dc into
dlog_fgate adds the row errors up over T (bf16: 6.7e-2 relative error on an H100 instead of < 1e-2).

Structure. Each attention kernel splits its range into three phases (masked edge, full blocks
without masks, masked edge) and runs one inner loop per phase. What a program holds is bundled in
small NamedTuples (:class:`QueryBlock`, :class:`KeySource`, :class:`KeyBlock`, ...) that the inner
loops take whole; Triton flattens them when it inlines the loops, so they cost nothing.
"""

from typing import NamedTuple

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
"""``log2(e)``: scores, decays and lse are kept in log2 units (``exp2`` instead of ``exp``); the
launchers fold it into ``qk_scale``."""
_LOG2E = tl.constexpr(LOG2E)  # the same number in the form @triton.jit code may read (a float global may not)


# ----------------------------------------------------------------------------- tile ranges


@triton.jit
def acp_tiles_kernel(DG, DELTA, ACP_KV, ACP_Q, stride_dgb, stride_dgh, stride_dgt, H, Tq, Tk, OFF,
                     NUM_QT, NUM_KT, PLAN_M: tl.constexpr, PLAN_N: tl.constexpr, SEARCH: tl.constexpr):
    """ACP pre-pass, one program per (plan tile, batch*head), all in parallel.

    ``ACP_KV[bh, m]``: the first key tile that query tile m keeps (plan tile n is kept iff
    ``DG[first query of m] - DG[last key of n] >= delta``; false on a prefix of n because DG is
    non-increasing, so counting the pruned tiles gives the index). ``ACP_Q[bh, n]``: one past the
    last query tile that keeps key tile n (true on a prefix of m). Same float64 arithmetic as
    :func:`foxacp.ops.acp.tile_bounds`, so the ranges agree exactly.
    """
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    DG += b.to(tl.int64) * stride_dgb + h * stride_dgh
    delta = tl.load(DELTA + bh).to(tl.float64)
    if t < NUM_QT:
        val = -tl.load(DG + (t * PLAN_M + OFF) * stride_dgt) + delta
        n_end = (tl.minimum(t * PLAN_M + PLAN_M, Tq) - 1 + OFF) // PLAN_N + 1  # causal key tiles
        pruned = 0
        for start in range(0, n_end, SEARCH):
            n = start + tl.arange(0, SEARCH)
            k_last = tl.minimum(n * PLAN_N + PLAN_N - 1, Tk - 1)
            e_k = -tl.load(DG + k_last.to(tl.int64) * stride_dgt, mask=n < n_end, other=0.0)
            pruned += tl.sum(((e_k < val) & (n < n_end)).to(tl.int32), axis=0)
        tl.store(ACP_KV + bh * NUM_QT + t, pruned)
    if t < NUM_KT:
        val = -tl.load(DG + tl.minimum(t * PLAN_N + PLAN_N - 1, Tk - 1) * stride_dgt) - delta
        kept = 0
        for start in range(0, NUM_QT, SEARCH):
            m = start + tl.arange(0, SEARCH)
            e_q = -tl.load(DG + (m * PLAN_M + OFF).to(tl.int64) * stride_dgt, mask=m < NUM_QT, other=0.0)
            kept += tl.sum(((e_q <= val) & (m < NUM_QT)).to(tl.int32), axis=0)
        tl.store(ACP_Q + bh * NUM_KT + t, kept)


@triton.jit
def local_first_kernel(Q, K, DG, LO, KMAX, DKEYS, OUT, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh,
                       stride_kt, stride_dgb, stride_dgh, stride_dgt, stride_lob, H, GROUP, Tq, Tk, OFF,
                       NUM_QT, NUM_KT, sm_scale, margin, log_eps,
                       HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr, PLAN_M: tl.constexpr,
                       PLAN_N: tl.constexpr, SEARCH: tl.constexpr, IS_VARLEN: tl.constexpr,
                       PRECISION: tl.constexpr):
    """The local ACP rule for one query tile (:func:`foxacp.ops.acp.local_kv_begin`): how many key
    tiles below the tile's diagonal it proves prunable. One program per (plan tile, batch*head).

    Phase 1, in blocks of ``ROWS`` rows: each row's local log-mass ``lambda`` (the log-sum-exp of
    ``sm_scale q . k + c_p - c_j`` over the visible keys among the ``ROWS - 1`` keys before its block
    and those up to the row, minus ``margin``), kept as the tile's minimum, and the tile's largest
    query norm. q and k are read once. Phase 2: count the key tiles n with ``Q K_n sm_scale +
    c[first query] + DKEYS[n] - lambda_min <= log_eps`` (``KMAX``, ``DKEYS``: the key-side bounds).
    NaN in q, k or the decays proves nothing (count 0).
    """
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    d = tl.arange(0, D_PAD)
    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    K += b.to(tl.int64) * stride_kb + kvh * stride_kh
    DG += b.to(tl.int64) * stride_dgb + h * stride_dgh
    LO += b.to(tl.int64) * stride_lob
    lam_min = float("inf")
    q_max = 0.0
    poisoned = 0
    tile_end = tl.minimum(m * PLAN_M + PLAN_M, Tq)
    for r0 in range(m * PLAN_M, tile_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)  # [ROWS]
        pos = rows + OFF
        first_col = r0 + OFF - (ROWS - 1)
        cols = first_col + tl.arange(0, 2 * ROWS)  # [2 ROWS]; the last one is past every row (masked)
        row_ok = rows < tile_end
        col_ok = (cols >= 0) & (cols < Tk)
        q = tl.load(Q + rows[:, None] * stride_qt + d[None, :], mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
                    other=0.0)  # [ROWS, D_PAD]
        k = tl.load(K + cols[:, None] * stride_kt + d[None, :], mask=col_ok[:, None] & (d[None, :] < HEAD_DIM),
                    other=0.0)  # [2 ROWS, D_PAD]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale  # [ROWS, 2 ROWS]
        ref = tl.load(DG + tl.maximum(first_col, 0) * stride_dgt)  # decays relative to the block's first key
        c_row = (tl.load(DG + tl.minimum(pos, Tk - 1) * stride_dgt) - ref).to(tl.float32)
        c_col = (tl.load(DG + tl.minimum(tl.maximum(cols, 0), Tk - 1) * stride_dgt) - ref).to(tl.float32)
        s += c_row[:, None] - c_col[None, :]
        visible = (cols[None, :] <= pos[:, None]) & col_ok[None, :] & row_ok[:, None]
        if IS_VARLEN:
            visible &= cols[None, :] >= tl.load(LO + tl.minimum(pos, Tk - 1))[:, None]
        poisoned += tl.sum(((s != s) & visible).to(tl.int32))
        s = tl.where(visible, s, float("-inf"))
        row_max = tl.max(s, 1)
        seen = row_max > float("-inf")
        row_max = tl.where(seen, row_max, 0.0)
        lam = row_max + tl.log(tl.sum(tl.exp(s - row_max[:, None]), 1)) - margin
        lam_min = tl.minimum(lam_min, tl.min(tl.where(seen, lam, float("inf")), 0))
        norms = tl.sqrt(tl.sum(q.to(tl.float32) * q.to(tl.float32), 1))
        poisoned += tl.sum((norms != norms).to(tl.int32))
        q_max = tl.maximum(q_max, tl.max(norms, 0))
    c_first = tl.load(DG + (m * PLAN_M + OFF) * stride_dgt)
    below = (m * PLAN_M + OFF) // PLAN_N  # key tiles strictly below the tile's first position
    count = 0
    for n0 in range(0, below, SEARCH):
        n = n0 + tl.arange(0, SEARCH)
        ok = n < below
        k_max = tl.load(KMAX + (b * (H // GROUP) + kvh).to(tl.int64) * NUM_KT + n, mask=ok, other=0.0)
        decayed = tl.load(DKEYS + bh.to(tl.int64) * NUM_KT + n, mask=ok, other=0.0)
        g = (q_max * k_max).to(tl.float64) * sm_scale + c_first + decayed - lam_min.to(tl.float64)
        count += tl.sum(((g <= log_eps) & ok).to(tl.int32), 0)
    tl.store(OUT + bh.to(tl.int64) * NUM_QT + m, tl.where(poisoned > 0, 0, count))


@triton.jit
def _query_block_keys(LO, acp_first, r0, Tq, OFF,
                      BLOCK_M: tl.constexpr, PLAN_M: tl.constexpr, PLAN_N: tl.constexpr,
                      IS_VARLEN: tl.constexpr, HAS_ACP: tl.constexpr):
    """Key columns ``[col_lo, col_hi)`` that query rows ``[r0, r0 + BLOCK_M)`` compute.

    Also returns ``lo_max``, the largest ``lo`` among the rows (keys at or above it are visible
    to every row up to the causal edge). ``LO`` already points at this batch; ``acp_first`` is
    ``ACP_KV[bh, r0 // PLAN_M]``, loaded by the caller before the q loads so that its latency
    overlaps them (it gates the first key loop).
    """
    r_last = tl.minimum(r0 + BLOCK_M, Tq) - 1
    p_first = r0 + OFF
    p_last = r_last + OFF
    col_hi = p_last + 1
    if IS_VARLEN:
        col_lo = tl.load(LO + p_first)
        lo_max = tl.load(LO + p_last)
    else:
        col_lo = p_first * 0
        lo_max = p_first * 0
    if HAS_ACP:  # first kept key tile of this block's plan tile (BLOCK_M divides PLAN_M)
        col_lo = tl.maximum(col_lo, acp_first * PLAN_N)
    return col_lo, col_hi, lo_max


@triton.jit
def _key_block_queries(LO, HI, ACP_Q, c0, Tq, Tk, OFF,
                       BLOCK_N: tl.constexpr, PLAN_M: tl.constexpr, PLAN_N: tl.constexpr,
                       IS_VARLEN: tl.constexpr, HAS_ACP: tl.constexpr):
    """Query rows ``[row_lo, row_hi)`` that use key columns ``[c0, c0 + BLOCK_N)``.

    Also returns ``[full_lo, full_hi)``: rows that see every column of the block (no mask).
    """
    c_last = tl.minimum(c0 + BLOCK_N, Tk) - 1
    row_lo = tl.maximum(c0 - OFF, 0)
    row_hi = Tq + c0 * 0
    full_lo = tl.maximum(c_last - OFF, 0)
    full_hi = Tq + c0 * 0
    full_lo = tl.where(c0 + BLOCK_N > Tk, Tq, full_lo)  # a partial block always takes the masked path
    if IS_VARLEN:
        hi_last = tl.load(HI + c_last)
        row_hi = tl.minimum(row_hi, hi_last - OFF + 1)
        row_hi = tl.where(tl.load(LO + hi_last) > c_last, row_lo, row_hi)  # all keys are padding
        hi_first = tl.load(HI + c0)
        # rows after c0's sequence start after c0 (lo > c0); padding keys are seen by no one
        full_hi = tl.where(tl.load(LO + hi_first) > c0, 0, tl.minimum(full_hi, hi_first - OFF + 1))
    if HAS_ACP:  # query tiles keeping this block's plan tile end here (BLOCK_N divides PLAN_N)
        row_hi = tl.minimum(row_hi, tl.load(ACP_Q + c0 // PLAN_N) * PLAN_M)
    return row_lo, row_hi, full_lo, full_hi


@triton.jit
def _whole_key_blocks(col_lo, col_hi, lo_max, p_first, BLOCK_N: tl.constexpr):
    """:func:`_query_block_keys`' columns in whole BLOCK_N blocks from ``col_lo`` for rows from key
    position ``p_first``: ``(col_lo, full_start, full_end)``, the phases ``[col_lo, full_start)``
    masked (some row's ``lo`` is inside), ``[full_start, full_end)`` blocks every row sees whole (no
    masks) and ``[full_end, col_hi)`` masked (the causal edge)."""
    col_lo = col_lo // BLOCK_N * BLOCK_N
    full_start = tl.minimum(tl.maximum((lo_max + BLOCK_N - 1) // BLOCK_N * BLOCK_N, col_lo), col_hi)
    full_end = tl.maximum(tl.minimum((p_first + 1) // BLOCK_N * BLOCK_N, col_hi), full_start)
    return col_lo, full_start, full_end


@triton.jit
def _whole_row_blocks(row_lo, row_hi, full_lo, full_hi, BLOCK_M: tl.constexpr):
    """:func:`_key_block_queries`' rows in whole BLOCK_M blocks from ``row_lo``: ``(row_lo,
    full_start, full_end)``, the phases ``[row_lo, full_start)`` masked (the causal edge),
    ``[full_start, full_end)`` rows that see every column (no masks) and ``[full_end, row_hi)``
    masked (rows of other sequences)."""
    row_lo = row_lo // BLOCK_M * BLOCK_M
    full_start = tl.minimum(tl.maximum((full_lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M, row_lo),
                            tl.maximum(row_hi, row_lo))
    full_end = tl.maximum(tl.minimum(full_hi // BLOCK_M * BLOCK_M, row_hi), full_start)
    return row_lo, full_start, full_end


@triton.jit
def acp_bounds_kernel(LO, HI, ACP_KV, ACP_Q, KV_LO, KV_HI, Q_LO, Q_HI, stride_lob, H, Tq, Tk, OFF,
                      NUM_QT, NUM_KT, PLAN_M: tl.constexpr, PLAN_N: tl.constexpr,
                      IS_VARLEN: tl.constexpr, HAS_ACP: tl.constexpr):
    """Element ranges of every plan tile, as the attention kernels compute them (debug / stats)."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    LO += b * stride_lob
    HI += b * stride_lob
    if t < NUM_QT:
        acp_first = tl.load(ACP_KV + bh * NUM_QT + t) if HAS_ACP else 0
        col_lo, col_hi, _ = _query_block_keys(LO, acp_first, t * PLAN_M, Tq, OFF, BLOCK_M=PLAN_M, PLAN_M=PLAN_M,
                                              PLAN_N=PLAN_N, IS_VARLEN=IS_VARLEN, HAS_ACP=HAS_ACP)
        tl.store(KV_LO + bh * NUM_QT + t, col_lo)
        tl.store(KV_HI + bh * NUM_QT + t, col_hi)
    if t < NUM_KT:
        row_lo, row_hi, _, _ = _key_block_queries(LO, HI, ACP_Q + bh * NUM_KT, t * PLAN_N, Tq, Tk, OFF,
                                                  BLOCK_N=PLAN_N, PLAN_M=PLAN_M, PLAN_N=PLAN_N,
                                                  IS_VARLEN=IS_VARLEN, HAS_ACP=HAS_ACP)
        tl.store(Q_LO + bh * NUM_KT + t, row_lo)
        tl.store(Q_HI + bh * NUM_KT + t, row_hi)


# ----------------------------------------------------------------------------- loads


@triton.jit
def _tma_block(DESC, b, h, start, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """Rows ``[start, start + BLOCK)`` of head ``(b, h)`` through a host tensor descriptor over a
    ``(B, H, T, D)`` tensor with block ``[1, 1, BLOCK, D_PAD]`` (TMA; zero outside T and D)."""
    return DESC.load([b, h, start, 0]).reshape(BLOCK, D_PAD)


# ----------------------------------------------------------------------------- launch order


@triton.jit
def _longest_first(pid, num_blocks, num_heads, HEADS_PER_GROUP: tl.constexpr):
    """``(query block, head)`` of forward program ``pid``: HEADS_PER_GROUP heads at a time, inside
    a group the last (longest, causal) query blocks first, heads fastest.

    GPUs start programs in ``pid`` order: running the longest programs first leaves short ones for
    the end (less tail with idle SMs), and one group of heads at a time keeps their K/V in L2.
    Measured on an H100 against the plain ``(block, head)`` grid (kernel-notes attempt 15):
    forward -2..-5% at 8k-16k, 4 heads per group better than 1 or 16; the same order made both
    backward kernels 5-20% slower, so they keep the plain grid.
    """
    group = pid // (HEADS_PER_GROUP * num_blocks)
    r = pid - group * HEADS_PER_GROUP * num_blocks
    width = tl.minimum(HEADS_PER_GROUP, num_heads - group * HEADS_PER_GROUP)
    block = r // width
    return num_blocks - 1 - block, group * HEADS_PER_GROUP + r - block * width


# ----------------------------------------------------------------------------- query blocks (forward, dQ)


class QueryBlock(NamedTuple):
    """Query rows ``[r0, r0 + BLOCK_M)`` of one (batch, head), as a forward or dQ program holds them."""
    rows: tl.tensor  # [BLOCK_M] row indices r
    row_ok: tl.tensor  # [BLOCK_M] r < Tq
    pos: tl.tensor  # [BLOCK_M] key position of each row, r + OFF
    lo: tl.tensor  # [BLOCK_M] first key each row sees (0 unless IS_VARLEN)
    offs_d: tl.tensor  # [D_PAD]
    q: tl.tensor  # [BLOCK_M, D_PAD]
    c_ref: tl.tensor  # decay at the block's first position (subtracted from every decay: precision)
    cq: tl.tensor  # [BLOCK_M] the rows' decay term (c_p - c_ref) * log2(e)


class KeySource(NamedTuple):
    """Where a forward or dQ program reads its keys: ``K``, ``V`` at its (batch, kv head), ``C`` (the
    cumulative decay) at its (batch, head), their strides along the position; keys ``>= Tk`` are masked."""
    K: tl.tensor
    V: tl.tensor
    C: tl.tensor
    stride_kt: tl.tensor
    stride_vt: tl.tensor
    stride_ct: tl.tensor
    Tk: tl.tensor


@triton.jit
def _query_block(Q, C, ACP_KV, LO, r0, stride_qt, stride_ct, Tq, OFF,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PLAN_M: tl.constexpr, PLAN_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_ACP: tl.constexpr):
    """Load query rows ``[r0, r0 + BLOCK_M)`` and split the key columns they compute into phases.

    ``Q``, ``C``, ``ACP_KV`` and ``LO`` already point at the program's (batch, head). Returns the
    :class:`QueryBlock` and the bounds of three phases, in whole BLOCK_N blocks:
    ``[col_lo, full_start)`` masked (keys below some row's ``lo``), ``[full_start, full_end)``
    blocks every row sees whole (no masks), ``[full_end, col_hi)`` masked (the causal edge).
    """
    acp_first = tl.load(ACP_KV + r0 // PLAN_M) if HAS_ACP else 0  # first, so its latency overlaps q's
    rows = r0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = rows < Tq
    pos_q = rows + OFF
    q_ptrs = Q + rows[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_M, D]
    c_ref = tl.load(C + (r0 + OFF) * stride_ct)
    cq = (tl.load(C + pos_q * stride_ct, mask=row_ok, other=0.0) - c_ref) * _LOG2E  # [BLOCK_M]
    col_lo, col_hi, lo_max = _query_block_keys(LO, acp_first, r0, Tq, OFF, BLOCK_M=BLOCK_M, PLAN_M=PLAN_M,
                                               PLAN_N=PLAN_N, IS_VARLEN=IS_VARLEN, HAS_ACP=HAS_ACP)
    col_lo, full_start, full_end = _whole_key_blocks(col_lo, col_hi, lo_max, r0 + OFF, BLOCK_N)
    if IS_VARLEN:
        lo_q = tl.load(LO + pos_q, mask=row_ok, other=0)
    else:
        lo_q = rows * 0
    return QueryBlock(rows, row_ok, pos_q, lo_q, offs_d, q, c_ref, cq), col_lo, full_start, full_end, col_hi


# ----------------------------------------------------------------------------- forward


class TmaKeys(NamedTuple):
    """The forward's host tensor descriptors over K and V, and the (batch, kv head) read through them."""
    K_DESC: tl.tensor
    V_DESC: tl.tensor
    b: tl.tensor
    h: tl.tensor


@triton.jit
def _fwd_inner(acc, l_i, m_i, query, keys, tma, col_start, col_end, qk_scale,
               MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_VARLEN: tl.constexpr, EVEN_D: tl.constexpr, ADVANCE: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax of a :class:`QueryBlock` over key blocks ``[col_start, col_end)`` of
    :class:`KeySource` ``keys``; MASKED applies causal/lo masks.

    Scores here omit the per-row decay ``c_p``: a row constant cancels in the softmax, so each
    element costs one FMA for the decay (``qk * scale - c_j``); the caller adds it to the lse.
    ADVANCE: pointers step by a block per iteration instead of being recomputed from the index.
    With a start read from memory (ACP) the recomputed addresses cost ~47 more instructions per
    step of the full-block loop at D=64 (697 vs 650, sm_90 SASS); advancing removes them (633).
    Measured (H100, 3 reps): ACP forward -2..-4% at D=64, +4% at D=128, dense unchanged; so the
    caller sets it for the ACP variant at head dims <= 64 only (kernel-notes attempt 8).
    USE_TMA: K and V blocks come through the :class:`TmaKeys` descriptors (Hopper's bulk copy
    engine; zero outside ``[Tk, HEAD_DIM]``, so no masks) instead of per-thread loads.
    """
    q, pos_q, lo_q, offs_d, c_ref = query.q, query.pos, query.lo, query.offs_d, query.c_ref
    K, V, C, Tk = keys.K, keys.V, keys.C, keys.Tk
    stride_kt, stride_vt, stride_ct = keys.stride_kt, keys.stride_vt, keys.stride_ct
    c_ptrs0 = C + (col_start + tl.arange(0, BLOCK_N)) * stride_ct
    k_ptrs0 = K + (col_start + tl.arange(0, BLOCK_N))[None, :] * stride_kt + offs_d[:, None]
    v_ptrs0 = V + (col_start + tl.arange(0, BLOCK_N))[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(col_start, col_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if ADVANCE:
            k_ptrs = k_ptrs0
            v_ptrs = v_ptrs0
            c_ptrs = c_ptrs0
        else:
            k_ptrs = K + cols[None, :] * stride_kt + offs_d[:, None]  # [D, BLOCK_N]
            v_ptrs = V + cols[:, None] * stride_vt + offs_d[None, :]  # [BLOCK_N, D]
            c_ptrs = C + cols * stride_ct
        if USE_TMA:
            kt = tl.trans(_tma_block(tma.K_DESC, tma.b, tma.h, start_n, BLOCK_N, offs_d.shape[0]))
            ck = tl.load(c_ptrs, mask=cols < Tk, other=0.0) if MASKED else tl.load(c_ptrs)
        elif MASKED:
            kt = tl.load(k_ptrs, mask=(cols[None, :] < Tk) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            ck = tl.load(c_ptrs, mask=cols < Tk, other=0.0)
        elif EVEN_D:
            kt = tl.load(k_ptrs)
            ck = tl.load(c_ptrs)
        else:
            kt = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            ck = tl.load(c_ptrs)
        ck = (ck - c_ref) * _LOG2E  # [BLOCK_N], log2 units
        # scores in log2 units without the row term: s = scale*log2e*q.k - c_j*log2e   # [BLOCK_M, BLOCK_N]
        s = tl.dot(q, kt) * qk_scale - ck[None, :]
        if MASKED:
            visible = cols[None, :] <= pos_q[:, None]
            if IS_VARLEN:
                visible = visible & (cols[None, :] >= lo_q[:, None])
            s = tl.where(visible, s, float("-inf"))
        # new running max; rows that have seen nothing yet keep -inf and use 0 as the pivot
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2(m_i - m_use)  # rescale of the old accumulator
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = _tma_block(tma.V_DESC, tma.b, tma.h, start_n, BLOCK_N, offs_d.shape[0])
        elif MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # [BLOCK_M, D]
        m_i = m_new
        if ADVANCE:
            k_ptrs0 += BLOCK_N * stride_kt
            v_ptrs0 += BLOCK_N * stride_vt
            c_ptrs0 += BLOCK_N * stride_ct
    return acc, l_i, m_i


@triton.jit
def fwd_kernel(Q, K, V, C, ACP_KV, LO, OUT, LSE, ACC_PART, ML_PART, K_DESC, V_DESC,
               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
               stride_vb, stride_vh, stride_vt, stride_cb, stride_ch, stride_ct, stride_lob,
               stride_ob, stride_oh, stride_ot,
               H, GROUP, Tq, Tk, OFF, NUM_QT, qk_scale,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               PLAN_M: tl.constexpr, PLAN_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
               IS_VARLEN: tl.constexpr, HAS_ACP: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr,
               HEADS_PER_GROUP: tl.constexpr):
    """One program per (query block, batch*head, key split). NUM_SPLITS > 1: flash-decoding partials."""
    pid_m, bh = _longest_first(tl.program_id(0), tl.cdiv(Tq, BLOCK_M), tl.num_programs(0) // tl.cdiv(Tq, BLOCK_M),
                               HEADS_PER_GROUP)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    Q += b64 * stride_qb + h * stride_qh
    K += b64 * stride_kb + hk * stride_kh
    V += b64 * stride_vb + hk * stride_vh
    C += b64 * stride_cb + h * stride_ch
    ACP_KV += bh * NUM_QT
    LO += b * stride_lob
    OUT += b64 * stride_ob + h * stride_oh

    query, col_lo, full_start, full_end, col_hi = _query_block(
        Q, C, ACP_KV, LO, pid_m * BLOCK_M, stride_qt, stride_ct, Tq, OFF, HEAD_DIM=HEAD_DIM, D_PAD=D_PAD,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PLAN_M=PLAN_M, PLAN_N=PLAN_N, IS_VARLEN=IS_VARLEN, HAS_ACP=HAS_ACP)
    if NUM_SPLITS > 1:  # this program takes an equal share of the key blocks
        n_blocks = tl.maximum(col_hi - col_lo + BLOCK_N - 1, 0) // BLOCK_N
        per_split = (n_blocks + NUM_SPLITS - 1) // NUM_SPLITS
        my_lo = tl.minimum(col_lo + split * per_split * BLOCK_N, col_hi)
        my_hi = tl.minimum(my_lo + per_split * BLOCK_N, col_hi)
    else:
        my_lo = col_lo
        my_hi = col_hi

    keys = KeySource(K, V, C, stride_kt, stride_vt, stride_ct, Tk)
    tma = TmaKeys(K_DESC, V_DESC, b, hk)
    ADVANCE: tl.constexpr = HAS_ACP and D_PAD <= 64 and not USE_TMA  # measured: see _fwd_inner
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    # full blocks first (no masks), then the masked edges below and above them
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, query, keys, tma, tl.maximum(full_start, my_lo),
                               tl.minimum(full_end, my_hi), qk_scale, MASKED=False, HEAD_DIM=HEAD_DIM,
                               BLOCK_N=BLOCK_N, IS_VARLEN=IS_VARLEN, EVEN_D=EVEN_D, ADVANCE=ADVANCE, USE_TMA=USE_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, query, keys, tma, tl.maximum(col_lo, my_lo),
                               tl.minimum(full_start, my_hi), qk_scale, MASKED=True, HEAD_DIM=HEAD_DIM,
                               BLOCK_N=BLOCK_N, IS_VARLEN=IS_VARLEN, EVEN_D=EVEN_D, ADVANCE=ADVANCE, USE_TMA=USE_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, query, keys, tma, tl.maximum(full_end, my_lo),
                               tl.minimum(col_hi, my_hi), qk_scale, MASKED=True, HEAD_DIM=HEAD_DIM,
                               BLOCK_N=BLOCK_N, IS_VARLEN=IS_VARLEN, EVEN_D=EVEN_D, ADVANCE=ADVANCE, USE_TMA=USE_TMA)

    m_i = m_i + query.cq  # the row's decay term, left out of the scores above
    rows, row_ok, offs_d = query.rows, query.row_ok, query.offs_d
    if NUM_SPLITS > 1:
        # partial results: unnormalised acc, running max and sum (combined by combine_kernel)
        part = (split * (tl.num_programs(0) // tl.cdiv(Tq, BLOCK_M)) + bh).to(tl.int64) * Tq
        tl.store(ACC_PART + (part + rows[:, None]) * D_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(ML_PART + (part + rows) * 2, m_i, mask=row_ok)
        tl.store(ML_PART + (part + rows) * 2 + 1, l_i, mask=row_ok)
    else:
        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        o_ptrs = OUT + rows[:, None] * stride_ot + offs_d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
        # log-sum-exp in log2 units; +inf for rows that see no key so that backward gives P = 0
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
        tl.store(LSE + bh.to(tl.int64) * Tq + rows, lse, mask=row_ok)


@triton.jit
def combine_kernel(ACC_PART, ML_PART, OUT, LSE, stride_ob, stride_oh, stride_ot, H, Tq,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Merge the key splits of the decoding forward: rescale each partial to the common max."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = rows < Tq
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        part = (s * tl.num_programs(1) + bh).to(tl.int64) * Tq
        m_s = tl.load(ML_PART + (part + rows) * 2, mask=row_ok, other=float("-inf"))
        l_s = tl.load(ML_PART + (part + rows) * 2 + 1, mask=row_ok, other=0.0)
        a_s = tl.load(ACC_PART + (part + rows[:, None]) * D_PAD + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        beta = tl.math.exp2(m_s - m_use)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = OUT + b.to(tl.int64) * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * Tq + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward


class KeyBlock(NamedTuple):
    """Key columns ``[c0, c0 + BLOCK_N)`` of one (batch, head), loaded once by a dK/dV program."""
    cols: tl.tensor  # [BLOCK_N] key positions j
    offs_d: tl.tensor  # [D_PAD]
    k: tl.tensor  # [BLOCK_N, D_PAD]
    v: tl.tensor  # [BLOCK_N, D_PAD]
    c_ref: tl.tensor  # decay at the block's first column (subtracted from every decay: precision)
    ck: tl.tensor  # [BLOCK_N] the columns' decay term (c_j - c_ref) * log2(e)


class QuerySource(NamedTuple):
    """Where a dK/dV program reads its queries: ``Q``, ``DO`` and ``C`` at its (batch, query head),
    ``LSE`` and ``DI`` at its row, ``LO`` at its batch; query rows ``>= Tq`` are masked, row r sits
    at key position ``r + OFF``."""
    Q: tl.tensor
    DO: tl.tensor
    C: tl.tensor
    LSE: tl.tensor
    DI: tl.tensor
    LO: tl.tensor
    stride_qt: tl.tensor
    stride_dot: tl.tensor
    stride_ct: tl.tensor
    Tq: tl.tensor
    OFF: tl.tensor


@triton.jit
def _dkdv_inner(dk, dv, dc, block, queries, row_start, row_end, qk_scale,
                MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                IS_VARLEN: tl.constexpr, EVEN_D: tl.constexpr):
    """Accumulate dK, dV, dc of a :class:`KeyBlock` over query blocks ``[row_start, row_end)`` of
    :class:`QuerySource` ``queries``; MASKED applies causal/lo masks."""
    k, v, ck, cols, c_ref, offs_d = block.k, block.v, block.ck, block.cols, block.c_ref, block.offs_d
    Q, DO, C, LSE, DI, LO = queries.Q, queries.DO, queries.C, queries.LSE, queries.DI, queries.LO
    stride_qt, stride_dot, stride_ct = queries.stride_qt, queries.stride_dot, queries.stride_ct
    Tq, OFF = queries.Tq, queries.OFF
    for start_m in range(row_start, row_end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        pos = rows + OFF
        qt_ptrs = Q + rows[None, :] * stride_qt + offs_d[:, None]  # [D, BLOCK_M]
        do_ptrs = DO + rows[:, None] * stride_dot + offs_d[None, :]  # [BLOCK_M, D]
        if MASKED:
            row_ok = rows < Tq
            qt = tl.load(qt_ptrs, mask=row_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
            di = tl.load(DI + rows, mask=row_ok, other=0.0)
            cq = tl.load(C + pos * stride_ct, mask=row_ok, other=0.0)
        else:
            if EVEN_D:
                qt = tl.load(qt_ptrs)
                do = tl.load(do_ptrs)
            else:
                qt = tl.load(qt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            lse = tl.load(LSE + rows)
            di = tl.load(DI + rows)
            cq = tl.load(C + pos * stride_ct)
        lse = lse - (cq - c_ref) * _LOG2E  # fold the row's decay term into its lse
        # transposed P^T[j, r] = exp2(s_rj - lse_r), s in log2 units   # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(tl.dot(k, qt) * qk_scale - ck[:, None] - lse[None, :])
        if MASKED:
            visible = cols[:, None] <= pos[None, :]
            if IS_VARLEN:
                lo_r = tl.load(LO + pos, mask=rows < Tq, other=0)
                visible = visible & (cols[:, None] >= lo_r[None, :])
            pt = tl.where(visible, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)  # dV += P^T dO
        dpt = tl.dot(v, tl.trans(do))  # dP^T = V dO^T   # [BLOCK_N, BLOCK_M]
        dst = pt * (dpt - di[None, :])  # dS^T = P^T * (dP^T - Di)
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)  # dK += dS^T Q (sm_scale applied at the end)
        dc -= tl.sum(dst, 1)  # dc_j = -sum_r dS_rj
    return dk, dv, dc


@triton.jit
def bwd_dkdv_kernel(Q, K, V, C, ACP_Q, LO, HI, DO, LSE, DI, DK, DV, DC,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_cb, stride_ch, stride_ct, stride_lob,
                    stride_dob, stride_doh, stride_dot,
                    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                    stride_dcb, stride_dch, stride_dct,
                    H, GROUP, Tq, Tk, OFF, NUM_KT, sm_scale, qk_scale,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PLAN_M: tl.constexpr, PLAN_N: tl.constexpr,
                    IS_VARLEN: tl.constexpr, HAS_ACP: tl.constexpr, EVEN_D: tl.constexpr):
    """One program per (key block, batch * query head h): dK, dV of its key block from head h's
    queries, stored at head h of ``DK``/``DV`` (the kv head's gradients when GROUP = 1, else
    partials that group_sum_kernel adds up over the GQA group: kernel-notes attempt 19).

    Runs after bwd_dq_kernel, which wrote ``DI`` and the query-side dc term into ``DC``; adds the
    key-side term ``-sum_r dS_rj`` (each (head, position) belongs to one program: race-free)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    c0 = pid_n * BLOCK_N
    cols = c0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    col_ok = cols < Tk
    kv_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b64 * stride_kb + hk * stride_kh + cols[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [BLOCK_N, D]
    v = tl.load(V + b64 * stride_vb + hk * stride_vh + cols[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [BLOCK_N, D]
    LO += b * stride_lob
    HI += b * stride_lob
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    Q += b64 * stride_qb + h * stride_qh
    DO += b64 * stride_dob + h * stride_doh
    C += b64 * stride_cb + h * stride_ch
    LSE += bh.to(tl.int64) * Tq
    DI += bh.to(tl.int64) * Tq
    row_lo, row_hi, full_lo, full_hi = _key_block_queries(LO, HI, ACP_Q + bh * NUM_KT, c0, Tq, Tk, OFF,
                                                          BLOCK_N=BLOCK_N, PLAN_M=PLAN_M, PLAN_N=PLAN_N,
                                                          IS_VARLEN=IS_VARLEN, HAS_ACP=HAS_ACP)
    row_lo, full_start, full_end = _whole_row_blocks(row_lo, row_hi, full_lo, full_hi, BLOCK_M)
    c_ref = tl.load(C + tl.minimum(c0, Tk - 1) * stride_ct)
    ck = tl.load(C + cols * stride_ct, mask=col_ok, other=0.0)
    ck = (ck - c_ref) * _LOG2E  # [BLOCK_N]
    dc = tl.zeros([BLOCK_N], dtype=tl.float32)
    block = KeyBlock(cols, offs_d, k, v, c_ref, ck)
    queries = QuerySource(Q, DO, C, LSE, DI, LO, stride_qt, stride_dot, stride_ct, Tq, OFF)
    # full blocks first (no masks), then the masked edges below and above them
    dk, dv, dc = _dkdv_inner(dk, dv, dc, block, queries, full_start, full_end, qk_scale, MASKED=False,
                             HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, IS_VARLEN=IS_VARLEN, EVEN_D=EVEN_D)
    dk, dv, dc = _dkdv_inner(dk, dv, dc, block, queries, row_lo, full_start, qk_scale, MASKED=True,
                             HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, IS_VARLEN=IS_VARLEN, EVEN_D=EVEN_D)
    dk, dv, dc = _dkdv_inner(dk, dv, dc, block, queries, full_end, row_hi, qk_scale, MASKED=True,
                             HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, IS_VARLEN=IS_VARLEN, EVEN_D=EVEN_D)
    dc_ptrs = DC + b64 * stride_dcb + h * stride_dch + cols * stride_dct  # + the query-side term (dQ kernel)
    tl.store(dc_ptrs, tl.load(dc_ptrs, mask=col_ok, other=0.0) + dc, mask=col_ok)
    dk_ptrs = DK + b64 * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + b64 * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def group_sum_kernel(PK, PV, DK, DV, stride_pb, stride_ph, stride_pt,
                     stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt, HKV, GROUP, Tk,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """GQA: ``dK[b, hk] = sum_g PK[b, hk * GROUP + g]`` (float32 partials of bwd_dkdv_kernel), and
    the same for dV; one program per (position block, batch * kv head)."""
    pid_t = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D_PAD)
    mask = (rows[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
    part = b * stride_pb + rows[:, None] * stride_pt + offs_d[None, :]
    dk = tl.zeros([BLOCK_T, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_T, D_PAD], dtype=tl.float32)
    for g in range(GROUP):
        head = (hk * GROUP + g) * stride_ph
        dk += tl.load(PK + part + head, mask=mask, other=0.0)
        dv += tl.load(PV + part + head, mask=mask, other=0.0)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + rows[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + rows[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_inner(dq, dcq, query, do, lse, di, keys, col_start, col_end, qk_scale,
              MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_VARLEN: tl.constexpr, EVEN_D: tl.constexpr, ADVANCE: tl.constexpr):
    """Accumulate dQ and the row sums of dS (query-side dc term) of a :class:`QueryBlock` over key
    blocks ``[col_start, col_end)`` of :class:`KeySource` ``keys``; MASKED applies causal/lo masks.

    ADVANCE: pointers step by a block per iteration (as in ``_fwd_inner``), for a start read from
    memory (ACP), where ptxas otherwise recomputes the addresses in every step."""
    q, pos_q, lo_q, offs_d, c_ref = query.q, query.pos, query.lo, query.offs_d, query.c_ref
    K, V, C, Tk = keys.K, keys.V, keys.C, keys.Tk
    stride_kt, stride_vt, stride_ct = keys.stride_kt, keys.stride_vt, keys.stride_ct
    if ADVANCE:
        kt_ptrs0 = K + (col_start + tl.arange(0, BLOCK_N))[None, :] * stride_kt + offs_d[:, None]
        vt_ptrs0 = V + (col_start + tl.arange(0, BLOCK_N))[None, :] * stride_vt + offs_d[:, None]
        c_ptrs0 = C + (col_start + tl.arange(0, BLOCK_N)) * stride_ct
    for start_n in range(col_start, col_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if ADVANCE:
            kt_ptrs = kt_ptrs0
            vt_ptrs = vt_ptrs0
        else:
            kt_ptrs = K + cols[None, :] * stride_kt + offs_d[:, None]  # [D, BLOCK_N]
            vt_ptrs = V + cols[None, :] * stride_vt + offs_d[:, None]  # [D, BLOCK_N]
        if MASKED:
            m = (cols[None, :] < Tk) & (offs_d[:, None] < HEAD_DIM)
            kt = tl.load(kt_ptrs, mask=m, other=0.0)
            vt = tl.load(vt_ptrs, mask=m, other=0.0)
            ck = tl.load(c_ptrs0 if ADVANCE else C + cols * stride_ct, mask=cols < Tk, other=0.0)
        elif EVEN_D:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
            ck = tl.load(c_ptrs0 if ADVANCE else C + cols * stride_ct)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            vt = tl.load(vt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            ck = tl.load(c_ptrs0 if ADVANCE else C + cols * stride_ct)
        ck = (ck - c_ref) * _LOG2E
        # P = exp2(s - lse), the row's decay term folded into lse by the caller   # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(tl.dot(q, kt) * qk_scale - ck[None, :] - lse[:, None])
        if MASKED:
            visible = cols[None, :] <= pos_q[:, None]
            if IS_VARLEN:
                visible = visible & (cols[None, :] >= lo_q[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt)  # dP = dO V^T
        ds = p * (dp - di[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)  # dQ += dS K (sm_scale applied at the end)
        dcq += tl.sum(ds, 1)  # query-side dc term: cancels the rounding of Di (see bwd_dq_kernel)
        if ADVANCE:
            kt_ptrs0 += BLOCK_N * stride_kt
            vt_ptrs0 += BLOCK_N * stride_vt
            c_ptrs0 += BLOCK_N * stride_ct
    return dq, dcq


@triton.jit
def bwd_dq_kernel(Q, K, V, C, ACP_KV, LO, OUT, DO, LSE, DI, DQ, DC,
                  stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                  stride_vb, stride_vh, stride_vt, stride_cb, stride_ch, stride_ct, stride_lob,
                  stride_ob, stride_oh, stride_ot,
                  stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
                  stride_dcb, stride_dch, stride_dct,
                  H, GROUP, Tq, Tk, OFF, NUM_QT, sm_scale, qk_scale,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PLAN_M: tl.constexpr, PLAN_N: tl.constexpr,
                  IS_VARLEN: tl.constexpr, HAS_ACP: tl.constexpr, EVEN_D: tl.constexpr):
    """One program per (query block, batch*head); the first backward kernel.

    Computes its rows' ``Di = rowsum(dO * O)`` (``= sum_j P_rj dP_rj``) and stores it for
    bwd_dkdv_kernel (no separate preprocessing launch). Besides dQ it writes the query-side term
    ``sum_j dS_rj`` to ``DC`` at the rows' positions (bwd_dkdv_kernel then adds the key-side
    ``-sum_r dS_rj``). Mathematically that term is 0 (each row of dS sums to zero over the computed
    keys); numerically it is exactly the error of ``Di``, computed from the rounded (bf16/fp16) O,
    and adding it cancels that error, which the reverse cumsum turning dc into dlog_fgate would
    otherwise accumulate over T.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    Q += b64 * stride_qb + h * stride_qh
    DO += b64 * stride_dob + h * stride_doh
    K += b64 * stride_kb + hk * stride_kh
    V += b64 * stride_vb + hk * stride_vh
    C += b64 * stride_cb + h * stride_ch
    ACP_KV += bh * NUM_QT
    LO += b * stride_lob
    LSE += bh.to(tl.int64) * Tq
    DI += bh.to(tl.int64) * Tq

    query, col_lo, full_start, full_end, col_hi = _query_block(
        Q, C, ACP_KV, LO, pid_m * BLOCK_M, stride_qt, stride_ct, Tq, OFF, HEAD_DIM=HEAD_DIM, D_PAD=D_PAD,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PLAN_M=PLAN_M, PLAN_N=PLAN_N, IS_VARLEN=IS_VARLEN, HAS_ACP=HAS_ACP)
    rows, row_ok, offs_d = query.rows, query.row_ok, query.offs_d
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    do = tl.load(DO + rows[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)  # [BLOCK_M, D]
    o = tl.load(OUT + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    di = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DI + rows, di, mask=row_ok)
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
    lse = lse - query.cq  # the row's decay term, folded into its lse
    keys = KeySource(K, V, C, stride_kt, stride_vt, stride_ct, Tk)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dcq = tl.zeros([BLOCK_M], dtype=tl.float32)
    # full blocks first (no masks, pointers advanced with ACP: see _dq_inner), then the masked edges
    dq, dcq = _dq_inner(dq, dcq, query, do, lse, di, keys, full_start, full_end, qk_scale, MASKED=False,
                        HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, IS_VARLEN=IS_VARLEN, EVEN_D=EVEN_D, ADVANCE=HAS_ACP)
    dq, dcq = _dq_inner(dq, dcq, query, do, lse, di, keys, col_lo, full_start, qk_scale, MASKED=True,
                        HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, IS_VARLEN=IS_VARLEN, EVEN_D=EVEN_D, ADVANCE=False)
    dq, dcq = _dq_inner(dq, dcq, query, do, lse, di, keys, full_end, col_hi, qk_scale, MASKED=True,
                        HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, IS_VARLEN=IS_VARLEN, EVEN_D=EVEN_D, ADVANCE=False)
    dq_ptrs = DQ + b64 * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)
    # the query-side dc term at the rows' positions (bwd_dkdv_kernel adds the key-side term)
    tl.store(DC + b64 * stride_dcb + h * stride_dch + query.pos * stride_dct, dcq, mask=row_ok)


# ----------------------------------------------------------------------------- ACP data threshold


@triton.jit
def row_norm_max_kernel(Q, K, PART, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        H, HKV, Tq, Tk, NUM_CHUNKS,
                        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr):
    """Largest squared row norm of q (programs ``bh < B*H``) or k (the rest) over ``CHUNK`` rows.

    ``PART[idx, chunk]`` float32, idx over ``B*H`` q heads then ``B*HKV`` k heads; reads q and k in
    their memory layout (usually ``(B, T, H, D)``), each element once.
    """
    chunk = tl.program_id(0)
    idx = tl.program_id(1)
    n_q = tl.num_programs(1) // (H + HKV) * H  # B*H
    if idx < n_q:
        b = idx // H
        h = idx % H
        base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        stride_t = stride_qt
        T = Tq
    else:
        b = (idx - n_q) // HKV
        h = (idx - n_q) % HKV
        base = K + b.to(tl.int64) * stride_kb + h * stride_kh
        stride_t = stride_kt
        T = Tk
    offs_d = tl.arange(0, D_PAD)
    best = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        x = tl.load(base + rows[:, None].to(tl.int64) * stride_t + offs_d[None, :],
                    mask=(rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
        best = tl.maximum(best, tl.sum(x * x, 1))
    tl.store(PART + idx * NUM_CHUNKS + chunk, tl.max(best, 0))


@triton.jit
def data_threshold_kernel(PART, DELTA, H, HKV, NUM_CHUNKS, sm_scale, offset,
                          GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """``DELTA[b, h] = -2 * max|q| * max|k| * sm_scale + offset`` (max|q| over h's GQA group),
    ``offset = log_eps - ln(seq_len)``; one program per (batch, kv head)."""
    bhk = tl.program_id(0)
    b = bhk // HKV
    hk = bhk % HKV
    n_q = tl.num_programs(0) // HKV * H  # B*H
    q_best = tl.zeros([BLOCK], dtype=tl.float32)
    k_best = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, NUM_CHUNKS, BLOCK):
        c = start + tl.arange(0, BLOCK)
        for g in range(GROUP):
            q_row = b * H + hk * GROUP + g
            q_best = tl.maximum(q_best, tl.load(PART + q_row * NUM_CHUNKS + c, mask=c < NUM_CHUNKS, other=0.0))
        k_row = n_q + bhk
        k_best = tl.maximum(k_best, tl.load(PART + k_row * NUM_CHUNKS + c, mask=c < NUM_CHUNKS, other=0.0))
    bound = tl.sqrt(tl.max(q_best, 0)) * tl.sqrt(tl.max(k_best, 0)) * sm_scale
    delta = -2.0 * bound + offset
    for g in range(GROUP):
        tl.store(DELTA + b * H + hk * GROUP + g, delta)
