"""Multi-GPU FSDP2 check: loss parity 1 vs N GPUs, resharded resume, tokens/s scaling.

    python benchmarks/multi_gpu.py --out runs/multi_gpu --gpus 2

Every run is ``torchrun --nproc_per_node=n -m foxacp train`` (FSDP2 and DCP checkpoints even
for n = 1), with the same seed and global batch, so the n-GPU run sees exactly the 1-GPU run's
batches (the loader splits each global batch by rank). Three parts:

0. noise floor: two 1-GPU runs that differ only in the micro-batch size (the order in which bf16
   gradients are summed); their loss gap is what "within bf16 noise" means for this setup.
1. parity: ``--parity-steps`` steps of ``--parity-preset`` with ACP on, on 1 and on N GPUs; the
   largest loss difference per step is reported.
2. reshard: the N-GPU run's checkpoint at the middle step is resumed on 1 GPU (DCP reshards
   N -> 1) and trained to the end; its losses are compared with the N-GPU run's.
3. scaling: for each ``--scaling-presets`` at ``--scaling-context``, tokens/s on 1 and N GPUs
   (median over the steps after ``--warmup`` steps) and the efficiency tok/s(N) / (N tok/s(1)).

``benchmarks/reproduce.py`` (issue 14's end-to-end run) reuses these parts.

Writes ``<out>/summary.json``, ``<out>/report.md`` and ``<out>/loss_curves.png`` and prints the tables. ``--device cpu``
runs the same thing with gloo processes (for checking this script without GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from foxacp.data import open_store
from foxacp.train import checkpoint


def read_metrics(out_dir: Path) -> list[dict]:
    """The per-step training records of ``out_dir/metrics.jsonl`` (no eval lines)."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if "loss" in r]


def losses_by_step(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}


def max_loss_gap(a: dict[int, float], b: dict[int, float]) -> dict:
    """Largest |a - b| over the steps both have, and where it happened."""
    steps = sorted(set(a) & set(b))
    if not steps:
        raise ValueError("the two runs share no logged step")
    gaps = {s: abs(a[s] - b[s]) for s in steps}
    worst = max(gaps, key=gaps.get)
    return {"steps": [steps[0], steps[-1]], "max_abs_diff": gaps[worst], "at_step": worst,
            "final": {"a": a[steps[-1]], "b": b[steps[-1]]}}


def median_tokens_per_s(records: list[dict], warmup: int) -> float:
    timed = [r["tokens_per_s"] for r in records if r["step"] > warmup]
    if not timed:
        raise ValueError(f"no steps after the {warmup} warm-up steps")
    return statistics.median(timed)


def run_overrides(preset: str, context: int, steps: int, micro_batch: int) -> list[str]:
    """The per-run part of a training command (the rest is common to every run)."""
    return [f"model.preset={preset}", f"data.seq_len={context}", f"run.max_steps={steps}",
            f"batch.micro_batch={micro_batch}"]


class Launcher:
    """Starts ``foxacp train`` under torchrun on the first ``n`` devices."""

    def __init__(self, common: list[str], device: str, log_dir: Path):
        self.common, self.device, self.log_dir = common, device, log_dir
        self.seconds = 0.0  # wall time of the last run, start-up included

    def train(self, name: str, gpus: int, out_dir: Path, overrides: list[str], resume: bool = False,
              timeout_s: float | None = None) -> list[dict]:
        """The run's step records. Past ``timeout_s`` the run gets SIGTERM (the trainer checkpoints
        and stops) and what it logged is returned; any other failure raises SystemExit."""
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
        if self.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "foxacp", "train", *(["--resume"] if resume else []),
               *self.common, f"run.device={self.device}", f"run.out_dir={out_dir}", *overrides]
        print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
        log = self.log_dir / f"{name}.log"
        start = time.perf_counter()
        stopped = False
        with open(log, "w") as handle:
            proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                print(f"[{name}] past its {timeout_s:.0f} s: SIGTERM", flush=True)
                proc.send_signal(signal.SIGTERM)
                code, stopped = proc.wait(), True
        self.seconds = time.perf_counter() - start
        print(f"[{name}] exit {code} after {self.seconds:.0f} s", flush=True)
        if code != 0 and not stopped:
            print(log.read_text()[-4000:], flush=True)
            raise SystemExit(f"[{name}] failed with exit code {code}; log {log}")
        return read_metrics(out_dir)


def resume_elsewhere(launch: Launcher, name: str, gpus: int, source_run: Path, step: int, out: Path,
                     overrides: list[str]) -> list[dict]:
    """Copy ``source_run``'s checkpoint at ``step`` into a new run folder, resume it on ``gpus``."""
    source = checkpoint.checkpoint_root(source_run) / f"step_{step:08d}"
    if not source.exists():
        raise SystemExit(f"expected the checkpoint {source}")
    target = out / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, checkpoint.checkpoint_root(target) / source.name)
    return launch.train(name, gpus, target, overrides, resume=True)


def run_parity(launch: Launcher, gpus: int, preset: str, context: int, steps: int, micro_batch: int,
               out: Path) -> dict:
    mid = steps // 2
    overrides = run_overrides(preset, context, steps, micro_batch) + [f"run.ckpt_every={mid}", "run.keep_last=4"]
    one = losses_by_step(launch.train("parity_1gpu", 1, out / "parity_1gpu", overrides))
    many = losses_by_step(launch.train(f"parity_{gpus}gpu", gpus, out / f"parity_{gpus}gpu", overrides))
    down = losses_by_step(resume_elsewhere(launch, f"reshard_{gpus}to1", 1, out / f"parity_{gpus}gpu", mid, out,
                                           overrides))
    up = losses_by_step(resume_elsewhere(launch, f"reshard_1to{gpus}", gpus, out / "parity_1gpu", mid, out,
                                         overrides))
    return {"preset": preset, "context": context, "steps": steps, "gpus": gpus, "resumed_from_step": mid,
            "comparisons": {f"1 GPU vs {gpus} GPUs": max_loss_gap(one, many),
                            f"{gpus}->1 GPU resumed vs {gpus} GPUs": max_loss_gap(down, many),
                            f"1->{gpus} GPUs resumed vs 1 GPU": max_loss_gap(up, one)},
            "curves": {"1gpu": one, f"{gpus}gpu": many, f"resumed_{gpus}to1": down, f"resumed_1to{gpus}": up}}


def run_noise_floor(launch: Launcher, preset: str, context: int, steps: int, micro_batch: int, out: Path,
                    gpus: int = 1) -> dict:
    """Two runs on ``gpus`` that differ only in gradient-accumulation order (micro-batch m vs m/2, or
    1 vs 2): how far bf16 summation order alone moves the loss curve, the yardstick for 1 vs N GPUs."""
    runs = {}
    for micro in (micro_batch, micro_batch // 2 if micro_batch >= 2 else 2):
        name = f"noise_{gpus}gpu_micro{micro}"
        runs[micro] = losses_by_step(launch.train(name, gpus, out / name, run_overrides(preset, context, steps, micro)))
    (a, b) = runs.values()
    return {"preset": preset, "context": context, "steps": steps, "gpus": gpus, "micro_batches": list(runs),
            "gap": max_loss_gap(a, b), "curves": {f"micro{m}": c for m, c in runs.items()}}


def run_scaling(launch: Launcher, counts: list[int], preset: str, context: int, steps: int, micro_batch: int,
                warmup: int, out: Path, checkpoint_step: int | None = None) -> dict:
    """Median tokens/s on each of ``counts`` GPUs (the first is the baseline, same global batch);
    ``checkpoint_step``: the run on the most GPUs also checkpoints at that step."""
    overrides = run_overrides(preset, context, steps, micro_batch)
    rates = {}
    for n in counts:
        extra = [f"run.ckpt_every={checkpoint_step}", "run.keep_last=4"] if checkpoint_step and n == max(counts) else []
        name = f"scaling_{preset}_{n}gpu"
        rates[n] = median_tokens_per_s(launch.train(name, n, out / name, overrides + extra), warmup)
    base = counts[0]
    return {"preset": preset, "context": context, "gpus": counts, "steps": steps,
            "tokens_per_s": {str(n): r for n, r in rates.items()},
            "speedup": {str(n): r / rates[base] for n, r in rates.items()},
            "efficiency": {str(n): r * base / (n * rates[base]) for n, r in rates.items()}}


def report(summary: dict) -> str:
    p = summary["parity"]
    lines = [f"# Multi-GPU FSDP2 check ({summary['device_name']})", "",
             f"Global batch {summary['global_tokens']} tokens, seed {summary['seed']}, ACP on, "
             f"compile {summary['compile']}.", "",
             f"## Loss parity: {p['preset']}, L={p['context']}, {p['steps']} steps", "",
             f"Resumed runs start from the step-{p['resumed_from_step']} checkpoint of the other world size "
             "(DCP resharding).", "",
             "| comparison | steps | max abs loss diff (step) | final losses |", "|---|---|---|---|"]
    n = summary["noise_floor"]
    comparisons = {**p["comparisons"],
                   f"1 GPU, micro-batch {n['micro_batches'][0]} vs {n['micro_batches'][1]} (noise floor)": n["gap"]}
    for label, d in comparisons.items():
        lines.append(f"| {label} | {d['steps'][0]}-{d['steps'][1]} | {d['max_abs_diff']:.4f} ({d['at_step']}) "
                     f"| {d['final']['a']:.4f} / {d['final']['b']:.4f} |")
    lines += ["", f"## Scaling at L={summary['scaling'][0]['context'] if summary['scaling'] else '-'}", ""]
    lines += scaling_table(summary["scaling"])
    return "\n".join(lines) + "\n"


def scaling_table(scaling: list[dict]) -> list[str]:
    """Markdown rows: per preset and GPU count, tokens/s, speed-up and efficiency."""
    lines = ["| preset | GPUs | tokens/s | speed-up | efficiency |", "|---|---|---|---|---|"]
    for s in scaling:
        for n, rate in s["tokens_per_s"].items():
            lines.append(f"| {s['preset']} | {n} | {rate:,.0f} | {s['speedup'][n]:.2f}x | {s['efficiency'][n]:.1%} |")
    return lines


def plot_curves(parity: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in parity["curves"].items():
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], label=label, linestyle="--" if "resumed" in label else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{parity['preset']}, L={parity['context']}: 1 vs {parity['gpus']} GPUs (FSDP2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/multi_gpu"))
    parser.add_argument("--gpus", type=int, default=2, help="N, the processes of the multi-GPU runs")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--global-tokens", type=int, default=65536)
    parser.add_argument("--micro-tokens", type=int, default=16384, help="tokens per forward per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--parity-preset", default="fox-pro-125m")
    parser.add_argument("--parity-context", type=int, default=4096)
    parser.add_argument("--parity-steps", type=int, default=50)
    parser.add_argument("--scaling-presets", nargs="*", default=["fox-pro-125m", "fox-pro-360m"])
    parser.add_argument("--scaling-context", type=int, default=16384)
    parser.add_argument("--scaling-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="scaling steps left out of the median")
    parser.add_argument("--noise-floor-only", action="store_true",
                        help="only the 1-GPU micro-batch m vs m/2 runs of the parity setup (needs one GPU)")
    parser.add_argument("overrides", nargs="*", help="more section.key=value for every run")
    args = parser.parse_args(argv)
    if args.gpus < 2 and not args.noise_floor_only:
        parser.error("--gpus must be >= 2")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.gpus and not args.noise_floor_only:
            parser.error(f"--gpus {args.gpus} but only {torch.cuda.device_count()} CUDA devices are visible")
        device_name = f"{args.gpus}x {torch.cuda.get_device_name(0)}"
    else:
        device_name = f"CPU, {args.gpus} gloo processes"

    args.out.mkdir(parents=True, exist_ok=True)
    open_store(args.data, tokenizer=args.tokenizer)  # prepare the corpus once, before the ranks start
    common = [f"data.source={args.data}", f"data.tokenizer={args.tokenizer}", "run.progress=false",
              "run.log_every=1", "run.eval_batches=1", f"run.seed={args.seed}", f"run.compile={args.compile}",
              f"batch.global_tokens={args.global_tokens}", "model.overrides.acp=true",
              "model.overrides.fgate_bias_init=spread", "optim.lr=0.002", "optim.warmup_tokens=1048576",
              *args.overrides]
    launch = Launcher(common, args.device, args.out)
    micro = lambda context: max(1, args.micro_tokens // context)  # noqa: E731
    noise = run_noise_floor(launch, args.parity_preset, args.parity_context, args.parity_steps,
                            micro(args.parity_context), args.out)
    (args.out / "noise_floor.json").write_text(json.dumps({"device_name": device_name, **noise}, indent=1))
    print(f"noise floor (1 GPU, micro-batch {noise['micro_batches']}): {noise['gap']}", flush=True)
    if args.noise_floor_only:
        return
    parity = run_parity(launch, args.gpus, args.parity_preset, args.parity_context, args.parity_steps,
                        micro(args.parity_context), args.out)
    scaling = [run_scaling(launch, [1, args.gpus], preset, args.scaling_context, args.scaling_steps,
                           micro(args.scaling_context), args.warmup, args.out)
               for preset in args.scaling_presets]
    summary = {"device_name": device_name, "gpus": args.gpus, "global_tokens": args.global_tokens,
               "seed": args.seed, "compile": args.compile, "noise_floor": noise, "parity": parity,
               "scaling": scaling}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_curves(parity, args.out / "loss_curves.png")
    text = report(summary) + "\n![loss curves](loss_curves.png)\n"
    (args.out / "report.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
