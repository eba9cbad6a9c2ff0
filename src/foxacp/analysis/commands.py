"""``foxacp analyze`` (what ACP prunes in a FoX model), ``foxacp eval`` (held-out quality,
ACP on/off parity, needle retrieval, throughput), ``foxacp hf-tokenizer`` and ``foxacp demo``
(ACP on vs off training). Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path

EVAL_TASKS = ("loss", "position", "needle", "throughput")


def register(subparsers) -> None:
    an = subparsers.add_parser("analyze")
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

    ev = subparsers.add_parser("eval")
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

    tk = subparsers.add_parser("hf-tokenizer")
    tk.add_argument("folder", help="a save_pretrained / `foxacp export` folder")
    tk.add_argument("--tokenizer", default=None, help="gpt2, bytes or a tokenizers JSON (default: the model's "
                                                      "training tokenizer from foxacp_training.json, else gpt2)")
    tk.set_defaults(func=_hf_tokenizer)

    demo = subparsers.add_parser("demo")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo's)")
    demo.set_defaults(func=_demo)


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


def _hf_tokenizer(args) -> int:
    from ..models.hf_tokenizer import save_hf_tokenizer
    from ..train.loading import read_training_meta

    name = args.tokenizer or read_training_meta(args.folder).get("tokenizer")
    save_hf_tokenizer(name or "gpt2", args.folder)
    _log(f"wrote the {name or 'gpt2'} tokenizer into {args.folder}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1 (omitted: the demo's), got {args.steps}")
    run_demo(Path(args.out), steps=args.steps)
    return 0


def _analyze(args) -> int:
    from .loading import load_model, open_data, resolve_device, resolve_dtype
    from .outputs import write_analysis
    from .pruning import analysis_lengths, analyze_model

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
    write_analysis(res, arrays, Path(args.out))
    at = next(r for r in res["savings_vs_length"] if r["length"] == seq_len)
    _log(f"attention FLOPs saved at L={seq_len}: {at['flops_saved_fraction']:.1%}; "
         f"top 10% of heads give {res['per_head_summary']['top10_share_of_savings']:.1%} of the savings")
    _log(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _eval(args) -> int:
    from .evaluation import run_eval
    from .loading import load_model, open_data, resolve_device, resolve_dtype
    from .outputs import write_eval

    names = args.names or [None] * len(args.models)
    if len(names) != len(args.models):
        raise ValueError(f"--names gives {len(names)} labels for {len(args.models)} models")
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
                   decode_tokens=args.decode_tokens, repeats=args.repeats, log=_log)
    for v in res["loss"]:
        _log(f"{v['model']} (ACP {v['acp']}): loss {v['loss']:.4f}, perplexity {v['perplexity']:.3f}")
    for name, p in res["acp_parity"].items():
        _log(f"{name}: ACP on - off, largest per-token loss difference {p['max_abs_token_loss_difference']:.3g}")
    if args.out:
        write_eval(res, Path(args.out))
        _log(f"report: {Path(args.out) / 'report.md'}")
    return 0
