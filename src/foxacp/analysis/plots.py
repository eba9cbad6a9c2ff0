"""PNG figures for ``foxacp analyze`` and ``foxacp eval``; each function returns the file name."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

CLASS_COLORS = {"local": "tab:orange", "global": "tab:blue"}


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ---- analyze ---------------------------------------------------------------------------------
def pattern_figure(pattern: dict, arrays: dict, out_dir: Path) -> str:
    """Tile map (kept / pruned / above the diagonal; with the local rule's map, tiles only the paper
    rule keeps in gold) beside the decay ``c_i - c_j`` heat map."""
    key = pattern["key"]
    tiles, decay, positions = arrays[f"tiles_{key}"], arrays[f"decay_{key}"], arrays[f"positions_{key}"]
    local = arrays.get(f"local_tiles_{key}")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.6))
    rows, cols = tiles.shape
    # 0 above the diagonal, 1 pruned, 2 kept by the paper rule only, 3 kept (by both rules)
    both = (tiles == 2) if local is None else (tiles == 2) & (local == 2)
    shown = tiles.astype(np.int8) + both
    cmap = ListedColormap(["white", "lightcoral", "gold", "seagreen"])
    ax1.imshow(shown, cmap=cmap, vmin=0, vmax=3, interpolation="nearest",
               extent=(0, cols * pattern["block_n"], rows * pattern["block_m"], 0))
    title = f"layer {pattern['layer']} head {pattern['head']}: tiles kept {pattern['kept_fraction']:.1%}"
    if local is not None and "local_kept_fraction" in pattern:
        title += f" paper, {pattern['local_kept_fraction']:.1%} local"
    ax1.set(title=title, xlabel=f"key position (tiles of {pattern['block_n']})",
            ylabel=f"query position (tiles of {pattern['block_m']})")
    legend = [("seagreen", "kept"), ("lightcoral", "pruned"), ("white", "above diagonal")]
    if local is not None:
        legend[1:1] = [("gold", "pruned by the local rule only")]
    handles = [matplotlib.patches.Patch(color=c, label=n) for c, n in legend]
    ax1.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.9, edgecolor="gray")
    delta = pattern["threshold"]
    floor = min(1.5 * delta, np.nanmin(decay) if np.isfinite(np.nanmin(decay)) else delta)
    extent = (positions[0] - 0.5, positions[-1] + 0.5, positions[-1] + 0.5, positions[0] - 0.5)
    im = ax2.imshow(decay, cmap="viridis", vmin=floor, vmax=0, extent=extent, interpolation="nearest")
    if np.nanmin(decay) < delta:
        ax2.contour(positions, positions, np.nan_to_num(decay, nan=0.0), levels=[delta], colors="red",
                    linewidths=1.0)
    ax2.set(title=f"decay c_i - c_j (red: threshold {delta:.1f})", xlabel="key position j", ylabel="query position i")
    fig.colorbar(im, ax=ax2, fraction=0.046)
    return save(fig, out_dir / f"pattern_{key}.png")


def head_savings_figures(per_head: list[dict], out_dir: Path) -> tuple[str, str]:
    """Per-head savings: bars (paper rule) sorted, with the local rule's as black dots; histogram."""
    ranked = sorted(per_head, key=lambda r: r["saved_fraction"], reverse=True)
    has_local = all("local_saved_fraction" in r for r in per_head)
    fig, ax = plt.subplots(figsize=(max(6, 0.09 * len(ranked) + 2), 4))
    ax.bar(range(len(ranked)), [r["saved_fraction"] for r in ranked],
           color=[CLASS_COLORS[r["class"]] for r in ranked], width=1.0 if len(ranked) > 40 else 0.8)
    if has_local:
        ax.plot(range(len(ranked)), [r["local_saved_fraction"] for r in ranked], "k.", ms=4)
    ax.set(xlabel="heads, sorted", ylabel="attention FLOPs pruned", ylim=(0, 1.02))
    ax.set_title("Per-head FLOP savings (orange: local heads, blue: global)"
                 + ("\nbars: paper rule, black dots: local rule" if has_local else ""), fontsize=10)
    if len(ranked) <= 48:
        ax.set_xticks(range(len(ranked)), [f"{r['layer']}.{r['head']}" for r in ranked], rotation=90, fontsize=6)
    bars = save(fig, out_dir / "head_savings_sorted.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 21)
    for cls, color in CLASS_COLORS.items():
        values = [r["saved_fraction"] for r in per_head if r["class"] == cls]
        if values:
            ax.hist(values, bins=bins, color=color, alpha=0.7, label=f"{cls} ({len(values)})")
    if has_local:
        ax.hist([r["local_saved_fraction"] for r in per_head], bins=bins, histtype="step", color="k", lw=1.5,
                label="local rule, all heads")
    ax.set(xlabel="fraction of the head's attention FLOPs pruned", ylabel="heads", title="Per-head savings")
    ax.legend()
    return bars, save(fig, out_dir / "head_savings_hist.png")


def savings_vs_length_figure(by_length: list[dict], train_len: int | None, out_dir: Path) -> str:
    """Kept fraction and FLOPs saved vs L, all layers (thick) and per layer (thin): the paper rule
    solid, the local rule (when reported) dashed."""
    lengths = [r["length"] for r in by_length]
    has_local = all("local_kept_fraction" in r for r in by_length)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    n_layers = len(by_length[0]["per_layer"])
    for i in range(n_layers):
        line, = ax1.plot(lengths, [r["per_layer"][i]["kept_fraction"] for r in by_length], lw=0.8, alpha=0.6)
        ax2.plot(lengths, [r["per_layer"][i]["flops_saved_fraction"] for r in by_length], lw=0.8, alpha=0.6,
                 color=line.get_color(), label=f"layer {i}" if n_layers <= 12 else None)
        if has_local:
            ax1.plot(lengths, [r["per_layer"][i]["local_kept_fraction"] for r in by_length], lw=0.8, alpha=0.6,
                     ls="--", color=line.get_color())
            ax2.plot(lengths, [r["per_layer"][i]["local_flops_saved_fraction"] for r in by_length], lw=0.8,
                     alpha=0.6, ls="--", color=line.get_color())
    paper = "all layers, paper rule" if has_local else "all layers"
    ax1.plot(lengths, [r["kept_fraction"] for r in by_length], "k-o", lw=2, label=paper)
    ax2.plot(lengths, [r["flops_saved_fraction"] for r in by_length], "k-o", lw=2, label=paper)
    if has_local:
        ax1.plot(lengths, [r["local_kept_fraction"] for r in by_length], "--s", color="tab:red", lw=2,
                 label="all layers, local rule")
        ax2.plot(lengths, [r["local_flops_saved_fraction"] for r in by_length], "--s", color="tab:red", lw=2,
                 label="all layers, local rule")
        ax1.legend(fontsize=7)
    for ax, label in ((ax1, "kept tile fraction"), (ax2, "attention FLOPs saved")):
        ax.set_xscale("log", base=2)
        ax.set(xlabel="context length L", ylabel=label, ylim=(0, 1.02))
        if train_len:
            ax.axvline(train_len, color="gray", ls="--", lw=1)
    ax1.set_title("Kept fraction vs context (gray: training length)")
    ax2.set_title("FLOPs saved vs context")
    ax2.legend(fontsize=6, ncol=2)
    return save(fig, out_dir / "savings_vs_length.png")


def gate_figure(gates: list[dict], out_dir: Path) -> str:
    layers = sorted({g["layer"] for g in gates})
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in layers:
        mine = [g for g in gates if g["layer"] == layer]
        x = layer + np.linspace(-0.3, 0.3, len(mine))
        y = np.array([g["decay_length"] for g in mine])
        lo = y - np.array([g["decay_length_p10"] for g in mine])
        hi = np.array([g["decay_length_p90"] for g in mine]) - y
        ax.errorbar(x, y, yerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)], fmt="o", ms=3, lw=0.7)
    ax.set_yscale("log")
    ax.set(xlabel="layer (heads side by side)", ylabel="decay length -1/mean log f (tokens)",
           title="Forget-gate decay length per head (bars: per-token 10-90th percentile)")
    ax.set_xticks(layers)
    return save(fig, out_dir / "gate_decay_lengths.png")


def threshold_figure(thresholds: list[dict], out_dir: Path) -> str:
    layers = [t["layer"] for t in thresholds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(layers, [max(t["bound_U"]) for t in thresholds], "o-", label="bound U used (max over heads)")
    ax1.plot(layers, [max(t["cauchy_schwarz_bound"]) for t in thresholds], "s--", label="max|q| max|k| / sqrt(D)")
    ax1.plot(layers, [max(t["max_abs_logit"]) for t in thresholds], "^-", label="largest actual |logit|")
    ax1.set(xlabel="layer", ylabel="logit magnitude", title="How conservative the bound is")
    ax1.legend(fontsize=7)
    ax2.plot(layers, [t["kept_fraction"] for t in thresholds], "o-", label="kept (threshold used)")
    ax2.plot(layers, [t["kept_fraction_tight_bound"] for t in thresholds], "^-", label="kept (U = actual max logit)")
    if all("local_kept_fraction" in t for t in thresholds):
        ax2.plot(layers, [t["local_kept_fraction"] for t in thresholds], "s--", label="kept (local rule)")
    ax2.set(xlabel="layer", ylabel="kept tile fraction", ylim=(0, 1.02), title="Kept fraction: bound vs tight bound")
    ax2.legend(fontsize=7)
    return save(fig, out_dir / "thresholds.png")


# ---- eval ------------------------------------------------------------------------------------
def position_loss_figure(curves: dict[str, dict], window: int, out_dir: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        ax.plot(curve["positions"], curve["smoothed"], lw=1.2, label=label)
    ax.set(xlabel="token position", ylabel=f"loss (moving average, {window} tokens)", title="Per-token loss by position")
    ax.legend(fontsize=7)
    return save(fig, out_dir / "loss_by_position.png")


def needle_figure(label: str, grid: dict, out_dir: Path, name: str) -> str:
    lengths, depths = grid["lengths"], grid["depths"]
    scores = np.array(grid["accuracy"], dtype=float)  # [len(lengths), len(depths)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(depths), 1.2 + 0.5 * len(lengths)))
    im = ax.imshow(scores, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(L) for L in lengths])
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(j, i, f"{scores[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set(xlabel="needle depth", ylabel="context length", title=f"Needle retrieval: {label}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save(fig, out_dir / name)


def throughput_figure(rows: list[dict], out_dir: Path) -> str:
    labels = [r["label"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.barh(labels, [r["prefill_tokens_per_s"] for r in rows], color="tab:blue")
    ax1.set(xlabel="prefill tokens/s", title="Prefill")
    ax2.barh(labels, [r["decode_tokens_per_s"] for r in rows], color="tab:green")
    ax2.set(xlabel="decode tokens/s", title="Decode")
    return save(fig, out_dir / "throughput.png")
