"""``foxacp info`` (preset sizes), ``foxacp generate`` (text from a saved model) and ``foxacp convert``
(a checkpoint of the FoX reference code as a foxacp folder)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def register(subparsers) -> None:
    info = subparsers.add_parser("info")
    info.add_argument("presets", nargs="*", help="preset names (default: all); see foxacp.models.PRESETS")
    info.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary size")
    info.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    info.set_defaults(func=_info)

    gen = subparsers.add_parser("generate")
    gen.add_argument("model", help="a save_pretrained / `foxacp export` folder, a training checkpoint or run "
                                   "folder, or a preset name (random weights, for smoke tests)")
    gen.add_argument("--prompt", default="", help="prompt text")
    gen.add_argument("--prompt-ids", default=None, help="prompt as comma-separated token ids (no tokenizer)")
    gen.add_argument("--tokenizer", default=None,
                     help="gpt2, bytes or a tokenizers JSON (default: the model's training tokenizer, else gpt2)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    gen.add_argument("--acp", action="store_true", help="prefill with ACP on (FoX models)")
    gen.add_argument("--acp-decode", action="store_true",
                     help="with --acp: prune the single-token decoding steps too (config.acp_decode)")
    gen.add_argument("--acp-evict", action="store_true",
                     help="decode with ACP KV-cache eviction: drop the keys ACP prunes for every later query "
                          "(FoX with QK-norm; threshold for prompt + --max-new-tokens positions)")
    gen.set_defaults(func=_generate)

    conv = subparsers.add_parser("convert")
    conv.add_argument("src", help="the reference's folder (config.json of ForgettingTransformerForCausalLM + weights)")
    conv.add_argument("out", help="output folder (must not exist or be empty)")
    conv.set_defaults(func=_convert)


def _info(args) -> int:
    import torch

    from .config import PRESETS, preset_config
    from .modeling import FoxForCausalLM

    names = args.presets or list(PRESETS)
    rows = []
    for name in names:
        overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
        config = preset_config(name, **overrides)
        with torch.device("meta"):  # sizes only: no memory, no init
            model = FoxForCausalLM(config)
        counts = model.parameter_counts()
        rows.append({"preset": name, "architecture": config.architecture, "layers": config.num_hidden_layers,
                     "hidden": config.hidden_size, "heads": config.num_attention_heads,
                     "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim,
                     "intermediate": config.intermediate_size, "vocab": config.vocab_size, **counts})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print("parameters: non-emb = without token embedding and LM head; with-emb = non-emb + token embedding\n"
          "(the FoX paper's 125M/360M/760M convention); total = both, LM head at vocab_size rows")
    header = f"{'preset':26s} {'L':>3s} {'d':>5s} {'H x D':>9s} {'kv':>3s} {'mlp':>5s} {'non-emb':>10s} " \
             f"{'with-emb':>10s} {'total':>10s}"
    print(header)
    for r in rows:
        print(f"{r['preset']:26s} {r['layers']:3d} {r['hidden']:5d} {r['heads']:>3d} x {r['head_dim']:<3d} "
              f"{r['kv_heads']:3d} {r['intermediate']:5d} {_fmt(r['non_embedding']):>10s} {_fmt(r['paper']):>10s} "
              f"{_fmt(r['total']):>10s}")
    return 0


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _load_model(spec: str):
    """``(model, tokenizer name or None)`` from a HF folder, a checkpoint or run folder, or a preset name."""
    from ..train.loading import load_trained_model
    from .config import PRESETS, preset_config
    from .modeling import FoxForCausalLM

    if spec in PRESETS and not Path(spec).exists():
        return FoxForCausalLM(preset_config(spec)), None
    try:
        model, meta = load_trained_model(spec)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; a preset name (random weights) is also accepted") from None
    tokenizer = meta.get("tokenizer")
    return model, tokenizer if isinstance(tokenizer, str) else None


def _check_sampling(args) -> None:
    """Refuse sampling settings that ``generate()`` would reject deep inside, or silently misread."""
    checks = (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "an integer >= 1"),
              ("--num-samples", args.num_samples, args.num_samples >= 1, "an integer >= 1"),
              ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0: greedy)"),
              ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0: off)"),
              ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"))
    for name, value, ok, accepted in checks:
        if not ok:
            raise ValueError(f"{name} must be {accepted}, got {value}")


def _token_ids(text: str) -> list[int]:
    """``--prompt-ids``: comma-separated non-negative token ids."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        ids = [-1]
    if any(i < 0 for i in ids):
        raise ValueError(f"--prompt-ids must be comma-separated non-negative token ids, got {text!r}")
    return ids


def _generate(args) -> int:
    import torch

    _check_sampling(args)
    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer_name = _load_model(args.model)
    if args.acp:
        if not getattr(model.config, "uses_forget_gate", False):
            kind = getattr(model.config, "architecture", model.config.model_type)
            raise ValueError(f"--acp needs a FoX model (forget gate), this is {kind}")
        model.set_acp(True, decode=args.acp_decode)
    if args.acp_evict:
        _check_evict(model, args)
    model = model.to(device).eval()
    tokenizer = None
    if args.prompt_ids is not None:
        ids = _token_ids(args.prompt_ids)
    else:
        from ..data.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(args.tokenizer or tokenizer_name or "gpt2")
        ids = [tokenizer.bos_id] + tokenizer.encode(args.prompt)
    if not ids:
        ids = [model.config.bos_token_id or 0]
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"--prompt-ids: token id {max(ids)} is outside the model's vocabulary "
                         f"(0..{model.config.vocab_size - 1})")
    input_ids = torch.tensor([ids] * args.num_samples, device=device)
    sampling = args.temperature > 0
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling,
                  pad_token_id=model.config.eos_token_id if model.config.eos_token_id is not None else 0)
    if sampling:
        kwargs.update(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    cache = None
    if args.acp_evict:
        from .modeling import CACHE_NAME  # the generate() keyword of the installed transformers

        cache = model.acp_eviction_cache(max_length=len(ids) + args.max_new_tokens)
        kwargs[CACHE_NAME] = cache
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    seconds = time.perf_counter() - start
    for row in out:
        new = row[len(ids):].tolist()
        if tokenizer is not None:
            print(tokenizer.decode(ids[1:] if args.prompt_ids is None else ids) + tokenizer.decode(new))
        else:
            print(",".join(map(str, ids + new)))
        print("---")
    n_new = out.shape[1] - len(ids)
    print(f"{n_new * out.shape[0]} tokens in {seconds:.2f}s ({n_new * out.shape[0] / max(seconds, 1e-9):.1f} tok/s)")
    if cache is not None:
        print(_eviction_summary(cache))
    return 0


def _check_evict(model, args) -> None:
    """``--acp-evict``: refuse models that cannot evict and options the evicting cache cannot serve."""
    config = model.config
    if not (hasattr(model, "acp_eviction_cache") and getattr(config, "uses_forget_gate", False)
            and getattr(config, "use_qk_norm", False)):
        kind = getattr(config, "architecture", config.model_type)
        raise ValueError(f"--acp-evict needs a FoX model with QK-norm (forget gate and a threshold fixed by the "
                         f"weights), this is {kind} with use_qk_norm={getattr(config, 'use_qk_norm', None)}")
    if args.acp:
        raise ValueError("--acp-evict cannot be combined with --acp: the evicting cache attends densely over the "
                         "keys it keeps (ACP's pruning is what it drops for good)")


def _eviction_summary(cache) -> str:
    """Keys kept by the evicting layers (fraction of the cached positions) and the cache's memory."""
    kept = [n for layer in cache.layers if hasattr(layer, "kept") for n in layer.kept()]
    positions = cache.get_seq_length()
    fraction = sum(kept) / (len(kept) * positions) if kept and positions else 1.0
    return (f"acp-evict: kept {fraction:.3f} of the keys ({positions} positions, {len(kept)} kv heads of the "
            f"forgetting-attention layers), cache {cache.memory_bytes() / 2**20:.2f} MiB")


def _convert(args) -> int:
    from .convert import convert_checkpoint, tokenizer_note

    model = convert_checkpoint(args.src, args.out)  # a ConversionError is a ValueError: the CLI names it, exit 2
    config = model.config
    print(f"wrote {args.out}: {config.architecture}, {config.num_hidden_layers} layers, d {config.hidden_size}, "
          f"{config.num_attention_heads} heads, {_fmt(model.parameter_counts()['total'])} parameters")
    note = tokenizer_note(args.out)
    if note:
        print(f"note: {note}")
    return 0
