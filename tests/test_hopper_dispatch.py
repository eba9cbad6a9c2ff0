"""backend="hopper" without a GPU: the dispatch, its errors and the fallbacks (CPU CI).

The kernels themselves are checked on a device (tests/gpu/test_hopper_gpu.py) and compiled for
sm_90 here (tests/test_triton_compile.py)."""

import types

import pytest
import torch

from foxacp import forgetting_attention
from foxacp.ops import backends


def inputs(T=16, D=64, dtype=torch.bfloat16):
    q, k, v = (torch.randn(1, T, 2, D, dtype=dtype) for _ in range(3))
    return q, k, v, torch.nn.functional.logsigmoid(torch.randn(1, T, 2) + 3)


def test_listed_backend():
    assert "hopper" in backends.BACKEND_NAMES


def test_hopper_on_cpu_is_a_clear_error():
    """On CPU the error names the missing GPU, or first the missing Gluon dialect (Triton < 3.5)."""
    with pytest.raises(ValueError, match="backend 'hopper' is unavailable for this call: .*(sm90|Gluon)"):
        forgetting_attention(*inputs(), backend="hopper")


@pytest.mark.parametrize("dtype, D, why", [(torch.float32, 64, "dtype"), (torch.bfloat16, 96, "head dim 96")])
def test_unsupported_inputs_named(dtype, D, why):
    module = backends.load("hopper")
    if module.kernels is None:
        pytest.skip("Triton's Gluon dialect does not load here: that is the reason given first")
    reason = module.unavailable_reason(inputs(D=D, dtype=dtype)[0].transpose(1, 2))
    assert reason is not None and why in reason


def test_without_gluon_the_reason_says_so(monkeypatch):
    module = backends.load("hopper")
    monkeypatch.setattr(module, "kernels", None)
    monkeypatch.setattr(module, "_IMPORT_ERROR", "ImportError: no gluon", raising=False)
    assert "Gluon" in module.unavailable_reason(inputs()[0])


def test_auto_never_picks_hopper_on_cpu():
    q = inputs()[0].transpose(1, 2)
    assert backends.resolve("auto", q, 64).__name__ == "foxacp.ops.blockwise"


@pytest.mark.parametrize("hopper_serves, seqlen_q, picked", [(True, 256, "hopper"), (False, 256, "triton"),
                                                             (True, 64, "triton")])
def test_auto_prefers_hopper_where_it_serves(monkeypatch, hopper_serves, seqlen_q, picked):
    """On CUDA "auto" takes hopper where it serves the call, except decoding-size calls, else triton
    (decided by the backends' own ``unavailable_reason``; faked here, as this machine has no GPU)."""
    triton_backend, hopper_backend = backends.load("triton"), backends.load("hopper")
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda q: None)
    monkeypatch.setattr(hopper_backend, "unavailable_reason", lambda q: None if hopper_serves else "not sm90")
    q = types.SimpleNamespace(is_cuda=True, shape=(1, 2, seqlen_q, 64))
    assert backends.resolve("auto", q, 64) is backends.load(picked)


def test_plan_tiles():
    """The plan is on the Gluon kernel's blocks where it runs and on Triton's elsewhere (decode and
    other head dims run the Triton forward on the same plan: its blocks divide these tiles)."""
    hopper = backends.load("hopper")
    triton_backend = backends.load("triton")
    for D in hopper.HEAD_DIMS:
        bm, bn = hopper.required_tiles(D)
        cfg = triton_backend.tile_config(D)
        assert bm % cfg.m1 == 0 and bm % cfg.m2 == 0 and bn % cfg.n1 == 0 and bn % cfg.n2 == 0
        assert bm % 64 == 0 and bn % cfg.block_n == 0  # decoding blocks (<= 64 rows) and Triton's key blocks
    assert hopper.required_tiles(32) == triton_backend.default_tiles(32)


@pytest.mark.parametrize("shape, stride", [((2, 4, 256), (1024, 1, 4)),  # a (B, T, H) gate seen as (B, H, T)
                                           ((1, 1, 128), (197, 197, 1))])  # size-1 dims with odd strides
def test_float_rows_makes_bulk_copyable_rows(shape, stride):
    """The padded float32 copies the Gluon kernels bulk-copy are fresh contiguous tensors whatever
    the input's strides (a clone of a strided view would keep them and fail TMA's 16-byte rule)."""
    module = backends.load("hopper")
    if module.kernels is None:
        pytest.skip(module.unavailable_reason(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)))
    t = torch.randn(int(torch.tensor(shape).prod()) * 4).as_strided(shape, stride)
    copy, _ = module._float_rows(t, 64, fill=float("inf"))
    assert copy.is_contiguous() and copy.shape == (*shape[:2], 256 if shape[-1] == 256 else 128)
    assert all((s * 4) % 16 == 0 for s in copy.stride()[:-1])
    assert torch.equal(copy[..., :shape[-1]], t)
