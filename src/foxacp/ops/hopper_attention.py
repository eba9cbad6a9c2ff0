"""``backend="hopper"``: forgetting attention with Gluon kernels for Hopper (sm90+) GPUs.

Two custom ops own the call: ``foxacp::hopper_attn_fwd`` runs the Gluon forward of
:mod:`foxacp.ops.hopper_kernels` (TMA K/V ring, asynchronous warpgroup MMAs with the next QK^T
overlapping the softmax) and ``foxacp::hopper_attn_bwd`` the backward: the Gluon dQ kernel (the
forward's key ring; it also writes Di and the query-side dc term), then the Gluon dK/dV kernel (TMA
ring of q, dO and the row statistics, warpgroup MMAs on transposed tiles, the dS column sums for
dlog_fgate in the same loop). Where it measured faster, a kernel's ring is fed by a one-warp
producer partition under a register cap (:func:`launch_config`, :func:`backward_launch`). All
follow the Triton kernels' ``(out, lse)`` conventions. ACP: the plan is built by the Triton pre-pass
on the forward's tiles (:func:`required_tiles`); every backward block divides them.

Covered: bf16/fp16, head dims 64 and 128, GQA, packed sequences / left padding, Tq <= Tk, any T.
Decoding calls (Tq <= ``DECODE_MAX_Q``) run the Triton flash-decoding forward on the same plan;
inputs the bulk-copy engine cannot address (16-byte alignment) run the Triton kernels.
Needs Triton's Gluon dialect with warpgroup MMAs (tested with Triton 3.6; 3.4's has none) and an
sm90+ GPU; ``"auto"`` picks it where it serves the call, elsewhere the backend says why.
"""

from typing import Optional

import torch

from . import triton_attention as portable
from .acp import MaskSpec, TilePlan

try:
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from . import hopper_kernels as kernels
except Exception as _err:  # noqa: BLE001 - any failure of a changed Gluon API; pragma: no cover
    kernels = None
    _IMPORT_ERROR = f"{type(_err).__name__}: {_err}"

HEAD_DIMS = (64, 128)
_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def tiles(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of the Gluon forward at a covered head dim (also the ACP plan tiles).

    Measured on an H200 (docs/kernel-notes.md, attempts 21 and 25). D=64, forward kernel at 16k:
    one warpgroup on 64x128 blocks with a producer warp 2.72 ms, 64x64 blocks without one (three
    CTAs per SM) 2.95, 64x128 without one 2.93; before the producer warp (attempt 21, against
    Triton's forward) 64x64 1.00x, 128x128 on two warpgroups 1.15x, 64x128 1.36x. D=128 (attempt
    21): two warpgroups on 128x128 blocks 0.91x Triton's forward (128x64 1.01x, 64x64 1.25x).
    """
    return (64, 128) if head_dim <= 64 else (128, 128)


def launch_config(head_dim: int) -> dict:
    """The forward's ring depth, consumer warps (one 16-row MMA slice each) and producer warp: 3
    stages (shared memory: two CTAs per SM at D=64, one at D=128). A producer warp takes a
    warpgroup's share of the register file, so ``maxnreg`` caps every thread such that those CTAs
    fit an SM's 64K registers; the consumers get what the producer's 24 leave (232 at D=64, 240 at
    D=128). Measured on an H200 (docs/kernel-notes.md, attempt 25; 16k): D=128 2.27-2.31 ms with
    the producer against 2.40 without; D=64 see :func:`tiles`."""
    if head_dim <= 64:
        return dict(STAGES=3, num_warps=4, PRODUCER_WARP=True, maxnreg=128)
    return dict(STAGES=3, num_warps=8, PRODUCER_WARP=True, maxnreg=168)


# The backward kernels' blocks (dK/dV: ``BLOCK_N = 16 * num_warps`` keys against ``BLOCK_M`` query
# rows; dQ: ``BLOCK_M = 16 * num_warps`` rows against ``BLOCK_N`` keys; both divide the forward's tiles
# at D=64 and 128) and ring depth. Measured on an H200 (docs/kernel-notes.md, attempt 22): one
# warpgroup on 64x64 blocks is the fastest dK/dV kernel at both head dims (D=128: 3.50 ms against 4.25
# for two warpgroups on 128 keys at (2, 8, 16k)); 2 and 3 stages tie; 32-row blocks are slower.
BACKWARD_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, STAGES=2, num_warps=4)


def backward_launch(head_dim: int) -> tuple[dict, dict]:
    """Launch options of the dQ and of the dK/dV kernel beyond :data:`BACKWARD_BLOCKS`: whether each
    has a producer warp, and the register cap (``maxnreg``) that sets its CTAs per SM. Measured on
    an H200 (docs/kernel-notes.md, attempt 25; 16k): D=64 dK/dV 4.63 ms with the producer (two CTAs
    per SM, 232 registers) against 5.08 without; D=64 dQ without the producer 3.35 at 128 registers
    (four CTAs per SM, no spills) against 3.60 at its natural 153 (three), with it 3.85-3.92;
    D=128 dQ 2.91 with it (232 registers, two CTAs) against 2.99 without, while the D=128 dK/dV
    consumers need more than 232 registers (184 bytes spilled, 5.97 ms against 3.63 without)."""
    if head_dim <= 64:
        return dict(PRODUCER_WARP=False, maxnreg=128), dict(PRODUCER_WARP=True, maxnreg=128)
    return dict(PRODUCER_WARP=True, maxnreg=128), dict(PRODUCER_WARP=False)


def required_tiles(head_dim: int) -> tuple[int, int]:
    return tiles(head_dim) if head_dim in HEAD_DIMS else portable.default_tiles(head_dim)


def plan(spec: MaskSpec, q, k, sm_scale: float) -> TilePlan:
    return portable.plan(spec, q, k, sm_scale, tiles=required_tiles(q.shape[-1]))


def unavailable_reason(q) -> Optional[str]:
    if kernels is None:
        return f"Triton's Gluon dialect is not available ({_IMPORT_ERROR})"
    if q.dtype not in _GL_DTYPES:
        return f"dtype {q.dtype} is not supported (bfloat16, float16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {list(HEAD_DIMS)}"
    if not q.is_cuda:
        return "needs a CUDA tensor on an sm90 (Hopper) or newer GPU"
    if not torch.compiler.is_compiling() and torch.cuda.get_device_capability(q.device) < (9, 0):
        return "needs an sm90 (Hopper) or newer GPU"
    return None


def _tma_ready(t: torch.Tensor) -> bool:
    """The bulk-copy engine's rules: unit last stride, 16-byte aligned base and strides, no
    broadcast (stride 0) dimension."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * size) % 16 == 0 and (s > 0 or n == 1) for s, n in zip(t.stride()[:-1], t.shape[:-1])))


def _descriptor(t: torch.Tensor, block: int) -> "TensorDescriptor":
    """A ``[1, 1, block, D]``-block descriptor over a ``(B, H, T, D)`` view (zero fill outside)."""
    shape = [1, 1, block, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(shape, getattr(gl, _GL_DTYPES[t.dtype]))
    return TensorDescriptor(t, list(t.shape), list(t.stride()), shape, layout)


def _float_rows(t: torch.Tensor, block: int, fill: float = 0.0):
    """``(copy, descriptor)`` of a float32 ``(B, H, T)`` tensor for ``[1, 1, block]`` bulk copies:
    a fresh contiguous tensor padded with ``fill`` to whole blocks (16-byte strides whatever the
    input's strides, as TMA needs; a few microseconds: 2 MB at (2, 16, 16k))."""
    length = t.shape[-1]
    copy = t.new_full((*t.shape[:-1], length + (-length % block)), fill)
    copy[..., :length] = t
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
    return copy, TensorDescriptor(copy, list(copy.shape), list(copy.stride()), [1, 1, block], layout)


def _forward(q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, sm_scale: float, plan_m: int, plan_n: int):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Tq <= portable.DECODE_MAX_Q or not all(_tma_ready(t) for t in (q, k, v)):
        return portable._forward(q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, sm_scale, plan_m, plan_n)
    block_m, block_n = tiles(D)
    assert (plan_m, plan_n) == (block_m, block_n), "the plan must be on this kernel's tiles"
    decay, c_desc = _float_rows(decay, block_n)  # the decays travel with K through the bulk-copy engine
    out = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    varlen = key_lo is not None
    num_qt = triton.cdiv(Tq, block_m)
    kernels.fwd_kernel[(num_qt * B * H,)](
        _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), c_desc, decay,
        acp_kv if acp_kv is not None else lse, key_lo if varlen else decay, out, lse,
        decay.stride(0), decay.stride(1), key_lo.stride(0) if varlen else 0, *out.stride()[:3],
        H, H // Hkv, Tq, Tk - Tq, num_qt, sm_scale * kernels.LOG2E,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, IS_VARLEN=varlen, HAS_ACP=acp_kv is not None,
        HEADS_PER_GROUP=portable.HEADS_PER_GROUP, **launch_config(D),
    )
    return out, lse


@torch.library.custom_op("foxacp::hopper_attn_fwd", mutates_args=())
def hopper_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                    acp_kv: Optional[torch.Tensor], acp_q: Optional[torch.Tensor], key_lo: Optional[torch.Tensor],
                    key_hi: Optional[torch.Tensor], sm_scale: float, plan_m: int,
                    plan_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward with ``foxacp::fox_attn_fwd``'s arguments and outputs (out, lse in log2 units)."""
    return _forward(q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, sm_scale, plan_m, plan_n)


@hopper_attn_fwd.register_fake
def _(q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, sm_scale, plan_m, plan_n):
    B, H, Tq, D = q.shape
    return q.new_empty((B, Tq, H, D)).transpose(1, 2), q.new_empty((B, H, Tq), dtype=torch.float32)


def _dq_pass(descs, q, k, decay_rows, c_desc, acp_kv, key_lo, out, lse, sm_scale: float, plan_m: int,
             plan_n: int, launch: dict):
    """The Gluon dQ kernel: ``(dq, di, dc)`` as ``triton_attention._dq_pass`` returns them.
    ``descs``: the bulk-copy descriptors of q, dO, k, v on :data:`BACKWARD_BLOCKS`;
    ``decay_rows``/``c_desc``: the decays padded for bulk copies (:func:`_float_rows`); ``launch``:
    its options from :func:`backward_launch`."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    blocks = BACKWARD_BLOCKS
    di = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    dc = portable.decay_gradient_buffer(q, k)
    varlen = key_lo is not None
    kernels.bwd_dq_kernel[(triton.cdiv(Tq, blocks["BLOCK_M"]), B * H)](
        *descs, c_desc, decay_rows, acp_kv if acp_kv is not None else di,
        key_lo if varlen else di, out, lse, di, dq, dc,
        decay_rows.stride(0), decay_rows.stride(1), key_lo.stride(0) if varlen else 0, *out.stride()[:3],
        *dq.stride()[:3], dc.stride(0), dc.stride(1), H, H // Hkv, Tq, Tk - Tq, triton.cdiv(Tq, plan_m),
        sm_scale, sm_scale * kernels.LOG2E,
        HEAD_DIM=D, PLAN_M=plan_m, PLAN_N=plan_n, IS_VARLEN=varlen, HAS_ACP=acp_kv is not None, **blocks,
        **launch,
    )
    return dq, di, dc


def _backward(dout, q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, out, lse, sm_scale: float, plan_m: int,
              plan_n: int):
    if not _tma_ready(dout):  # a fresh tensor: contiguous strides (also of size-1 dims), aligned base
        dout = dout.clone(memory_format=torch.contiguous_format)
    if not all(_tma_ready(t) for t in (q, k, v, dout)):
        return portable._backward(dout, q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, out, lse, sm_scale,
                                  plan_m, plan_n)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    blocks = BACKWARD_BLOCKS
    assert plan_m % blocks["BLOCK_M"] == 0 and plan_n % blocks["BLOCK_N"] == 0, "plan tiles must be whole blocks"
    assert blocks["BLOCK_M"] == blocks["BLOCK_N"], "one padded decay copy serves both kernels' bulk copies"
    decay_rows, c_desc = _float_rows(decay, blocks["BLOCK_N"])
    descs = (_descriptor(q, blocks["BLOCK_M"]), _descriptor(dout, blocks["BLOCK_M"]), _descriptor(k, blocks["BLOCK_N"]),
             _descriptor(v, blocks["BLOCK_N"]))
    dq_launch, dkdv_launch = backward_launch(D)
    dq, di, dc = _dq_pass(descs, q, k, decay_rows, c_desc, acp_kv, key_lo, out, lse, sm_scale, plan_m, plan_n,
                          dq_launch)
    dk, dv, dk_part, dv_part = portable.key_gradients(q, k, v)
    _, lse_desc = _float_rows(lse, blocks["BLOCK_M"], fill=float("inf"))  # padded rows see nothing
    _, di_desc = _float_rows(di, blocks["BLOCK_M"])
    # the query rows' decays c[Tk - Tq + r], copied so that every bulk copy starts 16-byte aligned
    cq_desc = c_desc if Tq == Tk else _float_rows(decay[..., Tk - Tq:], blocks["BLOCK_M"])[1]
    varlen = key_lo is not None
    kernels.bwd_dkdv_kernel[(triton.cdiv(Tk, blocks["BLOCK_N"]), B * H)](
        *descs, lse_desc, di_desc, cq_desc, decay_rows,
        acp_q if acp_q is not None else di, key_lo if varlen else di, key_hi if varlen else di, dk_part, dv_part, dc,
        decay_rows.stride(0), decay_rows.stride(1), key_lo.stride(0) if varlen else 0, *dk_part.stride()[:3],
        *dv_part.stride()[:3], dc.stride(0), dc.stride(1),
        H, H // Hkv, Tq, Tk, Tk - Tq, triton.cdiv(Tk, plan_n), sm_scale, sm_scale * kernels.LOG2E,
        HEAD_DIM=D, PLAN_M=plan_m, PLAN_N=plan_n, IS_VARLEN=varlen, HAS_ACP=acp_q is not None, **blocks,
        **dkdv_launch,
    )
    portable.sum_groups(dk, dv, dk_part, dv_part)
    return dq, dk, dv, dc


@torch.library.custom_op("foxacp::hopper_attn_bwd", mutates_args=())
def hopper_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                    acp_kv: Optional[torch.Tensor], acp_q: Optional[torch.Tensor], key_lo: Optional[torch.Tensor],
                    key_hi: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, sm_scale: float,
                    plan_m: int, plan_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward with ``foxacp::fox_attn_bwd``'s arguments and outputs ``(dq, dk, dv, d decay)``."""
    return _backward(dout, q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, out, lse, sm_scale, plan_m, plan_n)


@hopper_attn_bwd.register_fake
def _(dout, q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, out, lse, sm_scale, plan_m, plan_n):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty(decay.shape, dtype=torch.float32, device=decay.device))


hopper_attn_fwd.register_autograd(portable.backward_rule(hopper_attn_bwd), setup_context=portable.save_for_backward)


def attend(q, k, v, decay, *, sm_scale: float, spec: MaskSpec, plan: TilePlan):
    args = portable.launch_args(q, k, v, decay, sm_scale, spec, plan)
    out, _ = hopper_attn_fwd(*args) if portable.needs_autograd(q, k, v, decay) else _forward(*args)
    return out
