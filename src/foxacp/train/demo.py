"""``make demo``: train a tiny FoX (Pro) on the embedded corpus with ACP off and on, then report.

Both runs share the seed, data order and initial weights; they differ only in ``acp``. The
report (``<out>/report.md``) holds the loss curves, step times, the per-layer kept fraction
and a summary of the loss difference, the attention FLOPs saved and the speed-up.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..analysis.training_report import write_comparison_report
from .config import load_config
from .trainer import Trainer

# A model and context where attention is a real share of the work, small enough for 2 CPU cores.
DEMO_SETTINGS = [
    "data.source=shakespeare", "data.tokenizer=bytes", "data.seq_len=1024", "data.mode=document",
    "model.preset=fox-pro-small", "batch.global_tokens=8192", "batch.micro_batch=4",
    "optim.lr=0.003", "optim.warmup_tokens=65536", "run.log_every=1", "run.eval_every=0",
    "run.eval_batches=4", "run.ckpt_every=0", "run.keep_last=1",
]
CPU_STEPS, GPU_STEPS = 40, 200


def run_demo(out: Path, steps: int | None = None) -> str:
    steps = steps or (GPU_STEPS if torch.cuda.is_available() else CPU_STEPS)
    runs = {}
    for name, acp in (("acp_off", "false"), ("acp_on", "true")):
        run_dir = out / name
        overrides = DEMO_SETTINGS + [f"run.out_dir={run_dir}", f"run.max_steps={steps}",
                                     f"optim.total_tokens={steps * 8192}", f"model.overrides.acp={acp}"]
        _clear_metrics(run_dir)
        print(f"== training {name} ({steps} steps)", flush=True)
        trainer = Trainer(load_config(None, overrides))
        try:
            trainer.fit()
        finally:
            trainer.close()
        runs[name] = run_dir
    summary = write_comparison_report(runs, out, baseline="acp_off", candidate="acp_on",
                                      title="Demo: tiny FoX (Pro) on Shakespeare, ACP on vs off")
    print("\n" + summary)
    print(f"report: {out / 'report.md'}")
    return summary


def _clear_metrics(run_dir: Path) -> None:
    """A fresh demo run: old metrics and checkpoints would mix with the new ones."""
    import shutil

    if run_dir.exists():
        shutil.rmtree(run_dir)
