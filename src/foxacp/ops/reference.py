"""Exact forgetting attention in plain PyTorch: the executable specification.

For query ``i`` at key position ``p = Tk - Tq + i``::

    o_i = sum_j w_ij v_j / sum_j w_ij,   w_ij = exp(sm_scale * q_i . k_j + c_p - c_j)

over the visible keys ``key_lo[p] <= j <= p`` (and, when a :class:`~foxacp.ops.acp.TilePlan` is
given, only keys inside tiles the plan computes). Rows that see no key output 0.
Math runs in float32 (float64 when the inputs are float64); memory is O(Tq * Tk).
"""

from __future__ import annotations

import torch

from .acp import MaskSpec, TilePlan, plan_tiles


def visible_mask(spec: MaskSpec, device, plan: TilePlan | None = None) -> torch.Tensor:
    """Boolean ``(B, 1 or H, Tq, Tk)``: True where query i may attend key j."""
    pos_q = torch.arange(spec.seqlen_q, device=device) + spec.q_offset
    pos_k = torch.arange(spec.seqlen_k, device=device)
    mask = (pos_k[None, :] <= pos_q[:, None])[None, None]  # [1, 1, Tq, Tk]
    if spec.key_lo is not None:
        lo = spec.key_lo.long()[:, pos_q]  # [B, Tq]
        mask = mask & (pos_k[None, None, :] >= lo[:, :, None])[:, None]
    if plan is not None:
        mask = mask & plan.to_element_mask()
    return mask


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, *,
                        sm_scale: float, spec: MaskSpec, plan: TilePlan | None = None) -> torch.Tensor:
    """Dense forgetting attention on canonical tensors.

    q: ``(B, H, Tq, D)``; k, v: ``(B, Hkv, Tk, D)``; decay ``c``: ``(B, H, Tk)`` float32
    cumulative log forget gate. Query head ``h`` reads kv head ``h // (H // Hkv)``.
    Returns ``(B, H, Tq, D)`` in q's dtype; differentiable in all four inputs.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    qf = q.to(compute)
    kf = k.to(compute).repeat_interleave(group, dim=1)
    vf = v.to(compute).repeat_interleave(group, dim=1)
    c = decay.to(compute)
    c_q = c[:, :, spec.q_offset:]
    scores = torch.einsum("bhid,bhjd->bhij", qf, kf) * sm_scale + c_q[..., :, None] - c[..., None, :]
    mask = visible_mask(spec, q.device, plan)
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.einsum("bhij,bhjd->bhid", probs, vf).to(q.dtype)


def attention_mass_pruned(q, k, decay, *, sm_scale: float, spec: MaskSpec, plan: TilePlan) -> torch.Tensor:
    """Share of each query's dense attention mass that ``plan`` leaves out, ``(B, H, Tq)``.

    The ACP guarantee is that this is at most ``eps`` for every query.
    """
    compute = torch.float64
    group = q.shape[1] // k.shape[1]
    kf = k.to(compute).repeat_interleave(group, dim=1)
    c = decay.to(compute)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(compute), kf) * sm_scale
    scores = scores + c[:, :, spec.q_offset:, None] - c[:, :, None, :]
    visible = visible_mask(spec, q.device)
    kept = visible & plan.to_element_mask()
    row_max = scores.masked_fill(~visible, float("-inf")).amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = (weights * visible).sum(-1)
    pruned = (weights * (visible & ~kept)).sum(-1)
    return torch.where(total > 0, pruned / total.clamp_min(1e-300), torch.zeros_like(total))


# Backend interface (see foxacp.ops.backends): dense, pruned on the plan's tiles when ACP is on.
# Its own plans use 64 x 64 tiles; to check another backend, pass that call's plan (acp_plan=).
PLAN_TILES = (64, 64)


def required_tiles(head_dim: int) -> None:
    return None  # any plan


def unavailable_reason(q) -> str | None:
    return None


def plan(spec: MaskSpec, q, k, sm_scale: float) -> TilePlan:
    return plan_tiles(spec, *PLAN_TILES, q=q, k=k, sm_scale=sm_scale)


def attend(q, k, v, decay, *, sm_scale: float, spec: MaskSpec, plan: TilePlan):
    pruning = plan if plan.acp_kv_begin is not None else None
    return attention_reference(q, k, v, decay, sm_scale=sm_scale, spec=spec, plan=pruning)
