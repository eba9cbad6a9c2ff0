import os
import sys

import torch

# Triton kernels run in the interpreter on machines without CUDA. The variable must be set
# before Triton is first imported (by any test module), so it is set here, before collection.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_inputs(B, Tq, H, D, *, Tk=None, Hkv=None, dtype=torch.float32, gate_logit=3.0, spread=1.0,
                requires_grad=False, device="cpu"):
    """Random (q, k, v, log_fgate) in (B, T, H, D) layout; gates logsigmoid(gate_logit + spread*N)."""
    Tk = Tk or Tq
    Hkv = Hkv or H
    q = torch.randn(B, Tq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, Tk, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, Tk, Hkv, D, dtype=dtype, device=device)
    log_f = torch.nn.functional.logsigmoid(gate_logit + spread * torch.randn(B, Tk, H, device=device)).float()
    tensors = (q, k, v, log_f)
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


def run_backend(backend, inputs, *, device=None, **kwargs):
    """Output of ``forgetting_attention(*inputs, backend=backend, **kwargs)`` and the gradients of
    ``q, k, v, log_fgate`` from a fixed random projection of it.

    The inputs and tensor ``kwargs`` are copied to ``device`` (default: where the inputs are); the
    projection comes from a generator on the output's device seeded with 1.
    """
    from foxacp import forgetting_attention  # not at the top: Triton must not load before TRITON_INTERPRET

    device = inputs[0].device if device is None else device
    q, k, v, log_f = [t.detach().clone().to(device).requires_grad_(True) for t in inputs]
    kwargs = {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in kwargs.items()}
    out = forgetting_attention(q, k, v, log_f, backend=backend, **kwargs)
    weight = torch.randn(out.shape, device=out.device, generator=torch.Generator(device=out.device).manual_seed(1))
    (out.float() * weight).sum().backward()
    return out.detach(), [t.grad for t in (q, k, v, log_f)]


def rel_err(a, b) -> float:
    """``|a - b| / |b|`` (2-norms), with a floor of 1e-3 RMS on ``|b|`` for gradients that are ~0."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-3 * b.numel() ** 0.5)).item()


def write_byte_store(root, n_docs: int, words_per_doc: int):
    """A byte-level token store of ``n_docs`` pseudo-English documents under ``root/store``."""
    import random

    from foxacp.data import prepare_store

    rng = random.Random(0)
    words = "the forget gate decays old keys while attention keeps what matters most".split()
    for i in range(n_docs):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(words_per_doc)))
    out = root / "store"
    prepare_store([root], "bytes", out, progress=False)
    return out
