"""Building blocks: RMSNorm (shared and per-head), SwiGLU MLP, RoPE, the data-dependent KV-shift."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim (float32 statistics), returned in x's dtype.

    Uses the fused ``F.rms_norm`` where torch has it (one kernel instead of five on GPU).
    """
    if _HAS_FUSED_RMS_NORM:
        if weight.dim() == 1:
            return F.rms_norm(x, weight.shape, weight.to(x.dtype), eps).to(x.dtype)
        return (F.rms_norm(x, weight.shape[-1:], None, eps) * weight.to(x.dtype)).to(x.dtype)  # per-head scales
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


_HAS_FUSED_RMS_NORM = hasattr(F, "rms_norm")


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with one scale vector ``(dim,)``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class HeadRMSNorm(nn.Module):
    """RMSNorm over the head dim of ``(..., H, D)`` with one scale vector per head: weight ``(H, D)``."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(*positions.shape, 1, head_dim // 2)`` float32 for integer ``positions``.

    Computed on the fly (no buffers), so nothing depends on a maximum length or on how a
    checkpoint was loaded.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [..., D/2]
    return angles.cos()[..., None, :], angles.sin()[..., None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, T, H, D)`` by position (half-split pairing ``(i, i + D/2)``, as LLaMA in HF)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # tables in float32, the rotation in x's dtype (as HF)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def kv_shift(x: torch.Tensor, alpha: torch.Tensor, previous: torch.Tensor | None = None,
             restart: torch.Tensor | None = None) -> torch.Tensor:
    """Data-dependent token shift ``y_t = a_t x_{t-1} + (1 - a_t) x_t`` per head.

    x: ``(B, T, H, D)`` pre-shift keys or values; alpha: ``(B, T, H)`` in [0, 1] (float32);
    previous: ``(B, H, D)``, the pre-shift token before ``x[:, 0]`` (a decode cache's state; zero
    when None); restart: ``(B, T)`` bool, True where a sequence starts (its previous token
    contributes nothing). Left padding is handled by zeroing ``x`` on padded positions first.
    """
    if previous is None:
        previous = x.new_zeros(x.shape[0], 1, *x.shape[2:])
    else:
        previous = previous[:, None].to(x.dtype)
    shifted = torch.cat([previous, x[:, :-1]], dim=1)
    if restart is not None:
        shifted = shifted.masked_fill(restart[:, :, None, None], 0.0)
    return torch.lerp(x, shifted, alpha[..., None].to(x.dtype))  # x + a (shifted - x)
