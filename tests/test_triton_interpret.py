"""backend="triton" against the reference: outputs, all four gradients, ACP tile bounds.

On a machine without CUDA the kernels run in Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton. bf16 is left to tests/gpu: the interpreter's
bf16 ``tl.dot`` is wrong.
"""

import os
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from foxacp import forgetting_attention  # noqa: E402
from foxacp.ops import reference, triton_kernels  # noqa: E402
from foxacp.ops.acp import MaskSpec  # noqa: E402

from conftest import errors, make_inputs, run_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)
# float32 tolerance: the interpreter computes tl.dot in float32; a GPU in TF32 (10-bit mantissa),
# so there this file uses tests/gpu's float32 tolerance
FLOAT32_TOL = 2e-5 if DEVICE == "cpu" else 3e-3


@pytest.fixture
def ta():
    from foxacp.ops import triton_attention

    return triton_attention


def triton_and_reference(inputs, **kwargs):
    """The Triton call, and the reference on exactly the tiles that call's plan computed."""
    got = run_backend("triton", inputs, device=DEVICE, **kwargs)
    return got, run_backend("reference", inputs, device=DEVICE, acp_plan=got.plan, **kwargs)


def check(got, want, tol):
    """Output and every gradient finite and within ``tol`` (see conftest ``errors``)."""
    assert torch.isfinite(got.out).all()
    for name, grad in zip(["q", "k", "v", "log_fgate"], got.grads):
        assert grad is not None and torch.isfinite(grad).all(), name
    # dlog_fgate at the same tolerance: the kernels keep dc's query-side term, which cancels
    # the rounding of Di (otherwise the reverse cumsum adds it up over T)
    bad = {name: err for name, err in errors(got, want).items() if not err < tol}
    assert not bad, bad


# (B, Tq, Tk, H, Hkv, D, dtype, kwargs)
CASES = {
    "dense": (2, 37, None, 2, 2, 16, torch.float32, {}),
    "dense-T1": (2, 1, None, 2, 1, 16, torch.float32, {}),
    "acp-gqa-odd-d": (1, 70, None, 4, 2, 24, torch.float32, {"adaptive_threshold": -3.0}),
    "acp-auto-tq<tk": (2, 20, 90, 4, 2, 16, torch.float32, {"adaptive_threshold": "auto"}),
    "tq<tk-dense-prefill": (1, 75, 131, 2, 1, 16, torch.float32, {}),
    "seq-start": (2, 50, None, 2, 1, 16, torch.float32, {"seq_start": torch.tensor([0, 13])}),
    "seq-start-acp": (2, 61, None, 2, 2, 16, torch.float32, {"seq_start": torch.tensor([17, 3]),
                                                             "adaptive_threshold": -2.0}),
    "cu-seqlens": (1, 100, None, 2, 1, 16, torch.float32, {"cu_seqlens": torch.tensor([0, 30, 31, 100])}),
    "cu-seqlens-acp": (1, 129, None, 4, 2, 16, torch.float32, {"cu_seqlens": torch.tensor([0, 1, 47, 48, 129]),
                                                               "adaptive_threshold": -2.5}),
    "decode-split": (2, 3, 150, 2, 2, 16, torch.float32, {"adaptive_threshold": -4.0}),
    "local-gqa-odd-d": (1, 70, None, 4, 2, 24, torch.float32, {"adaptive_threshold": -3.0, "acp_rule": "local"}),
    "local-cu-seqlens": (1, 129, None, 4, 2, 16, torch.float32, {"cu_seqlens": torch.tensor([0, 1, 47, 48, 129]),
                                                                 "adaptive_threshold": "auto", "acp_rule": "local"}),
    "local-tq<tk": (2, 40, 90, 4, 2, 16, torch.float32, {"adaptive_threshold": "auto", "acp_rule": "local"}),
    "decode-1-seq-start": (2, 1, 77, 2, 1, 16, torch.float32, {"seq_start": torch.tensor([5, 40])}),
    "fp16-d64-acp": (1, 97, None, 2, 1, 64, torch.float16, {"adaptive_threshold": "auto"}),
    "fp16-d40": (1, 45, None, 2, 2, 40, torch.float16, {}),
    "fp16-gqa3-d40": (2, 45, None, 6, 2, 40, torch.float16, {}),  # float32 partials summed into half dk/dv
}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(ta, name):
    B, Tq, Tk, H, Hkv, D, dtype, kwargs = CASES[name]
    inputs = make_inputs(B, Tq, H, D, Tk=Tk, Hkv=Hkv, dtype=dtype, gate_logit=1.0)
    check(*triton_and_reference(inputs, **kwargs), FLOAT32_TOL if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("name", ["acp-gqa-odd-d", "tq<tk-dense-prefill", "cu-seqlens-acp", "decode-split",
                                  "fp16-d40"])
def test_pointer_loads_match_reference(ta, monkeypatch, name):
    """The per-thread-load path (GPUs before Hopper, rows not 16-byte aligned) without TMA descriptors."""
    monkeypatch.setattr(ta, "TMA_ENABLED", False)
    test_triton_matches_reference(ta, name)


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the forward tries TMA only at head dim 128; this "
                                              "launcher test runs in the interpreter, which tries it at every size")
def test_tma_compile_failure_falls_back(ta, monkeypatch):
    """A TMA variant that fails to compile (ptxas 12.8 crashes on some) is retried once with
    per-thread loads, with a warning, and remembered."""
    real = ta.kernels.fwd_kernel

    class CrashingTMA:
        fn = real.fn

        def __getitem__(self, grid):
            def launch(*args, USE_TMA, **meta):
                if USE_TMA:
                    raise triton.errors.TritonError("ptxas failed with error code -11")
                return real[grid](*args, USE_TMA=USE_TMA, **meta)
            return launch

    monkeypatch.setattr(ta.kernels, "fwd_kernel", CrashingTMA())
    monkeypatch.setattr(ta, "_TMA_FAILED", set())
    monkeypatch.setattr(ta, "TMA_ENABLED", True)  # also under FOXACP_TRITON_TMA=0 (make test-min)
    inputs = make_inputs(1, 40, 2, 16, dtype=torch.float32)
    def tma_warnings(fn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
        return result, [str(w.message) for w in caught if "TMA" in str(w.message)]

    (got, want), first = tma_warnings(lambda: triton_and_reference(inputs))
    assert len(first) == 1 and "fwd_kernel with TMA failed to compile" in first[0]
    check(got, want, FLOAT32_TOL)
    assert len(ta._TMA_FAILED) == 1
    assert tma_warnings(lambda: run_backend("triton", inputs, device=DEVICE))[1] == []  # remembered: no second attempt


def test_acp_actually_prunes(ta):
    """The ACP cases above prune: otherwise they would only test the dense path."""
    inputs = make_inputs(1, 129, 2, 16, gate_logit=1.0)
    q, k, v, log_f = [t.to(DEVICE) for t in inputs]
    _, stats = forgetting_attention(q, k, v, log_f, backend="triton", adaptive_threshold=-2.5, return_stats=True)
    # the interpreter's plan tiles are 32x16; a GPU's 128x64 tiles leave only off-diagonal ones at T=129
    assert stats.kept_fraction < (0.6 if DEVICE == "cpu" else 1.0)


def test_decode_split_counts(ta, monkeypatch):
    """The split-key decoding forward gives the same answer for any number of splits."""
    inputs = make_inputs(1, 2, 2, 16, Tk=200, gate_logit=2.0)
    outs = []
    for splits in (1, 3, 7):
        monkeypatch.setattr(ta, "_decode_splits", lambda *args, s=splits: s)
        outs.append(run_backend("triton", inputs, adaptive_threshold=-6.0, device=DEVICE)[0])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-5)


def _plan(ta, B, H, Tq, Tk, *, packed=None, seq_start=None, delta=None, rule="paper", gate_logit=0.5):
    """The Triton backend's plan for a call built like the API builds it (D = 64)."""
    from foxacp.ops import api
    from foxacp.ops.layout import SequenceLayout

    log_f = torch.nn.functional.logsigmoid(gate_logit + torch.randn(B, H, Tk)).float().to(DEVICE)
    cu = None if packed is None else torch.tensor(packed, device=DEVICE)
    start = None if seq_start is None else torch.tensor(seq_start, device=DEVICE)
    layout = SequenceLayout.from_arguments(start, cu, B, Tq, Tk, torch.device(DEVICE))
    _, decay_global = api.cumulative_decay(log_f, layout)
    delta_t = None if delta is None else (delta * (1 + torch.rand(B, H))).float().to(DEVICE)
    spec = MaskSpec(B, H, Tq, Tk, layout.key_lo, layout.key_hi, None if delta is None else decay_global, delta_t,
                    rule)
    q, k = torch.randn(B, H, Tq, 64, device=DEVICE), torch.randn(B, H, Tk, 64, device=DEVICE)
    return ta.plan(spec, q, k, 0.125)


@pytest.mark.parametrize("kind", ["causal", "tq<tk", "packed", "seq-start", "dense-packed", "local", "local-packed"])
def test_kernel_tile_bounds_match_plan(ta, kind):
    """The ranges each kernel program finds for itself are exactly the plan's, and the pre-pass
    gives the same ranges as the PyTorch search."""
    from foxacp.ops.acp import paper_ranges

    B, H = 2, 3
    if kind == "causal":
        plan = _plan(ta, B, H, 150, 150, delta=-3.0)
    elif kind == "tq<tk":
        plan = _plan(ta, B, H, 70, 201, delta=-5.0)
    elif kind == "packed":
        plan = _plan(ta, 1, H, 190, 190, packed=[0, 17, 18, 100, 190], delta=-4.0)
    elif kind == "seq-start":
        plan = _plan(ta, B, H, 120, 120, seq_start=[0, 45], delta=-2.0)
    elif kind == "local":
        plan = _plan(ta, B, H, 150, 150, delta=-12.0, rule="local", gate_logit=-1.0)
    elif kind == "local-packed":
        plan = _plan(ta, 1, H, 190, 190, packed=[0, 17, 18, 100, 190], delta=-12.0, rule="local", gate_logit=-1.0)
    else:
        plan = _plan(ta, 1, H, 90, 90, packed=[0, 33, 90])
    if plan.spec.has_acp:
        want = paper_ranges(plan.spec, plan.block_m, plan.block_n)
        assert torch.equal(plan.paper_kv_begin, want[0])
        if kind.startswith("local"):
            assert (plan.acp_kv_begin >= want[0]).all()  # never keeps more than the paper's rule
        else:
            assert torch.equal(plan.acp_q_end, want[1])
    mine = ta.acp_bounds(plan)
    assert torch.equal(mine.to_dense(), plan.to_dense())
    # the key-side ranges (used by the dK/dV kernel) describe the same tiles
    m = torch.arange(plan.num_q_tiles, device=mine.q_begin.device)[None, None, :, None]
    by_keys = (m >= mine.q_begin[:, :, None, :]) & (m < mine.q_end[:, :, None, :])
    assert torch.equal(by_keys, plan.to_dense())


def test_custom_op_opcheck(ta):
    """Schema, fake (meta) implementation and autograd registration of the custom op."""
    q, k, v, log_f = make_inputs(1, 20, 2, 16, Hkv=1)
    q, k, v = (t.to(DEVICE).transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    decay = log_f.to(DEVICE).transpose(1, 2).cumsum(-1).requires_grad_(True)
    delta = torch.full((1, 2), -3.0, device=DEVICE)
    acp_kv, acp_q = ta.acp_tiles(decay.detach().double(), delta, 20, *ta.default_tiles(16))
    args = (q, k, v, decay, acp_kv, acp_q, None, None, 0.25, *ta.default_tiles(16))
    torch.library.opcheck(torch.ops.foxacp.fox_attn_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("shape", [(2, 37, 37, 4, 2, 24), (1, 20, 90, 6, 3, 16), (2, 70, 70, 2, 2, 40)])
def test_fused_data_threshold(ta, shape):
    """The fused ACP threshold kernels (used for half-precision CUDA inputs) match the PyTorch path."""
    from foxacp.ops import acp

    B, Tq, Tk, H, Hkv, D = shape
    q = (3 * torch.randn(B, H, Tq, D)).half().to(DEVICE)
    k = torch.randn(B, Tk, Hkv, D).half().to(DEVICE).transpose(1, 2)  # (B, T, H, D) memory, as the API passes
    q[0, -1, 5] *= 4  # one large row norm
    want = acp.threshold_from_data(q.cpu(), k.cpu(), 0.3, Tk, -7.0)
    got = ta._data_threshold(q, k, 0.3, Tk, -7.0)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)


@triton.jit
def _order_kernel(OUT, num_blocks, num_heads, GROUP: triton.language.constexpr):
    pid = triton.language.program_id(0)
    block, head = triton_kernels._longest_first(pid, num_blocks, num_heads, GROUP)
    triton.language.store(OUT + 2 * pid, block)
    triton.language.store(OUT + 2 * pid + 1, head)


@pytest.mark.parametrize("num_blocks, num_heads", [(5, 6), (1, 3), (4, 8), (3, 1)])
def test_forward_launch_order_covers_every_program_once(ta, num_blocks, num_heads):
    """``_longest_first`` maps the 1-D forward grid onto every (query block, head) exactly once,
    longest (last) blocks first within each group of heads, including a partial last group."""
    out = torch.full((num_blocks * num_heads, 2), -1, dtype=torch.int32, device=DEVICE)
    _order_kernel[(num_blocks * num_heads,)](out, num_blocks, num_heads, GROUP=ta.HEADS_PER_GROUP)
    pairs = [tuple(p) for p in out.tolist()]
    assert sorted(pairs) == [(b, h) for b in range(num_blocks) for h in range(num_heads)]
    for h in range(num_heads):  # within a head, blocks run last to first
        blocks = [b for b, head in pairs if head == h]
        assert blocks == sorted(blocks, reverse=True)
    group = [h // ta.HEADS_PER_GROUP for _, h in pairs]
    assert group == sorted(group)  # one group of heads after the other


def test_inference_path_matches_custom_op(ta, monkeypatch):
    """Without autograd the backend calls the launcher directly (no custom-op dispatch): same output."""
    inputs = [t.to(DEVICE) for t in make_inputs(1, 40, 2, 16, Tk=90, Hkv=1, gate_logit=2.0)]
    calls = []
    monkeypatch.setattr(ta, "_forward", lambda *args, f=ta._forward: calls.append(1) or f(*args))
    with torch.no_grad():
        direct = forgetting_attention(*inputs, backend="triton", adaptive_threshold=-4.0)
    assert calls == [1]
    q, k, v, log_f = [t.clone().requires_grad_(True) for t in inputs]
    via_op = forgetting_attention(q, k, v, log_f, backend="triton", adaptive_threshold=-4.0)
    torch.testing.assert_close(direct, via_op.detach(), rtol=0, atol=0)


def test_refuses_offsets_beyond_int32(ta):
    """One batch element past 2**31 elements would wrap the kernels' 32-bit offsets: a clear error."""
    q = torch.empty(2, 32, 2**20, 128, device="meta")  # (B, H, T, D) views: 2**32 elements per batch element
    kv = torch.empty(2, 8, 2**20, 128, device="meta")
    with pytest.raises(ValueError, match="32 bits"):
        ta._check_offsets_fit_int32(q, kv, kv)
    small = torch.empty(2, 32, 2**10, 128, device="meta")
    ta._check_offsets_fit_int32(small, small[:, :8], small[:, :8])


@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 70, 24, None), (1, 2, 1, 40, 100, 16, None),
                                   (1, 4, 2, 129, 129, 16, [0, 1, 47, 48, 129])])
@pytest.mark.parametrize("poison", [False, True])
def test_local_rule_kernel_matches_pytorch(ta, shape, poison):
    """The local rule's fused kernel finds what the PyTorch definition does (GQA, Tq < Tk, packed
    sequences with a one-token sequence, small tiles so that it prunes), and NaN proves nothing."""
    from foxacp.acp import key_side_bounds, local_kv_begin
    from foxacp.ops.layout import SequenceLayout

    B, H, Hkv, Tq, Tk, D, cu = shape
    q, k = 0.3 * torch.randn(B, H, Tq, D, device=DEVICE), 0.3 * torch.randn(B, Hkv, Tk, D, device=DEVICE)
    if poison:
        q[0, 1, Tq // 2, 0] = float("nan")
    decay = torch.nn.functional.logsigmoid(torch.randn(B, H, Tk, device=DEVICE) - 1).double().cumsum(-1)
    layout = SequenceLayout.from_arguments(None, None if cu is None else torch.tensor(cu, device=DEVICE),
                                           B, Tq, Tk, torch.device(DEVICE))
    spec = MaskSpec(B, H, Tq, Tk, layout.key_lo, layout.key_hi, decay, torch.zeros(B, H, device=DEVICE), "local")
    bounds = key_side_bounds(spec, k, 16)
    want = local_kv_begin(spec, q, k, 0.3, 16, 16, bounds)
    got = ta._local_first(spec, q, k, 0.3, 16, 16, bounds)
    assert want.sum() > 0  # it prunes here
    assert torch.equal(got, want)


def test_plan_finer_than_the_forward_blocks(ta, monkeypatch):
    """A plan on query tiles smaller than the Triton forward's blocks (the Hopper backend's plan when
    its inputs cannot be bulk-copied and the Triton kernels run instead) is followed exactly: the
    forward narrows its blocks to the plan's rows rather than reading one tile's range for two."""
    cfg = ta.tile_config(16)
    monkeypatch.setattr(ta, "default_tiles", lambda head_dim: (cfg.block_m // 2, cfg.block_n))
    inputs = make_inputs(1, 150, 2, 16, gate_logit=1.0)
    got, want = triton_and_reference(inputs, adaptive_threshold=-2.0)
    assert got.plan.block_m < cfg.block_m and got.plan.to_dense().float().mean() < 0.8  # it prunes
    check(got, want, FLOAT32_TOL)
