"""Decoding speed: generate() against HF's Llama of the same size, and ACP in decoding steps.

    python benchmarks/decode.py generate --preset fox-pro-125m --json decode_generate.json
    python benchmarks/decode.py acp --preset fox-pro-125m --prompt 16384 --tokens 32 --json decode_acp.json
    python benchmarks/decode.py evict --preset fox-pro-125m --contexts 16384 65536 131072 --json decode_evict.json

``generate``: for each ``--scenarios`` entry ``BATCHxPROMPT`` (default 1x2048, 8x2048, 1x32768),
steady tokens/s of greedy ``model.generate()`` decoding (from ``--tokens`` and ``--tokens // 2`` new
tokens, so that the prefill and one-off setup cancel; both are reported too) for the foxacp preset
(random weights, spread gates) with ``cache_implementation="dynamic"`` (FoxCache) and ``"static"``
(the step captured as a CUDA graph: generate()'s default on CUDA), and for a
``transformers.LlamaForCausalLM`` of the same width, depth, heads, MLP and vocabulary, in the same
run. ``tokens_per_s`` counts every sequence
of the batch. ``--hf-static`` adds HF's Llama with its static cache (generate() then compiles the
decoding step with CUDA graphs).

``evict``: for each ``--contexts`` length, the same prompt (one prefill call) and the same
teacher-forced single-token steps with the full :class:`FoxCache` and with ACP eviction
(``model.acp_eviction_cache``), each decoding for ``--seconds`` (at most ``--tokens`` steps):
cache bytes after the steps (what is allocated), prefill seconds, decoding tokens/s, the peak
memory while decoding (CUDA), the kept-key fraction and the largest logit difference over the
steps both ran. A short warm-up compiles the kernels first. ``--checkpoint`` loads a trained model
instead of random weights with spread gates.

``acp``: builds the preset, fills the cache with a ``--prompt``-token prefill, then times
``--tokens`` greedy single-token steps (median of ``--repeats``) with ACP off, on in the prefill
only (the default) and on in every step too. A torch.profiler pass over a few steps reports, per
generated token: GPU kernel launches, host-device synchronisations, host (CPU) time, and the
busiest operators; on CUDA also the host time of one attention call through the API, the custom
op and the launcher.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

from foxacp.models import FoxCache, FoxForCausalLM, preset_config
from foxacp.models.cache import EvictingLayerCache

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")


def decode_steps(model, cache: FoxCache, token, steps: int):
    """``steps`` greedy single-token steps; the cache is updated in place."""
    for _ in range(steps):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    return token


def prefill(model, prompt) -> tuple[FoxCache, torch.Tensor]:
    """A cache holding ``prompt`` and the greedy next token."""
    cache = FoxCache(model.config.num_hidden_layers)
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, prompt, tokens: int, repeats: int, device) -> dict:
    """Median seconds per token over ``repeats`` decodes of ``tokens`` steps from a fresh prefill."""
    per_token = []
    for run in range(repeats + 1):
        cache, token = prefill(model, prompt)
        sync(device)
        start = time.perf_counter()
        decode_steps(model, cache, token, tokens)
        sync(device)
        if run:  # run 0 warms up
            per_token.append((time.perf_counter() - start) / tokens)
    return {"ms_per_token": 1e3 * statistics.median(per_token), "tokens_per_s": 1 / statistics.median(per_token)}


def profile(model, prompt, steps: int, device, top: int) -> dict:
    cache, token = prefill(model, prompt)
    token = decode_steps(model, cache, token, 2)
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        decode_steps(model, cache, token, steps)
        sync(device)
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = {e.key: e.count / steps for e in events if e.key in SYNC_EVENTS}
    ops = sorted((e for e in events if e.key.startswith(("aten::", "foxacp::"))),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"kernels_per_token": kernels / steps, "syncs_per_token": syncs,
            "top_ops": [{"op": e.key, "calls_per_token": e.count / steps,
                         "self_cpu_us_per_token": e.self_cpu_time_total / steps} for e in ops]}


def attention_host_us(config, cache_len: int, batch: int, device, calls: int = 300) -> dict:
    """Host microseconds of one decoding-step attention call (one query against ``cache_len`` keys)
    at the model's shape, through the API, the custom op and the launcher alone (CUDA only)."""
    from foxacp import forgetting_attention
    from foxacp.ops import triton_attention

    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = torch.randn(batch, 1, H, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, cache_len, Hkv, D, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    c = torch.nn.functional.logsigmoid(torch.randn(batch, cache_len, H, device=device) + 4).cumsum(1)
    qc, kc, vc, cc = (t.transpose(1, 2) for t in (q, k, v, c))
    scale = D ** -0.5
    paths = {
        "api": lambda: forgetting_attention(q, k, v, c, cumulative_gate=True, backend="triton"),
        "custom_op": lambda: triton_attention.fox_attn_fwd(qc, kc, vc, cc, None, None, None, None, scale),
        "launcher": lambda: triton_attention._forward(qc, kc, vc, cc, None, None, None, None, scale),
    }
    result = {}
    for name, fn in paths.items():
        for _ in range(20):
            fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        result[name] = (time.perf_counter() - start) / calls * 1e6  # host time: launches are asynchronous
        sync(device)
    return result


def llama_like(config, max_positions: int):
    """A ``transformers.LlamaForCausalLM`` with the width, depth, heads, MLP and vocabulary of ``config``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                        head_dim=config.head_dim, max_position_embeddings=max_positions, rope_theta=config.rope_theta,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(llama)


def generate_seconds(model, prompt, new_tokens: int, device, **kwargs) -> float:
    """Wall seconds of a greedy ``generate()`` of exactly ``new_tokens`` tokens."""
    sync(device)
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, **kwargs)
    sync(device)
    return time.perf_counter() - start


def generate_speed(model, prompt, tokens: int, repeats: int, device, **kwargs) -> dict:
    """Steady decoding speed of ``generate()``: the time of ``tokens`` new tokens minus that of
    ``tokens // 2`` (both pay the prefill and any one-off setup, e.g. a CUDA graph capture), per
    extra step; ``setup_s`` is what the first ``tokens // 2`` steps took beyond that pace.
    Medians over ``repeats`` after one warm-up of each length."""
    half = tokens // 2
    seconds = {}
    for n in (1, half, tokens):
        generate_seconds(model, prompt, n, device, **kwargs)
        seconds[n] = statistics.median(generate_seconds(model, prompt, n, device, **kwargs) for _ in range(repeats))
    step = (seconds[tokens] - seconds[half]) / (tokens - half)
    return {"first_token_s": seconds[1], "setup_s": seconds[half] - seconds[1] - (half - 1) * step,
            "ms_per_step": 1e3 * step, "tokens_per_s": prompt.shape[0] / step}


def parse_scenario(text: str) -> tuple[int, int]:
    batch, _, prompt = text.partition("x")
    if not (batch.isdigit() and prompt.isdigit() and int(batch) > 0 and int(prompt) > 0):
        raise argparse.ArgumentTypeError(f"a scenario is BATCHxPROMPT, e.g. 8x2048; got {text!r}")
    return int(batch), int(prompt)


def run_generate(args, device, dtype) -> dict:
    """foxacp ``--preset`` and the same-size HF Llama, generate() tokens/s for every scenario."""
    torch.manual_seed(0)
    fox = FoxForCausalLM(preset_config(args.preset, fgate_bias_init="spread")).to(device, dtype).eval()
    longest = max(prompt for _, prompt in args.scenarios) + args.tokens
    llama = llama_like(fox.config, longest).to(device, dtype).eval()
    models = [("foxacp " + args.preset + ", FoxCache (uncaptured)", fox, {"cache_implementation": "dynamic"}),
              ("foxacp " + args.preset + ", StaticFoxCache (captured)", fox, {"cache_implementation": "static"}),
              ("hf llama (same size)", llama, {})]
    if args.hf_static:
        models.append(("hf llama, static cache (compiled)", llama, {"cache_implementation": "static"}))
    rows = []
    for batch, length in args.scenarios:
        prompt = torch.randint(1, fox.config.vocab_size, (batch, length), device=device)
        for name, model, kwargs in models:
            row = {"model": name, "batch": batch, "prompt": length,
                   **generate_speed(model, prompt, args.tokens, args.repeats, device, **kwargs)}
            rows.append(row)
            print(f"{name:<52} batch {batch:>2} prompt {length:>6}: {row['tokens_per_s']:9.1f} tokens/s "
                  f"({row['ms_per_step']:.2f} ms/step, first token {row['first_token_s']:.3f} s, "
                  f"setup {row['setup_s']:.3f} s)", flush=True)
    return {"preset": args.preset, "tokens": args.tokens, "rows": rows}


def teacher_forced(model, cache, prompt, steps, seconds: float, device, check_every: int = 8) -> dict:
    """Prefill ``prompt`` into ``cache``, then feed the given ``steps`` tokens one per call until
    ``seconds`` have passed (looked at every ``check_every`` steps, after a device sync) or all are
    fed. The logits of each step fed, the prefill seconds and the decoding steps per second; on
    CUDA also the peak memory while decoding (the cache, the weights and a step's temporaries)."""
    sync(device)
    start = time.perf_counter()
    model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    logits = []
    start = time.perf_counter()
    while len(logits) < steps.shape[1] and (not logits or time.perf_counter() - start < seconds):
        for t in range(len(logits), min(len(logits) + check_every, steps.shape[1])):
            out = model(input_ids=steps[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1].float())
        sync(device)
    result = {"prefill_s": prefill_s, "steps": len(logits), "tokens_per_s": len(logits) / (time.perf_counter() - start)}
    if device.type == "cuda":
        result["decode_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return {"logits": logits, **result}


def run_evict(args, device, dtype) -> dict:
    """Full cache against ACP eviction at every context length: memory, speed, logit difference."""
    torch.manual_seed(0)
    if args.checkpoint:
        model = FoxForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(device).eval()
    else:
        model = FoxForCausalLM(preset_config(args.preset, fgate_bias_init="spread")).to(device, dtype).eval()
    vocab = model.config.vocab_size

    def caches(length: int):
        return (("full", lambda: FoxCache(model.config.num_hidden_layers)),
                ("evict", lambda: model.acp_eviction_cache(length + args.tokens, log_eps=args.log_eps,
                                                           evict_every=args.evict_every, page_size=args.page_size)))

    warm = min(1024, min(args.contexts))  # kernels compile here, outside every timing
    for _, new_cache in caches(warm):
        teacher_forced(model, new_cache(), torch.randint(1, vocab, (1, warm), device=device),
                       torch.randint(1, vocab, (1, 24), device=device), float("inf"), device)
    rows = []
    for length in args.contexts:
        prompt = torch.randint(1, vocab, (1, length), device=device)
        steps = torch.randint(1, vocab, (1, args.tokens), device=device)
        row, logits = {"context": length}, {}
        for name, new_cache in caches(length):
            cache = new_cache()
            run = teacher_forced(model, cache, prompt, steps, args.seconds, device)
            logits[name] = run.pop("logits")
            row.update({f"{name}_{key}": value for key, value in run.items()})
            row[f"{name}_cache_bytes"] = cache.memory_bytes()
            if name == "evict":
                layers = [layer for layer in cache.layers if isinstance(layer, EvictingLayerCache)]
                kept = [k for layer in layers for k in layer.kept()]
                positions = cache.get_seq_length()
                row["kept_key_fraction"] = sum(kept) / (len(kept) * positions) if kept else 1.0
                row["page_size"] = layers[0].page_size if layers else None
                # the pools against the bytes of exactly the kept positions' keys, values and c
                pool = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values,
                                                                                      layer.decays))
                exact = 0
                for layer in layers:
                    _, batch, _, head_dim = layer.keys.shape
                    per_position = 2 * head_dim * layer.keys.element_size() + layer.decays.shape[2] * 4
                    exact += sum(layer.kept()) * batch * per_position
                row["evict_pool_over_kept"] = pool / exact if exact else None
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
        compared = min(len(logits["full"]), len(logits["evict"]))
        row["compared_steps"] = compared
        row["max_logit_diff"] = max(float((g - w).abs().max()) for g, w in zip(logits["evict"][:compared],
                                                                                logits["full"][:compared]))
        rows.append(row)
        mib = (row["full_cache_bytes"] / 2**20, row["evict_cache_bytes"] / 2**20)
        print(f"context {length:>7}: cache {mib[0]:9.1f} -> {mib[1]:9.1f} MiB (kept {row['kept_key_fraction']:.3f}), "
              f"{row['full_tokens_per_s']:7.1f} -> {row['evict_tokens_per_s']:7.1f} tokens/s "
              f"({row['full_steps']} / {row['evict_steps']} steps), max |logit diff| {row['max_logit_diff']:.2e}",
              flush=True)
    return {"preset": args.checkpoint or args.preset, "max_tokens": args.tokens, "seconds_per_run": args.seconds,
            "log_eps": args.log_eps, "evict_every": args.evict_every, "dtype": str(dtype), "rows": rows}


def run_acp(args, device, dtype) -> dict:
    """Decoding steps with ACP off / prefill only / every step, with a profile of each."""
    torch.manual_seed(0)
    model = FoxForCausalLM(preset_config(args.preset, fgate_bias_init="spread")).to(device, dtype).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), device=device)
    settings = ((False, False), (True, False), (True, True))  # (acp, acp_decode)
    rows = []
    # every timing before any profiling: a CUDA profiler pass slows the host calls after it
    for acp, decode in settings:
        model.set_acp(acp, decode=decode)
        rows.append({"acp": acp, "acp_decode": decode, **measure(model, prompt, args.tokens, args.repeats, device)})
    host_us = attention_host_us(model.config, args.prompt, args.batch, device) if device.type == "cuda" else None
    for row in rows:
        model.set_acp(row["acp"], decode=row["acp_decode"])
        row.update(profile(model, prompt, args.profile_steps, device, args.top))
        label = "on in decoding steps too" if row["acp_decode"] else "on in the prefill" if row["acp"] else "off"
        print(f"\nACP {label}: {row['ms_per_token']:.2f} ms/token ({row['tokens_per_s']:.1f} tok/s), "
              f"{row['kernels_per_token']:.0f} GPU kernels/token, syncs/token {row['syncs_per_token']}")
        for op in row["top_ops"]:
            print(f"  {op['op']:<40} {op['calls_per_token']:6.1f} calls {op['self_cpu_us_per_token']:9.1f} us")
    result = {"preset": args.preset, "prompt": args.prompt, "batch": args.batch, "tokens": args.tokens, "rows": rows}
    if host_us is not None:
        result["attention_host_us"] = host_us
        print("\nattention call, host us (API / custom op / launcher): "
              + " / ".join(f"{us:.0f}" for us in host_us.values()))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    gen = modes.add_parser("generate", help="generate() tokens/s beside HF's Llama of the same size")
    gen.add_argument("--scenarios", type=parse_scenario, nargs="+",
                     default=[(1, 2048), (8, 2048), (1, 32768)], help="BATCHxPROMPT entries")
    gen.add_argument("--tokens", type=int, default=128)
    gen.add_argument("--repeats", type=int, default=2)
    gen.add_argument("--hf-static", action="store_true", help="also HF's Llama with a static cache, compiled")
    gen.set_defaults(run=run_generate)
    acp = modes.add_parser("acp", help="ACP off / prefill / every step, with a profile")
    acp.add_argument("--prompt", type=int, default=16384)
    acp.add_argument("--tokens", type=int, default=32)
    acp.add_argument("--batch", type=int, default=1)
    acp.add_argument("--repeats", type=int, default=3)
    acp.add_argument("--profile-steps", type=int, default=4)
    acp.add_argument("--top", type=int, default=12)
    acp.set_defaults(run=run_acp)
    evict = modes.add_parser("evict", help="ACP KV-cache eviction against the full cache")
    evict.add_argument("--contexts", type=int, nargs="+", default=[16384, 65536, 131072])
    evict.add_argument("--tokens", type=int, default=512, help="most decoding steps per run")
    evict.add_argument("--seconds", type=float, default=15.0,
                       help="decoding time per run (each context runs the full and the evicting cache)")
    evict.add_argument("--log-eps", type=float, default=-10.0)
    evict.add_argument("--evict-every", type=int, default=64)
    evict.add_argument("--page-size", type=int, default=None, help="default: eviction_page_size(context)")
    evict.add_argument("--checkpoint", default=None, help="a saved model folder (default: random weights)")
    evict.set_defaults(run=run_evict)
    for sub in (gen, acp, evict):
        sub.add_argument("--preset", default="fox-pro-125m")
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sub.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.mode == "generate" and args.tokens < 4:
        parser.error("--tokens must be at least 4 (the speed comes from --tokens against --tokens // 2)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.no_grad():
        result = args.run(args, device, dtype)
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result["transformers"] = transformers.__version__
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
