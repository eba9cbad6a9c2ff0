"""Block-sparse forgetting attention in PyTorch (``backend="torch"``): the CPU path.

FlashAttention's schedule in plain PyTorch: for each query tile, only the key tiles the
:class:`~foxacp.ops.acp.TilePlan` keeps are read, so time and memory (O(T x tile)) fall with
the kept fraction. Heads whose key range agrees for a query tile are batched into one matmul.

Backward recomputes the probabilities from the saved log-sum-exp ``lse``:
``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(dO * O))``, ``dQ = sm_scale dS K``,
``dK = sm_scale dS^T Q`` and, since ``s_ij`` holds ``+c_i - c_j``,
``dc = sum_j dS_ij (at query positions) - sum_i dS_ij (at key positions)``. The query-side term is
zero in exact arithmetic (each row of ``dS`` sums to zero over the keys the forward computed) but
is kept: it is exactly the rounding error of ``rowsum(dO * O)`` and cancels it, so the reverse
cumsum that gives dlog_fgate does not accumulate those errors over T (as in the Triton kernels).
"""

from __future__ import annotations

import torch

from .acp import MaskSpec, TilePlan, plan_tiles

PLAN_TILES = (64, 64)


def required_tiles(head_dim: int) -> None:
    return None  # any plan: the loops follow its tiles


def unavailable_reason(q) -> str | None:
    return None


def plan(spec: MaskSpec, q, k, sm_scale: float) -> TilePlan:
    return plan_tiles(spec, *PLAN_TILES, q=q, k=k, sm_scale=sm_scale)


def attend(q, k, v, decay, *, sm_scale: float, spec: MaskSpec, plan: TilePlan):
    return _BlockwiseAttention.apply(q, k, v, decay, sm_scale, spec, plan)


def _range_groups(plan: TilePlan):
    """Yield ``(query tile, key tile begin, key tile end, flat (b*h) indices)`` to compute."""
    n_heads = plan.kv_begin.shape[0] * plan.kv_begin.shape[1]
    begin = plan.kv_begin.reshape(n_heads, -1).cpu()
    end = plan.kv_end.reshape(n_heads, -1).cpu()
    for m in range(plan.num_q_tiles):
        ranges = torch.stack([begin[:, m], end[:, m]], dim=1)
        unique, inverse = torch.unique(ranges, dim=0, return_inverse=True)
        for g, (n0, n1) in enumerate(unique.tolist()):
            if n0 < n1:
                yield m, n0, n1, torch.nonzero(inverse == g).flatten()


class _Workspace:
    """Flattened float copies of the inputs and the index maps shared by forward and backward."""

    def __init__(self, q, k, v, decay, spec: MaskSpec, plan: TilePlan):
        self.compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        self.q = q.to(self.compute).reshape(B * H, Tq, D)
        self.k = k.to(self.compute).reshape(B * Hkv, Tk, D)
        self.v = v.to(self.compute).reshape(B * Hkv, Tk, D)
        self.c = decay.to(self.compute).reshape(B * H, Tk)
        heads = torch.arange(B * H, device=q.device)
        self.kv_index = (heads // H) * Hkv + (heads % H) // (H // Hkv)  # flat kv head per flat q head
        self.batch_index = heads // H
        self.key_lo = spec.key_lo
        self.offset, self.Tq, self.Tk = spec.q_offset, Tq, Tk
        self.bm, self.bn = plan.block_m, plan.block_n

    def scores(self, m: int, n0: int, n1: int, heads: torch.Tensor, sm_scale: float):
        """Masked scores ``[G, rows, cols]`` of query tile m against key tiles [n0, n1)."""
        i0, i1 = m * self.bm, min(self.Tq, (m + 1) * self.bm)
        j0, j1 = n0 * self.bn, min(self.Tk, n1 * self.bn)
        kv = self.kv_index[heads]
        s = torch.matmul(self.q[heads, i0:i1], self.k[kv, j0:j1].transpose(1, 2)) * sm_scale
        pos_q = torch.arange(i0, i1, device=s.device) + self.offset
        pos_k = torch.arange(j0, j1, device=s.device)
        s = s + self.c[heads, self.offset + i0:self.offset + i1, None] - self.c[heads, None, j0:j1]
        visible = pos_k[None, None, :] <= pos_q[None, :, None]
        if self.key_lo is not None:
            lo = self.key_lo.long()[self.batch_index[heads]][:, pos_q]
            visible = visible & (pos_k[None, None, :] >= lo[:, :, None])
        return s.masked_fill(~visible, float("-inf")), (i0, i1, j0, j1), kv


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, decay, sm_scale, spec, plan):
        ws = _Workspace(q, k, v, decay, spec, plan)
        out = torch.zeros_like(ws.q)
        lse = torch.full(ws.q.shape[:2], float("-inf"), dtype=ws.compute, device=q.device)
        for m, n0, n1, heads in _range_groups(plan):
            s, (i0, i1, j0, j1), kv = ws.scores(m, n0, n1, heads, sm_scale)
            row_max = s.amax(-1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            p = torch.exp(s - row_max)  # [G, rows, cols]
            row_sum = p.sum(-1, keepdim=True)
            seen = row_sum > 0
            out[heads, i0:i1] = torch.matmul(p, ws.v[kv, j0:j1]) / torch.where(seen, row_sum, 1.0)
            lse[heads, i0:i1] = torch.where(seen, row_max + torch.log(row_sum), float("-inf")).squeeze(-1)
        ctx.save_for_backward(q, k, v, decay, out, lse)
        ctx.sm_scale, ctx.spec, ctx.plan = sm_scale, spec, plan
        return out.view(q.shape).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, decay, out, lse = ctx.saved_tensors
        sm_scale, plan = ctx.sm_scale, ctx.plan
        ws = _Workspace(q, k, v, decay, ctx.spec, plan)
        d_out = grad_out.to(ws.compute).reshape(ws.q.shape)
        row_dot = (d_out * out).sum(-1)  # rowsum(dO * O) = sum_j P_ij dP_ij
        lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))  # empty rows: P = 0
        dq, dk, dv = torch.zeros_like(ws.q), torch.zeros_like(ws.k), torch.zeros_like(ws.v)
        dc = torch.zeros_like(ws.c)
        for m, n0, n1, heads in _range_groups(plan):
            s, (i0, i1, j0, j1), kv = ws.scores(m, n0, n1, heads, sm_scale)
            p = torch.exp(s - lse[heads, i0:i1, None])  # [G, rows, cols]
            do = d_out[heads, i0:i1]
            dv[:, j0:j1].index_add_(0, kv, torch.matmul(p.transpose(1, 2), do))
            dp = torch.matmul(do, ws.v[kv, j0:j1].transpose(1, 2))
            ds = p * (dp - row_dot[heads, i0:i1, None])
            dq[heads, i0:i1] = torch.matmul(ds, ws.k[kv, j0:j1]) * sm_scale
            dk[:, j0:j1].index_add_(0, kv, torch.matmul(ds.transpose(1, 2), ws.q[heads, i0:i1]) * sm_scale)
            dc[heads, j0:j1] -= ds.sum(1)
            dc[heads, ws.offset + i0:ws.offset + i1] += ds.sum(2)
        return (dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype),
                dc.view(decay.shape).to(decay.dtype), None, None, None)
