"""The public forgetting-attention call (input checks, layouts, ACP, dispatch) and the gate cumsum."""

from __future__ import annotations

import math
from typing import Literal

import torch

from . import backends
from .acp import ACP_RULES, AcpStats, MaskSpec, TilePlan, threshold_from_data
from .layout import SequenceLayout

Backend = Literal["auto", "reference", "torch", "triton", "hopper"]


def forgetting_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_fgate: torch.Tensor,
    *,
    head_first: bool = False,
    sm_scale: float | None = None,
    adaptive_threshold: None | str | float | torch.Tensor = None,
    log_eps: float = -10.0,
    acp_rule: str = "paper",
    seq_start: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    layout: SequenceLayout | None = None,
    acp_plan: TilePlan | None = None,
    backend: Backend = "auto",
    return_stats: bool = False,
    cumulative_gate: bool = False,
):
    """Causal softmax attention with a forget gate, optionally pruned by ACP.

    Layout (``head_first=False``): q ``(B, Tq, H, D)``; k, v ``(B, Tk, Hkv, D)``;
    log_fgate ``(B, Tk, H)`` float32 (``log f``, <= 0). ``head_first=True`` swaps T and H.
    ``H % Hkv == 0``; query head ``h`` reads kv head ``h // (H // Hkv)`` (GQA).

    With ``c = cumsum(log_fgate)`` (float32, restarted per packed sequence) and
    ``s_ij = sm_scale * q_i . k_j``::

        o_i = sum_{j<=i} exp(s_ij + c_i - c_j) v_j / sum_{j<=i} exp(s_ij + c_i - c_j)

    ``Tq <= Tk``: the queries are the last ``Tq`` positions, so with Tq=2, Tk=4 the visible
    pairs are ``[[1,1,1,0],[1,1,1,1]]``.

    Args:
        sm_scale: score scale, default ``1/sqrt(D)``.
        adaptive_threshold: ACP. ``None``: dense. ``"auto"``: ``delta = -(2U + ln Tk) + log_eps``,
            ``U = max|q_i| max|k_j| sm_scale`` per (batch, head). A float or a tensor
            broadcastable to ``(B, H)``: delta itself (<= 0; a CUDA tensor is checked without a host
            sync, so a bad value fails as a device-side assert). A (query tile, key tile) pair
            whose largest decay ``c[first query] - c[last key]`` is below delta is skipped; the
            attention mass removed from any query is then <= ``e^log_eps``. ACP needs a real
            forget gate: ``log_fgate <= 0`` (checked like a tensor delta). NaN activations make
            the data threshold prune nothing, so ACP never turns a finite dense output into
            another value beyond the eps bound.
        acp_rule: ``"paper"`` (the rule above) or ``"local"``: also prunes what the data-aware bound
            of :mod:`foxacp.ops.acp` proves removable (same eps guarantee, fewer kept tiles).
        seq_start: ``(B,)`` ints; positions before ``seq_start[b]`` are left padding, never
            attended, and their outputs are 0.
        cu_seqlens: ``(N+1,)`` int offsets of packed sequences (B must be 1, Tq == Tk);
            attention and gate decay never cross a boundary.
        layout: a :class:`~foxacp.ops.layout.SequenceLayout` built once for the batch (instead of
            ``seq_start``/``cu_seqlens``; models pass one to every layer).
        acp_plan: a :class:`~foxacp.ops.acp.TilePlan` to compute instead of planning (e.g. the plan
            of another backend's call, to run the reference on exactly its tiles; the Triton and
            Hopper backends take only plans on their own tiles, ``required_tiles``).
        backend: ``"reference"`` (dense PyTorch), ``"torch"`` (block-sparse PyTorch),
            ``"triton"`` (GPU kernels), ``"hopper"`` (sm90+: Gluon kernels) or ``"auto"`` (on CUDA
            hopper where it serves the call, else triton when available; else torch).
        return_stats: also return :class:`~foxacp.ops.acp.AcpStats`.
        cumulative_gate: ``log_fgate`` already holds ``c = cumsum(log f)`` (non-increasing), as a
            decode cache keeps it; no cumsum is taken. Not with ``cu_seqlens``.

    Returns:
        Output in q's layout and dtype, or ``(output, AcpStats)``.
    """
    _check_tensors(q, k, v, log_fgate, head_first)
    if head_first:
        q_c, k_c, v_c, gate = q, k, v, log_fgate
    else:
        q_c, k_c, v_c, gate = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), log_fgate.transpose(1, 2)
    batch, heads, seqlen_q, head_dim = q_c.shape
    seqlen_k = k_c.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(sm_scale, (int, float)) or not math.isfinite(sm_scale) or sm_scale <= 0:
        raise ValueError(f"sm_scale must be a positive finite number, got {sm_scale!r}")
    if acp_rule not in ACP_RULES:
        raise ValueError(f"acp_rule must be one of {list(ACP_RULES)}, got {acp_rule!r}")
    if layout is None:
        layout = SequenceLayout.from_arguments(seq_start, cu_seqlens, batch, seqlen_q, seqlen_k, q.device)
    elif seq_start is not None or cu_seqlens is not None:
        raise ValueError("pass layout or seq_start/cu_seqlens, not both")
    else:
        layout.check(batch, seqlen_q, seqlen_k)

    delta = _threshold(adaptive_threshold, log_eps, q_c, k_c, sm_scale, batch, heads, seqlen_k)
    if cumulative_gate:
        if layout.is_packed:
            raise ValueError("cumulative_gate=True cannot be combined with cu_seqlens")
        decay, decay_global = gate, (None if delta is None else gate.detach().double())
    else:
        decay, decay_global = cumulative_decay(gate, layout)
    if delta is not None:
        _check_forget_gate(gate, cumulative_gate)
        # a NaN gate poisons the decay from there on: plan it as fully decayed, so rows before it
        # keep their tiles (rows after it are NaN with or without ACP)
        decay_global = decay_global.nan_to_num(nan=-math.inf)
    spec = MaskSpec(batch, heads, seqlen_q, seqlen_k, layout.key_lo, layout.key_hi, decay_global, delta,
                    acp_rule, log_eps)

    impl = backends.resolve(backend, q_c, head_dim)
    plan = impl.plan(spec, q_c, k_c, sm_scale) if acp_plan is None else _checked_plan(acp_plan, impl, spec, head_dim)
    out = impl.attend(q_c, k_c, v_c, decay, sm_scale=sm_scale, spec=spec, plan=plan)
    if not head_first:
        out = out.transpose(1, 2)
    if not return_stats:
        return out
    return out, AcpStats.from_plan(plan, head_dim, delta)


def _checked_plan(plan, impl, spec: MaskSpec, head_dim: int) -> TilePlan:
    if not isinstance(plan, TilePlan):
        raise TypeError(f"acp_plan must be a foxacp.acp.TilePlan, got {type(plan).__name__}")
    want = (spec.batch, spec.heads, -(-spec.seqlen_q // plan.block_m))
    if (plan.spec.batch, plan.spec.heads, plan.seqlen_q, plan.seqlen_k) != \
            (spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k):
        raise ValueError(f"acp_plan was made for (B, H, Tq, Tk) = {(plan.spec.batch, plan.spec.heads, plan.seqlen_q, plan.seqlen_k)}, "
                         f"this call has {(spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k)}")
    if plan.acp_kv_begin is not None and tuple(plan.acp_kv_begin.shape) != want:
        raise ValueError(f"acp_plan.acp_kv_begin must have shape {want}, got {tuple(plan.acp_kv_begin.shape)}")
    tiles = impl.required_tiles(head_dim)
    if tiles is not None and (plan.block_m, plan.block_n) != tiles:
        raise ValueError(f"this backend computes {tiles} tiles; acp_plan has {(plan.block_m, plan.block_n)}")
    return plan


def cumulative_decay(log_fgate: torch.Tensor, layout: SequenceLayout | None = None, *,
                     initial: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cumulative log forget gate of ``log_fgate`` ``(B, H, T)``, summed over the last dim.

    The gates cover the last ``T`` key positions of ``layout`` (all of them, or the new ones of a
    decoding step whose earlier positions a cache holds; ``layout`` None: no padding, no packing)::

        c_t = initial + sum_{s <= t} log f_s    (initial: ``(B, H)``, c of the position before; 0 if None)

    Gates at left-padded positions count as 0, so padding never enters a visible decay; in a packed
    layout ``c`` restarts at 0 at every sequence start. The sum runs in float64 (a float32 sum over
    long contexts drifts) and is returned twice: as float32 ``c`` (what attention adds to its
    scores) and as the global float64 sum, not restarted, which is monotone across packed sequences
    (what the ACP search needs); the restart subtracts each sequence's start value in float64, so
    it is exact.
    """
    batch, heads, length = log_fgate.shape
    past = 0 if layout is None else layout.seqlen - length
    if past < 0:
        raise ValueError(f"log_fgate covers {length} positions, more than the layout's {layout.seqlen}")
    if initial is not None and tuple(initial.shape) != (batch, heads):
        raise ValueError(f"initial must have shape (B, H) = {(batch, heads)}, got {tuple(initial.shape)}")
    if layout is not None and layout.is_packed and (past or initial is not None):
        raise ValueError("a packed layout (cu_seqlens) cannot continue a decay (initial, or a longer layout)")
    if layout is not None and layout.is_left_padded:
        positions = torch.arange(past, layout.seqlen, device=log_fgate.device)
        log_fgate = log_fgate.masked_fill(positions[None, None, :] < layout.key_lo[:, None, past:], 0.0)
    decay_global = torch.cumsum(log_fgate, dim=-1, dtype=torch.float64)  # no separate float64 copy of the gates
    if initial is not None:
        decay_global = decay_global + initial.double()[..., None]
    packed = layout is not None and layout.is_packed
    decay = decay_global - _value_before(decay_global, layout.key_lo) if packed else decay_global
    return decay.float(), decay_global.detach()


def _check_forget_gate(gate: torch.Tensor, cumulative: bool) -> None:
    """ACP's bound assumes a decay that never grows: ``log f <= 0`` (or a non-increasing ``c``)."""
    values = gate.detach()
    steps = values.diff(dim=-1) if cumulative else values
    valid = ~(steps > 0).any()  # NaN passes here: it is planned as fully decayed
    what = "cumulative_gate must be non-increasing" if cumulative else "log_fgate must be <= 0 (log of a forget gate)"
    if values.is_cuda or torch.compiler.is_compiling():  # no host sync on the hot path
        torch._assert_async(valid, f"{what} when ACP is on")
    elif not bool(valid):
        raise ValueError(f"{what} when ACP is on (adaptive_threshold is set); a positive value breaks the eps bound")


def _value_before(values: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """``values[..., starts - 1]`` per position (0 where starts == 0); values ``(B, H, T)``."""
    index = (starts.long() - 1).clamp_min(0)[:, None, :].expand(-1, values.shape[1], -1)
    before = values.gather(-1, index)
    return torch.where(starts[:, None, :] > 0, before, torch.zeros_like(before))


def _check_tensors(q, k, v, log_fgate, head_first: bool) -> None:
    names = {"q": q, "k": k, "v": v, "log_fgate": log_fgate}
    for name, t in names.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    layout = "(B, H, T, D)" if head_first else "(B, T, H, D)"
    for name in ("q", "k", "v"):
        if names[name].dim() != 4:
            raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(names[name].shape)}")
    if not q.is_floating_point() or q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"q must be float16/bfloat16/float32/float64, got {q.dtype}")
    for name in ("k", "v"):
        if names[name].dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {names[name].dtype}")
        if names[name].device != q.device:
            raise ValueError(f"{name} is on {names[name].device}, q on {q.device}")
    if log_fgate.dtype != torch.float32:
        raise TypeError(f"log_fgate must be float32 (the cumsum needs it), got {log_fgate.dtype}")
    if log_fgate.device != q.device:
        raise ValueError(f"log_fgate is on {log_fgate.device}, q on {q.device}")
    t_dim, h_dim = (2, 1) if head_first else (1, 2)
    B, Tq, H, D = q.shape[0], q.shape[t_dim], q.shape[h_dim], q.shape[3]
    Tk, Hkv = k.shape[t_dim], k.shape[h_dim]
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k has batch {k.shape[0]}, q has batch {B}")
    if k.shape[3] != D:
        raise ValueError(f"k has head dim {k.shape[3]}, q has head dim {D}")
    if D < 1 or Tq < 1 or B < 1:
        raise ValueError(f"q must have B >= 1, T >= 1 and D >= 1, got shape {tuple(q.shape)}")
    if q.device.type == "meta":
        raise ValueError("forgetting_attention needs tensors with data; got device 'meta' "
                         "(under torch.compile the custom op's fake implementation serves shapes)")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv})")
    if Tq > Tk:
        raise ValueError(f"q has {Tq} positions, more than k's {Tk} (queries must be the last Tq keys)")
    gate_shape = (B, H, Tk) if head_first else (B, Tk, H)
    if tuple(log_fgate.shape) != gate_shape:
        raise ValueError(f"log_fgate must have shape {gate_shape} (one gate per query head), "
                         f"got {tuple(log_fgate.shape)}")


def _data_threshold(q, k, sm_scale: float, seqlen_k: int, log_eps: float) -> torch.Tensor:
    """:func:`~foxacp.ops.acp.threshold_from_data`; half-precision CUDA inputs take the Triton
    backend's fused version (one read of q and k in their layout) where it is available."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype:
        try:
            triton_backend = backends.load("triton")
        except ValueError:
            triton_backend = None
        if triton_backend is not None and triton_backend.unavailable_reason(q) is None:
            return triton_backend.acp_data_threshold(q.detach(), k.detach(), float(sm_scale), int(seqlen_k),
                                                     float(log_eps))
    return threshold_from_data(q, k, sm_scale, seqlen_k, log_eps)


def _threshold(adaptive_threshold, log_eps: float, q, k, sm_scale: float, batch: int, heads: int,
               seqlen_k: int) -> torch.Tensor | None:
    """ACP threshold delta as float32 ``(B, H)``, or None for dense attention."""
    if adaptive_threshold is None:
        return None
    if isinstance(adaptive_threshold, str):
        if adaptive_threshold != "auto":
            raise ValueError(f"adaptive_threshold must be None, 'auto', a float or a tensor, "
                             f"got {adaptive_threshold!r}")
        if not isinstance(log_eps, (int, float)) or not log_eps < 0:
            raise ValueError(f"log_eps must be a negative number, got {log_eps!r}")
        # NaN activations give a NaN bound: prune nothing there rather than everything
        return _data_threshold(q, k, sm_scale, seqlen_k, log_eps).float().nan_to_num(nan=-math.inf)
    if isinstance(adaptive_threshold, bool) or not isinstance(adaptive_threshold, (int, float, torch.Tensor)):
        raise TypeError(f"adaptive_threshold must be None, 'auto', a float or a tensor, "
                        f"got {type(adaptive_threshold).__name__}")
    if isinstance(adaptive_threshold, (int, float)):
        if math.isnan(adaptive_threshold) or adaptive_threshold > 0:
            raise ValueError(f"adaptive_threshold must be <= 0 and not NaN (a log-decay), got {adaptive_threshold}")
        return torch.full((batch, heads), float(adaptive_threshold), device=q.device)
    delta = torch.as_tensor(adaptive_threshold, dtype=torch.float32, device=q.device)
    try:
        delta = torch.broadcast_to(delta, (batch, heads)).contiguous()
    except RuntimeError:
        raise ValueError(f"adaptive_threshold tensor of shape {tuple(delta.shape)} does not "
                         f"broadcast to (B, H) = ({batch}, {heads})") from None
    valid = (delta <= 0).all()  # False for NaN too; two small kernels (decoding calls this per layer)
    if delta.is_cuda or torch.compiler.is_compiling():  # no host sync (nor graph break) on the hot path
        torch._assert_async(valid)
    elif not bool(valid):
        raise ValueError(f"adaptive_threshold must be <= 0 and not NaN (a log-decay), got {adaptive_threshold}")
    return delta
