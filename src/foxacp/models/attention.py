"""Attention layers: forgetting attention (FoX) and softmax attention with RoPE (Transformer).

Both share the projections and the Pro extras, applied in this order::

    q = Wq x;  k~ = Wk x;  v~ = Wv x                     (B, T, heads, D)
    KV-shift:  k = a_k k~_{t-1} + (1 - a_k) k~_t,  a_k = sigmoid(W_ak x)   (same for v)
    QK-norm:   q, k = RMSNorm_h(q), RMSNorm_h(k)         (one scale vector per head)
    FoX:       o = forgetting_attention(q, k, v, logsigmoid(W_f x + b_f))
    Transf.:   o = SDPA(RoPE(q), RoPE(k), v), causal
    out gate:  o = RMSNorm_h(o) * sigmoid(W_g x)
    out = W_o o

With ``config.acp`` the FoX layer prunes with a per-head threshold from its QK-norm weights
(:func:`~foxacp.ops.acp.threshold_from_qk_norm`, no pass over activations) or, without QK-norm,
from the data (``"auto"``), under the bound ``config.acp_rule``. Layers read every ACP setting
from the model's one config object at call time, so ``model.set_acp`` is the only switch.
Decoding steps (at most ``ACP_DECODE_MAX_QUERIES`` new tokens against
a cache) attend densely unless ``config.acp_decode``: such a step reads each cached key once, so
pruning saves little, while the threshold and tile search add launches to a host-bound step
(benchmarks/decode.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import AcpStats, cumulative_decay, forgetting_attention, threshold_from_qk_norm
from ..ops.layout import SequenceLayout
from .cache import LayerCache
from .config import FoxConfig
from .layers import HeadRMSNorm, apply_rope, kv_shift, rope_cos_sin

ACP_DECODE_MAX_QUERIES = 64

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@dataclass
class AttentionContext:
    """Per-forward inputs shared by all layers (built once by :class:`~foxacp.models.FoxModel`).

    ``layout``: the batch's :class:`~foxacp.ops.layout.SequenceLayout` over the whole (cached + new)
    sequence, validated once (left padding or packed sequences; None when plain causal).
    ``seq_start`` ``(B,)``: left-padding tokens per row (the cache keeps it). ``padding`` ``(B, T)``: True on this call's padded positions. ``restart`` ``(B, T)``: True where
    a packed sequence starts (the KV-shift reads nothing before it). ``positions``: RoPE positions
    ``(B or 1, T)``. ``sdpa_mask``: bool ``(B or 1, 1, T, Tk)`` (True = attend) or None with
    ``sdpa_causal`` telling SDPA to apply its own causal mask; ``segments``: packed-sequence
    offsets (Transformer: SDPA runs once per sequence).
    """

    layout: SequenceLayout | None = None
    seq_start: torch.Tensor | None = None
    padding: torch.Tensor | None = None
    restart: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    sdpa_mask: torch.Tensor | None = None
    sdpa_causal: bool = False
    segments: list[int] | None = None  # cu_seqlens as ints (Transformer: one SDPA call per sequence)


class _AttentionBase(nn.Module):
    def __init__(self, config: FoxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = d = config.hidden_size
        self.num_heads = H = config.num_attention_heads
        self.num_kv_heads = Hkv = config.num_key_value_heads
        self.head_dim = D = config.head_dim
        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, Hkv * D, bias=False)
        self.v_proj = nn.Linear(d, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        self.use_kv_shift = config.use_kv_shift
        if self.use_kv_shift:
            self.k_shift_proj = nn.Linear(d, Hkv, bias=False)
            self.v_shift_proj = nn.Linear(d, Hkv, bias=False)
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.q_norm = HeadRMSNorm(H, D, config.qk_norm_eps)
            self.k_norm = HeadRMSNorm(Hkv, D, config.qk_norm_eps)
        self.use_output_gate = config.use_output_gate
        if self.use_output_gate:
            self.o_norm = HeadRMSNorm(H, D, config.rms_norm_eps)
            self.g_proj = nn.Linear(d, H * D, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.use_kv_shift:
            k, v = self._shift(x, k, v, ctx, cache)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        o = self._attend(x, q, k, v, ctx, cache)  # [B, T, H, D]
        if self.use_output_gate:
            o = self.o_norm(o) * torch.sigmoid(self.g_proj(x)).view(B, T, self.num_heads, self.head_dim)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def _shift(self, x, k, v, ctx: AttentionContext, cache: LayerCache | None):
        if ctx.padding is not None:  # the token before the first real one contributes nothing
            k = k.masked_fill(ctx.padding[:, :, None, None], 0.0)
            v = v.masked_fill(ctx.padding[:, :, None, None], 0.0)
        a_k = torch.sigmoid(self.k_shift_proj(x).float())  # [B, T, Hkv]
        a_v = torch.sigmoid(self.v_shift_proj(x).float())
        prev_k = prev_v = None
        if cache is not None:
            prev_k, prev_v = cache.shift_key, cache.shift_value
            cache.keep_shift_inputs(k, v)
        return kv_shift(k, a_k, prev_k, ctx.restart), kv_shift(v, a_v, prev_v, ctx.restart)

    def _attend(self, x, q, k, v, ctx, cache):  # pragma: no cover - abstract
        raise NotImplementedError


class ForgetGateProjection(nn.Linear):
    """``Linear(d, H, bias=True)`` producing forget-gate logits; its own class so that weight
    init can give the bias the configured decay lengths."""


class ForgettingAttentionLayer(_AttentionBase):
    """FoX attention: softmax attention whose scores decay by the cumulative forget gate."""

    def __init__(self, config: FoxConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.fgate_proj = ForgetGateProjection(config.hidden_size, self.num_heads, bias=True)
        self.config = config  # the model's own config object: the one owner of the ACP settings
        self.collect_stats = False
        self.last_stats: AcpStats | None = None

    def acp_threshold(self, seq_len: int) -> torch.Tensor | str | None:
        """ACP threshold for a key length ``seq_len``: ``(H,)`` from the QK-norm weights, ``"auto"``
        (from the data, per batch and head) without QK-norm, or None when ACP is off."""
        if not self.config.acp:
            return None
        if not self.use_qk_norm:
            return "auto"
        return threshold_from_qk_norm(self.q_norm.weight, self.k_norm.weight, self.head_dim, seq_len,
                                      self.config.acp_log_eps)

    def _attend(self, x, q, k, v, ctx: AttentionContext, cache: LayerCache | None):
        log_f = F.logsigmoid(self.fgate_proj(x).float())  # [B, T, H]
        if getattr(cache, "owns_attention", False):  # static decoding buffers, or an evicting cache
            return cache.attend(q, k, v, log_f, ctx)
        cumulative = cache is not None
        if cumulative:  # the cache keeps c, so the decay continues from its last position
            initial = None if cache.decay is None else cache.decay[:, -1]
            c, _ = cumulative_decay(log_f.transpose(1, 2), ctx.layout, initial=initial)
            k, v, log_f = cache.append(k, v, c.transpose(1, 2))
        settings = self.config
        decoding = cache is not None and q.shape[1] <= ACP_DECODE_MAX_QUERIES
        threshold = None if decoding and not settings.acp_decode else self.acp_threshold(k.shape[1])
        if isinstance(threshold, torch.Tensor):
            threshold = threshold[None, :]
        result = forgetting_attention(
            q, k, v, log_f,
            adaptive_threshold=threshold, log_eps=settings.acp_log_eps, acp_rule=settings.acp_rule,
            layout=ctx.layout, backend=settings.attention_backend, return_stats=self.collect_stats,
            cumulative_gate=cumulative,
        )
        if self.collect_stats:
            result, self.last_stats = result
        return result


class SoftmaxAttentionLayer(_AttentionBase):
    """Transformer attention: RoPE on q and k, causal softmax through torch SDPA."""

    def __init__(self, config: FoxConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.rope_theta = config.rope_theta

    def _attend(self, x, q, k, v, ctx: AttentionContext, cache: LayerCache | None):
        cos, sin = rope_cos_sin(ctx.positions, self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v, _ = cache.append(k, v, None)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        group = self.num_heads // self.num_kv_heads
        extra = {}
        if group > 1:
            if _SDPA_HAS_GQA:
                extra["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if ctx.segments is not None:
            o = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                          **extra)
                           for s, e in zip(ctx.segments[:-1], ctx.segments[1:])], dim=2)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.sdpa_mask, is_causal=ctx.sdpa_causal, **extra)
        return o.transpose(1, 2)
