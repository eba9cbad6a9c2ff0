"""The output folders of ``foxacp analyze`` and ``foxacp eval``: figures (PNG), the numbers as JSON
(``analysis.json`` / ``eval.json``) and ``report.md`` formatted from them."""

from __future__ import annotations

import json
import math
from pathlib import Path


def write_analysis(res: dict, arrays: dict, out: Path) -> dict:
    """Write what :func:`~foxacp.analysis.pruning.analyze_model` returned into ``out``; returns the figures."""
    import numpy as np

    from . import plots
    from .report import analysis_markdown

    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for p in res["patterns"]:
        figures[f"pattern_{p['key']}"] = plots.pattern_figure(p, arrays, out)
    figures["head_savings_sorted"], figures["head_savings_hist"] = plots.head_savings_figures(res["per_head"], out)
    figures["savings_vs_length"] = plots.savings_vs_length_figure(res["savings_vs_length"],
                                                                 res["model"]["train_seq_len"], out)
    figures["gate_decay_lengths"] = plots.gate_figure(res["gates"], out)
    figures["thresholds"] = plots.threshold_figure(res["thresholds"], out)
    res["figures"] = figures
    np.savez_compressed(out / "patterns.npz", **arrays)
    (out / "analysis.json").write_text(json.dumps(_finite(res), indent=1))
    (out / "report.md").write_text(analysis_markdown(res, figures))
    return figures


def write_eval(res: dict, out: Path) -> dict:
    """Write what :func:`~foxacp.analysis.evaluation.run_eval` returned into ``out``; returns the figures."""
    from . import plots
    from .report import eval_markdown

    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    if res["position"]:
        figures["loss_by_position"] = plots.position_loss_figure(res["position"], res["position_window"], out)
    for i, (label, grid) in enumerate(res["needle"].items()):
        figures[f"needle_{i}"] = plots.needle_figure(label, grid, out, f"needle_{i}.png")
    if res["throughput"]:
        figures["throughput"] = plots.throughput_figure(res["throughput"], out)
    res["figures"] = figures
    (out / "eval.json").write_text(json.dumps(_finite(res), indent=1))
    (out / "report.md").write_text(eval_markdown(res, figures))
    return figures


def _finite(obj):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
