"""Markdown reports for ``foxacp analyze`` and ``foxacp eval``.

Every number in a report is formatted from the JSON written beside it (``analysis.json`` /
``eval.json``); nothing is computed here.
"""

from __future__ import annotations


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def analysis_markdown(res: dict, figures: dict) -> str:
    m, s = res["model"], res["settings"]
    hs = res["per_head_summary"]
    at = next(r for r in res["savings_vs_length"] if r["length"] == s["seq_len"])
    longest = res["savings_vs_length"][-1]
    lines = [
        f"# ACP analysis: {m['name']}",
        "",
        f"Model `{m['source']}` (step {'-' if m['step'] is None else m['step']}): {m['architecture']}, {m['layers']} layers x {m['heads']} heads "
        f"of {m['head_dim']}, QK-norm {'on' if m['qk_norm'] else 'off'}, eps = e^{m['acp_log_eps']:g}; trained at "
        f"L = {m['train_seq_len'] or 'unknown'}. Analysis length L = {s['seq_len']}, {s['num_seqs']} held-out windows per length, "
        f"tiles {s['block_m']} x {s['block_n']}, {s['device']} {s['dtype']}.",
        "",
        "## Summary",
        "",
        "Two ACP rules on the same forwards: the paper's (arXiv 2504.06949) and the data-aware local rule "
        "(`acp_rule=\"local\"`, ops/acp.py), which keeps a subset of the paper rule's tiles under the same "
        "eps guarantee. Numbers without a rule named are the paper rule's.",
        "",
        f"- attention FLOPs saved at L={s['seq_len']}: {pct(at['flops_saved_fraction'])} paper rule, "
        f"{pct(at['local_flops_saved_fraction'])} local rule (kept tile fraction {at['kept_fraction']:.3f} paper, "
        f"{at['local_kept_fraction']:.3f} local)",
        f"- attention FLOPs saved at L={longest['length']}: {pct(longest['flops_saved_fraction'])} paper rule, "
        f"{pct(longest['local_flops_saved_fraction'])} local rule (kept tile fraction {longest['kept_fraction']:.3f} "
        f"paper, {longest['local_kept_fraction']:.3f} local; local / paper {longest['local_to_paper_kept']:.3f})",
        f"- top 10% of heads ({hs['top10_heads']} of {hs['heads']}) provide {pct(hs['top10_share_of_savings'])} "
        f"of the saved FLOPs",
        f"- heads: {hs['classes']['local']['heads']} local, {hs['classes']['global']['heads']} global "
        f"({hs['local_rule']}); local heads provide {pct(hs['classes']['local']['share_of_savings'])} of the savings",
        f"- median per-head saving: {pct(hs['median_head_saved_fraction'])}",
        "",
        "## Pruning patterns",
        "",
        f"Tile maps on the first held-out window at L={s['seq_len']} (green kept, red pruned, white above the "
        "diagonal; gold: kept by the paper rule, pruned by the local rule) beside the decay c_i - c_j (red line: "
        "the paper rule's threshold delta; tiles whose largest decay is below it are skipped). Arrays: "
        "`patterns.npz`.",
        "",
        "| layer | head | kept tiles | pruned tiles | kept fraction | kept fraction, local | threshold "
        "| keys kept by the last query tile | same, local |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in res["patterns"]:
        lines.append(f"| {p['layer']} | {p['head']} | {p['kept_tiles']} | {p['pruned_tiles']} | {p['kept_fraction']:.3f} "
                     f"| {p['local_kept_fraction']:.3f} | {p['threshold']:.2f} | {p['last_row_kept_span_tokens']} "
                     f"| {p['local_last_row_kept_span_tokens']} |")
    lines.append("")
    lines += ["![pattern](" + figures["pattern_" + p["key"]] + ")" for p in res["patterns"]]
    lines += [
        "",
        "## FLOP savings per head",
        "",
        f"Over all {hs['heads']} heads at L={s['seq_len']}: saved {hs['flops_saved']:.4g} of {hs['flops_dense']:.4g} "
        f"dense attention FLOPs = {pct(hs['flops_saved_fraction'])} (the per-head savings summed); the local rule "
        f"saved {hs['local_flops_saved']:.4g} = {pct(hs['local_flops_saved_fraction'])} (median head "
        f"{pct(hs['local_median_head_saved_fraction'])}). Head classes and figures: paper rule (black dots in the "
        "sorted figure: local rule).",
        "",
        f"![sorted]({figures['head_savings_sorted']}) ![hist]({figures['head_savings_hist']})",
        "",
        "| class | heads | mean saved fraction | share of savings |",
        "|---|---|---|---|",
    ]
    for cls, c in hs["classes"].items():
        mean = "-" if c["mean_saved_fraction"] is None else pct(c["mean_saved_fraction"])
        lines.append(f"| {cls} | {c['heads']} | {mean} | {pct(c['share_of_savings'])} |")
    lines += ["", "| layer | head | saved fraction | saved fraction, local | decay length | pruning distance | class |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(res["per_head"], key=lambda r: -r["saved_fraction"]):
        lines.append(f"| {r['layer']} | {r['head']} | {r['saved_fraction']:.3f} | {r['local_saved_fraction']:.3f} | "
                     f"{r['decay_length']:.1f} | {r['pruning_distance']:.0f} | {r['class']} |")
    lines += [
        "",
        "## Savings vs context length",
        "",
        f"![length]({figures['savings_vs_length']})",
        "",
        "| L | beyond training length | windows | data | kept fraction | FLOPs saved | kept fraction, local "
        "| FLOPs saved, local | local / paper kept | per-layer FLOPs saved | per-layer FLOPs saved, local |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["savings_vs_length"]:
        per_layer = ", ".join(f"{x['flops_saved_fraction']:.2f}" for x in r["per_layer"])
        per_layer_local = ", ".join(f"{x['local_flops_saved_fraction']:.2f}" for x in r["per_layer"])
        lines.append(f"| {r['length']} | {'yes' if r['beyond_training_length'] else 'no'} | {r['windows']} | {r['data']} "
                     f"| {r['kept_fraction']:.3f} | {pct(r['flops_saved_fraction'])} | {r['local_kept_fraction']:.3f} "
                     f"| {pct(r['local_flops_saved_fraction'])} | {r['local_to_paper_kept']:.3f} | {per_layer} "
                     f"| {per_layer_local} |")
    lines += [
        "",
        "## Forget-gate statistics",
        "",
        f"Per head over the held-out tokens at L={s['seq_len']}: decay length -1/mean(log f) and the 10-90th "
        "percentile of the per-token -1/log f.",
        "",
        f"![gates]({figures['gate_decay_lengths']})",
        "",
        "| layer | head | mean log f | decay length | std log f | p10 | p50 | p90 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in res["gates"]:
        lines.append(f"| {g['layer']} | {g['head']} | {g['mean_log_f']:.4g} | {g['decay_length']:.1f} | "
                     f"{g['log_f_std']:.3g} | {g['decay_length_p10']:.1f} | {g['decay_length_p50']:.1f} | "
                     f"{g['decay_length_p90']:.1f} |")
    lines += [
        "",
        "## Thresholds and how conservative the bound is",
        "",
        f"delta = -(2U + ln L) + ln eps at L={s['seq_len']}. U is the bound on |logit| the threshold assumes; the "
        "largest actual |logit| is over causal pairs of the analysed windows. 'delta slack' = 2 (U - actual): how "
        "much lower delta is than the tightest valid one; 'kept with tight bound' is the kept fraction that tight "
        "bound would give under the paper rule; the last column is what the local rule keeps.",
        "",
        f"![thresholds]({figures['thresholds']})",
        "",
        "| layer | delta (min..max over heads) | U (max) | max q.k/sqrt(D) bound | largest actual logit | U / actual (min) "
        "| kept | kept with tight bound | kept, local rule |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in res["thresholds"]:
        lines.append(f"| {t['layer']} | {min(t['delta']):.2f}..{max(t['delta']):.2f} | {max(t['bound_U']):.2f} | "
                     f"{max(t['cauchy_schwarz_bound']):.2f} | {max(t['max_abs_logit']):.2f} | "
                     f"{min(t['bound_over_actual']):.2f} | {t['kept_fraction']:.3f} | {t['kept_fraction_tight_bound']:.3f} "
                     f"| {t['local_kept_fraction']:.3f} |")
    lines += ["", "All numbers: `analysis.json`."]
    return "\n".join(lines) + "\n"


def eval_markdown(res: dict, figures: dict) -> str:
    s = res["settings"]
    lines = [f"# Evaluation at L = {s['seq_len']}", "",
             f"{s['num_seqs']} held-out windows ({res['data']}), {s['device']} {s['dtype']}.", "",
             "## Held-out loss", "",
             "| model | ACP | loss | perplexity | tokens |", "|---|---|---|---|---|"]
    for v in res["loss"]:
        lines.append(f"| {v['model']} | {v['acp']} | {v['loss']:.4f} | {v['perplexity']:.3f} | {v['tokens']} |")
    if res["acp_parity"]:
        lines += ["", "## ACP on vs off (same tokens)", "",
                  "| model | loss on | loss off | mean difference | largest per-token difference | eps |",
                  "|---|---|---|---|---|---|"]
        for name, p in res["acp_parity"].items():
            lines.append(f"| {name} | {p['loss_acp_on']:.6f} | {p['loss_acp_off']:.6f} | {p['mean_loss_difference']:.3g} "
                         f"| {p['max_abs_token_loss_difference']:.3g} | {p['eps']:.3g} |")
    if res.get("position"):
        lines += ["", "## Loss by position", "",
                  f"Mean over windows, trailing moving average of {res['position_window']} tokens.", ""]
        if "loss_by_position" in figures:
            lines.append(f"![position]({figures['loss_by_position']})")
        lines += ["", "| variant | first quarter | last quarter |", "|---|---|---|"]
        for label, c in res["position"].items():
            lines.append(f"| {label} | {c['first_quarter_loss']:.4f} | {c['last_quarter_loss']:.4f} |")
    if res.get("needle"):
        lines += ["", "## Needle in a haystack", "",
                  "\"The secret number of NAME is NNNN.\" at depth d of L tokens; greedy answer, exact match of its "
                  "first number.", "", "| variant | mean accuracy |", "|---|---|"]
        for label, g in res["needle"].items():
            lines.append(f"| {label} | {g['mean_accuracy']:.3f} |")
        lines.append("")
        lines += [f"![needle]({figures[f'needle_{i}']})" for i in range(len(res["needle"])) if f"needle_{i}" in figures]
    if res.get("throughput"):
        lines += ["", "## Throughput", "", "| variant | prompt | batch | prefill tokens/s | decode tokens/s |",
                  "|---|---|---|---|---|"]
        for r in res["throughput"]:
            lines.append(f"| {r['label']} | {r['prompt_len']} | {r['batch']} | {r['prefill_tokens_per_s']:.1f} | "
                         f"{r['decode_tokens_per_s']:.1f} |")
        if "throughput" in figures:
            lines += ["", f"![throughput]({figures['throughput']})"]
    lines += ["", "All numbers: `eval.json`."]
    return "\n".join(lines) + "\n"
