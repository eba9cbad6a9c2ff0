"""Generation cache: per layer keys, values, the cumulative forget gate and the KV-shift state.

For forgetting attention the cache keeps ``c = cumsum(log f)`` per query head (float32) next to
the keys, so a decode step appends ``c_last + cumsum(log f_new)`` and calls
:func:`foxacp.forgetting_attention` with ``cumulative_gate=True``: nothing is re-summed over the
whole cache. The KV-shift state is the last *pre-shift* key/value token ``k~_{T-1}``, ``v~_{T-1}``.

All tensors are batch-first: k, v ``(B, T, Hkv, D)``, c ``(B, T, H)``, shift states
``(B, Hkv, D)``. ``seq_start`` ``(B,)`` counts the left-padding tokens of each row (or is None).
The cache is updated in place by the model; ``get_seq_length()`` is the number of cached positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCache:
    """One attention layer's state (every field None until the first forward)."""

    key: torch.Tensor | None = None  # [B, T, Hkv, D] (after shift, norm, RoPE: as attended)
    value: torch.Tensor | None = None  # [B, T, Hkv, D]
    decay: torch.Tensor | None = None  # [B, T, H] float32, c = cumsum(log f); FoX only
    shift_key: torch.Tensor | None = None  # [B, Hkv, D] last pre-shift key; KV-shift only
    shift_value: torch.Tensor | None = None  # [B, Hkv, D] last pre-shift value; KV-shift only

    def append(self, key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor | None):
        """Append new positions and return the full (key, value, decay)."""
        if self.key is None:
            self.key, self.value, self.decay = key, value, decay
        else:
            self.key = torch.cat([self.key, key], dim=1)
            self.value = torch.cat([self.value, value], dim=1)
            if decay is not None:
                self.decay = torch.cat([self.decay, decay], dim=1)
        return self.key, self.value, self.decay

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in vars(self).items() if isinstance(t, torch.Tensor)}


class FoxCache:
    """Decode cache of a :class:`~foxacp.models.FoxForCausalLM` (returned as ``past_key_values``)."""

    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.seq_start: torch.Tensor | None = None
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> LayerCache:
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Cached positions (including left padding), as Hugging Face's caches report it."""
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0):
        return None  # grows without a limit

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Select batch rows ``index`` in place (beam search, batch pruning)."""
        for layer in self.layers:
            for name, t in layer.tensors().items():
                setattr(layer, name, t.index_select(0, index.to(t.device)))
        if self.seq_start is not None:
            self.seq_start = self.seq_start.index_select(0, index.to(self.seq_start.device))

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors().values())
