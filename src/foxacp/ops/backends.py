"""Backend registry: which implementation serves a call, and a clear error when none can.

A backend module provides, on canonical tensors (q ``(B, H, Tq, D)``, k/v ``(B, Hkv, Tk, D)``,
decay ``(B, H, Tk)`` float32):

* ``plan(spec, q, k, sm_scale) -> TilePlan``: the call's :class:`~foxacp.ops.acp.TilePlan`, built once;
* ``attend(q, k, v, decay, *, sm_scale, spec, plan) -> out``: computes exactly the plan's tiles;
* ``required_tiles(head_dim)``: the tiles a given plan must use, or None for any;
* ``unavailable_reason(q) -> str | None``.
"""

from __future__ import annotations

import functools
import warnings

_MODULES = {
    "reference": "foxacp.ops.reference",
    "torch": "foxacp.ops.blockwise",
    "triton": "foxacp.ops.triton_attention",
    "hopper": "foxacp.ops.hopper_attention",
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
    elif name == "hopper":
        from . import hopper_attention as module
    elif name == "torch":
        from . import blockwise as module
    else:
        from . import reference as module
    return module


def resolve(name: str, q, head_dim: int):
    """The backend module for ``name``. "auto" on CUDA picks hopper where it serves the call (sm90+,
    Gluon, bf16/fp16, head dim 64 or 128: its forward + backward measured 10-11% faster than
    triton's at every benchmark shape, docs/results.md run 20; decoding-size calls, Tq <= 64, stay on
    triton, whose plan tiles are narrower in keys), else triton when it can, else torch.

    On CUDA, "auto" warns once when the Triton backend cannot load at all (triton missing or
    too old) rather than running the slower torch path without a word; a call the kernels do
    not cover (dtype, head dim, GPU generation) falls back quietly.
    """
    if name == "auto":
        if q.is_cuda:
            try:
                triton_backend = load("triton")
            except ValueError as err:
                _warn_triton_unloadable(str(err))
            else:
                reason = triton_backend.unavailable_reason(q)
                if reason is None:
                    hopper_backend = load("hopper")
                    if q.shape[-2] > triton_backend.DECODE_MAX_Q and hopper_backend.unavailable_reason(q) is None:
                        return hopper_backend
                    return triton_backend
                if triton_backend.triton is None:  # the module's `import triton` failed
                    _warn_triton_unloadable(reason)
        return load("torch")
    module = load(name)
    reason = module.unavailable_reason(q)
    if reason is not None:
        raise ValueError(f"backend {name!r} is unavailable for this call: {reason}")
    return module


@functools.cache  # once per cause, not once per attention call
def _warn_triton_unloadable(cause: str) -> None:
    warnings.warn(f"foxacp: backend='auto' runs the PyTorch path on CUDA because the Triton backend "
                  f"cannot load: {cause}. Install triton >= 3.4 (torch >= 2.8 brings it on Linux), "
                  "or pass backend='torch' to silence this.", RuntimeWarning, stacklevel=4)
