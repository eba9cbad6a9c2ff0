"""Public ACP helpers: thresholds, tile plans and statistics.

See :mod:`foxacp.ops.acp` for both bounds (the paper's and the data-aware ``"local"`` rule) and
their proofs; :class:`~foxacp.ops.layout.SequenceLayout` describes a batch's sequences.
"""

from .ops.acp import (
    ACP_RULES,
    AcpStats,
    MaskSpec,
    TilePlan,
    key_side_bounds,
    local_kv_begin,
    local_log_mass,
    paper_ranges,
    plan_tiles,
    threshold_from_data,
    threshold_from_qk_norm,
    tile_bounds,
)
from .ops.layout import SequenceLayout

__all__ = ["ACP_RULES", "AcpStats", "MaskSpec", "SequenceLayout", "TilePlan", "key_side_bounds",
           "local_kv_begin", "local_log_mass", "paper_ranges",
           "plan_tiles", "threshold_from_data", "threshold_from_qk_norm", "tile_bounds"]
