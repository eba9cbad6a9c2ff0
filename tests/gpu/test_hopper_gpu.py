"""backend="hopper" (Gluon forward, dQ and dK/dV kernels) on an sm90+ GPU: the Triton backend's case
matrix at head dims 64 and 128 against the float32 reference (output and every gradient, ACP on
exactly the plan's tiles), 16k, poisoned outputs, torch.compile(fullgraph=True). Skipped elsewhere."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="needs an sm90+ GPU")]

from foxacp import forgetting_attention  # noqa: E402
from foxacp.ops import backends  # noqa: E402

from test_triton_gpu import CASES, check_compile_fullgraph, compare, make  # noqa: E402

HOPPER_CASES = [name for name, case in CASES.items() if case[5] in (64, 128)]
EXTRA = {  # shapes that exercise the Hopper kernel's own edges: partial last blocks, one block, GQA 4:1
    "odd-T-129": (2, 129, None, 4, 4, 64, {"adaptive_threshold": "auto"}),
    "T-65-d128": (1, 65, None, 2, 1, 128, {}),
    "gqa-4-odd": (1, 3001, None, 8, 2, 128, {"adaptive_threshold": -5.0}),
    "tq<tk-d128": (1, 300, 1000, 4, 4, 128, {"adaptive_threshold": "auto"}),
    "tq-65-long-keys": (2, 65, 5000, 4, 2, 64, {"seq_start": torch.tensor([100, 4000])}),  # just above decoding
    "tq<tk-one-head": (1, 128, 197, 1, 1, 64, {}),  # size-1 dims: the padded decay copies' strides
}


@pytest.fixture
def ta():
    reason = backends.load("hopper").unavailable_reason(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16, device="cuda"))
    if reason is not None:
        pytest.skip(reason)
    from foxacp.ops import triton_attention

    return triton_attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", HOPPER_CASES + list(EXTRA))
def test_hopper_matches_reference(ta, name, dtype):
    B, Tq, Tk, H, Hkv, D, kwargs = {**CASES, **EXTRA}[name]
    kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    compare(ta, make(B, Tq, H, D, Tk=Tk, Hkv=Hkv, dtype=dtype), dtype, backend="hopper", **kwargs)


@pytest.mark.parametrize("acp", [None, "auto"])
def test_hopper_16k(ta, acp):
    compare(ta, make(1, 16384, 2, 64, Hkv=1, tau=[64.0, 8192.0]), torch.bfloat16, backend="hopper",
            adaptive_threshold=acp)


@pytest.mark.parametrize("seqlen", [256, 320])
def test_hopper_cumulative_gate_strided(ta, seqlen):
    """A cumulative gate given as (B, T, H) reaches the kernels as a strided (B, H, T) view; the
    bulk copies of its decays need contiguous copies (whole-block T and not)."""
    q, k, v, log_f = make(2, seqlen, 4, 64)
    compare(ta, (q, k, v, log_f.cumsum(1)), torch.bfloat16, backend="hopper", cumulative_gate=True)


def test_hopper_plan_tiles(ta):
    """The plan is on the Gluon forward's blocks (the backward kernels' blocks divide them)."""
    q, k, v, log_f = make(1, 1024, 2, 64)
    _, stats = forgetting_attention(q, k, v, log_f, backend="hopper", adaptive_threshold="auto", return_stats=True)
    assert (stats.plan.block_m, stats.plan.block_n) == backends.load("hopper").required_tiles(64)


def test_auto_picks_hopper(ta):
    q = make(1, 256, 2, 64)[0].transpose(1, 2)
    assert backends.resolve("auto", q, 64) is backends.load("hopper")


def test_hopper_fallback_runs_triton_on_the_hopper_plan(ta, monkeypatch):
    """Inputs the bulk-copy engine cannot address run the Triton kernels on the Hopper plan's tiles
    (64x128 at D=64: finer rows than the Triton forward's 128-row blocks, which narrow to them)."""
    monkeypatch.setattr(backends.load("hopper"), "_tma_ready", lambda t: False)
    compare(ta, make(1, 3000, 4, 64, Hkv=2), torch.bfloat16, backend="hopper", adaptive_threshold=-3.0)


def test_hopper_compile_fullgraph(ta):
    check_compile_fullgraph("hopper", "paper")
