"""Compare training runs from their ``metrics.jsonl``: loss, step time and ACP kept fraction.

``write_comparison_report(runs, out_dir)`` draws PNG plots and writes ``report.md`` with a
summary paragraph (loss difference, attention FLOPs saved, speed-up) and the numbers in JSON.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..train.metrics import read_metrics  # noqa: E402


def _step_records(path: Path) -> list[dict]:
    """Training-step records, the latest line per step (resumed runs repeat steps)."""
    by_step = {r["step"]: r for r in read_metrics(path) if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def _final_val(path: Path) -> float | None:
    vals = [r["val_loss"] for r in read_metrics(path) if "val_loss" in r]
    return vals[-1] if vals else None


def summarize_run(run_dir: Path) -> dict:
    records = _step_records(run_dir / "metrics.jsonl")
    timed = records[1:] or records  # the first step holds warm-up and compilation
    flops = [r["flops_per_token"] for r in timed]
    return {
        "steps": records[-1]["step"],
        "final_loss": records[-1]["loss"],
        "val_loss": _final_val(run_dir / "metrics.jsonl"),
        "median_step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mean_kept_fraction": statistics.mean(r["acp"]["kept_fraction"] for r in timed),
        "attention_flops_saved_fraction": 1 - sum(f["attention_computed"] for f in flops)
        / max(sum(f["attention_dense"] for f in flops), 1e-30),
        "total_flops_saved_fraction": 1 - sum(f["total_computed"] for f in flops)
        / max(sum(f["matmul"] + f["attention_dense"] for f in flops), 1e-30),
    }


def plot_runs(runs: dict[str, Path], out_dir: Path) -> dict[str, str]:
    """Loss, step time and per-layer kept fraction figures; returns {name: png filename}."""
    data = {name: _step_records(path / "metrics.jsonl") for name, path in runs.items()}
    figures = {}

    for key, ylabel, title in (("loss", "training loss", "Loss"), ("step_time_s", "seconds", "Step time")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, recs in data.items():
            ax.plot([r["step"] for r in recs], [r[key] for r in recs], label=name)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend()
        figures[key.removesuffix("_s")] = _save(fig, out_dir / f"{key.removesuffix('_s')}.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, recs in data.items():
        layers = len(recs[0]["acp"]["layer_kept_fraction"]) if recs else 0
        if not any(r["acp"]["kept_fraction"] < 1 for r in recs):
            continue  # dense run: nothing to show
        for layer in range(layers):
            ax.plot([r["step"] for r in recs], [r["acp"]["layer_kept_fraction"][layer] for r in recs],
                    label=f"{name} layer {layer}")
    ax.set(xlabel="step", ylabel="kept tile fraction", title="ACP kept fraction per layer", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    figures["kept_fraction"] = _save(fig, out_dir / "kept_fraction.png")
    return figures


def write_comparison_report(runs: dict[str, Path], out_dir: Path, *, baseline: str, candidates: list[str],
                            title: str = "ACP on vs off") -> str:
    """Write ``report.md`` + PNGs + ``summary.json`` comparing each of ``candidates`` to ``baseline``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize_run(path) for name, path in runs.items()}
    figures = plot_runs(runs, out_dir)
    base = summaries[baseline]
    speedups, lines_out = {}, []
    for candidate in candidates:
        cand = summaries[candidate]
        speedups[candidate] = base["median_step_time_s"] / cand["median_step_time_s"]
        val_diff = None if base["val_loss"] is None or cand["val_loss"] is None else cand["val_loss"] - base["val_loss"]
        lines_out.append(
            f"{candidate} vs {baseline} after {cand['steps']} steps: final training loss "
            f"{cand['final_loss']:.4f} vs {base['final_loss']:.4f} (difference {cand['final_loss'] - base['final_loss']:+.4f})"
            + ("" if val_diff is None else f", held-out loss difference {val_diff:+.4f}")
            + f". ACP kept {cand['mean_kept_fraction']:.1%} of the causal attention tiles on average, saving "
            f"{cand['attention_flops_saved_fraction']:.1%} of attention FLOPs "
            f"({cand['total_flops_saved_fraction']:.1%} of all training FLOPs). Median step time "
            f"{cand['median_step_time_s']:.3f} s vs {base['median_step_time_s']:.3f} s: "
            f"speed-up {speedups[candidate]:.2f}x.")
    summary = "\n\n".join(lines_out)
    lines = [f"# {title}", "", summary, "", "| run | steps | final loss | val loss | median step s | tokens/s | kept | attn FLOPs saved |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        val = "-" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
        lines.append(f"| {name} | {s['steps']} | {s['final_loss']:.4f} | {val} | {s['median_step_time_s']:.3f} | "
                     f"{s['median_tokens_per_s']:.0f} | {s['mean_kept_fraction']:.3f} | "
                     f"{s['attention_flops_saved_fraction']:.3f} |")
    lines += [""] + [f"![{name}]({file})" for name, file in figures.items()]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps({"summary": summary, "speedup": speedups, "runs": summaries},
                                                     indent=1))
    return summary


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
