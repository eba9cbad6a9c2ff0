import os
import sys
from typing import NamedTuple

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


class Run(NamedTuple):
    out: torch.Tensor
    grads: list  # of q, k, v, log_fgate
    plan: object  # the call's TilePlan


def run_backend(backend, inputs, *, device=None, **kwargs) -> Run:
    """Output of ``forgetting_attention(*inputs, backend=backend, **kwargs)``, the gradients of
    ``q, k, v, log_fgate`` from a fixed random projection of it, and the call's tile plan (pass it as
    ``acp_plan=`` to run another backend on exactly the same tiles).

    The inputs and tensor ``kwargs`` are copied to ``device`` (default: where the inputs are); the
    projection comes from a generator on the output's device seeded with 1.
    """
    from foxacp import forgetting_attention  # not at the top: Triton must not load before TRITON_INTERPRET

    device = inputs[0].device if device is None else device
    q, k, v, log_f = [t.detach().clone().to(device).requires_grad_(True) for t in inputs]
    kwargs = {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in kwargs.items()}
    out, stats = forgetting_attention(q, k, v, log_f, backend=backend, return_stats=True, **kwargs)
    weight = torch.randn(out.shape, device=out.device, generator=torch.Generator(device=out.device).manual_seed(1))
    (out.float() * weight).sum().backward()
    return Run(out.detach(), [t.grad for t in (q, k, v, log_f)], stats.plan)


def rel_err(a, b, scale_rms: float) -> float:
    """``|a - b| / max(|b|, scale_rms * sqrt(n))`` (2-norms).

    A gradient can be exactly 0 where its terms cancel (dq with one visible key: dS = P (dP - Di)
    = 0), and then ``|a - b| / |b|`` measures rounding noise against nothing. ``scale_rms`` is the
    RMS size of the terms of the same computation (:func:`errors` passes the reference dv's), so
    near a zero reference the error is relative to what rounding acts on, elsewhere it is the plain
    relative error.
    """
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(scale_rms * b.numel() ** 0.5)).item()


def rms(t) -> float:
    return t.double().pow(2).mean().sqrt().item()


def errors(got: Run, want: Run) -> dict:
    """Relative errors of the output and every gradient. The output's floor is the reference output's
    RMS; the gradients' is the reference dv's RMS: dv never cancels (``dv_j = sum_i P_ij dO_i``,
    P >= 0) and has the size of the dS terms that make dq, dk and dlog_fgate."""
    errs = {"out": rel_err(got.out, want.out, rms(want.out))}
    grad_scale = rms(want.grads[2])
    errs.update({f"d{n}": rel_err(a, b, grad_scale) for n, a, b in zip(["q", "k", "v", "log_fgate"], got.grads, want.grads)})
    return errs


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
