"""``foxacp info`` (preset sizes), ``foxacp generate`` (text from a saved model) and ``foxacp convert``
(a checkpoint of the FoX reference code as a foxacp folder)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def register(subparsers) -> None:
    info = subparsers.add_parser("info", help="sizes and parameter counts of model presets")
    info.add_argument("presets", nargs="*", help="preset names (default: all); see foxacp.models.PRESETS")
    info.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary size")
    info.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    info.set_defaults(func=_info)

    gen = subparsers.add_parser("generate", help="generate text with a saved model")
    gen.add_argument("model", help="a save_pretrained / `foxacp export` folder, a training checkpoint, "
                                   "or a preset name (random weights, for smoke tests)")
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
    gen.set_defaults(func=_generate)

    conv = subparsers.add_parser("convert", help="turn a checkpoint of the FoX reference code (zhixuan-lin/"
                                                 "forgetting-transformer, Hugging Face format) into a foxacp folder")
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
    """``(model, tokenizer name or None)`` from a HF folder, a training checkpoint or a preset."""
    from .config import PRESETS, preset_config
    from .modeling import FoxForCausalLM

    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        model = FoxForCausalLM.from_pretrained(str(path))
        tokenizer = None
        meta = path / "foxacp_training.json"
        if meta.is_file():
            tokenizer = json.loads(meta.read_text()).get("tokenizer")
        return model, tokenizer if isinstance(tokenizer, str) else None
    if path.exists():
        from ..train.commands import model_from_checkpoint

        model, state = model_from_checkpoint(path)
        tokenizer = state.get("tokenizer")
        return model, tokenizer if isinstance(tokenizer, str) else None
    if spec in PRESETS:
        return FoxForCausalLM(preset_config(spec)), None
    raise FileNotFoundError(f"{spec!r} is neither a model folder, a checkpoint, nor a preset name")


def _generate(args) -> int:
    import torch

    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer_name = _load_model(args.model)
    if args.acp:
        if not model.config.uses_forget_gate:
            raise SystemExit(f"--acp needs a FoX model, this is {model.config.architecture}")
        model.set_acp(True, decode=args.acp_decode)
    model = model.to(device).eval()
    tokenizer = None
    if args.prompt_ids is not None:
        ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    else:
        from ..data.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(args.tokenizer or tokenizer_name or "gpt2")
        ids = [tokenizer.bos_id] + tokenizer.encode(args.prompt)
    if not ids:
        ids = [model.config.bos_token_id or 0]
    if max(ids) >= model.config.vocab_size:
        raise SystemExit(f"prompt token id {max(ids)} is outside the model's vocabulary ({model.config.vocab_size})")
    input_ids = torch.tensor([ids] * args.num_samples, device=device)
    sampling = args.temperature > 0
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling,
                  pad_token_id=model.config.eos_token_id if model.config.eos_token_id is not None else 0)
    if sampling:
        kwargs.update(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
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
    return 0


def _convert(args) -> int:
    from .convert import ConversionError, convert_checkpoint, tokenizer_note

    try:
        model = convert_checkpoint(args.src, args.out)
    except ConversionError as err:
        raise SystemExit(f"foxacp convert: {err}") from None
    config = model.config
    print(f"wrote {args.out}: {config.architecture}, {config.num_hidden_layers} layers, d {config.hidden_size}, "
          f"{config.num_attention_heads} heads, {_fmt(model.parameter_counts()['total'])} parameters")
    note = tokenizer_note(args.out)
    if note:
        print(f"note: {note}")
    return 0
