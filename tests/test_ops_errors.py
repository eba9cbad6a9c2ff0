"""Every misuse of forgetting_attention raises a clear error naming the argument."""

import pytest
import torch

from foxacp import forgetting_attention

from conftest import make_inputs


def call(**changes):
    q, k, v, log_f = make_inputs(2, 16, 4, 8, Hkv=2)
    args = {"q": q, "k": k, "v": v, "log_fgate": log_f}
    kwargs = {"backend": "torch"}
    kwargs.update({name: changes.pop(name) for name in list(changes) if name not in args})
    args.update(changes)
    return forgetting_attention(args["q"], args["k"], args["v"], args["log_fgate"], **kwargs)


@pytest.mark.parametrize("changes, error, words", [
    ({"q": torch.randn(2, 16, 4)}, ValueError, "q must be 4-D"),
    ({"k": torch.randn(3, 16, 2, 8)}, ValueError, "k and v must have the same shape"),
    ({"k": torch.randn(3, 16, 2, 8), "v": torch.randn(3, 16, 2, 8)}, ValueError, "batch"),
    ({"k": torch.randn(2, 16, 2, 4), "v": torch.randn(2, 16, 2, 4)}, ValueError, "head dim"),
    ({"k": torch.randn(2, 16, 3, 8), "v": torch.randn(2, 16, 3, 8)}, ValueError, "multiple of k/v heads"),
    ({"k": torch.randn(2, 8, 2, 8), "v": torch.randn(2, 8, 2, 8)}, ValueError, "more than k's"),
    ({"v": torch.randn(2, 16, 2, 8).double()}, TypeError, "v must have q's dtype"),
    ({"q": torch.randn(2, 16, 4, 8).int()}, TypeError, "q must be float"),
    ({"log_fgate": torch.zeros(2, 16, 4, dtype=torch.float16)}, TypeError, "log_fgate must be float32"),
    ({"log_fgate": torch.zeros(2, 16, 2)}, ValueError, "one gate per query head"),
    ({"log_fgate": [0.0]}, TypeError, "log_fgate must be a torch.Tensor"),
    ({"adaptive_threshold": 1.0}, ValueError, "adaptive_threshold must be <= 0"),
    ({"adaptive_threshold": float("nan")}, ValueError, "adaptive_threshold must be <= 0"),
    ({"adaptive_threshold": torch.tensor([0.5, -1.0, -1, -1])}, ValueError, "adaptive_threshold must be <= 0"),
    ({"adaptive_threshold": torch.zeros(3)}, ValueError, "does not broadcast to (B, H)"),
    ({"adaptive_threshold": "fast"}, ValueError, "adaptive_threshold must be None, 'auto'"),
    ({"adaptive_threshold": "auto", "log_eps": 1.0}, ValueError, "log_eps must be a negative"),
    ({"cu_seqlens": torch.tensor([0, 16])}, ValueError, "batch size 1"),
    ({"seq_start": torch.tensor([0, 16])}, ValueError, "seq_start values must lie in [0, 16)"),
    ({"seq_start": torch.tensor([-1, 0])}, ValueError, "seq_start values"),
    ({"seq_start": torch.tensor([0])}, ValueError, "seq_start must have shape (2,)"),
    ({"seq_start": torch.tensor([0.0, 1.0])}, TypeError, "seq_start must be an integer tensor"),
    ({"seq_start": torch.tensor([0, 1]), "cu_seqlens": torch.tensor([0, 16])}, ValueError, "not both"),
    ({"sm_scale": -1.0}, ValueError, "sm_scale must be a positive"),
    ({"backend": "cuda"}, ValueError, "backend must be one of"),
])
def test_bad_input(changes, error, words):
    with pytest.raises(error) as info:
        call(**changes)
    assert words in str(info.value), str(info.value)


@pytest.mark.parametrize("cu, words", [
    (torch.tensor([0, 10, 10, 16]), "strictly increasing"),
    (torch.tensor([0, 10]), "end at T=16"),
    (torch.tensor([1, 16]), "start at 0"),
    (torch.tensor([0.0, 16.0]), "int32/int64"),
    (torch.tensor([[0, 16]]), "1-D"),
])
def test_bad_cu_seqlens(cu, words):
    q, k, v, log_f = make_inputs(1, 16, 2, 8)
    with pytest.raises((ValueError, TypeError)) as info:
        forgetting_attention(q, k, v, log_f, cu_seqlens=cu, backend="torch")
    assert words in str(info.value), str(info.value)


def test_cu_seqlens_needs_equal_lengths():
    q, k, v, log_f = make_inputs(1, 8, 2, 8, Tk=16)
    with pytest.raises(ValueError, match="Tq == Tk"):
        forgetting_attention(q, k, v, log_f, cu_seqlens=torch.tensor([0, 16]), backend="torch")


def test_unsupported_head_dim_for_triton_is_clear():
    q, k, v, log_f = make_inputs(1, 8, 2, 320)
    with pytest.raises(ValueError, match="backend 'triton' is unavailable for this call: head dim 320"):
        forgetting_attention(q, k, v, log_f, backend="triton")
