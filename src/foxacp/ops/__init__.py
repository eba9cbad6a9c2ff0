"""Attention kernels: the exact reference, the block-sparse torch path, Triton; ACP bounds."""

from .acp import AcpStats, MaskSpec, TilePlan, threshold_from_data, threshold_from_qk_norm, tile_bounds
from .api import cumulative_decay, forgetting_attention

__all__ = [
    "forgetting_attention",
    "cumulative_decay",
    "AcpStats",
    "MaskSpec",
    "TilePlan",
    "threshold_from_data",
    "threshold_from_qk_norm",
    "tile_bounds",
]
