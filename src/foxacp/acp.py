"""Public ACP helpers: ``foxacp.acp.threshold_from_qk_norm``, ``tile_bounds``, ``AcpStats``.

See :mod:`foxacp.ops.acp` for the bound and its proof.
"""

from .ops.acp import (
    AcpStats,
    MaskSpec,
    TilePlan,
    threshold_from_data,
    threshold_from_qk_norm,
    tile_bounds,
)

__all__ = ["AcpStats", "MaskSpec", "TilePlan", "threshold_from_data", "threshold_from_qk_norm", "tile_bounds"]
