"""Training FLOPs per token, with the attention part split into computed and skipped by ACP.

Dense matmuls: ``6 N`` per token for training (``2 N`` forward, ``4 N`` backward), ``N`` the
parameters of all linear layers including the LM head (embeddings are lookups). Causal attention
forward: ``QK^T`` and ``PV`` cost ``2 * 2 * H * D`` per (query, key) pair and each query sees
``(L + 1) / 2`` keys on average; training is 3x the forward. ACP removes the share
``flops_saved_fraction`` of the attention part (from the layers' :class:`AcpStats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks used for MFU (vendor datasheets).
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


@dataclass(frozen=True)
class FlopsPerToken:
    matmul: float
    attention_dense: float
    attention_computed: float

    @property
    def total_dense(self) -> float:
        return self.matmul + self.attention_dense

    @property
    def total_computed(self) -> float:
        return self.matmul + self.attention_computed

    def as_dict(self) -> dict:
        return {"matmul": self.matmul, "attention_dense": self.attention_dense,
                "attention_computed": self.attention_computed,
                "attention_skipped": self.attention_dense - self.attention_computed,
                "total_computed": self.total_computed}


def linear_params(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def training_flops_per_token(model: torch.nn.Module, *, layers: int, heads: int, head_dim: int,
                             seq_len: int, kept_fraction: float = 1.0) -> FlopsPerToken:
    matmul = 6.0 * linear_params(model)
    attention = 3.0 * layers * 4.0 * heads * head_dim * (seq_len + 1) / 2.0
    return FlopsPerToken(matmul, attention, attention * kept_fraction)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU (None on CPU or an unknown GPU: MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16.items() if key in name), None)
