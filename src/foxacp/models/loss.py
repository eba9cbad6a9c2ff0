"""Chunked LM-head cross-entropy: the (N, V) float32 logits never exist at once.

:func:`chunked_cross_entropy` takes the final hidden states and the LM-head weight. For each
chunk of ``chunk_size`` tokens it computes the logits (in the inputs' dtype), upcasts that chunk
to float32, and takes the log-sum-exp; when gradients are needed it also forms the chunk's
``softmax - onehot`` right away and folds it into ``dL/dhidden`` and ``dL/dweight`` (float32
accumulator), so backward only scales the stored gradients. Peak extra memory is one
``(chunk_size, V)`` float32 block plus the gradient buffers.

Rows of the weight past ``vocab_size`` (the LM head padded to a multiple of 64 for fast GEMMs)
are masked to ``-inf``: they get probability 0 and zero gradient.
"""

from __future__ import annotations

import torch

__all__ = ["chunked_cross_entropy"]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, ignore_index: int, chunk_size: int):
        n_tokens = hidden.shape[0]
        padded_vocab = weight.shape[0]
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type) if device_type in ("cuda", "cpu") else False
        matmul_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start:start + chunk_size]  # [n, d]
            t = targets[start:start + chunk_size]  # [n]
            valid = t != ignore_index
            t_safe = torch.where(valid, t, torch.zeros_like(t))
            logits = (h @ weight.t()).float()  # [n, Vp]
            if padded_vocab > vocab_size:
                logits[:, vocab_size:] = float("-inf")
            lse = torch.logsumexp(logits, dim=-1)  # [n]
            picked = logits.gather(1, t_safe[:, None]).squeeze(1)
            loss_sum += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            if need_hidden_grad or need_weight_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(probs.shape[0], device=probs.device), t_safe] -= 1.0
                # d(sum loss)/d logits = (softmax - onehot) on valid rows; the row mask is applied
                # to the d-wide factors below instead of this V-wide block.
                grad_logits = probs.to(matmul_dtype)
                row_mask = valid[:, None].to(matmul_dtype)
                if need_hidden_grad:
                    grad_hidden[start:start + chunk_size] = (grad_logits @ weight.to(matmul_dtype)) * row_mask
                if need_weight_grad:
                    grad_weight += (grad_logits.t() @ (h.to(matmul_dtype) * row_mask)).float()
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has = (need_hidden_grad, need_weight_grad)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        grad_hidden = grad_weight = None
        if ctx.has[0]:
            stored = saved.pop(0)
            grad_hidden = stored * grad_loss.to(stored.dtype)
        if ctx.has[1]:
            grad_weight = (saved.pop(0) * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          vocab_size: int | None = None, ignore_index: int = -100, chunk_size: int = 2048,
                          reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` without materialising all logits.

    Args:
        hidden: ``(..., d)`` final hidden states (any float dtype).
        weight: ``(Vp, d)`` LM-head weight, ``Vp >= vocab_size``.
        targets: ``(...)`` token ids aligned with ``hidden`` (already shifted); ``ignore_index``
            entries count for nothing.
        vocab_size: real vocabulary size (default ``Vp``); columns past it are masked out.
        reduction: ``"mean"`` over non-ignored targets (0 when there are none) or ``"sum"``.

    Returns a float32 scalar, differentiable in ``hidden`` and ``weight``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must match hidden's leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    if not 1 <= vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size {vocab_size} must lie in [1, {weight.shape[0]}] (the weight's rows)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden_flat = hidden.reshape(-1, hidden.shape[-1])
    targets_flat = targets.reshape(-1).to(hidden.device)
    total = _ChunkedLinearCrossEntropy.apply(hidden_flat, weight, targets_flat, vocab_size, ignore_index, chunk_size)
    if reduction == "sum":
        return total
    count = (targets_flat != ignore_index).sum().clamp_min(1)
    return total / count
