"""Training step time of a model on given batches, and the share of it spent in attention.

:func:`training_step_time` times forward + backward + AdamW steps on one device (the first batch
is a warm-up, the median of the rest is reported). The optimizer runs with learning rate 0: it
does all its work but leaves the weights, so every step sees the same (for FoX: learned) gates.

:func:`attention_share` is the part of a step that goes away when the attention core alone is
replaced by a pass-through of ``v`` (:func:`attention_core_removed`): the projections, norms,
gates' projections, MLPs, loss and optimizer keep their work, only ``softmax(q k^T) v`` (FoX:
with the decay and ACP; Transformer: SDPA) is gone. Measured eagerly: compiled blocks would
recompile for the patched layers.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch


@contextlib.contextmanager
def attention_core_removed(model):
    """Inside, every attention layer of ``model`` returns ``v`` (repeated over the query heads of
    its group) instead of attending; ``q`` and ``k`` stay in the graph at no cost beyond an add."""
    from ..models.attention import _AttentionBase

    layers = [m for m in model.modules() if isinstance(m, _AttentionBase)]
    for layer in layers:
        layer._attend = _pass_through
    try:
        yield
    finally:
        for layer in layers:
            del layer._attend  # back to the class's method


def _pass_through(x, q, k, v, ctx, cache):
    group = q.shape[2] // v.shape[2]
    return (v + 0 * k).repeat_interleave(group, dim=2) + 0 * q


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step_time(model, batches: list[dict], *, device: torch.device, bf16: bool) -> float:
    """Median seconds of forward + backward + AdamW (lr 0) over ``batches[1:]`` (``batches[0]``
    warms up). Each batch is ``{"input_ids", "labels"}`` (labels already shifted, as the loader gives)."""
    if len(batches) < 2:
        raise ValueError(f"training_step_time needs >= 2 batches (one warm-up), got {len(batches)}")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=device.type == "cuda" or None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for batch in batches:
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        _sync(device)
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, shift_labels=labels, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def attention_share(model, batches: list[dict], *, device: torch.device, bf16: bool) -> dict:
    """Step time with and without the attention core (both eager) and the attention share."""
    full = training_step_time(model, batches, device=device, bf16=bf16)
    with attention_core_removed(model):
        rest = training_step_time(model, batches, device=device, bf16=bf16)
    return {"eager_step_time_s": full, "eager_step_time_without_attention_s": rest,
            "attention_share": max(0.0, 1.0 - rest / full)}
