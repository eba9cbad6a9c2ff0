"""Record what each forgetting-attention layer sees during a forward, without editing the model.

``capture_attention(model)`` is a context manager. Inside it, every call a
``ForgettingAttentionLayer`` makes to ``forgetting_attention`` is intercepted (the layer's module
global is swapped for a wrapper, and a forward pre-hook tells the wrapper which layer is
calling). Per layer it keeps:

- ``log_f``: the per-token forget-gate logs ``log f`` ``(B, T, H)`` on CPU (float32);
- ``max_logit``: the largest actual ``|s_ij| = sm_scale |q_i . k_j|`` over causal pairs
  ``j <= i``, per (batch, head), float64;
- ``max_logit_cs``: the data bound ``max|q| max|k| sm_scale`` per (batch, head) (Cauchy-Schwarz);

Only prefill calls (no decode cache) are recorded.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch


@dataclass
class LayerCapture:
    log_f: list = field(default_factory=list)  # [(B, T, H)] per call
    max_logit: list = field(default_factory=list)  # [(B, H)] per call
    max_logit_cs: list = field(default_factory=list)  # [(B, H)] per call


def causal_max_abs_logit(q: torch.Tensor, k: torch.Tensor, sm_scale: float, chunk: int = 256) -> torch.Tensor:
    """``max_{j <= i} sm_scale |q_i . k_j|`` per (batch, head); q ``(B, T, H, D)``, k ``(B, T, Hkv, D)``.

    Queries are the last ``Tq`` of the ``Tk`` keys. Chunked over queries: memory
    ``H * chunk * Tk`` floats.
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    offset = Tk - Tq
    kh = k.float().repeat_interleave(H // Hkv, dim=2).permute(0, 2, 3, 1)  # [B, H, D, Tk]
    best = torch.zeros(B, H, dtype=torch.float32, device=q.device)
    keys = torch.arange(Tk, device=q.device)
    for start in range(0, Tq, chunk):
        stop = min(start + chunk, Tq)
        qc = q[:, start:stop].float().permute(0, 2, 1, 3)  # [B, H, c, D]
        visible = stop + offset  # keys any query of the chunk may see
        s = torch.matmul(qc, kh[..., :visible]).abs_()  # [B, H, c, visible]
        rows = torch.arange(start, stop, device=q.device)[:, None] + offset
        s.masked_fill_(keys[None, :visible] > rows, 0.0)
        best = torch.maximum(best, s.amax(dim=(-1, -2)))
    return (best * sm_scale).double()


@contextlib.contextmanager
def capture_attention(model, *, logits: bool = True):
    """Yield ``{layer_idx: LayerCapture}`` filled by forwards run inside the ``with`` block."""
    from ..models import attention as attention_module

    layers = [m for m in model.modules() if isinstance(m, attention_module.ForgettingAttentionLayer)]
    records = {layer.layer_idx: LayerCapture() for layer in layers}
    current = {"layer": None}
    original = attention_module.forgetting_attention

    def wrapper(q, k, v, log_fgate, **kwargs):
        layer = current["layer"]
        if layer is not None and not kwargs.get("cumulative_gate", False):
            rec = records[layer]
            rec.log_f.append(log_fgate.detach().float().cpu())
            if logits:
                scale = kwargs.get("sm_scale") or 1.0 / math.sqrt(q.shape[-1])
                rec.max_logit.append(causal_max_abs_logit(q.detach(), k.detach(), scale).cpu())
                qn = q.detach().float().norm(dim=-1).amax(dim=1)  # [B, H]
                kn = k.detach().float().norm(dim=-1).amax(dim=1)  # [B, Hkv]
                kn = kn.repeat_interleave(q.shape[2] // k.shape[2], dim=1)
                rec.max_logit_cs.append((qn * kn * scale).double().cpu())
        return original(q, k, v, log_fgate, **kwargs)

    def pre_hook(module, args):
        current["layer"] = module.layer_idx

    handles = [layer.register_forward_pre_hook(pre_hook) for layer in layers]
    attention_module.forgetting_attention = wrapper
    try:
        yield records
    finally:
        attention_module.forgetting_attention = original
        for handle in handles:
            handle.remove()
