"""CPU benchmark: block-sparse torch backend (dense and ACP) vs the dense reference.

Each case runs in a fresh subprocess so its peak resident memory is its own. Times are the
median of ``--repeats`` forward+backward passes after one warm-up. Prints a table and writes
JSON (``--out``).

    python benchmarks/cpu_attention.py --lengths 2048 4096 8192 --out runs/cpu_attention.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import statistics
import time

GATES = {"never": None, "slow": 256.0, "medium": 32.0, "fast": 8.0}  # decay length tau in tokens


def gate_logits(tau: float | None, shape, generator):
    """Forget-gate logits with ``f = exp(-1/tau)`` (tau None: nothing forgets) plus small noise."""
    import torch
    if tau is None:
        return torch.full(shape, 30.0)
    f = math.exp(-1.0 / tau)
    return math.log(f / (1 - f)) + 0.3 * torch.randn(shape, generator=generator)


def run_case(contender: str, T: int, gate: str, heads: int, head_dim: int, repeats: int, queue) -> None:
    import torch
    from foxacp import forgetting_attention
    torch.set_num_threads(torch.get_num_threads())
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.rms_norm(torch.randn(1, T, heads, head_dim, generator=g), (head_dim,))
    k = torch.nn.functional.rms_norm(torch.randn(1, T, heads, head_dim, generator=g), (head_dim,))
    v = torch.randn(1, T, heads, head_dim, generator=g)
    log_f = torch.nn.functional.logsigmoid(gate_logits(GATES[gate], (1, T, heads), g)).float()
    for t in (q, k, v, log_f):
        t.requires_grad_(True)
    backend, threshold = {"reference": ("reference", None), "torch dense": ("torch", None),
                          "torch acp": ("torch", "auto")}[contender]
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, kept = [], 1.0
    for step in range(repeats + 1):
        start = time.perf_counter()
        out, stats = forgetting_attention(q, k, v, log_f, adaptive_threshold=threshold, backend=backend,
                                          return_stats=True)
        out.sum().backward()
        if step:
            times.append(time.perf_counter() - start)
        kept = stats.kept_fraction
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
    queue.put({"contender": contender, "T": T, "gate": gate, "ms": 1e3 * statistics.median(times),
               "peak_mb": peak_mb, "kept_fraction": kept})


def measure(contender, T, gate, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_case, args=(contender, T, gate, args.heads, args.head_dim, args.repeats, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--gates", nargs="+", default=list(GATES), choices=list(GATES))
    parser.add_argument("--contenders", nargs="+", default=["reference", "torch dense", "torch acp"])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    rows = []
    print(f"forward+backward on CPU, B=1, H={args.heads}, D={args.head_dim}, float32; ms (peak MB)")
    header = f"{'T':>6} {'gate':>7} {'kept':>6} " + " ".join(f"{c:>20}" for c in args.contenders)
    print(header)
    for T in args.lengths:
        for gate in args.gates:
            results = [measure(c, T, gate, args) for c in args.contenders]
            rows.extend(results)
            kept = results[-1]["kept_fraction"]
            cells = " ".join(f"{r['ms']:>11.0f} ({r['peak_mb']:>6.0f})" for r in results)
            print(f"{T:>6} {gate:>7} {kept:>6.2f} {cells}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": "cpu", "heads": args.heads, "head_dim": args.head_dim, "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
