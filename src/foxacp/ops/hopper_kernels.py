"""Gluon (Triton's explicit dialect) kernels for forgetting attention on Hopper (sm90+): the
forward and the backward's dQ and dK/dV kernels.

Same functions and conventions as ``triton_kernels``' forward, dQ and dK/dV kernels (read that
module's docstring): query row ``r`` sits at key position ``p = r + OFF`` and sees keys
``lo[p] <= j <= p``; scores are kept in log2 units without the row term,
``s_rj = qk_scale * q_r . k_j - (c_j - c_ref) * log2(e)``, and the row term
``(c_p - c_ref) * log2(e)`` is added to the stored lse, so either backend's backward reads either
forward's ``(out, lse)``.

What Gluon lets us write that Triton 3.6 could not (docs/kernel-notes.md, attempt 13):

* K and V blocks stream through the bulk-copy engine (TMA, 4-D descriptors over the ``(B, H, T, D)``
  views: zero fill outside T, no masks) into a ``STAGES``-deep ring, each stage completing on its
  own mbarrier, issued up to ``STAGES`` blocks ahead;
* FlashAttention-3's intra-warpgroup overlap: in step ``j`` the QK^T of block ``j`` and the PV of
  block ``j - 1`` are both in flight (asynchronous warpgroup MMAs) while nothing waits; the softmax
  of block ``j`` runs while PV ``j - 1`` is still on the tensor cores;
* the decay vector ``c_j`` of a block rides with K through the bulk-copy engine (a padded float32
  copy of the decays, 16-byte rows) and is read from shared memory once per block.

In the forward and the dQ kernel each warp owns 16 query rows, in the dK/dV kernel 16 keys (one or
two warpgroups per program). Each kernel fills its ring one of two ways (``PRODUCER_WARP``, chosen
per kernel and head dim by measurement: ``hopper_attention.launch_config``/``backward_launch``):

* a one-warp producer partition (``gl.warp_specialize``) issues every bulk copy, waiting on a
  per-stage "free" barrier that one consumer thread arrives on once every consumer warp is past
  the stage (its MMAs completed, its shared-memory rows read: :func:`_release`); the consumers only
  wait on "full" barriers;
* or the consumer warps refill a stage themselves, after a CTA barrier that keeps a warpgroup from
  overwriting a stage another one is still reading.

ACP: the plan tiles are the forward's ``BLOCK_M x BLOCK_N`` blocks, which the backward kernels'
blocks divide; each program reads its kept range from the plan.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_wait)

from . import triton_kernels
from .triton_kernels import LOG2E

_LOG2E = gl.constexpr(LOG2E)
# registers of a producer warp (it only issues bulk copies and waits on barriers): the fewest allowed
_PRODUCER_REGISTERS = gl.constexpr(24)
# the Triton kernels' ranges and phases of a query block's keys and a key block's queries (one source
# of them), compiled as Gluon
_query_block_keys = gluon.jit(triton_kernels._query_block_keys.fn)
_whole_key_blocks = gluon.jit(triton_kernels._whole_key_blocks.fn)
_key_block_queries = gluon.jit(triton_kernels._key_block_queries.fn)
_whole_row_blocks = gluon.jit(triton_kernels._whole_row_blocks.fn)


@gluon.constexpr_function
def _mma_layout(num_warps, width):
    """Layout of a warpgroup-MMA result ``[16 * num_warps, width]``: each warp owns 16 rows."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, width, 16])


@gluon.constexpr_function
def _register_operand(acc_layout):
    """Layout of a 16-bit left MMA operand held in registers, for an MMA with result ``acc_layout``
    (a probability or dS tile fed to the next MMA without a shared-memory round trip)."""
    return gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)


@gluon.constexpr_function
def _mma_sums(head_dim):
    """Whether the backward kernels sum dS on the tensor cores (:func:`_sum_column`): at D=64, where
    it took the backward from 8.41-8.43 to 8.24-8.27 ms at (2,16,16k,64) and 2% off at 4k and GQA
    (H200, kernel-notes attempt 32); not at D=128, where the dK/dV kernel already sits at 255
    registers, spills more with the extra accumulator, and measured no faster (7.14-7.15 against
    7.15-7.18 ms at (2,8,16k,128)). Both kernels follow the same rule: dlog_fgate needs its two dS
    sums rounded alike."""
    return head_dim <= 64


@gluon.jit
def _sum_column(dtype: gl.constexpr, K: gl.constexpr, num_warps: gl.constexpr):
    """A ``[K, 8]`` shared-memory MMA operand, ones in column 0 and zeros elsewhere: ``X @ it`` has
    X's row sums in its column 0. The backward kernels sum dS for dlog_fgate this way, on the tensor
    cores from the 16-bit dS their dQ or dK MMA already takes, instead of one FP32 add per score
    (where :func:`_mma_sums`). Written by every warp of the calling region, fenced for the async
    proxy and behind a barrier, so any MMA after the call may read it."""
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([K, 8], dtype)
    fill: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [num_warps, 1], [1, 0])
    column = gl.arange(0, 8, layout=gl.SliceLayout(0, fill))
    values = gl.where(column[None, :] == 0, gl.full([K, 8], 1.0, dtype, layout=fill),
                      gl.zeros([K, 8], dtype, layout=fill))
    ones = gl.allocate_shared_memory(dtype, [K, 8], layout, values)
    fence_async_shared()
    gl.thread_barrier()
    return ones


@gluon.jit
def _longest_first(pid, num_blocks, num_heads, HEADS_PER_GROUP: gl.constexpr):
    """``(query block, head)`` of program ``pid``: the Triton forward's launch order
    (``triton_kernels._longest_first``: groups of heads, longest causal blocks first)."""
    group = pid // (HEADS_PER_GROUP * num_blocks)
    r = pid - group * HEADS_PER_GROUP * num_blocks
    width = gl.minimum(HEADS_PER_GROUP, num_heads - group * HEADS_PER_GROUP)
    block = r // width
    return num_blocks - 1 - block, group * HEADS_PER_GROUP + r - block * width


@gluon.jit
def _block_and_head(H, GROUP, BLOCK: gl.constexpr):
    """``(first row or key, batch * head, batch, head, K/V head)`` of a backward program: block
    ``program_id(0)`` of ``BLOCK`` rows or keys, ``program_id(1)`` over batch * heads."""
    bh = gl.program_id(1)
    h = bh % H
    return gl.program_id(0) * BLOCK, bh, bh // H, h, h // GROUP


@gluon.jit
def _issue_kv(loads, ring, j, col_lo, b, h, hk, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Start the bulk copies of key block ``j`` (columns ``col_lo + j * BLOCK_N``) into ring stage
    ``j % STAGES`` (:func:`_kv_ring`): K and the block's decays on the stage's K barrier, V on its
    V barrier. ``loads``: the descriptors of K, V and the padded decays."""
    k_desc, v_desc, c_desc = loads
    k_smem, v_smem, c_smem, k_bars, v_bars, free_bars = ring
    s = j % STAGES
    col = col_lo + j * BLOCK_N
    mbarrier.expect(k_bars.index(s), k_desc.block_type.nbytes + c_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(c_desc, [b, h, col], k_bars.index(s), c_smem.index(s))
    tma.async_copy_global_to_shared(k_desc, [b, hk, col, 0], k_bars.index(s), k_smem.index(s))
    mbarrier.expect(v_bars.index(s), v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(v_desc, [b, hk, col, 0], v_bars.index(s), v_smem.index(s))


@gluon.jit
def _refill_kv(loads, ring, j, n_blocks, col_lo, b, h, hk, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Without a producer warp: once every warp is past its reads of stage ``j % STAGES`` (the CTA
    barrier), load key block ``j`` into it, if there is one."""
    gl.thread_barrier()
    if j < n_blocks:
        _issue_kv(loads, ring, j, col_lo, b, h, hk, BLOCK_N, STAGES)


@gluon.jit
def _key_blocks(LO, ACP_KV, r0, Tq, OFF, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PLAN_M: gl.constexpr,
               PLAN_N: gl.constexpr, IS_VARLEN: gl.constexpr, HAS_ACP: gl.constexpr):
    """Key blocks of query rows ``[r0, r0 + BLOCK_M)``: ``(col_lo, full_start, full_end, n_blocks)``,
    the blocks starting at ``col_lo``; masks only on ``[col_lo, full_start)`` (some row's ``lo`` is
    inside) and ``[full_end, col_hi)`` (the causal edge). ``ACP_KV`` points at this (batch, head)."""
    acp_first = gl.load(ACP_KV + r0 // PLAN_M) if HAS_ACP else 0
    col_lo, col_hi, lo_max = _query_block_keys(LO, acp_first, r0, Tq, OFF, BLOCK_M=BLOCK_M, PLAN_M=PLAN_M,
                                               PLAN_N=PLAN_N, IS_VARLEN=IS_VARLEN, HAS_ACP=HAS_ACP)
    col_lo, full_start, full_end = _whole_key_blocks(col_lo, col_hi, lo_max, r0 + OFF, BLOCK_N)
    return col_lo, full_start, full_end, gl.cdiv(col_hi - col_lo, BLOCK_N)


@gluon.jit
def _query_rows(C, LO, r0, Tq, OFF, BLOCK_M: gl.constexpr, IS_VARLEN: gl.constexpr, row_layout: gl.constexpr):
    """Rows ``r0 .. r0 + BLOCK_M`` of a query block (forward, dQ): ``(rows, key positions, c_ref =
    the decay at the first row, each row's first visible key, 0 without packing)``."""
    rows = r0 + gl.arange(0, BLOCK_M, layout=row_layout)
    pos_q = rows + OFF
    c_ref = gl.load(C + r0 + OFF)
    if IS_VARLEN:
        lo_q = gl.load(LO + pos_q, mask=rows < Tq, other=0)
    else:
        lo_q = rows * 0
    return rows, pos_q, c_ref, lo_q


@gluon.jit
def _scores(s, c_stage, col, c_ref, pos_q, lo_q, masked, qk_scale,
            BLOCK_N: gl.constexpr, IS_VARLEN: gl.constexpr, col_layout: gl.constexpr):
    """Block scores in log2 units from ``s = q . k`` (no row term), masked where the block needs it;
    the block's decays come from its ring stage (zero filled past the padded Tk)."""
    cols = col + gl.arange(0, BLOCK_N, layout=col_layout)
    ck = (c_stage.reshape([BLOCK_N]).load(col_layout) - c_ref) * _LOG2E
    s = s * qk_scale - ck[None, :]
    if masked:
        visible = cols[None, :] <= pos_q[:, None]
        if IS_VARLEN:
            visible = visible & (cols[None, :] >= lo_q[:, None])
        s = gl.where(visible, s, float("-inf"))
    return s


@gluon.jit
def _kv_producer(loads, ring, col_lo, n_blocks, b, h, hk, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Worker partition (one warp) of the forward and the dQ kernel: streams key blocks
    ``0 .. n_blocks - 1`` through the ring, refilling a stage once the consumers released it (a fresh
    barrier counts as released)."""
    free_bars = ring[5]
    for j in range(n_blocks):
        mbarrier.wait(free_bars.index(j % STAGES), ((j // STAGES) & 1) ^ 1)
        _issue_kv(loads, ring, j, col_lo, b, h, hk, BLOCK_N, STAGES)


@gluon.jit
def _release(free_bars, stage):
    """Every consumer warp is done with ``stage`` (its MMAs completed, its decays or row statistics
    read): hand it to the producer. Gluon's arrive is one thread's and its lowering puts a
    barrier across the partition's warps before it anyway (in the PTX); the explicit barrier
    states that the release needs it (with two warpgroups thread 0 could otherwise release a stage
    the other still reads) and compiles to the same single ``bar.sync``. No proxy fence before the
    arrive: every generic read of the stage has returned its value by now (the step used it) and
    the MMAs that read it were waited on, so the bulk copy that refills it cannot overtake a read
    (CUTLASS's pipelines release the same way). Without the fence the D=64 dK/dV kernel took
    4.56-4.60 ms against 4.67-4.69 at (2,16,16k,64) (H200, kernel-notes attempt 27)."""
    gl.thread_barrier()
    mbarrier.arrive(free_bars.index(stage))


@gluon.jit
def _fwd_consumer(q_smem, q_bars, loads, ring, C, LO, OUT, LSE, b, h, hk, bh, r0, Tq, OFF, keys, qk_scale, out_strides,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  IS_VARLEN: gl.constexpr, PRODUCER_WARP: gl.constexpr, num_warps: gl.constexpr):
    """The forward's softmax loop over the ring's key blocks ``keys = (col_lo, full_start,
    full_end, n_blocks)`` (:func:`_key_blocks`), then the normalised output and lse: the default
    partition next to :func:`_kv_producer` (``PRODUCER_WARP``), or the whole program, which then
    refills each stage itself two blocks after its use."""
    k_smem, v_smem, c_smem, k_bars, v_bars, free_bars = ring
    col_lo, full_start, full_end, n_blocks = keys
    stride_ob, stride_oh, stride_ot = out_strides
    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(num_warps, HEAD_DIM)
    p_layout: gl.constexpr = _register_operand(o_layout)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    rows, pos_q, c_ref, lo_q = _query_rows(C, LO, r0, Tq, OFF, BLOCK_M, IS_VARLEN, row_s)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    q = q_smem.reshape([BLOCK_M, HEAD_DIM])
    mbarrier.wait(q_bars.index(0), phase=0)

    if n_blocks > 0:
        # block 0: scores and probabilities (nothing to overlap with yet)
        mbarrier.wait(k_bars.index(0), phase=0)
        kt = k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s = warpgroup_mma(q, kt, zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s])
        masked = (col_lo < full_start) | (col_lo >= full_end)
        s = _scores(s, c_smem.index(0), col_lo, c_ref, pos_q, lo_q, masked, qk_scale, BLOCK_N, IS_VARLEN, col_s)
        m_i = gl.max(s, 1)
        m_use = gl.where(m_i == float("-inf"), 0.0, m_i)
        p = gl.exp2(s - m_use[:, None])
        l_i = gl.sum(p, 1)
        for j in range(1, n_blocks):
            if not PRODUCER_WARP:
                # the stage of block j - 2 takes block j + STAGES - 2: its last reader, PV of block
                # j - 2, finished in step j - 1 (the barrier: in every warpgroup)
                _refill_kv(loads, ring, j + STAGES - 2, n_blocks, col_lo, b, h, hk, BLOCK_N, STAGES)
            st = j % STAGES
            ph = (j // STAGES) & 1
            prev = (j - 1) % STAGES
            prev_ph = ((j - 1) // STAGES) & 1
            mbarrier.wait(k_bars.index(st), phase=ph)
            kt = k_smem.index(st).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
            s = warpgroup_mma(q, kt, zero_s, use_acc=False, is_async=True)
            # PV of block j - 1 joins it on the tensor cores
            mbarrier.wait(v_bars.index(prev), phase=prev_ph)
            p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
            acc = warpgroup_mma(p_op, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=[s])
            col = col_lo + j * BLOCK_N
            masked = (col < full_start) | (col >= full_end)
            s = _scores(s, c_smem.index(st), col, c_ref, pos_q, lo_q, masked, qk_scale, BLOCK_N, IS_VARLEN, col_s)
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(s - m_use[:, None])
            alpha = gl.exp2(m_i - m_use)
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
            if PRODUCER_WARP:
                _release(free_bars, prev)  # block j - 1: K, V and decays all read
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        last = (n_blocks - 1) % STAGES
        mbarrier.wait(v_bars.index(last), phase=((n_blocks - 1) // STAGES) & 1)
        p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        acc = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    if not PRODUCER_WARP:
        _retire((q_bars, k_bars, v_bars))

    # normalise, store; lse in log2 units with the row term, +inf where a row saw no key
    seen = l_i > 0.0
    l_safe = gl.where(seen, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, row_o)[:, None]
    rows_o = r0 + gl.arange(0, BLOCK_M, layout=row_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=col_o)
    o_ptrs = OUT + b.to(gl.int64) * stride_ob + h * stride_oh + rows_o[:, None] * stride_ot + offs_d[None, :]
    gl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(rows_o < Tq)[:, None])
    cq = (gl.load(C + pos_q, mask=rows < Tq, other=0.0) - c_ref) * _LOG2E
    lse = gl.where(seen, m_i + cq + gl.log2(l_safe), float("inf"))
    gl.store(LSE + bh.to(gl.int64) * Tq + rows, lse, mask=rows < Tq)


@gluon.jit
def _kv_ring(k_desc, v_desc, c_desc, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             PRODUCER_WARP: gl.constexpr):
    """Shared memory of a K/V/decay ring: ``(k, v, decays, K barriers, V barriers, free barriers)``."""
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    c_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, 1, BLOCK_N], c_desc.layout)
    return k_smem, v_smem, c_smem, _barriers(STAGES), _barriers(STAGES), _barriers(STAGES, PRODUCER_WARP)


@gluon.jit
def _retire(bar_groups):
    """Invalidate the mbarriers of ``bar_groups`` (a tuple of barrier arrays) once the loop that
    used them is done: without a producer partition the compiler may reuse their shared memory
    for the epilogue's layout conversions, which PTX allows only for invalidated barriers. (With
    one, every barrier is an argument of the warp-specialised region and stays reserved.)"""
    for g in gl.static_range(len(bar_groups)):
        _invalidate(bar_groups[g])


@gluon.jit
def _invalidate(bars):
    count: gl.constexpr = bars.type.shape[0]
    for i in gl.static_range(count):
        mbarrier.invalidate(bars.index(i))


@gluon.jit
def _barriers(n: gl.constexpr, USED: gl.constexpr = True):
    """``n`` mbarriers, each completing on one arrival (plus the bytes a bulk copy expects); left
    uninitialised unless ``USED`` (a ring's free barriers when no producer partition waits on them:
    plain shared memory the compiler may reuse)."""
    bars = gl.allocate_shared_memory(gl.int64, [n, 1], mbarrier.MBarrierLayout())
    if USED:
        for i in gl.static_range(n):
            mbarrier.init(bars.index(i), count=1)
    return bars


@gluon.jit
def fwd_kernel(q_desc, k_desc, v_desc, c_desc, C, ACP_KV, LO, OUT, LSE,
               stride_cb, stride_ch, stride_lob, stride_ob, stride_oh, stride_ot,
               H, GROUP, Tq, OFF, NUM_QT, qk_scale,
               HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               IS_VARLEN: gl.constexpr, HAS_ACP: gl.constexpr, HEADS_PER_GROUP: gl.constexpr,
               PRODUCER_WARP: gl.constexpr, num_warps: gl.constexpr):
    """One program per (query block, batch*head): the ``num_warps`` consumer warps run the softmax
    loop (:func:`_fwd_consumer`) while, with ``PRODUCER_WARP``, a one-warp partition streams the key
    blocks through the ring (:func:`_kv_producer`). ``C`` is the float32 decay ``(B, H, Tk)`` padded
    to whole key blocks with unit stride along positions (``c_desc`` describes the same tensor);
    ``OUT``'s head dim is contiguous."""
    gl.static_assert(BLOCK_M == 16 * num_warps, "one 16-row MMA slice per warp")
    gl.static_assert(STAGES >= 3 or (PRODUCER_WARP and STAGES >= 2),
                     "block j's stage is free only after PV of block j - 1: 2 stages, 3 when refilled in step j")
    num_blocks = gl.cdiv(Tq, BLOCK_M)
    pid_m, bh = _longest_first(gl.program_id(0), num_blocks, gl.num_programs(0) // num_blocks, HEADS_PER_GROUP)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    r0 = pid_m * BLOCK_M
    C += b.to(gl.int64) * stride_cb + h * stride_ch
    LO += b * stride_lob
    keys = _key_blocks(LO, ACP_KV + bh * NUM_QT, r0, Tq, OFF, BLOCK_M, BLOCK_N, BLOCK_M, BLOCK_N, IS_VARLEN, HAS_ACP)
    col_lo, n_blocks = keys[0], keys[3]

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    q_bars = _barriers(1)
    loads = (k_desc, v_desc, c_desc)
    ring = _kv_ring(k_desc, v_desc, c_desc, HEAD_DIM, BLOCK_N, STAGES, PRODUCER_WARP)
    mbarrier.expect(q_bars.index(0), q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, h, r0, 0], q_bars.index(0), q_smem)
    out_strides = (stride_ob, stride_oh, stride_ot)
    if PRODUCER_WARP:
        gl.warp_specialize([
            (_fwd_consumer, (q_smem, q_bars, loads, ring, C, LO, OUT, LSE, b, h, hk, bh, r0, Tq, OFF, keys,
                             qk_scale, out_strides, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, IS_VARLEN, True, num_warps)),
            (_kv_producer, (loads, ring, col_lo, n_blocks, b, h, hk, BLOCK_N, STAGES)),
        ], [1], [_PRODUCER_REGISTERS])
    else:
        for first in gl.static_range(STAGES - 1):
            if first < n_blocks:
                _issue_kv(loads, ring, first, col_lo, b, h, hk, BLOCK_N, STAGES)
        _fwd_consumer(q_smem, q_bars, loads, ring, C, LO, OUT, LSE, b, h, hk, bh, r0, Tq, OFF, keys, qk_scale,
                      out_strides, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, IS_VARLEN, False, num_warps)


# ----------------------------------------------------------------------------- backward: dK, dV


@gluon.jit
def _issue_queries(descs, ring, i, row_lo, b, h, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """Start the bulk copies of query block ``i`` (rows ``row_lo + i * BLOCK_M``) into ring stage
    ``i % STAGES``: q, dO, and the rows' lse, Di and decays (``descs`` in that order), all on the
    stage's barrier (every copy starts at a multiple of BLOCK_M rows)."""
    q_desc, do_desc, lse_desc, di_desc, cq_desc = descs
    q_smem, do_smem, lse_smem, di_smem, cq_smem, bars, free_bars = ring
    s = i % STAGES
    r = row_lo + i * BLOCK_M
    nbytes: gl.constexpr = q_desc.block_type.nbytes + do_desc.block_type.nbytes + 3 * lse_desc.block_type.nbytes
    mbarrier.expect(bars.index(s), nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, h, r, 0], bars.index(s), q_smem.index(s))
    tma.async_copy_global_to_shared(do_desc, [b, h, r, 0], bars.index(s), do_smem.index(s))
    tma.async_copy_global_to_shared(lse_desc, [b, h, r], bars.index(s), lse_smem.index(s))
    tma.async_copy_global_to_shared(di_desc, [b, h, r], bars.index(s), di_smem.index(s))
    tma.async_copy_global_to_shared(cq_desc, [b, h, r], bars.index(s), cq_smem.index(s))


@gluon.jit
def _query_producer(descs, ring, row_lo, n_blocks, b, h, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """Worker partition (one warp) of the dK/dV kernel: streams query blocks ``0 .. n_blocks - 1``
    (q, dO and the rows' statistics) through the ring, refilling a stage once the consumers released it."""
    free_bars = ring[6]
    for i in range(n_blocks):
        mbarrier.wait(free_bars.index(i % STAGES), ((i // STAGES) & 1) ^ 1)
        _issue_queries(descs, ring, i, row_lo, b, h, BLOCK_M, STAGES)


@gluon.jit
def _dkdv_consumer(k_smem, v_smem, kv_bars, ones, descs, ring, C, LO, DK, DV, DC, b, h, c0, Tk, OFF, row_lo,
                   full_start, full_end, n_blocks, sm_scale, qk_scale, stride_dkb, stride_dkh, stride_dkt, stride_dvb,
                   stride_dvh, stride_dvt, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, IS_VARLEN: gl.constexpr, PRODUCER_WARP: gl.constexpr,
                   num_warps: gl.constexpr):
    """The dK/dV kernel's loop over the ring's query blocks, then dK, dV and the key-side dc term:
    the default partition next to :func:`_query_producer` (``PRODUCER_WARP``), or the whole
    program, refilling each stage itself once every warp is done with it."""
    q_smem, do_smem, lse_smem, di_smem, cq_smem, bars, free_bars = ring
    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_M)
    acc_layout: gl.constexpr = _mma_layout(num_warps, HEAD_DIM)
    op_layout: gl.constexpr = _register_operand(acc_layout)
    key_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    key_acc: gl.constexpr = gl.SliceLayout(1, acc_layout)
    dim_acc: gl.constexpr = gl.SliceLayout(0, acc_layout)

    cols = c0 + gl.arange(0, BLOCK_N, layout=key_s)
    c_ref = gl.load(C + gl.minimum(c0, Tk - 1))
    ck = (gl.load(C + cols, mask=cols < Tk, other=0.0) - c_ref) * _LOG2E
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
    sum_layout: gl.constexpr = _mma_layout(num_warps, 8)
    if _mma_sums(HEAD_DIM):
        dc = gl.zeros([BLOCK_N, 8], gl.float32, layout=sum_layout)  # column 0: sum_r dS^T[j, r]
    else:
        dc = gl.zeros([BLOCK_N], gl.float32, layout=key_s)
    zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
    k = k_smem.reshape([BLOCK_N, HEAD_DIM])
    v = v_smem.reshape([BLOCK_N, HEAD_DIM])
    mbarrier.wait(kv_bars.index(0), phase=0)

    for i in range(n_blocks):
        st = i % STAGES
        mbarrier.wait(bars.index(st), phase=(i // STAGES) & 1)
        q = q_smem.index(st).reshape([BLOCK_M, HEAD_DIM])
        do = do_smem.index(st).reshape([BLOCK_M, HEAD_DIM])
        s_tok = warpgroup_mma(k, q.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(v, do.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        cq = cq_smem.index(st).reshape([BLOCK_M]).load(row_s)
        lse = lse_smem.index(st).reshape([BLOCK_M]).load(row_s) - (cq - c_ref) * _LOG2E
        di = di_smem.index(st).reshape([BLOCK_M]).load(row_s)
        s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
        pt = gl.exp2(s * qk_scale - ck[:, None] - lse[None, :])
        r = row_lo + i * BLOCK_M
        if (r < full_start) | (r >= full_end):
            pos = r + OFF + gl.arange(0, BLOCK_M, layout=row_s)
            visible = cols[:, None] <= pos[None, :]
            if IS_VARLEN:
                lo_r = gl.load(LO + pos, mask=pos < Tk, other=0)
                visible = visible & (cols[:, None] >= lo_r[None, :])
            pt = gl.where(visible, pt, 0.0)
        dv = warpgroup_mma(gl.convert_layout(pt.to(q_smem.dtype), op_layout), do, dv, is_async=True)
        dpt = warpgroup_mma_wait(num_outstanding=1, deps=[dp_tok])
        dst = pt * (dpt - di[None, :])
        ds_op = gl.convert_layout(dst.to(q_smem.dtype), op_layout)
        dk = warpgroup_mma(ds_op, q, dk, is_async=True)
        if _mma_sums(HEAD_DIM):
            dc = warpgroup_mma(gl.convert_layout(ds_op, _register_operand(sum_layout)), ones, dc, is_async=True)
            dv, dk, dc = warpgroup_mma_wait(num_outstanding=0, deps=[dv, dk, dc])
        else:
            dc += gl.sum(dst, 1)
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=[dv, dk])
        if PRODUCER_WARP:
            _release(free_bars, st)
        else:
            gl.thread_barrier()
            if i + STAGES < n_blocks:
                _issue_queries(descs, ring, i + STAGES, row_lo, b, h, BLOCK_M, STAGES)

    if not PRODUCER_WARP:
        _retire((kv_bars, bars))

    # + the query-side term (dQ kernel)
    if _mma_sums(HEAD_DIM):
        dc = gl.convert_layout(gl.sum(dc, 1), key_s)
    gl.store(DC + cols, gl.load(DC + cols, mask=cols < Tk, other=0.0) - dc, mask=cols < Tk)
    keys = c0 + gl.arange(0, BLOCK_N, layout=key_acc)
    offs_d = gl.arange(0, HEAD_DIM, layout=dim_acc)
    ok = (keys < Tk)[:, None]
    dk_ptrs = DK + b.to(gl.int64) * stride_dkb + h * stride_dkh + keys[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + b.to(gl.int64) * stride_dvb + h * stride_dvh + keys[:, None] * stride_dvt + offs_d[None, :]
    gl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
    gl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=ok)


@gluon.jit
def bwd_dkdv_kernel(q_desc, do_desc, k_desc, v_desc, lse_desc, di_desc, cq_desc, C, ACP_Q, LO, HI, DK, DV, DC,
                    stride_cb, stride_ch, stride_lob, stride_dkb, stride_dkh, stride_dkt,
                    stride_dvb, stride_dvh, stride_dvt, stride_dcb, stride_dch,
                    H, GROUP, Tq, Tk, OFF, NUM_KT, sm_scale, qk_scale,
                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    PLAN_M: gl.constexpr, PLAN_N: gl.constexpr, IS_VARLEN: gl.constexpr, HAS_ACP: gl.constexpr,
                    PRODUCER_WARP: gl.constexpr, num_warps: gl.constexpr):
    """One program per (key block, batch * query head h): the Triton ``bwd_dkdv_kernel``'s job
    (same inputs, outputs and GQA partials; read its docstring) with warpgroup MMAs on transposed
    tiles, ``[BLOCK_N keys, BLOCK_M rows]``:

        S^T = K Q^T,  P^T = exp2(S^T * qk_scale - ck_j - lse_r),  dP^T = V dO^T,
        dV += P^T dO,  dS^T = P^T * (dP^T - Di_r),  dK += dS^T Q,  dc_j -= sum_r dS^T[j, r]

    (``ck_j = (c_j - c_ref) log2 e``, the row's ``(c_r - c_ref) log2 e`` folded into its lse; the
    query-side dc term was written by the dQ kernel). K and V are loaded once; q, dO and the rows'
    lse, Di and decays stream through a ``STAGES``-deep TMA ring (float32 row vectors padded to 16
    bytes), fed by a one-warp producer partition with ``PRODUCER_WARP`` (:func:`_query_producer`),
    else by the consumers themselves. In the consumers
    (:func:`_dkdv_consumer`) the QK^T and dO V^T of a block run together; the exponentials overlap
    the second, dS overlaps the dV MMA and the column sums overlap the dK MMA (at D=64 they are an
    MMA themselves: :func:`_mma_sums`). ``C`` is the float32
    decay with unit stride along positions; ``cq_desc`` describes a copy of the query rows' decays
    ``c[OFF + r]`` padded to whole blocks: a bulk copy's start along the innermost dimension must be
    16-byte aligned (at ``r + OFF`` into the full decays it was not, and the copy faulted:
    kernel-notes attempt 22)."""
    gl.static_assert(BLOCK_N == 16 * num_warps, "one 16-key MMA slice per warp")
    c0, bh, b, h, hk = _block_and_head(H, GROUP, BLOCK_N)
    C += b.to(gl.int64) * stride_cb + h * stride_ch
    LO += b * stride_lob
    HI += b * stride_lob
    DC += b.to(gl.int64) * stride_dcb + h * stride_dch

    # query rows of this block: [row_lo, row_hi) in whole blocks, masks outside [full_start, full_end)
    row_lo, row_hi, full_lo, full_hi = _key_block_queries(LO, HI, ACP_Q + bh * NUM_KT, c0, Tq, Tk, OFF,
                                                          BLOCK_N=BLOCK_N, PLAN_M=PLAN_M, PLAN_N=PLAN_N,
                                                          IS_VARLEN=IS_VARLEN, HAS_ACP=HAS_ACP)
    row_lo, full_start, full_end = _whole_row_blocks(row_lo, row_hi, full_lo, full_hi, BLOCK_M)
    n_blocks = gl.cdiv(row_hi - row_lo, BLOCK_M)

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    ring = (gl.allocate_shared_memory(q_desc.dtype, [STAGES, 1, 1, BLOCK_M, HEAD_DIM], q_desc.layout),
            gl.allocate_shared_memory(do_desc.dtype, [STAGES, 1, 1, BLOCK_M, HEAD_DIM], do_desc.layout),
            gl.allocate_shared_memory(gl.float32, [STAGES, 1, 1, BLOCK_M], lse_desc.layout),
            gl.allocate_shared_memory(gl.float32, [STAGES, 1, 1, BLOCK_M], di_desc.layout),
            gl.allocate_shared_memory(gl.float32, [STAGES, 1, 1, BLOCK_M], cq_desc.layout),
            _barriers(STAGES), _barriers(STAGES, PRODUCER_WARP))
    kv_bars = _barriers(1)
    ones = _sum_column(q_desc.dtype, BLOCK_M, num_warps)
    mbarrier.expect(kv_bars.index(0), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [b, hk, c0, 0], kv_bars.index(0), k_smem)
    tma.async_copy_global_to_shared(v_desc, [b, hk, c0, 0], kv_bars.index(0), v_smem)
    descs = (q_desc, do_desc, lse_desc, di_desc, cq_desc)
    if PRODUCER_WARP:
        gl.warp_specialize([
            (_dkdv_consumer, (k_smem, v_smem, kv_bars, ones, descs, ring, C, LO, DK, DV, DC, b, h, c0, Tk, OFF, row_lo,
                              full_start, full_end, n_blocks, sm_scale, qk_scale, stride_dkb, stride_dkh, stride_dkt,
                              stride_dvb, stride_dvh, stride_dvt, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, IS_VARLEN, True,
                              num_warps)),
            (_query_producer, (descs, ring, row_lo, n_blocks, b, h, BLOCK_M, STAGES)),
        ], [1], [_PRODUCER_REGISTERS])
    else:
        for first in gl.static_range(STAGES):
            if first < n_blocks:
                _issue_queries(descs, ring, first, row_lo, b, h, BLOCK_M, STAGES)
        _dkdv_consumer(k_smem, v_smem, kv_bars, ones, descs, ring, C, LO, DK, DV, DC, b, h, c0, Tk, OFF, row_lo,
                       full_start, full_end, n_blocks, sm_scale, qk_scale, stride_dkb, stride_dkh, stride_dkt,
                       stride_dvb, stride_dvh, stride_dvt, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, IS_VARLEN, False,
                       num_warps)


# ----------------------------------------------------------------------------- backward: dQ


@gluon.jit
def _dq_consumer(q_smem, do_smem, q_bars, ones, loads, ring, C, LO, OUT, LSE, DI, DQ, DC, b, h, hk, bh, r0, Tq, OFF,
                 keys, sm_scale, qk_scale, out_strides, dq_strides, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, IS_VARLEN: gl.constexpr, PRODUCER_WARP: gl.constexpr,
                 num_warps: gl.constexpr):
    """The dQ kernel's work: Di, the loop over the ring's key blocks ``keys`` (as in
    :func:`_fwd_consumer`), then dQ and the query-side dc term; the default partition next to
    :func:`_kv_producer` (``PRODUCER_WARP``), or the whole program, which then refills each stage
    itself right after its use."""
    k_smem, v_smem, c_smem, k_bars, v_bars, free_bars = ring
    col_lo, full_start, full_end, n_blocks = keys
    stride_ob, stride_oh, stride_ot = out_strides
    stride_dqb, stride_dqh, stride_dqt = dq_strides
    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
    acc_layout: gl.constexpr = _mma_layout(num_warps, HEAD_DIM)
    op_layout: gl.constexpr = _register_operand(acc_layout)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_acc: gl.constexpr = gl.SliceLayout(1, acc_layout)
    dim_acc: gl.constexpr = gl.SliceLayout(0, acc_layout)

    # Di = rowsum(dO * O) from the stored output (read once; the dK/dV kernel reads Di)
    rows_acc = r0 + gl.arange(0, BLOCK_M, layout=row_acc)
    offs_d = gl.arange(0, HEAD_DIM, layout=dim_acc)
    ok_acc = (rows_acc < Tq)[:, None]
    o = gl.load(OUT + b.to(gl.int64) * stride_ob + h * stride_oh + rows_acc[:, None] * stride_ot + offs_d[None, :],
                mask=ok_acc, other=0.0)
    rows, pos_q, c_ref, lo_q = _query_rows(C, LO, r0, Tq, OFF, BLOCK_M, IS_VARLEN, row_s)
    lse = gl.load(LSE + bh.to(gl.int64) * Tq + rows, mask=rows < Tq, other=float("inf"))
    lse = lse - (gl.load(C + pos_q, mask=rows < Tq, other=0.0) - c_ref) * _LOG2E  # the row term, folded in
    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=acc_layout)
    sum_layout: gl.constexpr = _mma_layout(num_warps, 8)
    if _mma_sums(HEAD_DIM):
        dcq = gl.zeros([BLOCK_M, 8], gl.float32, layout=sum_layout)  # column 0: sum_j dS[r, j]
    else:
        dcq = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    q = q_smem.reshape([BLOCK_M, HEAD_DIM])
    do = do_smem.reshape([BLOCK_M, HEAD_DIM])
    mbarrier.wait(q_bars.index(0), phase=0)
    di = gl.sum(o.to(gl.float32) * do.load(acc_layout).to(gl.float32), 1)
    gl.store(DI + bh.to(gl.int64) * Tq + rows_acc, di, mask=rows_acc < Tq)
    di = gl.convert_layout(di, row_s)

    for j in range(n_blocks):
        st = j % STAGES
        ph = (j // STAGES) & 1
        mbarrier.wait(k_bars.index(st), phase=ph)
        s_tok = warpgroup_mma(q, k_smem.index(st).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero_s,
                              use_acc=False, is_async=True)
        mbarrier.wait(v_bars.index(st), phase=ph)
        dp_tok = warpgroup_mma(do, v_smem.index(st).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero_s,
                               use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
        col = col_lo + j * BLOCK_N
        s = _scores(s, c_smem.index(st), col, c_ref, pos_q, lo_q, (col < full_start) | (col >= full_end), qk_scale,
                    BLOCK_N, IS_VARLEN, col_s)
        p = gl.exp2(s - lse[:, None])
        dp = warpgroup_mma_wait(num_outstanding=0, deps=[dp_tok])
        ds = p * (dp - di[:, None])
        ds_op = gl.convert_layout(ds.to(q_smem.dtype), op_layout)
        dq = warpgroup_mma(ds_op, k_smem.index(st).reshape([BLOCK_N, HEAD_DIM]), dq, is_async=True)
        if _mma_sums(HEAD_DIM):
            dcq = warpgroup_mma(gl.convert_layout(ds_op, _register_operand(sum_layout)), ones, dcq, is_async=True)
            dq, dcq = warpgroup_mma_wait(num_outstanding=0, deps=[dq, dcq])
        else:
            dcq += gl.sum(ds, 1)
            dq = warpgroup_mma_wait(num_outstanding=0, deps=[dq])
        if PRODUCER_WARP:
            _release(free_bars, st)
        else:
            _refill_kv(loads, ring, j + STAGES, n_blocks, col_lo, b, h, hk, BLOCK_N, STAGES)

    if not PRODUCER_WARP:
        _retire((q_bars, k_bars, v_bars))

    dq_ptrs = DQ + b.to(gl.int64) * stride_dqb + h * stride_dqh + rows_acc[:, None] * stride_dqt + offs_d[None, :]
    gl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=ok_acc)
    # the query-side dc term at the rows' positions (the dK/dV kernel adds the key-side term)
    if _mma_sums(HEAD_DIM):
        dcq = gl.convert_layout(gl.sum(dcq, 1), row_s)
    gl.store(DC + pos_q, dcq, mask=rows < Tq)


@gluon.jit
def bwd_dq_kernel(q_desc, do_desc, k_desc, v_desc, c_desc, C, ACP_KV, LO, OUT, LSE, DI, DQ, DC,
                  stride_cb, stride_ch, stride_lob, stride_ob, stride_oh, stride_ot,
                  stride_dqb, stride_dqh, stride_dqt, stride_dcb, stride_dch,
                  H, GROUP, Tq, OFF, NUM_QT, sm_scale, qk_scale,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  PLAN_M: gl.constexpr, PLAN_N: gl.constexpr, IS_VARLEN: gl.constexpr, HAS_ACP: gl.constexpr,
                  PRODUCER_WARP: gl.constexpr, num_warps: gl.constexpr):
    """One program per (query block, batch * head): the Triton ``bwd_dq_kernel``'s job (read its
    docstring: it runs first, stores ``Di = rowsum(dO * O)`` and writes the query-side dc term
    ``sum_j dS_rj`` to ``DC``), with the forward's key ring (K, V and the block's decays; streamed
    by :func:`_kv_producer` with ``PRODUCER_WARP``) and :func:`_dq_consumer`:

        S = Q K^T,  P = exp2(S * qk_scale - ck_j - lse_r),  dP = dO V^T,  dS = P * (dP - Di_r),
        dQ += dS K,  dc_r += sum_j dS[r, j]

    QK^T and dO V^T run together; the exponentials overlap the second. ``C`` is the float32 decay
    padded to whole key blocks with unit stride along positions (``c_desc`` describes it)."""
    gl.static_assert(BLOCK_M == 16 * num_warps, "one 16-row MMA slice per warp")
    r0, bh, b, h, hk = _block_and_head(H, GROUP, BLOCK_M)
    C += b.to(gl.int64) * stride_cb + h * stride_ch
    LO += b * stride_lob
    DC += b.to(gl.int64) * stride_dcb + h * stride_dch
    keys = _key_blocks(LO, ACP_KV + bh * NUM_QT, r0, Tq, OFF, BLOCK_M, BLOCK_N, PLAN_M, PLAN_N, IS_VARLEN, HAS_ACP)
    col_lo, n_blocks = keys[0], keys[3]

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [1, 1, BLOCK_M, HEAD_DIM], do_desc.layout)
    q_bars = _barriers(1)
    ones = _sum_column(k_desc.dtype, BLOCK_N, num_warps)
    loads = (k_desc, v_desc, c_desc)
    ring = _kv_ring(k_desc, v_desc, c_desc, HEAD_DIM, BLOCK_N, STAGES, PRODUCER_WARP)
    mbarrier.expect(q_bars.index(0), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, h, r0, 0], q_bars.index(0), q_smem)
    tma.async_copy_global_to_shared(do_desc, [b, h, r0, 0], q_bars.index(0), do_smem)
    out_strides = (stride_ob, stride_oh, stride_ot)
    dq_strides = (stride_dqb, stride_dqh, stride_dqt)
    if PRODUCER_WARP:
        gl.warp_specialize([
            (_dq_consumer, (q_smem, do_smem, q_bars, ones, loads, ring, C, LO, OUT, LSE, DI, DQ, DC, b, h, hk, bh, r0,
                            Tq, OFF, keys, sm_scale, qk_scale, out_strides, dq_strides, HEAD_DIM, BLOCK_M, BLOCK_N,
                            STAGES, IS_VARLEN, True, num_warps)),
            (_kv_producer, (loads, ring, col_lo, n_blocks, b, h, hk, BLOCK_N, STAGES)),
        ], [1], [_PRODUCER_REGISTERS])
    else:
        for first in gl.static_range(STAGES):
            if first < n_blocks:
                _issue_kv(loads, ring, first, col_lo, b, h, hk, BLOCK_N, STAGES)
        _dq_consumer(q_smem, do_smem, q_bars, ones, loads, ring, C, LO, OUT, LSE, DI, DQ, DC, b, h, hk, bh, r0, Tq,
                     OFF, keys, sm_scale, qk_scale, out_strides, dq_strides, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                     IS_VARLEN, False, num_warps)
