"""AdamW with the paper's parameter groups, and the learning-rate schedule by tokens.

``lr(tokens) = peak * tokens / warmup`` during warmup, then
``min + (peak - min) * (1 + cos(pi * progress)) / 2`` with ``progress`` going from 0 at the end
of warmup to 1 at ``total_tokens`` (constant ``min`` after).
"""

from __future__ import annotations

import math

import torch

from .config import OptimSection


def lr_at(tokens: int, cfg: OptimSection) -> float:
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_tokens > 0 and tokens < cfg.warmup_tokens:
        return peak * tokens / cfg.warmup_tokens
    span = max(cfg.total_tokens - cfg.warmup_tokens, 1)
    progress = min(max((tokens - cfg.warmup_tokens) / span, 0.0), 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over ``model.param_groups(weight_decay)`` (decay on linear/embedding weights only)."""
    groups = model.param_groups(cfg.weight_decay)
    fused = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
