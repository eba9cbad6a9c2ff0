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
