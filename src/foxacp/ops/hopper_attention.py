"""``backend="hopper"``: forgetting attention with a Gluon forward for Hopper (sm90+) GPUs.

One custom op, ``foxacp::hopper_attn_fwd``, owns the call: its forward is the Gluon kernel of
:mod:`foxacp.ops.hopper_kernels` (TMA K/V ring, asynchronous warpgroup MMAs with the next QK^T
overlapping the softmax), its backward the Triton backward kernels (``foxacp::fox_attn_bwd``), which
read the same ``(out, lse)`` conventions. ACP: the plan is built by the Triton pre-pass on this
kernel's tiles (:func:`required_tiles`); the Triton backward's blocks divide them.

Covered: bf16/fp16, head dims 64 and 128, GQA, packed sequences / left padding, Tq <= Tk, any T.
Decoding calls (Tq <= ``DECODE_MAX_Q``) run the Triton flash-decoding forward on the same plan;
inputs the bulk-copy engine cannot address (16-byte alignment) run the Triton forward too.
Needs Triton's Gluon dialect with warpgroup MMAs (tested with Triton 3.6; 3.4's has none) and an
sm90+ GPU; elsewhere the backend says why and ``"auto"`` never picks it.
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
except (ImportError, AttributeError) as _err:  # pragma: no cover - depends on the environment
    kernels = None
    _IMPORT_ERROR = f"{type(_err).__name__}: {_err}"

HEAD_DIMS = (64, 128)
_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def tiles(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of the Gluon kernel at a covered head dim (also the ACP plan tiles).

    Measured on an H200 (docs/kernel-notes.md, attempt 21), forward time against Triton's: D=64 one
    warpgroup on 64x64 blocks 1.00x (128x128 on two warpgroups 1.15x, 64x128 1.36x); D=128 two
    warpgroups on 128x128 blocks 0.91x (128x64 1.01x, 64x64 1.25x).
    """
    return (64, 64) if head_dim <= 64 else (128, 128)


def launch_config(head_dim: int) -> dict:
    """Ring depth and warps: one 16-row MMA slice per warp; 3 stages at D=128 (shared memory)."""
    return dict(STAGES=4, num_warps=4) if head_dim <= 64 else dict(STAGES=3, num_warps=8)


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
    """The bulk-copy engine's rules: unit last stride, 16-byte aligned base and strides."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1])


def _descriptor(t: torch.Tensor, block: int) -> "TensorDescriptor":
    """A ``[1, 1, block, D]``-block descriptor over a ``(B, H, T, D)`` view (zero fill outside)."""
    shape = [1, 1, block, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(shape, getattr(gl, _GL_DTYPES[t.dtype]))
    return TensorDescriptor(t, list(t.shape), list(t.stride()), shape, layout)


def _forward(q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, sm_scale: float, plan_m: int, plan_n: int):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Tq <= portable.DECODE_MAX_Q or not all(_tma_ready(t) for t in (q, k, v)):
        return portable._forward(q, k, v, decay, acp_kv, acp_q, key_lo, key_hi, sm_scale, plan_m, plan_n)
    block_m, block_n = tiles(D)
    assert (plan_m, plan_n) == (block_m, block_n), "the plan must be on this kernel's tiles"
    # the decays travel with K through the bulk-copy engine, which needs 16-byte row strides: a copy
    # padded to whole blocks (2 MB at (2, 16, 16k), a few microseconds)
    decay = torch.nn.functional.pad(decay, (0, -Tk % block_n))
    c_desc = TensorDescriptor(decay, list(decay.shape), list(decay.stride()), [1, 1, block_n],
                              gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3))
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


hopper_attn_fwd.register_autograd(portable.backward_rule, setup_context=portable.save_for_backward)


def attend(q, k, v, decay, *, sm_scale: float, spec: MaskSpec, plan: TilePlan):
    args = portable.launch_args(q, k, v, decay, sm_scale, spec, plan)
    out, _ = hopper_attn_fwd(*args) if portable.needs_autograd(q, k, v, decay) else _forward(*args)
    return out
