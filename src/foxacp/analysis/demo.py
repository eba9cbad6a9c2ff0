"""ACP on vs off: train the same model twice and compare (``make demo`` and benchmarks/train_acp.py).

Both runs share the seed, data order and initial weights; they differ only in ``acp``. The
report (``<out>/report.md``) holds the loss curves, step times, the per-layer kept fraction
and a summary of the loss difference, the attention FLOPs saved and the speed-up.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..train.config import load_config
from ..train.trainer import Trainer
from .training_report import write_comparison_report

# The demo: a model and context where attention is a real share of the work, small enough for
# 2 CPU cores (about 4 minutes for both runs); on a GPU the same command runs longer.
DEMO_SETTINGS = [
    "data.source=shakespeare", "data.tokenizer=bytes", "data.seq_len=1024", "data.mode=document",
    "model.preset=fox-pro-small", "batch.global_tokens=8192", "batch.micro_batch=4",
    "optim.lr=0.003", "optim.warmup_tokens=65536", "run.eval_batches=4", "run.keep_last=1",
]
CPU_STEPS, GPU_STEPS = 40, 200


def run_acp_comparison(config: str | None, overrides: list[str], out: Path, steps: int, title: str,
                       rules: tuple[str, ...] = ("paper",)) -> str:
    """Train ``config`` + ``overrides`` for ``steps`` steps with ACP off, then on under each of
    ``rules`` (runs ``acp_on`` for the paper's rule, ``acp_on_<rule>`` for others); write the report."""
    variants = [("acp_off", ["model.overrides.acp=false"])]
    variants += [("acp_on" if rule == "paper" else f"acp_on_{rule}",
                  ["model.overrides.acp=true", f"model.overrides.acp_rule={rule}"]) for rule in rules]
    runs = {}
    for name, acp_overrides in variants:
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # old metrics would mix with the new ones
        run_overrides = overrides + [f"run.out_dir={run_dir}", f"run.max_steps={steps}", "run.log_every=1",
                                     "run.eval_every=0", "run.ckpt_every=0", *acp_overrides]
        cfg = load_config(config, run_overrides)
        if cfg.optim.total_tokens < steps * cfg.batch.global_tokens:  # the schedule spans the comparison
            cfg = load_config(config, run_overrides + [f"optim.total_tokens={steps * cfg.batch.global_tokens}"])
        print(f"== training {name} ({steps} steps)", flush=True)
        trainer = Trainer(cfg)
        try:
            trainer.fit()
        finally:
            trainer.close()
        runs[name] = run_dir
    summary = write_comparison_report(runs, out, baseline="acp_off", candidates=[name for name, _ in variants[1:]],
                                      title=title)
    print("\n" + summary)
    print(f"report: {out / 'report.md'}")
    return summary


def run_demo(out: Path, steps: int | None = None) -> str:
    steps = steps or (GPU_STEPS if torch.cuda.is_available() else CPU_STEPS)
    return run_acp_comparison(None, DEMO_SETTINGS, out, steps,
                              "Demo: tiny FoX (Pro) on Shakespeare, ACP on vs off")
