"""backend="torch" (block-sparse) against the dense reference: outputs and all four gradients."""

import pytest
import torch

from foxacp import forgetting_attention

from conftest import make_inputs, run_backend


def assert_close(a, b, tol):
    (out_a, grads_a), (out_b, grads_b) = a[:2], b[:2]
    torch.testing.assert_close(out_a, out_b, atol=tol, rtol=tol)
    for name, ga, gb in zip("q k v log_fgate".split(), grads_a, grads_b):
        assert ga is not None and gb is not None, name
        torch.testing.assert_close(ga, gb, atol=tol, rtol=tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("T", [1, 7, 64, 257, 1000])
@pytest.mark.parametrize("acp", [None, "auto", -3.0])
def test_torch_matches_reference(T, acp):
    inputs = make_inputs(2 if T < 500 else 1, T, 4, 32, Hkv=2, gate_logit=1.0)
    ref = run_backend("reference", inputs, adaptive_threshold=acp)
    out = run_backend("torch", inputs, adaptive_threshold=acp)
    assert_close(out, ref, 2e-5)


def test_gradcheck_float64():
    q, k, v, log_f = make_inputs(1, 9, 2, 4, Hkv=1, dtype=torch.float64, requires_grad=True)
    log_f = log_f.detach().double().requires_grad_(True)

    def fn(q, k, v, log_f):
        return forgetting_attention(q, k, v, log_f.float(), backend="torch", adaptive_threshold=-2.0)

    # log_fgate must be float32; check its gradient through a float64 -> float32 cast at looser tolerance
    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, log_f.detach()), (q, k, v))
    assert torch.autograd.gradcheck(lambda lf: fn(q.detach(), k.detach(), v.detach(), lf).double(), (log_f,),
                                    eps=1e-3, atol=1e-3, rtol=1e-2)


def test_head_first_layout():
    q, k, v, log_f = make_inputs(2, 33, 2, 8)
    ref = forgetting_attention(q, k, v, log_f, backend="torch")
    hf = forgetting_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), log_f.transpose(1, 2),
                              head_first=True, backend="torch")
    torch.testing.assert_close(hf.transpose(1, 2), ref)


@pytest.mark.parametrize("acp", [None, "auto"])
def test_cu_seqlens_equals_separate_calls(acp):
    lengths = [1, 70, 5, 130]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = make_inputs(1, sum(lengths), 4, 16, Hkv=2, gate_logit=0.5)
    out, grads, _ = run_backend("torch", inputs, cu_seqlens=cu, adaptive_threshold=acp)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        piece = [t[:, s:e] for t in inputs]
        # each sequence alone; "auto" there sees only its own data, so compare dense pieces
        ref_out, ref_grads, _ = run_backend("reference", piece)
        tol = 2e-5 if acp is None else 1e-3
        torch.testing.assert_close(out[:, s:e], ref_out, atol=tol, rtol=tol)


def test_cu_seqlens_gradients_match_reference():
    cu = torch.tensor([0, 50, 51, 140])
    inputs = make_inputs(1, 140, 2, 16, gate_logit=0.0)
    assert_close(run_backend("torch", inputs, cu_seqlens=cu, adaptive_threshold=-4.0),
                 run_backend("reference", inputs, cu_seqlens=cu, adaptive_threshold=-4.0), 2e-5)


@pytest.mark.parametrize("Tq", [1, 3, 64, 100])
def test_prefill_against_cache_is_tail_of_full(Tq):
    q, k, v, log_f = make_inputs(2, 150, 4, 16, Hkv=1)
    full = forgetting_attention(q, k, v, log_f, backend="torch")
    tail = forgetting_attention(q[:, -Tq:], k, v, log_f, backend="torch")
    torch.testing.assert_close(tail, full[:, -Tq:], atol=2e-6, rtol=2e-6)
    assert_close(run_backend("torch", (q[:, -Tq:], k, v, log_f), adaptive_threshold="auto"),
                 run_backend("reference", (q[:, -Tq:], k, v, log_f), adaptive_threshold="auto"), 2e-5)


def test_cumulative_gate_equals_log_gate():
    q, k, v, log_f = make_inputs(1, 80, 2, 8)
    full = forgetting_attention(q[:, -5:], k, v, log_f, backend="torch", adaptive_threshold="auto")
    cum = forgetting_attention(q[:, -5:], k, v, log_f.cumsum(1), cumulative_gate=True, backend="torch",
                               adaptive_threshold="auto")
    torch.testing.assert_close(full, cum)


def test_seq_start_left_padding():
    starts = torch.tensor([0, 17, 99])
    inputs = make_inputs(3, 100, 2, 16, gate_logit=0.0)
    out, grads, _ = run_backend("torch", inputs, seq_start=starts, adaptive_threshold="auto")
    ref = run_backend("reference", inputs, seq_start=starts, adaptive_threshold="auto")
    assert_close((out, grads), ref, 2e-5)
    for b, s in enumerate(starts.tolist()):
        assert torch.all(out[b, :s] == 0)
        alone = forgetting_attention(*[t[b:b + 1, s:] for t in inputs], backend="reference")
        torch.testing.assert_close(out[b:b + 1, s:], alone, atol=2e-5, rtol=2e-5)
        for g in grads[:3]:  # padding receives no gradient
            assert torch.all(g[b, :s] == 0)


def test_low_precision_inputs_keep_dtype():
    q, k, v, log_f = make_inputs(1, 40, 2, 8)
    out = forgetting_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), log_f, backend="torch")
    ref = forgetting_attention(q, k, v, log_f, backend="reference")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
