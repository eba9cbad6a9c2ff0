"""foxacp: the Forgetting Transformer with Adaptive Computation Pruning."""

from . import acp
from .ops import AcpStats, forgetting_attention

__version__ = "0.1.0"
__all__ = ["forgetting_attention", "AcpStats", "acp", "__version__"]
