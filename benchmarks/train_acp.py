"""End-to-end training throughput with ACP off and on, same model, data and seed, one run.

    python benchmarks/train_acp.py --config configs/fox-pro-125m-4k.yaml --steps 60 \
        --out runs/train_acp batch.global_tokens=65536 model.overrides.fgate_bias_init=spread

``--rules paper,local`` adds one ACP run per rule (the data-aware rule of ``foxacp.ops.acp``).
Prints the summary (loss difference, kept fraction, attention FLOPs saved, tokens/s of each)
and writes ``<out>/report.md``, ``<out>/summary.json`` and the plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from foxacp.analysis.demo import run_acp_comparison


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="runs/train_acp")
    parser.add_argument("--rules", default="paper", help="ACP rules to train with, e.g. paper,local (one run each)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    run_acp_comparison(args.config, args.overrides, Path(args.out), args.steps,
                       f"Training throughput, ACP on vs off ({args.config or 'defaults'})",
                       rules=tuple(args.rules.split(",")))


if __name__ == "__main__":
    main()
