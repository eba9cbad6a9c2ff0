"""``backend="triton"``: launcher for the fused forgetting-attention kernels (forward, backward, decode).

Layers (kernels live in :mod:`foxacp.ops.triton_kernels`):

* tile configs: one small table keyed by the padded head dim, a default for anything else and
  small tiles under ``TRITON_INTERPRET=1``; never raises on an unknown GPU;
* launchers ``_forward`` / ``_backward``: allocation, grids, strides (inputs are usually transposed
  views of ``(B, T, H, D)`` tensors; nothing is copied unless the last dim is strided);
* ``torch.library`` custom ops ``foxacp::fox_attn_fwd`` / ``foxacp::fox_attn_bwd`` with fake
  implementations and autograd, so ``torch.compile`` traces through them;
* the backend interface of :mod:`foxacp.ops.backends`: ``plan``, ``attend``, ``required_tiles``,
  ``unavailable_reason`` (``default_tiles``: the plan tiles of a head dim).

ACP: ``plan`` builds the call's :class:`~foxacp.ops.acp.TilePlan` once, on the forward tiles
``default_tiles(head_dim)``: the paper rule's ranges come from one tiny parallel pre-pass over the
float64 global decay (see the kernels' module docstring; the custom op ``foxacp::acp_tiles``), the
local rule adds its data bound in PyTorch. The forward reads the plan's ``acp_kv_begin``, the
backward the same saved ``acp_kv_begin``/``acp_q_end``: nothing is planned twice.
"""

import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

try:
    import triton
    import triton.errors
    from triton.tools.tensor_descriptor import TensorDescriptor

    from . import triton_kernels as kernels
except ImportError as _err:  # pragma: no cover - depends on the environment
    triton = None
    _IMPORT_ERROR = str(_err)

from .acp import LOCAL_MARGIN, LOCAL_WINDOW, MaskSpec, TilePlan, plan_tiles

MAX_HEAD_DIM = 256
DECODE_MAX_Q = 64  # Tq at or below this takes the decoding forward (small query blocks, split keys)
HEADS_PER_GROUP = 4  # forward launch order: this many heads at a time, longest first (kernels._longest_first)


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, as Triton itself does
# Hopper+: the forward at head dims 65-128 streams K/V blocks through host tensor descriptors (TMA);
# measured -3% there, +2% at D=64 and +7% in the backward (kernel-notes attempt 9), so only there.
# FOXACP_TRITON_TMA=0 turns it off (benchmarks compare both; older GPUs never use it).
TMA_ENABLED = os.environ.get("FOXACP_TRITON_TMA", "1") != "0"


def _interpreting() -> bool:
    return _INTERPRET


@dataclass(frozen=True)
class TileConfig:
    """Block sizes. The forward's ``(block_m, block_n)`` are the ACP plan tiles; the backward's
    blocks divide them (dkdv: ``m1 x n1``, dq: ``m2 x n2``) so pruning never cuts a block."""

    block_m: int
    block_n: int
    fwd_warps: int
    fwd_stages: int
    m1: int
    n1: int
    m2: int
    n2: int
    bwd_warps: int
    bwd_stages: int

    def __post_init__(self):
        assert self.block_m % self.m1 == 0 and self.block_m % self.m2 == 0
        assert self.block_n % self.n1 == 0 and self.block_n % self.n2 == 0


# Keyed by the head dim padded to a power of two; sm80+ (Ampere, Hopper, Blackwell) defaults.
# Picked on an H100 (docs/kernel-notes.md has the sweep): bwd 64x64 blocks, 4 warps, 2 stages.
_CONFIGS = {
    16: TileConfig(128, 64, 4, 3, 64, 64, 64, 64, 4, 2),
    32: TileConfig(128, 64, 4, 3, 64, 64, 64, 64, 4, 2),
    64: TileConfig(128, 64, 4, 3, 64, 64, 64, 64, 4, 2),
    128: TileConfig(64, 64, 4, 3, 64, 64, 64, 64, 4, 2),
    256: TileConfig(64, 32, 8, 2, 16, 32, 32, 16, 8, 1),
}
_DEFAULT = TileConfig(64, 32, 4, 2, 16, 32, 32, 16, 4, 1)
_INTERPRETER = TileConfig(32, 16, 4, 1, 16, 16, 16, 16, 4, 1)


def _pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def tile_config(head_dim: int) -> TileConfig:
    if _interpreting():
        return _INTERPRETER
    return _CONFIGS.get(_pad(head_dim), _DEFAULT)


def _stages(stages: int, dtype: torch.dtype, head_dim: int) -> int:
    # float32 tiles take twice the shared memory: keep one stage for wide heads
    return 1 if dtype == torch.float32 and _pad(head_dim) >= 128 else stages


def _use_tma(*tensors) -> bool:
    """Tensor descriptors for these ``(B, H, T, D)`` tensors: Hopper or newer (or the interpreter),
    last dim contiguous, base and every other stride 16-byte aligned (TMA's rules)."""
    if not TMA_ENABLED:
        return False
    if not _interpreting() and torch.cuda.get_device_capability(tensors[0].device) < (9, 0):
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


_TMA_FAILED: set = set()  # kernel specialisations whose TMA variant did not compile


def _launch(kernel, grid, make_args, desc_tensors, block: int, d_pad: int, allow_tma: bool, **meta):
    """Launch ``kernel`` on ``make_args(descs)``: ``descs`` are host tensor descriptors with
    ``[1, 1, block, d_pad]`` blocks over the ``(B, H, T, D)`` ``desc_tensors`` (USE_TMA) where
    ``allow_tma`` and :func:`_use_tma` say so, else the tensors themselves (the kernel ignores them).

    A TMA variant that fails to compile is launched again with per-thread loads: ptxas 12.8
    (Triton 3.6's) segfaults on some TMA specialisations (docs/kernel-notes.md attempt 9: e.g. the
    forward at 128x64 blocks with 2 stages, or head dims above 128). The failure is remembered per
    specialisation, so each compiles once more at most.
    """
    args = make_args(desc_tensors)
    if allow_tma and _use_tma(*desc_tensors):  # (nothing here runs on the common no-TMA path)
        int_spec = tuple((a == 1, a % 16 == 0) for a in args if isinstance(a, int))  # Triton specialises on these
        key = (kernel.fn.__name__, tuple(sorted(meta.items())), int_spec, desc_tensors[0].dtype, block, d_pad)
        if key not in _TMA_FAILED:
            descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block, d_pad]) for t in desc_tensors]
            try:
                return kernel[grid](*make_args(descs), USE_TMA=True, **meta)
            except triton.errors.TritonError as err:  # compile-time only: nothing ran
                _TMA_FAILED.add(key)
                warnings.warn(f"foxacp: {kernel.fn.__name__} with TMA failed to compile ({type(err).__name__}); "
                              "using per-thread loads for this configuration", RuntimeWarning, stacklevel=3)
    return kernel[grid](*args, USE_TMA=False, **meta)


def group_sum_block(d_pad: int) -> int:
    """Rows per group_sum_kernel program: two float32 blocks of them stay in registers up to D=256."""
    return 16 if _interpreting() else min(64, 8192 // d_pad)


def _search_block() -> int:
    return 16 if _interpreting() else 256


def _decode_splits(batch_heads: int, seqlen_k: int, block_n: int, device) -> int:
    """Key splits for the decoding forward: fill about two waves of the GPU, >= 4 blocks a split."""
    if _interpreting():
        sms = 4
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (2 * sms) // max(batch_heads, 1))
    return max(1, min(want, triton.cdiv(seqlen_k, 4 * block_n), 128))


# ----------------------------------------------------------------------------- launchers


@torch.library.custom_op("foxacp::acp_tiles", mutates_args=())
def acp_tiles(decay_global: torch.Tensor, delta: torch.Tensor, seqlen_q: int, plan_m: int,
              plan_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper rule's pre-pass: ``acp_kv_begin (B, H, nqt)``, ``acp_q_end (B, H, nkt)`` int32,
    equal to :func:`foxacp.ops.acp.paper_ranges` (same float64 arithmetic) in one launch."""
    B, H, Tk = decay_global.shape
    nqt, nkt = triton.cdiv(seqlen_q, plan_m), triton.cdiv(Tk, plan_n)
    acp_kv = torch.empty((B, H, nqt), dtype=torch.int32, device=decay_global.device)
    acp_q = torch.empty((B, H, nkt), dtype=torch.int32, device=decay_global.device)
    kernels.acp_tiles_kernel[(max(nqt, nkt), B * H)](
        decay_global, delta.contiguous(), acp_kv, acp_q, *decay_global.stride(), H, seqlen_q, Tk, Tk - seqlen_q,
        nqt, nkt, PLAN_M=plan_m, PLAN_N=plan_n, SEARCH=_search_block(), num_warps=4,
    )
    return acp_kv, acp_q


@acp_tiles.register_fake
def _(decay_global, delta, seqlen_q, plan_m, plan_n):
    B, H, Tk = decay_global.shape
    return (decay_global.new_empty((B, H, -(-seqlen_q // plan_m)), dtype=torch.int32),
            decay_global.new_empty((B, H, -(-Tk // plan_n)), dtype=torch.int32))


def _forward(q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, sm_scale: float, plan_m: int, plan_n: int):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = tile_config(D)
    d_pad = _pad(D)
    out = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    has_acp, varlen = acp_kv is not None, key_lo is not None
    # a block reads the kept range of its plan tile, so it must not span two: a plan on finer rows
    # (the Hopper backend's, when its inputs fall back to these kernels) narrows the blocks
    block_m, block_n, warps, stages = min(cfg.block_m, plan_m), cfg.block_n, cfg.fwd_warps, cfg.fwd_stages
    assert plan_m % block_m == 0 and plan_n % block_n == 0, "the plan's tiles must be whole forward blocks"
    splits = 1
    if Tq <= DECODE_MAX_Q:
        block_m = min(max(16, triton.next_power_of_2(Tq)), block_m)
        warps = 4
        splits = _decode_splits(B * H * triton.cdiv(Tq, block_m), Tk, block_n, q.device)
    stages = _stages(stages, q.dtype, D)
    acp_kv = acp_kv if has_acp else lse
    lo = key_lo if varlen else decay
    if splits > 1:
        acc_part = torch.empty((splits, B * H, Tq, d_pad), dtype=torch.float32, device=q.device)
        ml_part = torch.empty((splits, B * H, Tq, 2), dtype=torch.float32, device=q.device)
    else:
        acc_part = ml_part = lse
    grid = (triton.cdiv(Tq, block_m) * B * H, splits)
    _launch(
        kernels.fwd_kernel, grid,
        lambda kv: [q, k, v, decay, acp_kv, lo, out, lse, acc_part, ml_part, *kv,
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *decay.stride(),
                    key_lo.stride(0) if varlen else 0, *out.stride()[:3],
                    H, H // Hkv, Tq, Tk, Tk - Tq, triton.cdiv(Tq, plan_m), sm_scale * kernels.LOG2E],
        (k, v), block_n, d_pad, d_pad == 128 or _interpreting(),  # where it pays; CI tests it
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, PLAN_M=plan_m, PLAN_N=plan_n,
        NUM_SPLITS=splits, IS_VARLEN=varlen, HAS_ACP=has_acp, EVEN_D=D == d_pad, HEADS_PER_GROUP=HEADS_PER_GROUP,
        num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        kernels.combine_kernel[(triton.cdiv(Tq, block_m), B * H)](
            acc_part, ml_part, out, lse, *out.stride()[:3], H, Tq,
            HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=block_m, NUM_SPLITS=splits, num_warps=4,
        )
    return out, lse


def _dq_pass(dout, q, k, v, decay, acp_kv, key_lo, out, lse, sm_scale: float, plan_m: int, plan_n: int):
    """The first backward kernel: ``(dq, di, dc)``, with ``di = rowsum(dO * O)`` (read by the dK/dV
    kernel) and ``dc`` (float32, contiguous) holding the query-side term at the query positions
    and zeros elsewhere. ``dout``'s last dim must be contiguous."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = tile_config(D)
    d_pad = _pad(D)
    has_acp, varlen = acp_kv is not None, key_lo is not None
    di = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    dc = decay_gradient_buffer(q, k)
    kernels.bwd_dq_kernel[(triton.cdiv(Tq, cfg.m2), B * H)](
        q, k, v, decay, acp_kv if has_acp else di, key_lo if varlen else decay, out, dout, lse, di, dq, dc,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *decay.stride(), key_lo.stride(0) if varlen else 0,
        *out.stride()[:3], *dout.stride()[:3], *dq.stride()[:3], *dc.stride(),
        H, H // Hkv, Tq, Tk, Tk - Tq, triton.cdiv(Tq, plan_m), sm_scale, sm_scale * kernels.LOG2E,
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=cfg.m2, BLOCK_N=cfg.n2, PLAN_M=plan_m, PLAN_N=plan_n, IS_VARLEN=varlen,
        HAS_ACP=has_acp, EVEN_D=D == d_pad, num_warps=cfg.bwd_warps, num_stages=_stages(cfg.bwd_stages, q.dtype, D),
    )
    return dq, di, dc


def decay_gradient_buffer(q, k) -> torch.Tensor:
    """The float32 ``(B, H, Tk)`` d decay a dQ kernel writes at the query positions ``[Tk - Tq, Tk)``
    and the dK/dV kernel then adds to at every position: zeroed only where no query sits."""
    B, H, Tq, Tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    return (torch.empty if Tq == Tk else torch.zeros)((B, H, Tk), dtype=torch.float32, device=q.device)


def key_gradients(q, k, v):
    """``(dk, dv, dk_part, dv_part)``: a dK/dV kernel writes the partials, one per query head; with
    GQA they are float32 buffers that :func:`sum_groups` adds into ``dk``/``dv``, else ``dk``/``dv``."""
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if q.shape[1] == k.shape[1]:
        return dk, dv, dk, dv
    B, H, Tk, D = q.shape[0], q.shape[1], k.shape[2], k.shape[3]
    dk_part, dv_part = (torch.empty((B, H, Tk, D), dtype=torch.float32, device=q.device) for _ in range(2))
    return dk, dv, dk_part, dv_part


def sum_groups(dk, dv, dk_part, dv_part) -> None:
    """GQA: ``dk[:, hk] = sum`` of its group's partials (one pass, both tensors); nothing without GQA."""
    if dk_part is dk:
        return
    B, Hkv, Tk, D = dk.shape
    d_pad = _pad(D)
    block_t = group_sum_block(d_pad)
    kernels.group_sum_kernel[(triton.cdiv(Tk, block_t), B * Hkv)](
        dk_part, dv_part, dk, dv, *dk_part.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], Hkv,
        dk_part.shape[1] // Hkv, Tk, HEAD_DIM=D, D_PAD=d_pad, BLOCK_T=block_t, num_warps=4,
    )


def _backward(dout, q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, out, lse, sm_scale: float, plan_m: int,
              plan_n: int):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = tile_config(D)
    d_pad = _pad(D)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    has_acp, varlen = acp_kv is not None, key_lo is not None
    # dQ first: it computes Di = rowsum(dO * O), which the dK/dV kernel reads
    dq, di, dc = _dq_pass(dout, q, k, v, decay, acp_kv, key_lo, out, lse, sm_scale, plan_m, plan_n)
    dk, dv, dk_part, dv_part = key_gradients(q, k, v)
    kernels.bwd_dkdv_kernel[(triton.cdiv(Tk, cfg.n1), B * H)](
        q, k, v, decay, acp_q if has_acp else di, key_lo if varlen else decay, key_hi if varlen else decay,
        dout, lse, di, dk_part, dv_part, dc,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *decay.stride(), key_lo.stride(0) if varlen else 0,
        *dout.stride()[:3], *dk_part.stride()[:3], *dv_part.stride()[:3], *dc.stride(),
        H, H // Hkv, Tq, Tk, Tk - Tq, triton.cdiv(Tk, plan_n), sm_scale, sm_scale * kernels.LOG2E,
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=cfg.m1, BLOCK_N=cfg.n1, PLAN_M=plan_m, PLAN_N=plan_n, IS_VARLEN=varlen,
        HAS_ACP=has_acp, EVEN_D=D == d_pad, num_warps=cfg.bwd_warps, num_stages=_stages(cfg.bwd_stages, q.dtype, D),
    )
    sum_groups(dk, dv, dk_part, dv_part)
    return dq, dk, dv, dc


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("foxacp::fox_attn_fwd", mutates_args=())
def fox_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                 acp_kv: Optional[torch.Tensor], acp_q: Optional[torch.Tensor], key_lo: Optional[torch.Tensor],
                 key_hi: Optional[torch.Tensor], sm_scale: float, plan_m: int,
                 plan_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out (B, H, Tq, D) in q's dtype, lse (B, H, Tq) float32 in log2 units)``.
    ``acp_kv``/``acp_q``: the plan's :attr:`~foxacp.ops.acp.TilePlan.acp_kv_begin` /
    ``acp_q_end`` (None: dense) on ``plan_m x plan_n`` tiles, which the kernels' blocks divide;
    the forward reads the first, the backward both."""
    return _forward(q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, sm_scale, plan_m, plan_n)


@fox_attn_fwd.register_fake
def _(q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, sm_scale, plan_m, plan_n):
    B, H, Tq, D = q.shape
    out = q.new_empty((B, Tq, H, D)).transpose(1, 2)
    return out, q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.custom_op("foxacp::fox_attn_bwd", mutates_args=())
def fox_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                 acp_kv: Optional[torch.Tensor], acp_q: Optional[torch.Tensor], key_lo: Optional[torch.Tensor],
                 key_hi: Optional[torch.Tensor], out: torch.Tensor,
                 lse: torch.Tensor, sm_scale: float, plan_m: int,
                 plan_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv, d decay)``; d decay is float32 (key- and query-side terms, see kernels).
    ``out``/``lse`` may come from any forward with the same conventions (the Hopper backend's too,
    whose backward runs this one for inputs its bulk copies cannot address)."""
    return _backward(dout, q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, out, lse, sm_scale, plan_m, plan_n)


@fox_attn_bwd.register_fake
def _(dout, q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, out, lse, sm_scale, plan_m, plan_n):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty(decay.shape, dtype=torch.float32, device=decay.device))


def save_for_backward(ctx, inputs, output):
    """Autograd context of a forward op with inputs ``(q, k, v, decay, acp_kv, acp_q, key_lo,
    key_hi, sm_scale, plan_m, plan_n)`` and outputs ``(out, lse)`` (this module's and the Hopper one's)."""
    q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, sm_scale, plan_m, plan_n = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, out, lse)
    ctx.launch = (sm_scale, plan_m, plan_n)


def backward_rule(backward_op):
    """Autograd backward of a forward op saved by :func:`save_for_backward`: ``backward_op`` (with
    ``foxacp::fox_attn_bwd``'s arguments) gives the gradients of q, k, v and the decay."""
    def rule(ctx, dout, dlse):
        q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, out, lse = ctx.saved_tensors
        dq, dk, dv, dc = backward_op(dout, q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, out, lse, *ctx.launch)
        return dq, dk, dv, dc, None, None, None, None, None, None, None
    return rule


fox_attn_fwd.register_autograd(backward_rule(fox_attn_bwd), setup_context=save_for_backward)


# ----------------------------------------------------------------------------- ACP data threshold


def _data_threshold(q, k, sm_scale: float, seq_len: int, log_eps: float) -> torch.Tensor:
    """:func:`foxacp.ops.acp.threshold_from_data` in two launches: one read of q and k for the
    largest row norms (in their memory layout, float32 accumulation), one tiny finishing kernel."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    block_t = 16 if _interpreting() else max(16, min(128, 8192 // _pad(D)))
    chunk = block_t * (2 if _interpreting() else max(1, 32768 // (block_t * _pad(D))))
    num_chunks = triton.cdiv(max(Tq, Tk), chunk)
    part = torch.empty((B * (H + Hkv), num_chunks), dtype=torch.float32, device=q.device)
    kernels.row_norm_max_kernel[(num_chunks, B * (H + Hkv))](
        q, k, part, *q.stride()[:3], *k.stride()[:3], H, Hkv, Tq, Tk, num_chunks,
        HEAD_DIM=D, D_PAD=_pad(D), BLOCK_T=block_t, CHUNK=chunk, num_warps=4,
    )
    delta = torch.empty((B, H), dtype=torch.float32, device=q.device)
    kernels.data_threshold_kernel[(B * Hkv,)](
        part, delta, H, Hkv, num_chunks, float(sm_scale), float(log_eps) - math.log(max(seq_len, 1)),
        GROUP=H // Hkv, BLOCK=16 if _interpreting() else 256, num_warps=4,
    )
    return delta


@torch.library.custom_op("foxacp::acp_data_threshold", mutates_args=())
def acp_data_threshold(q: torch.Tensor, k: torch.Tensor, sm_scale: float, seq_len: int,
                       log_eps: float) -> torch.Tensor:
    """ACP threshold ``(B, H)`` float32 from q ``(B, H, Tq, D)`` and k ``(B, Hkv, Tk, D)`` (no grad)."""
    return _data_threshold(q, k, sm_scale, seq_len, log_eps)


@acp_data_threshold.register_fake
def _(q, k, sm_scale, seq_len, log_eps):
    return q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)


# ----------------------------------------------------------------------------- backend interface


def default_tiles(head_dim: int) -> tuple[int, int]:
    """The forward tiles, which are the ACP plan tiles of every kernel."""
    cfg = tile_config(head_dim)
    return cfg.block_m, cfg.block_n


def required_tiles(head_dim: int) -> tuple[int, int]:
    """A plan given to this backend must be on these tiles (the kernels' blocks divide them)."""
    return default_tiles(head_dim)


def plan(spec: MaskSpec, q, k, sm_scale: float, tiles: Optional[tuple[int, int]] = None) -> TilePlan:
    """The call's tile plan on ``tiles`` (default: :func:`default_tiles`): the paper rule from the
    pre-pass, the local rule's data bound on top (its query side from one kernel that reads q and k once)."""
    bm, bn = tiles or default_tiles(q.shape[-1])
    if not spec.has_acp:
        return TilePlan(spec, bm, bn)
    paper = acp_tiles(spec.decay, spec.delta, spec.seqlen_q, bm, bn)
    return plan_tiles(spec, bm, bn, q=q, k=k, sm_scale=sm_scale, paper=paper, local_first=_local_first)


def _local_first(spec: MaskSpec, q, k, sm_scale: float, block_m: int, block_n: int, key_bounds):
    """:func:`foxacp.ops.acp.local_kv_begin` in one launch (:func:`local_first`)."""
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    return local_first(q.detach(), k.detach(), spec.decay, spec.key_lo, *key_bounds, float(sm_scale),
                       float(spec.log_eps), block_m, block_n)


@torch.library.custom_op("foxacp::local_first", mutates_args=())
def local_first(q: torch.Tensor, k: torch.Tensor, decay_global: torch.Tensor, key_lo: Optional[torch.Tensor],
                k_prefix_max: torch.Tensor, decayed_keys: torch.Tensor, sm_scale: float, log_eps: float,
                plan_m: int, plan_n: int) -> torch.Tensor:
    """The local rule's prunable key tiles per query tile ``(B, H, nqt)`` int32 (``local_first_kernel``)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    nqt, nkt = triton.cdiv(Tq, plan_m), triton.cdiv(Tk, plan_n)
    out = torch.empty((B, H, nqt), dtype=torch.int32, device=q.device)
    varlen = key_lo is not None
    kernels.local_first_kernel[(nqt, B * H)](
        q, k, decay_global, key_lo if varlen else out, k_prefix_max, decayed_keys, out,
        *q.stride()[:3], *k.stride()[:3], *decay_global.stride(), key_lo.stride(0) if varlen else 0,
        H, H // Hkv, Tq, Tk, Tk - Tq, nqt, nkt, sm_scale, LOCAL_MARGIN, log_eps,
        HEAD_DIM=D, D_PAD=_pad(D), ROWS=LOCAL_WINDOW, PLAN_M=plan_m, PLAN_N=plan_n, SEARCH=_search_block(),
        IS_VARLEN=varlen, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )
    return out


@local_first.register_fake
def _(q, k, decay_global, key_lo, k_prefix_max, decayed_keys, sm_scale, log_eps, plan_m, plan_n):
    return q.new_empty((q.shape[0], q.shape[1], -(-q.shape[2] // plan_m)), dtype=torch.int32)


def unavailable_reason(q) -> Optional[str]:
    if triton is None:
        return f"triton is not installed ({_IMPORT_ERROR})"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if _interpreting():
        return None
    if not q.is_cuda:
        return "no CUDA tensor (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    if not torch.compiler.is_compiling() and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "needs an sm80 or newer GPU"
    return None


def _check_offsets_fit_int32(q, k, v) -> None:
    """The kernels offset by the batch index in 64 bits but within one batch element in 32 bits
    (registers and address arithmetic): refuse tensors whose per-batch extent does not fit, as well
    as the (B, H, Tk, D) float32 dK/dV partials of a GQA backward."""
    H, D = q.shape[1], q.shape[3]
    extents = [sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) for t in (q, k, v)]
    if max(extents + [H * k.shape[2] * D]) >= 2**31:
        raise ValueError(f"the GPU kernels index one batch element in 32 bits; q {tuple(q.shape)} and "
                         f"k {tuple(k.shape)} (B, H, T, D) need more than 2**31 elements per batch element: "
                         "split the sequence or the heads across calls, or use backend='torch'")


def launch_args(q, k, v, decay, sm_scale: float, spec: MaskSpec, plan: TilePlan) -> tuple:
    """The forward ops' arguments for a call: checked sizes, unit-stride head dims, the plan's arrays."""
    _check_offsets_fit_int32(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    key_lo = None if spec.key_lo is None else spec.key_lo.contiguous()
    key_hi = None if spec.key_hi is None else spec.key_hi.contiguous()
    return (q, k, v, decay, plan.acp_kv_begin, plan.acp_q_end, key_lo, key_hi, float(sm_scale), plan.block_m,
            plan.block_n)


def needs_autograd(*tensors) -> bool:
    """Whether the forward must go through its custom op: under torch.compile or with gradients.
    Inference calls the launcher directly: the op's dispatch costs ~50 us of host time per call (a
    decoding step's budget) and buys nothing without autograd or torch.compile."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def attend(q, k, v, decay, *, sm_scale: float, spec: MaskSpec, plan: TilePlan):
    args = launch_args(q, k, v, decay, sm_scale, spec, plan)
    out, _ = fox_attn_fwd(*args) if needs_autograd(q, k, v, decay) else _forward(*args)
    return out


def acp_bounds(plan: TilePlan) -> "KernelRanges":
    """The kernels' own element ranges per plan tile, as a :class:`~foxacp.ops.acp.TilePlan`'s ranges.

    For tests and analysis: ``acp_bounds(plan).to_dense()`` must equal ``plan.to_dense()``; the
    returned object's ``kv_begin``... are what the kernels compute (read back from the device).
    """
    spec, bm, bn = plan.spec, plan.block_m, plan.block_n
    B, H, Tq, Tk = spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k
    device = next((t.device for t in (spec.decay, spec.key_lo, plan.acp_kv_begin) if t is not None),
                  torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    nqt, nkt = triton.cdiv(Tq, bm), triton.cdiv(Tk, bn)
    out = [torch.empty((B, H, n), dtype=torch.int32, device=device) for n in (nqt, nqt, nkt, nkt)]
    varlen, has_acp = spec.key_lo is not None, plan.acp_kv_begin is not None
    dummy = out[0]
    acp_kv, acp_q = (plan.acp_kv_begin, plan.acp_q_end) if has_acp else (dummy, dummy)
    lo = spec.key_lo.contiguous() if varlen else dummy
    hi = spec.key_hi.contiguous() if varlen else dummy
    kernels.acp_bounds_kernel[(max(nqt, nkt), B * H)](
        lo, hi, acp_kv, acp_q, *out, lo.stride(0) if varlen else 0, H, Tq, Tk, Tk - Tq, nqt, nkt,
        PLAN_M=bm, PLAN_N=bn, IS_VARLEN=varlen, HAS_ACP=has_acp,
    )
    col_lo, col_hi, row_lo, row_hi = (t.long() for t in out)
    empty_q = col_lo >= col_hi
    empty_k = row_lo >= row_hi
    i32 = lambda t: t.to(torch.int32)  # noqa: E731
    return KernelRanges(i32(torch.where(empty_q, 0, col_lo // bn)), i32(torch.where(empty_q, 0, (col_hi + bn - 1) // bn)),
                        i32(torch.where(empty_k, 0, row_lo // bm)), i32(torch.where(empty_k, 0, (row_hi + bm - 1) // bm)),
                        nkt)


@dataclass(frozen=True)
class KernelRanges:
    """Tile ranges as the kernels compute them (see :func:`acp_bounds`)."""

    kv_begin: torch.Tensor
    kv_end: torch.Tensor
    q_begin: torch.Tensor
    q_end: torch.Tensor
    num_k_tiles: int

    def to_dense(self) -> torch.Tensor:
        n = torch.arange(self.num_k_tiles, device=self.kv_begin.device)
        return (n >= self.kv_begin[..., None]) & (n < self.kv_end[..., None])
