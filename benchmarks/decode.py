"""Decoding speed with ACP off, on in the prefill only (the default) and on in every step too.

    python benchmarks/decode.py --preset fox-pro-125m --prompt 16384 --tokens 32 --json decode.json

Builds the preset with random weights (spread gate init, so heads forget at many rates), fills
the cache with a ``--prompt``-token prefill, then times ``--tokens`` greedy single-token steps
(median of ``--repeats``). A torch.profiler pass over a few steps reports, per generated token:
GPU kernel launches, host-device synchronisations, host (CPU) time, and the busiest operators;
on CUDA also the host time of one attention call through the API, the custom op and the launcher.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from foxacp.models import FoxForCausalLM, preset_config

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")


def decode_steps(model, cache, token, steps: int):
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return cache, token


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, prompt, tokens: int, repeats: int, device) -> dict:
    """Median seconds per token over ``repeats`` decodes of ``tokens`` steps from a fresh prefill."""
    per_token = []
    for run in range(repeats + 1):
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        start = time.perf_counter()
        decode_steps(model, out.past_key_values, token, tokens)
        sync(device)
        if run:  # run 0 warms up
            per_token.append((time.perf_counter() - start) / tokens)
    return {"ms_per_token": 1e3 * statistics.median(per_token), "tokens_per_s": 1 / statistics.median(per_token)}


def profile(model, prompt, steps: int, device, top: int) -> dict:
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, token = decode_steps(model, out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), 2)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fox-pro-125m")
    parser.add_argument("--prompt", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = FoxForCausalLM(preset_config(args.preset, fgate_bias_init="spread")).to(device, dtype).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    settings = ((False, False), (True, False), (True, True))  # (acp, acp_decode)
    rows = []
    with torch.no_grad():
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
    result = {"device": name, "preset": args.preset, "prompt": args.prompt, "batch": args.batch,
              "tokens": args.tokens, "rows": rows}
    if host_us is not None:
        result["attention_host_us"] = host_us
        print("\nattention call, host us (API / custom op / launcher): " + " / ".join(f"{us:.0f}" for us in host_us.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
