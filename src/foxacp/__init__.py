"""foxacp: the Forgetting Transformer with Adaptive Computation Pruning.

``forgetting_attention``, ``AcpStats`` and ``acp`` load torch on first use, so that importing
the package (and ``foxacp --help``) stays fast.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

from . import _auto_register

try:
    __version__ = version("foxacp")  # the one source: pyproject.toml's [project] version
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0+unknown"

__all__ = ["forgetting_attention", "AcpStats", "acp", "__version__"]


def __getattr__(name: str):
    if name in ("forgetting_attention", "AcpStats"):
        return getattr(importlib.import_module(".ops", __name__), name)
    if name == "acp":
        return importlib.import_module(".acp", __name__)
    raise AttributeError(f"module 'foxacp' has no attribute {name!r}")


# transformers' Auto classes learn model_type "foxacp" when they are imported (transformers is not imported here)
_auto_register.install()
