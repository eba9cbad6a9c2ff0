"""The Triton custom ops alone (dense, default tiles) against SDPA, for A/B runs of two source trees.

    python benchmarks/ops_ab.py --tag new --json new.jsonl
    PYTHONPATH=/path/to/base/checkout/src python benchmarks/ops_ab.py --tag base --json base.jsonl
    python benchmarks/ops_ab.py --profile       # CUDA time per kernel (GQA vs the same-FLOP MHA shape)

Times ``fox_attn_fwd`` and ``fox_attn_bwd`` (no API preamble: no gate cumsum, no ACP) and SDPA
causal forward / backward on the same inputs, medians of ``triton.testing.do_bench``. Whichever
``foxacp`` is importable is timed, so two checkouts give a same-machine A/B (run them in one GPU
call, alternating, to see the spread). The shapes are benchmarks/attention.py's plus the MHA shape
with the GQA shape's FLOPs.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton

from attention import SHAPES, decays, make_inputs, op_backward, op_forward

MHA_LIKE_GQA = (4, 32, 32, 8192, 64)


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def op_inputs(B, H, Hkv, T, D):
    """(B, H, T, D) views of benchmarks/attention.py's inputs (gate: nothing to prune), dO, and the
    forward's out/lse."""
    q, k, v, log_f = make_inputs(B, H, Hkv, T, D, "none")
    qc, kc, vc = (t.transpose(1, 2) for t in (q, k, v))
    decay, _ = decays(log_f.transpose(1, 2))
    scale = 1 / math.sqrt(D)
    out, lse = op_forward(qc, kc, vc, decay, scale)
    return qc, kc, vc, decay, scale, torch.randn_like(qc), out, lse


def time_shape(shape) -> dict:
    B, H, Hkv, T, D = shape
    qc, kc, vc, decay, scale, dout, out, lse = op_inputs(*shape)
    gqa = {"enable_gqa": True} if H != Hkv else {}
    sdpa_fwd = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, is_causal=True, **gqa))
    leaves = [t.detach().requires_grad_(True) for t in (qc, kc, vc)]
    o = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, **gqa)
    sdpa_bwd = median_ms(lambda: torch.autograd.grad(o, leaves, dout, retain_graph=True))
    fwd = median_ms(lambda: op_forward(qc, kc, vc, decay, scale))
    bwd = median_ms(lambda: op_backward(dout, qc, kc, vc, decay, out, lse, scale))
    return dict(shape=shape, sdpa_fwd=sdpa_fwd, sdpa_bwd=sdpa_bwd, fwd=fwd, bwd=bwd, fwd_x=fwd / sdpa_fwd,
                bwd_x=bwd / sdpa_bwd, fwd_bwd_x=(fwd + bwd) / (sdpa_fwd + sdpa_bwd))


def kernel_profile(shape, iters: int = 10) -> dict:
    """Mean CUDA ms per call of each kernel over ``iters`` forward + backward calls."""
    qc, kc, vc, decay, scale, dout, out, lse = op_inputs(*shape)

    def step():
        op_forward(qc, kc, vc, decay, scale)
        op_backward(dout, qc, kc, vc, decay, out, lse, scale)

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 1e3 / iters for e in prof.key_averages() if e.key.endswith("_kernel")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="ops", help="label of this tree in the output")
    parser.add_argument("--json", default=None, help="append one JSON line per result")
    parser.add_argument("--profile", action="store_true", help="CUDA time per kernel, GQA vs MHA shape")
    args = parser.parse_args(argv)
    gqa_shape = SHAPES[4]
    if args.profile:
        jobs = [lambda s=s: dict(shape=s, kernels=kernel_profile(s)) for s in (gqa_shape, MHA_LIKE_GQA)]
    else:
        jobs = [lambda s=s: time_shape(s) for s in [SHAPES[0], SHAPES[2], SHAPES[3], gqa_shape, MHA_LIKE_GQA]]
    for job in jobs:
        row = dict(tag=args.tag, device=torch.cuda.get_device_name(), **job())
        line = json.dumps(row)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
