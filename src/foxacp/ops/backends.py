"""Backend registry: which implementation serves a call, and a clear error when none can.

A backend module provides, on canonical tensors (q ``(B, H, Tq, D)``, k/v ``(B, Hkv, Tk, D)``,
decay ``(B, H, Tk)`` float32):

* ``plan(spec, q, k, sm_scale) -> TilePlan``: the call's :class:`~foxacp.ops.acp.TilePlan`, built once;
* ``attend(q, k, v, decay, *, sm_scale, spec, plan) -> out``: computes exactly the plan's tiles;
* ``required_tiles(head_dim)``: the tiles a given plan must use, or None for any;
* ``unavailable_reason(q) -> str | None``.
"""

from __future__ import annotations

_MODULES = {
    "reference": "foxacp.ops.reference",
    "torch": "foxacp.ops.blockwise",
    "triton": "foxacp.ops.triton_attention",
}
BACKEND_NAMES = ("auto", *_MODULES)  # the one list (configs and the CLI read it)


def load(name: str):
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {name!r}")
    try:
        return _import(name)
    except ImportError as err:
        raise ValueError(f"backend {name!r} is unavailable here: {err}") from None


def _import(name: str):
    # import statements, not importlib: torch.compile runs these while tracing (no graph break)
    if name == "triton":
        from . import triton_attention as module
    elif name == "torch":
        from . import blockwise as module
    else:
        from . import reference as module
    return module


def resolve(name: str, q, head_dim: int):
    """The backend module for ``name`` ("auto" picks triton on CUDA when it can, else torch)."""
    if name == "auto":
        if q.is_cuda:
            try:
                triton_backend = load("triton")
                if triton_backend.unavailable_reason(q) is None:
                    return triton_backend
            except ValueError:
                pass
        return load("torch")
    module = load(name)
    reason = module.unavailable_reason(q)
    if reason is not None:
        raise ValueError(f"backend {name!r} is unavailable for this call: {reason}")
    return module
