"""``foxacp analyze`` (what ACP prunes in a FoX model) and ``foxacp eval`` (held-out quality,
ACP on/off parity, needle retrieval, throughput). Heavy imports happen inside the commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

EVAL_TASKS = ("loss", "position", "needle", "throughput")


def register(subparsers) -> None:
    an = subparsers.add_parser("analyze", help="ACP pruning patterns, per-head savings, savings vs length, gates, "
                                               "thresholds of a FoX model (report.md, PNGs, analysis.json)")
    an.add_argument("model", help="a training checkpoint or run folder, or a Hugging Face folder")
    _data_args(an)
    an.add_argument("--out", required=True, help="output folder")
    an.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="context lengths for savings vs length (default 1024..16384 and 2x the training length)")
    an.add_argument("--layers", type=int, nargs="+", default=None,
                    help="layers to draw pruning patterns for (default: first, middle, last)")
    an.add_argument("--heads", type=int, nargs="+", default=None,
                    help="heads to draw (default: each chosen layer's most and least pruned head)")
    an.set_defaults(func=_analyze)

    ev = subparsers.add_parser("eval", help="held-out loss/perplexity with ACP on and off, loss by position, "
                                            "needle in a haystack, throughput")
    ev.add_argument("models", nargs="+", help="training checkpoints / run folders / Hugging Face folders")
    _data_args(ev)
    ev.add_argument("--out", default=None, help="output folder for report.md, eval.json and PNGs "
                                                "(default: print the summary only)")
    ev.add_argument("--names", nargs="+", default=None, help="labels for the models (default: from the paths)")
    ev.add_argument("--tasks", nargs="+", choices=EVAL_TASKS, default=list(EVAL_TASKS))
    ev.add_argument("--smooth", type=int, default=None, help="moving-average window of the position curve "
                                                             "(default L/64)")
    ev.add_argument("--needle-lengths", type=int, nargs="+", default=None,
                    help="needle context lengths (default: L/4, L/2, L)")
    ev.add_argument("--needle-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ev.add_argument("--needle-trials", type=int, default=4, help="prompts per (length, depth) cell")
    ev.add_argument("--throughput-len", type=int, default=None, help="prompt length for throughput (default L)")
    ev.add_argument("--throughput-batch", type=int, default=1)
    ev.add_argument("--decode-tokens", type=int, default=64)
    ev.add_argument("--repeats", type=int, default=3, help="timed repeats (after one warm-up)")
    ev.set_defaults(func=_eval)

    tk = subparsers.add_parser("hf-tokenizer", help="write a Hugging Face tokenizer into a model folder "
                                                    "(for AutoTokenizer / lm-eval-harness)")
    tk.add_argument("folder", help="a save_pretrained / `foxacp export` folder")
    tk.add_argument("--tokenizer", default=None, help="gpt2, bytes or a tokenizers JSON (default: the model's "
                                                      "training tokenizer from foxacp_training.json, else gpt2)")
    tk.set_defaults(func=_hf_tokenizer)


def _data_args(p) -> None:
    p.add_argument("--data", required=True, help="held-out data: a built-in corpus name, a token store or a zarr")
    p.add_argument("--tokenizer", default=None, help="tokenizer for preparing a built-in corpus (default: the "
                                                     "model's training tokenizer, else gpt2)")
    p.add_argument("--seq-len", type=int, default=None, help="context length (default: the training length)")
    p.add_argument("--num-seqs", type=int, default=4, help="held-out windows per length")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="held-out document fraction (default: the training run's, else 0.05)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _finite(obj):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _hf_tokenizer(args) -> int:
    from ..models.hf_tokenizer import save_hf_tokenizer

    name = args.tokenizer
    meta = Path(args.folder) / "foxacp_training.json"
    if name is None and meta.is_file():
        name = json.loads(meta.read_text()).get("tokenizer")
    save_hf_tokenizer(name or "gpt2", args.folder)
    _log(f"wrote the {name or 'gpt2'} tokenizer into {args.folder}")
    return 0


def _analyze(args) -> int:
    import numpy as np

    from . import plots
    from .loading import load_model, open_data, resolve_device, resolve_dtype
    from .pruning import analysis_lengths, analyze_model
    from .report import analysis_markdown

    loaded = load_model(args.model)
    store = open_data(args.data, args.tokenizer or loaded.tokenizer)
    seq_len = args.seq_len or loaded.train_seq_len or 2048
    lengths = analysis_lengths(seq_len, args.lengths, loaded.train_seq_len)
    device = resolve_device(args.device)
    vf = args.val_fraction if args.val_fraction is not None else (loaded.val_fraction or 0.05)
    _log(f"analyze {loaded.source}: L={seq_len}, lengths {lengths}, {args.num_seqs} windows each")
    res, arrays = analyze_model(loaded, store, seq_len=seq_len, lengths=lengths, num_seqs=args.num_seqs,
                                layers=args.layers, heads=args.heads, val_fraction=vf, device=device,
                                dtype=resolve_dtype(args.dtype, device), log=_log)
    out = Path(args.out)
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
    at = next(r for r in res["savings_vs_length"] if r["length"] == seq_len)
    _log(f"attention FLOPs saved at L={seq_len}: {at['flops_saved_fraction']:.1%}; "
         f"top 10% of heads give {res['per_head_summary']['top10_share_of_savings']:.1%} of the savings")
    _log(f"report: {out / 'report.md'}")
    return 0


def _eval(args) -> int:
    from .loading import load_model, open_data, resolve_device, resolve_dtype

    names = args.names or [None] * len(args.models)
    if len(names) != len(args.models):
        raise SystemExit(f"--names gives {len(names)} labels for {len(args.models)} models")
    models = [load_model(m, n) for m, n in zip(args.models, names)]
    store = open_data(args.data, args.tokenizer or models[0].tokenizer)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    seq_len = args.seq_len or models[0].train_seq_len or 2048
    vf = args.val_fraction if args.val_fraction is not None else (models[0].val_fraction or 0.05)
    res = run_eval(models, store, seq_len=seq_len, num_seqs=args.num_seqs, val_fraction=vf, tasks=args.tasks,
                   device=device, dtype=dtype, smooth=args.smooth, needle_lengths=args.needle_lengths,
                   needle_depths=args.needle_depths, needle_trials=args.needle_trials,
                   throughput_len=args.throughput_len, throughput_batch=args.throughput_batch,
                   decode_tokens=args.decode_tokens, repeats=args.repeats)
    for v in res["loss"]:
        _log(f"{v['model']} (ACP {v['acp']}): loss {v['loss']:.4f}, perplexity {v['perplexity']:.3f}")
    for name, p in res["acp_parity"].items():
        _log(f"{name}: ACP on - off, largest per-token loss difference {p['max_abs_token_loss_difference']:.3g}")
    if args.out:
        write_eval(res, Path(args.out))
        _log(f"report: {Path(args.out) / 'report.md'}")
    return 0


def run_eval(models, store, *, seq_len: int, num_seqs: int, val_fraction: float, tasks, device, dtype,
             smooth: int | None = None, needle_lengths=None, needle_depths=(0.0, 0.5, 1.0), needle_trials: int = 4,
             throughput_len: int | None = None, throughput_batch: int = 1, decode_tokens: int = 64,
             repeats: int = 3, log=_log) -> dict:
    """All evaluations for ``models`` (:class:`~foxacp.analysis.loading.LoadedModel`); a JSON-ready dict."""
    from . import evaluation as E
    from .loading import heldout_windows, set_acp, store_tokenizer

    windows = heldout_windows(store, seq_len, num_seqs, val_fraction)
    window = smooth or max(1, seq_len // 64)
    res = {"settings": {"seq_len": seq_len, "num_seqs": len(windows.input_ids), "val_fraction": val_fraction,
                        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "tasks": list(tasks)},
           "data": windows.source, "models": [], "loss": [], "acp_parity": {}, "position": {},
           "position_window": window, "needle": {}, "throughput": []}
    tokenizer = haystacks = None
    if "needle" in tasks:
        tokenizer = store_tokenizer(store)
        needle_lengths = needle_lengths or sorted({max(64, seq_len // 4), max(64, seq_len // 2), seq_len})
        hay = heldout_windows(store, max(needle_lengths), max(1, needle_trials), val_fraction)
        haystacks = [row[1:].tolist() for row in hay.input_ids]  # drop the BOS
    for loaded in models:
        model = loaded.model.to(device=device, dtype=dtype).eval()
        res["models"].append({"name": loaded.name, "source": loaded.source, "step": loaded.step,
                              "architecture": getattr(model.config, "architecture", type(model).__name__)})
        settings = ("on", "off") if loaded.is_fox else ("n/a",)
        original_acp = bool(getattr(model.config, "acp", False))
        losses = {}
        for acp in settings:
            if loaded.is_fox:
                set_acp(model, acp == "on")
            label = loaded.name if acp == "n/a" else f"{loaded.name} ACP {acp}"
            if "loss" in tasks or "position" in tasks:
                log(f"{label}: loss on {len(windows.input_ids)} windows of {seq_len}")
                losses[acp] = E.per_token_losses(model, windows.input_ids, windows.labels, device=device)
                res["loss"].append({"model": loaded.name, "acp": acp, **E.loss_summary(losses[acp])})
                if "position" in tasks:
                    res["position"][label] = E.position_curve(losses[acp], window)
            if "needle" in tasks:
                log(f"{label}: needle grid")
                res["needle"][label] = E.needle_grid(model, tokenizer, haystacks, needle_lengths, list(needle_depths),
                                                     needle_trials, device=device, log=log)
            if "throughput" in tasks:
                log(f"{label}: throughput")
                t = E.throughput(model, prompt_len=throughput_len or seq_len, decode_tokens=decode_tokens,
                                 batch=throughput_batch, vocab=model.config.vocab_size, device=device, repeats=repeats)
                res["throughput"].append({"label": label, "model": loaded.name, "acp": acp, **t})
        if loaded.is_fox and "on" in losses and "off" in losses:
            res["acp_parity"][loaded.name] = E.acp_parity(losses["on"], losses["off"], float(model.config.acp_log_eps))
        if loaded.is_fox:
            set_acp(model, original_acp)
        model.to("cpu")
    return res


def write_eval(res: dict, out: Path) -> dict:
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
