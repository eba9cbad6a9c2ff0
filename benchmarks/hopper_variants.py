"""The Hopper backend's launch choices against each other, in one run (docs/kernel-notes.md attempt 25).

Each variant replaces some of ``hopper_attention``'s launch choices (forward tiles, a producer warp
per kernel, register caps); ``shipped`` is the code as it is. For every shape the script checks the
variant's output and gradients against the shipped ones, times forward and forward + backward through
``forgetting_attention`` (SDPA and every variant in turn, median of ``--rounds``), and reads each
kernel's CUDA time from the profiler (dense, no gate). Prints a table and writes JSON.

    python benchmarks/hopper_variants.py [--shapes 2,3] [--variants shipped,no-producer] [--rounds 3]
    python benchmarks/hopper_variants.py --list
    python benchmarks/hopper_variants.py --compile [--variants no-producer]   # any machine, no GPU

``--compile`` builds each variant's Gluon kernels for sm_90 at the head dims it changes (through
``benchmarks/compile_sm90.py``: registers, spills, CTAs per SM), so a sweep that would not compile
fails on a CPU rather than on a leased GPU (``tests/test_hopper_variants.py`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from foxacp.ops import hopper_attention

# head dim -> launch options, per kernel; a kernel or head dim a variant leaves out keeps the shipped choice
VARIANTS = {
    "shipped": {},
    "no-producer": {  # session 7's kernels: every ring refilled by its consumers, no register caps
        "tiles": {64: (64, 64)},
        "fwd": {64: dict(STAGES=4, num_warps=4, PRODUCER_WARP=False),
                128: dict(STAGES=3, num_warps=8, PRODUCER_WARP=False)},
        "dq": {64: dict(PRODUCER_WARP=False), 128: dict(PRODUCER_WARP=False)},
        "dkdv": {64: dict(PRODUCER_WARP=False), 128: dict(PRODUCER_WARP=False)},
    },
    "producer-everywhere": {  # a producer warp in every kernel, caps for two CTAs per SM (one: D=128 forward)
        "dq": {64: dict(PRODUCER_WARP=True, maxnreg=128)},
        "dkdv": {128: dict(PRODUCER_WARP=True, maxnreg=128)},
    },
    "fwd-64x64": {  # D=64 forward on 64x64 tiles without a producer warp (three CTAs per SM)
        "tiles": {64: (64, 64)},
        "fwd": {64: dict(STAGES=4, num_warps=4, PRODUCER_WARP=False)},
    },
}


_SHIPPED = hopper_attention.tiles, hopper_attention.launch_config, hopper_attention.backward_launch


def use(name: str) -> None:
    """From now on ``hopper_attention`` launches (and plans ACP on the tiles of) variant ``name``;
    ``use("shipped")`` restores the code as it is. Set for a whole forward + backward: the backward
    reads its launch options when it runs."""
    spec = VARIANTS[name]
    shipped_tiles, shipped_forward, shipped_backward = _SHIPPED

    def tiles(head_dim):
        return spec.get("tiles", {}).get(head_dim) or shipped_tiles(head_dim)

    def launch_config(head_dim):
        return spec.get("fwd", {}).get(head_dim) or shipped_forward(head_dim)

    def backward_launch(head_dim):
        dq, dkdv = shipped_backward(head_dim)
        return spec.get("dq", {}).get(head_dim) or dq, spec.get("dkdv", {}).get(head_dim) or dkdv

    hopper_attention.tiles, hopper_attention.launch_config, hopper_attention.backward_launch = (
        _SHIPPED if name == "shipped" else (tiles, launch_config, backward_launch))


def compile_variants(names) -> None:
    """Each variant's Gluon kernels compiled for sm_90, at every head dim it changes."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compile_sm90

    for name in names:
        head_dims = sorted({d for choice in VARIANTS[name].values() for d in choice})
        for head_dim in head_dims:
            print(f"variant {name}, D={head_dim}:", flush=True)
            use(name)
            try:
                compile_sm90.compile_gluon(head_dim)
            finally:
                use("shipped")


def kernel_times(run, repeats: int = 5) -> dict:
    """CUDA ms per call of every kernel ``run()`` launches that takes over 0.1 ms (profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    per_call = {e.key: e.device_time_total / 1000 / repeats for e in prof.key_averages()}
    return {key[:48]: round(ms, 4) for key, ms in per_call.items() if ms > 0.1}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="0,2,3,4", help="indices into benchmarks/attention.py's SHAPES")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--gates", default="none,spread", help="spread gates run with ACP (auto threshold)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="hopper_variants.json")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--compile", action="store_true", help="compile each variant for sm_90 (no GPU) and exit")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected names from {list(VARIANTS)}")
    if args.list:
        print(json.dumps(VARIANTS, indent=1, default=str))
        return
    if args.compile:
        return compile_variants(names)

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import attention as bench
    from foxacp import forgetting_attention

    if not torch.cuda.is_available() or not bench.hopper_ready(torch.empty(1, 1, 1, 64, device="cuda",
                                                                             dtype=torch.bfloat16)):
        sys.exit("hopper_variants.py needs an sm90+ GPU where backend='hopper' runs")
    result = dict(device=torch.cuda.get_device_name(), variants={n: VARIANTS[n] for n in names}, rows=[],
                  checks=[], kernels=[])
    for index in (int(i) for i in args.shapes.split(",")):
        B, H, Hkv, T, D = bench.SHAPES[index]
        for gate in args.gates.split(","):
            q, k, v, log_f = bench.make_inputs(B, H, Hkv, T, D, gate)
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v, log_f)]
            grads = torch.randn_like(q)
            threshold = "auto" if gate != "none" else None

            def call(name):
                use(name)
                return forgetting_attention(*leaves, backend="hopper", adaptive_threshold=threshold)

            def outputs(name):
                for t in leaves:
                    t.grad = None
                out = call(name)
                out.backward(grads)
                return [out.float()] + [t.grad.float() for t in leaves]

            shipped = outputs("shipped")
            for name in names:
                errors = [((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
                          for a, b in zip(outputs(name), shipped)]
                result["checks"].append(dict(shape=[B, H, Hkv, T, D], gate=gate, variant=name,
                                             rel_diff_out_dq_dk_dv_dlogf=errors))
            qh, kh, vh = (t.transpose(1, 2) for t in leaves[:3])
            contenders = {"sdpa causal": lambda: torch.nn.functional.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True, enable_gqa=H != Hkv).transpose(1, 2)}
            contenders.update({name: (lambda name=name: call(name)) for name in names})
            for mode in ("fwd", "fwd+bwd"):
                times = bench.time_round_robin(contenders, mode == "fwd+bwd", grads, args.rounds)
                sdpa = statistics.median(times["sdpa causal"])
                for name, rounds in times.items():
                    ms = statistics.median(rounds)
                    result["rows"].append(dict(shape=[B, H, Hkv, T, D], gate=gate, mode=mode, contender=name, ms=ms,
                                               ms_rounds=rounds, vs_sdpa=ms / sdpa))
                    print(f"{(B, H, Hkv, T, D)} {gate:>6} {mode:>7} {name:>20} {ms:8.3f} ms x{ms / sdpa:.2f}",
                          flush=True)
            if gate == "none":
                for name in names:
                    per_kernel = kernel_times(lambda name=name: call(name).backward(grads))
                    result["kernels"].append(dict(shape=[B, H, Hkv, T, D], variant=name, ms=per_kernel))
                    print(f"{(B, H, Hkv, T, D)} kernels {name}: {per_kernel}", flush=True)
            use("shipped")
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            del q, k, v, log_f, leaves, grads, contenders
            torch.cuda.empty_cache()
    print_table(result["rows"])


def print_table(rows) -> None:
    names = list(dict.fromkeys(r["contender"] for r in rows))
    print("\n| shape (B,H,Hkv,T,D) | gate | mode | " + " | ".join(names) + " |")
    print("|---" * (3 + len(names)) + "|")
    keyed = {}
    for r in rows:
        keyed.setdefault((tuple(r["shape"]), r["gate"], r["mode"]), {})[r["contender"]] = r
    for (shape, gate, mode), group in keyed.items():
        cells = [f"{group[n]['ms']:.2f} (x{group[n]['vs_sdpa']:.2f})" if n in group else "-" for n in names]
        print(f"| {shape} | {gate} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
