"""foxacp: the Forgetting Transformer with Adaptive Computation Pruning."""

from . import _auto_register, acp
from .ops import AcpStats, forgetting_attention

__version__ = "0.1.0"
__all__ = ["forgetting_attention", "AcpStats", "acp", "__version__"]

# transformers' Auto classes learn model_type "foxacp" when they are imported (transformers is not imported here)
_auto_register.install()
