"""What ACP prunes in a trained FoX model: the numbers behind ``foxacp analyze``.

``analyze_model(loaded, store, ...)`` runs held-out windows through the model with ACP on and
returns a JSON-ready dict. Both ACP rules (:mod:`foxacp.ops.acp`) are reported side by side from
the same forwards: they run under the data-aware ``"local"`` rule, whose :class:`AcpStats` also
count what the paper's rule alone keeps on the same call. The unprefixed numbers (``kept_fraction``,
``flops_saved_fraction``, ``flops_done``, ...) are the paper rule's; ``local_*`` are the local
rule's (its kept tiles are a subset of the paper rule's, so ``local_kept_fraction <= kept_fraction``).

- ``savings_vs_length``: per context length L, the kept tile fraction and the share of
  attention FLOPs saved, overall and per layer (``flops = 4 D`` per computed score, at tile
  granularity, as :class:`~foxacp.ops.acp.AcpStats` counts them), and the mean threshold;
  ``local_to_paper_kept`` is the local rule's kept tiles over the paper rule's.
- ``per_head`` (at the analysis length): each (layer, head)'s FLOPs done / dense / saved, its
  measured decay length and its class. A head is *local* when its ACP pruning distance
  ``|delta| * decay_length`` (how far back a constant gate of that decay would let ACP prune)
  is shorter than L, else *global*. ``per_head_summary`` holds the overall saving (the sum of
  the heads' saved FLOPs over the sum of their dense FLOPs) and the share of all saved FLOPs
  that the top 10% of heads provide.
- ``gates``: per head, ``mean log f`` over held-out tokens, the decay length
  ``-1 / mean log f``, the std of ``log f`` and the 10/50/90th percentiles of the per-token
  decay length ``-1 / log f``.
- ``thresholds``: per layer and head, ``delta``, the bound ``U`` it implies
  (``U = (log_eps - delta - ln L) / 2``), the largest actual ``|s_ij|`` over causal pairs, the
  Cauchy-Schwarz data bound ``max|q| max|k| / sqrt(D)``, and the kept fraction ACP would reach
  with the tightest valid threshold (``U`` = the actual largest logit of each sequence).
- ``patterns``: for the chosen (layer, head) pairs on the first held-out window, the tile
  counts; the tile maps (``tiles_*`` the paper rule's, ``local_tiles_*`` the local rule's: 2 kept,
  1 pruned, 0 above the diagonal) and decay maps go to ``patterns.npz`` for the figures.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .capture import capture_attention
from .loading import LoadedModel, fox_layers, heldout_windows

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)


def analysis_lengths(seq_len: int, lengths: list[int] | None, train_seq_len: int | None) -> list[int]:
    """Lengths to measure: those given, else 1k..16k plus twice the training length; always ``seq_len``."""
    if lengths:
        chosen = set(lengths)
    else:
        chosen = set(DEFAULT_LENGTHS)
        if train_seq_len and 2 * train_seq_len > max(DEFAULT_LENGTHS):
            chosen.add(2 * train_seq_len)
    chosen.add(seq_len)
    return sorted(chosen)


@torch.no_grad()
def analyze_model(loaded: LoadedModel, store, *, seq_len: int, lengths: list[int], num_seqs: int = 4,
                  layers: list[int] | None = None, heads: list[int] | None = None,
                  val_fraction: float = 0.05, device: torch.device = torch.device("cpu"),
                  dtype: torch.dtype = torch.float32, log=print) -> tuple[dict, dict]:
    """``(results, arrays)``: the JSON-ready numbers and the arrays behind the pattern figures."""
    model = loaded.model
    if not loaded.is_fox:
        raise ValueError(f"{loaded.source}: `analyze` needs a FoX model (forget gate); "
                         f"this one is {model.config.architecture}")
    cfg = model.config
    model.to(device=device, dtype=dtype).eval()
    original_acp, original_rule = bool(cfg.acp), cfg.acp_rule
    model.set_acp(True, rule="local")  # each call's stats then carry both rules' kept tiles
    model.collect_acp_stats(True)
    try:
        return _analyze(loaded, store, seq_len=seq_len, lengths=lengths, num_seqs=num_seqs, layers=layers,
                        heads=heads, val_fraction=val_fraction, device=device, dtype=dtype, log=log)
    finally:
        model.set_acp(original_acp, rule=original_rule)


def _analyze(loaded: LoadedModel, store, *, seq_len, lengths, num_seqs, layers, heads, val_fraction, device,
             dtype, log) -> tuple[dict, dict]:
    model, cfg = loaded.model, loaded.model.config
    n_layers, n_heads = len(fox_layers(model)), cfg.num_attention_heads
    log_eps = float(cfg.acp_log_eps)

    by_length, head_acc, captures, first_stats = [], None, None, None
    for L in lengths:
        windows = heldout_windows(store, L, num_seqs, val_fraction)
        acc = {k: np.zeros(n_layers, dtype=np.float64)
               for k in ("kept", "causal", "done", "dense", "local_kept", "local_done")}
        delta_sum = np.zeros(n_layers)
        delta_count = 0
        heads_done = np.zeros((n_layers, n_heads))
        heads_dense = np.zeros((n_layers, n_heads))
        heads_kept = np.zeros((n_layers, n_heads))
        heads_causal = np.zeros((n_layers, n_heads))
        heads_local_done = np.zeros((n_layers, n_heads))
        heads_local_kept = np.zeros((n_layers, n_heads))
        capture_ctx = capture_attention(model) if L == seq_len else None
        records = capture_ctx.__enter__() if capture_ctx is not None else None
        try:
            for row, ids in enumerate(windows.input_ids):
                log(f"  L={L}: window {row + 1}/{len(windows.input_ids)}")
                model.model(input_ids=ids[None].to(device), use_cache=False)
                stats = [s for s in model.acp_stats() if s is not None]
                for i, s in enumerate(stats):
                    paper_kept, paper_done = _paper_counts(s)
                    acc["kept"][i] += int(paper_kept.sum())
                    acc["local_kept"][i] += int(s.kept_tiles.sum())
                    acc["causal"][i] += int(s.causal_tiles.sum())
                    acc["done"][i] += int(paper_done.sum())
                    acc["local_done"][i] += int(s.flops_done.sum())
                    acc["dense"][i] += int(s.flops_dense.sum())
                    delta_sum[i] += float(s.threshold.float().mean())
                    heads_done[i] += paper_done.sum(0).cpu().numpy()
                    heads_local_done[i] += s.flops_done.sum(0).cpu().numpy()
                    heads_dense[i] += s.flops_dense.sum(0).cpu().numpy()
                    heads_kept[i] += paper_kept.sum(0).cpu().numpy()
                    heads_local_kept[i] += s.kept_tiles.sum(0).cpu().numpy()
                    heads_causal[i] += s.causal_tiles.sum(0).cpu().numpy()
                delta_count += 1
                if L == seq_len and row == 0:
                    first_stats = [(s.plan, s.threshold.detach().cpu(), s.block_m, s.block_n) for s in stats]
        finally:
            if capture_ctx is not None:
                capture_ctx.__exit__(None, None, None)
        if L == seq_len:
            captures = records
            head_acc = (heads_done, heads_dense, heads_kept, heads_causal, heads_local_done, heads_local_kept)
            layer_local_kept = acc["local_kept"] / np.maximum(acc["causal"], 1)
        kept_fraction = acc["kept"].sum() / max(acc["causal"].sum(), 1)
        saved = 1 - acc["done"].sum() / max(acc["dense"].sum(), 1)
        local_kept_fraction = acc["local_kept"].sum() / max(acc["causal"].sum(), 1)
        local_saved = 1 - acc["local_done"].sum() / max(acc["dense"].sum(), 1)
        by_length.append({
            "length": L,
            "beyond_training_length": bool(loaded.train_seq_len and L > loaded.train_seq_len),
            "windows": len(windows.input_ids),
            "data": windows.source,
            "kept_fraction": float(kept_fraction),
            "flops_saved_fraction": float(saved),
            "flops_done": float(acc["done"].sum()),
            "flops_dense": float(acc["dense"].sum()),
            "local_kept_fraction": float(local_kept_fraction),
            "local_flops_saved_fraction": float(local_saved),
            "local_flops_done": float(acc["local_done"].sum()),
            "local_to_paper_kept": float(acc["local_kept"].sum() / max(acc["kept"].sum(), 1)),
            "per_layer": [{"layer": i, "kept_fraction": float(acc["kept"][i] / max(acc["causal"][i], 1)),
                           "flops_saved_fraction": float(1 - acc["done"][i] / max(acc["dense"][i], 1)),
                           "local_kept_fraction": float(acc["local_kept"][i] / max(acc["causal"][i], 1)),
                           "local_flops_saved_fraction": float(1 - acc["local_done"][i] / max(acc["dense"][i], 1))}
                          for i in range(n_layers)],
            "mean_threshold_per_layer": [float(d / max(delta_count, 1)) for d in delta_sum],
        })

    gates = _gate_statistics(captures, n_heads)
    thresholds = _threshold_statistics(captures, first_stats, seq_len, log_eps, cfg.head_dim)
    for t, local in zip(thresholds, layer_local_kept):
        t["local_kept_fraction"] = float(local)  # the local rule's kept fraction of the layer, same windows
    per_head, head_summary = _per_head(head_acc, gates, thresholds, seq_len)
    patterns, arrays = _patterns(first_stats, captures, per_head, layers, heads, n_layers, n_heads)

    results = {
        "model": {"name": loaded.name, "source": loaded.source, "step": loaded.step,
                  "architecture": cfg.architecture, "layers": n_layers, "heads": n_heads,
                  "head_dim": cfg.head_dim, "qk_norm": bool(cfg.use_qk_norm), "acp_log_eps": log_eps,
                  "train_seq_len": loaded.train_seq_len},
        "settings": {"seq_len": seq_len, "lengths": list(lengths), "num_seqs": num_seqs,
                     "val_fraction": val_fraction, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                     "block_m": first_stats[0][2], "block_n": first_stats[0][3],
                     "acp_rules": ["paper", "local"]},
        "savings_vs_length": by_length,
        "per_head": per_head,
        "per_head_summary": head_summary,
        "gates": gates,
        "thresholds": thresholds,
        "patterns": patterns,
    }
    return results, arrays


def _paper_counts(stats) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper rule's kept tiles and FLOPs done per (batch, head) on the call of ``stats``: its
    ``paper_kept_tiles`` at the call's FLOPs per tile (``flops_dense / causal_tiles``, exact)."""
    kept = stats.kept_tiles if stats.paper_kept_tiles is None else stats.paper_kept_tiles
    per_tile = stats.flops_dense // stats.causal_tiles.clamp_min(1)
    return kept, kept * per_tile


def _gate_statistics(captures, n_heads: int) -> list[dict]:
    out = []
    for layer in sorted(captures):
        log_f = torch.cat([x.reshape(-1, n_heads) for x in captures[layer].log_f]).double()  # [N, H]
        mean = log_f.mean(0)
        per_token = -1.0 / log_f.clamp_max(-1e-12)
        q = torch.quantile(per_token.clamp_max(1e12), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=0)
        for h in range(n_heads):
            out.append({"layer": layer, "head": h, "mean_log_f": float(mean[h]),
                        "decay_length": float(-1.0 / min(float(mean[h]), -1e-12)),
                        "log_f_std": float(log_f[:, h].std()) if log_f.shape[0] > 1 else 0.0,
                        "decay_length_p10": float(q[0, h]), "decay_length_p50": float(q[1, h]),
                        "decay_length_p90": float(q[2, h]), "tokens": int(log_f.shape[0])})
    return out


def _threshold_statistics(captures, first_stats, seq_len: int, log_eps: float, head_dim: int) -> list[dict]:
    """Per layer: delta, the bound U, the actual largest logit, and kept fractions (actual vs tight)."""
    from ..ops.acp import MaskSpec

    out = []
    for i, layer in enumerate(sorted(captures)):
        rec = captures[layer]
        plan, delta, bm, bn = first_stats[i]
        delta_h = delta.double().mean(0)  # [H] (identical over rows with QK-norm)
        bound = (log_eps - delta_h - math.log(seq_len)) / 2
        actual = torch.stack(rec.max_logit).amax(dim=(0, 1))  # [H] over sequences and rows
        cs = torch.stack(rec.max_logit_cs).amax(dim=(0, 1))
        kept = causal = kept_tight = 0
        for log_f, max_logit in zip(rec.log_f, rec.max_logit):
            B, T, H = log_f.shape
            decay = torch.cumsum(log_f.double(), dim=1).transpose(1, 2).contiguous()  # [B, H, T]
            for d, counter in ((delta.double().expand(B, H), "kept"),
                               (-(2 * max_logit + math.log(T)) + log_eps, "tight")):
                p = MaskSpec(B, H, T, T, decay=decay, delta=d.float()).plan(bm, bn)
                if counter == "kept":
                    kept += int(p.kept_tiles().sum())
                    causal += int(p.causal_tiles().sum())
                else:
                    kept_tight += int(p.kept_tiles().sum())
        out.append({
            "layer": layer,
            "delta": [float(x) for x in delta_h],
            "bound_U": [float(x) for x in bound],
            "max_abs_logit": [float(x) for x in actual],
            "cauchy_schwarz_bound": [float(x) for x in cs],
            "bound_over_actual": [float(b / a) if a > 0 else float("inf") for b, a in zip(bound, actual)],
            "delta_slack": [float(2 * (b - a)) for b, a in zip(bound, actual)],
            "kept_fraction": kept / max(causal, 1),
            "kept_fraction_tight_bound": kept_tight / max(causal, 1),
        })
    return out


def _per_head(head_acc, gates, thresholds, seq_len: int) -> tuple[list[dict], dict]:
    done, dense, kept, causal, local_done, local_kept = head_acc
    n_layers, n_heads = done.shape
    gate_of = {(g["layer"], g["head"]): g for g in gates}
    rows = []
    for i in range(n_layers):
        for h in range(n_heads):
            g = gate_of[(thresholds[i]["layer"], h)]
            distance = abs(thresholds[i]["delta"][h]) * g["decay_length"]
            rows.append({"layer": thresholds[i]["layer"], "head": h, "flops_done": float(done[i, h]),
                         "flops_dense": float(dense[i, h]), "flops_saved": float(dense[i, h] - done[i, h]),
                         "saved_fraction": float(1 - done[i, h] / max(dense[i, h], 1)),
                         "kept_fraction": float(kept[i, h] / max(causal[i, h], 1)),
                         "local_flops_done": float(local_done[i, h]),
                         "local_flops_saved": float(dense[i, h] - local_done[i, h]),
                         "local_saved_fraction": float(1 - local_done[i, h] / max(dense[i, h], 1)),
                         "local_kept_fraction": float(local_kept[i, h] / max(causal[i, h], 1)),
                         "decay_length": g["decay_length"], "pruning_distance": float(distance),
                         "class": "local" if distance < seq_len else "global"})
    total_saved = sum(r["flops_saved"] for r in rows)
    total_dense = sum(r["flops_dense"] for r in rows)
    local_saved = sum(r["local_flops_saved"] for r in rows)
    ranked = sorted(rows, key=lambda r: r["flops_saved"], reverse=True)
    n_top = max(1, math.ceil(0.1 * len(rows)))
    top_saved = sum(r["flops_saved"] for r in ranked[:n_top])
    by_class = {}
    for cls in ("local", "global"):
        members = [r for r in rows if r["class"] == cls]
        by_class[cls] = {"heads": len(members),
                         "mean_saved_fraction": float(np.mean([r["saved_fraction"] for r in members])) if members else None,
                         "share_of_savings": (sum(r["flops_saved"] for r in members) / total_saved) if total_saved else 0.0}
    summary = {
        "length": seq_len,
        "heads": len(rows),
        "flops_saved": total_saved,
        "flops_dense": total_dense,
        "flops_saved_fraction": total_saved / total_dense if total_dense else 0.0,
        "top10_heads": n_top,
        "top10_share_of_savings": top_saved / total_saved if total_saved else 0.0,
        "median_head_saved_fraction": float(np.median([r["saved_fraction"] for r in rows])),
        "local_flops_saved": local_saved,
        "local_flops_saved_fraction": local_saved / total_dense if total_dense else 0.0,
        "local_median_head_saved_fraction": float(np.median([r["local_saved_fraction"] for r in rows])),
        "classes": by_class,
        "local_rule": "local when |delta| * decay_length < L (ACP can prune keys that far back)",
    }
    return rows, summary


def choose_pattern_heads(per_head, layers, heads, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """The (layer, head) pairs to draw: given ones, else first/middle/last layer x most/least pruned head."""
    layer_ids = sorted({r["layer"] for r in per_head})
    if layers:
        chosen_layers = [layer_ids[i] for i in layers if -len(layer_ids) <= i < len(layer_ids)]
    else:
        chosen_layers = sorted({layer_ids[0], layer_ids[len(layer_ids) // 2], layer_ids[-1]})
    pairs = []
    for layer in chosen_layers:
        if heads:
            pairs += [(layer, h) for h in heads if 0 <= h < n_heads]
        else:
            mine = sorted((r for r in per_head if r["layer"] == layer), key=lambda r: r["saved_fraction"])
            pairs += sorted({(layer, mine[-1]["head"]), (layer, mine[0]["head"])})
    return pairs


def _paper_kv_begin(plan) -> torch.Tensor:
    """The paper rule's first kept key tile per query tile of ``plan`` (the forward's, any rule)."""
    if plan.paper_kv_begin is None:
        return plan.kv_begin
    return torch.minimum(torch.maximum(plan.dense_kv_begin, plan.paper_kv_begin), plan.kv_end)


def _patterns(first_stats, captures, per_head, layers, heads, n_layers, n_heads):
    """Tile maps (2 kept, 1 pruned, 0 above the diagonal; the paper rule's and the local rule's)
    and decay maps of the chosen heads."""
    layer_ids = sorted(captures)
    patterns, arrays = [], {}
    for layer, head in choose_pattern_heads(per_head, layers, heads, n_layers, n_heads):
        i = layer_ids.index(layer)
        plan, delta, bm, bn = first_stats[i]
        n = torch.arange(plan.num_k_tiles)
        kv_end = plan.kv_end[0, head, :, None].cpu()
        causal = (n >= plan.dense_kv_begin[0, head, :, None].cpu()) & (n < kv_end)
        local_begin = plan.kv_begin[0, head].cpu()  # the forward's plan: the local rule's
        paper_begin = _paper_kv_begin(plan)[0, head].cpu()
        kept = (n >= paper_begin[:, None]) & (n < kv_end)
        local_kept = (n >= local_begin[:, None]) & (n < kv_end)
        tiles = causal.to(torch.int8) + kept.to(torch.int8)
        local_tiles = causal.to(torch.int8) + local_kept.to(torch.int8)
        c = torch.cumsum(captures[layer].log_f[0][0, :, head].double(), dim=0)  # [T]
        T = c.shape[0]
        idx = torch.linspace(0, T - 1, min(T, 256)).round().long()
        decay = c[idx][:, None] - c[idx][None, :]
        decay[idx[:, None] < idx[None, :]] = float("nan")
        key = f"L{layer}_H{head}"
        arrays[f"tiles_{key}"] = tiles.numpy()
        arrays[f"local_tiles_{key}"] = local_tiles.numpy()
        arrays[f"decay_{key}"] = decay.numpy()
        arrays[f"positions_{key}"] = idx.numpy()
        # farthest key distance still kept in the last query tile
        last = int(plan.num_q_tiles - 1)
        first_kept = int(paper_begin[last])
        patterns.append({"layer": layer, "head": head, "key": key, "tile_rows": int(plan.num_q_tiles),
                         "tile_cols": int(plan.num_k_tiles), "kept_tiles": int(kept.sum()),
                         "causal_tiles": int(causal.sum()), "pruned_tiles": int(causal.sum() - kept.sum()),
                         "kept_fraction": float(kept.sum() / max(int(causal.sum()), 1)),
                         "local_kept_tiles": int(local_kept.sum()),
                         "local_pruned_tiles": int(causal.sum() - local_kept.sum()),
                         "local_kept_fraction": float(local_kept.sum() / max(int(causal.sum()), 1)),
                         "local_last_row_kept_span_tokens": int(plan.seqlen_k - int(local_begin[last]) * bn),
                         "threshold": float(delta[0, head]), "block_m": bm, "block_n": bn,
                         "last_row_kept_span_tokens": int(plan.seqlen_k - first_kept * bn),
                         "min_decay_in_sequence": float(c[-1] - c[0])})
    return patterns, arrays
