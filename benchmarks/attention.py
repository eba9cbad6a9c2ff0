"""Forgetting-attention speed on one GPU, every contender timed in the same run.

Contenders: torch SDPA causal (no gate: the speed of light for the shape), foxacp triton dense,
foxacp triton with ``adaptive_threshold="auto"`` (paper and local rule), ``backend="hopper"`` dense and
ACP where it runs (sm90+), FlexAttention with the gate as ``score_mod``
(dense causal and with an ACP ``BlockMask`` built from the tile plan; also plain causal Flex with
no gate, i.e. PyTorch's own Triton FA2 template), fla's
``parallel_forgetting_attn`` when importable. q and k are RMS-normalised (as QK-norm does).

Gates: ``none`` (logit 30, nothing to prune), ``spread`` (per-head decay lengths log-spaced from 8
to 65536 tokens, logit = log(f/(1-f)) + 0.3 N(0,1), f = exp(-1/tau)), ``fast`` (tau = 64).

Usage: ``python benchmarks/attention.py [--quick] [--no-flex] [--rounds 3] [--json out.json]``.
Each contender is timed ``--rounds`` times, the contenders in turn (a clock drift during the run
then hits all of them alike), and the median is reported. Prints a table (ms, dense-equivalent
TFLOP/s, ratio to SDPA, kept-tile fraction) and writes JSON (with every round's time).
``--compare-tma`` adds foxacp dense without TMA descriptors, timed in a child process with the
documented switch ``FOXACP_TRITON_TMA=0`` (against the child's own SDPA).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import triton

from foxacp import forgetting_attention
from foxacp.acp import MaskSpec, threshold_from_data

SHAPES = [  # (B, H, Hkv, T, D)
    (8, 16, 16, 4096, 64),
    (4, 16, 16, 8192, 64),
    (2, 16, 16, 16384, 64),
    (2, 8, 8, 16384, 128),
    (4, 32, 8, 8192, 64),  # GQA 4:1
]
GATES = ["none", "spread", "fast"]
LOG_EPS = -10.0  # forgetting_attention's default for adaptive_threshold="auto"


def make_inputs(B, H, Hkv, T, D, gate, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, D, device="cuda", generator=g)
    k = torch.randn(B, T, Hkv, D, device="cuda", generator=g)
    v = torch.randn(B, T, Hkv, D, device="cuda", generator=g, dtype=dtype)
    q = (q / q.pow(2).mean(-1, keepdim=True).sqrt()).to(dtype)
    k = (k / k.pow(2).mean(-1, keepdim=True).sqrt()).to(dtype)
    if gate == "none":
        logit = torch.full((B, T, H), 30.0, device="cuda")
    else:
        if gate == "spread":
            tau = torch.logspace(math.log10(8), math.log10(65536), H, device="cuda")
        else:
            tau = torch.full((H,), 64.0, device="cuda")
        f = torch.exp(-1.0 / tau)
        logit = torch.log(f / (1 - f)) + 0.3 * torch.randn(B, T, H, device="cuda", generator=g)
    return q, k, v, torch.nn.functional.logsigmoid(logit).float()


def decays(gate):
    """``c = cumsum(log f)`` of ``gate`` ``(B, H, T)`` as forgetting_attention builds it for plain
    causal inputs: float32 for the kernels, and the float64 sum the ACP plan is searched in."""
    decay_global = torch.cumsum(gate, -1, dtype=torch.float64)
    return decay_global.float(), decay_global


def plan_arrays(decay_global, delta, seqlen, head_dim):
    """The paper rule's tile plan arrays ``(acp_kv_begin, acp_q_end)`` on the backend's current tiles
    (the Triton pre-pass), for :func:`op_forward` / :func:`op_backward`."""
    from foxacp.ops.triton_attention import acp_tiles, default_tiles

    return acp_tiles(decay_global, delta, seqlen, *default_tiles(head_dim))


def op_forward(qc, kc, vc, decay, scale, *, plan=(None, None)):
    """The Triton forward custom op alone (no API preamble), plain causal; ACP on ``plan``'s arrays
    (:func:`plan_arrays`). (B, H, T, D) inputs; returns ``(out, lse)``. The one place that calls the op."""
    from foxacp.ops.triton_attention import default_tiles, fox_attn_fwd

    plan_m, plan_n = default_tiles(qc.shape[-1])
    return fox_attn_fwd(qc, kc, vc, decay, acp_kv=plan[0], acp_q=plan[1], key_lo=None, key_hi=None, sm_scale=scale,
                        plan_m=plan_m, plan_n=plan_n)


def op_backward(dout, qc, kc, vc, decay, out, lse, scale, *, plan=(None, None)):
    """The Triton backward custom op alone, for :func:`op_forward`'s ``out, lse``."""
    from foxacp.ops.triton_attention import default_tiles, fox_attn_bwd

    plan_m, plan_n = default_tiles(qc.shape[-1])
    return fox_attn_bwd(dout, qc, kc, vc, decay, acp_kv=plan[0], acp_q=plan[1], key_lo=None, key_hi=None,
                        out=out, lse=lse, sm_scale=scale, plan_m=plan_m, plan_n=plan_n)


def hopper_ready(q) -> bool:
    """Whether ``backend="hopper"`` serves ``q`` here (Gluon importable, sm90+, bf16/fp16, D 64/128)."""
    from foxacp.ops import backends

    try:
        reason = backends.load("hopper").unavailable_reason(q)
    except ValueError as err:
        reason = str(err)
    if reason is not None:
        print(f"hopper skipped: {reason}", file=sys.stderr)
    return reason is None


def bench(fn, backward: bool, grads=None):
    """Median ms of fn (forward) or of forward + backward."""
    if backward:
        def step():
            out = fn()
            out.backward(grads)
    else:
        def step():
            with torch.no_grad():
                fn()
    step()
    torch.cuda.synchronize()
    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")


def time_round_robin(contenders: dict, backward: bool, grads, rounds: int) -> dict:
    """``{name: [ms per round]}``: every contender timed once per round, in turn, so a drift of the
    GPU's clock during the run hits all of them alike (the median over rounds is reported). A
    contender that fails is reported once and left out."""
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            if name not in times:
                continue
            try:
                times[name].append(bench(fn, backward, grads))
            except Exception as err:  # noqa: BLE001 - report and go on
                print(f"{name} {'fwd+bwd' if backward else 'fwd'} failed: {type(err).__name__}: {err}", file=sys.stderr)
                del times[name]
    return times


def plan_for(q, k, log_f, block):
    """The ACP tile plan at FlexAttention's block size, as the API would build it."""
    qc, kc, gate = q.transpose(1, 2), k.transpose(1, 2), log_f.transpose(1, 2)
    B, H, T, D = qc.shape
    decay, decay_global = decays(gate)
    delta = threshold_from_data(qc, kc, 1 / math.sqrt(D), T, LOG_EPS)
    spec = MaskSpec(B, H, T, T, None, None, decay_global, delta)
    return spec.plan(block, block), decay


def flex_contenders(q, k, v, log_f, H, Hkv):
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    B, T = q.shape[0], q.shape[1]
    qh, kh, vh = (t.transpose(1, 2).detach().requires_grad_(True) for t in (q, k, v))
    plan, decay = plan_for(q, k, log_f, 128)
    decay = decay.detach().contiguous()  # a captured tensor needing grad makes Flex materialise (B,H,T,T)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + decay[b, h, q_idx] - decay[b, h, kv_idx]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    dense_mask = create_block_mask(causal, None, None, T, T, device="cuda")
    # ACP BlockMask from tile bounds: blocks strictly below the diagonal are full, the diagonal partial
    n = torch.arange(plan.num_k_tiles, device="cuda")
    m = torch.arange(plan.num_q_tiles, device="cuda")[:, None]
    kept = (n >= plan.kv_begin[..., None]) & (n < plan.kv_end[..., None])  # [B, H, M, N]
    full = kept & (n < m)
    part = kept & (n == m)

    def to_idx(sel):
        num = sel.sum(-1).to(torch.int32)
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx

    kv_num, kv_idx = to_idx(part)
    full_num, full_idx = to_idx(full)
    acp_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=128, mask_mod=causal)
    gqa = H != Hkv
    return {
        # PyTorch's Triton template with no gate at all: what Triton-generated FA2 reaches on this GPU
        "flex causal": lambda: flex(qh, kh, vh, block_mask=dense_mask, enable_gqa=gqa),
        "flex dense": lambda: flex(qh, kh, vh, score_mod=score_mod, block_mask=dense_mask, enable_gqa=gqa),
        "flex acp": lambda: flex(qh, kh, vh, score_mod=score_mod, block_mask=acp_mask, enable_gqa=gqa),
    }, plan.kept_fraction()


def tune(json_path, part="all"):
    """Time the custom ops alone for candidate tile configs (no API preamble), and the preamble
    parts. ACP (nothing prunable) only for the default config. The forward runs as the process's
    ``FOXACP_TRITON_TMA`` says (default on); run once with ``FOXACP_TRITON_TMA=0`` to compare."""
    from foxacp.ops.triton_attention import TMA_ENABLED, TileConfig, _CONFIGS

    results = []
    # (block_m, block_n, warps, stages) per head dim; configs whose TMA variant crashes ptxas 12.8 left out
    fwd_cands = {64: [(128, 64, 4, 3), (64, 128, 4, 2), (64, 128, 4, 3), (128, 128, 8, 2), (128, 64, 4, 2)],
                 128: [(64, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2)]}
    # (m1, n1, m2, n2, warps, stages): m1, m2 divide the plan's block_m, n1, n2 its block_n
    bwd_cands = {64: [(64, 64, 64, 64, 4, 2), (32, 64, 64, 64, 4, 2), (32, 64, 64, 64, 4, 3), (64, 64, 64, 64, 4, 3)],
                 128: [(64, 64, 64, 64, 4, 2), (32, 64, 64, 64, 4, 2), (32, 64, 64, 32, 4, 2)]}

    def timed(kind, D, cfg, make_config, run, baseline, flops=None, with_acp=False):
        default = _CONFIGS[D]
        _CONFIGS[D] = make_config(cfg)
        for acp in ((False, True) if with_acp else (False,)):
            try:
                ms = triton.testing.do_bench(lambda: run(acp), warmup=25, rep=100, return_mode="median")
            except Exception as err:  # noqa: BLE001
                print(f"D={D} {kind} {cfg} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
                continue
            uses_tma = TMA_ENABLED and kind == "fwd"  # only the forward has a TMA variant
            results.append(dict(D=D, kind=kind, acp=acp, tma=uses_tma, cfg=cfg, ms=ms, vs_sdpa=ms / baseline))
            print(f"D={D} {kind} acp={acp:d} tma={uses_tma:d} {cfg} {ms:.3f} ms x{ms / baseline:.2f}"
                  + (f" {flops / ms / 1e9:.0f} TF/s" if flops else ""), flush=True)
        _CONFIGS[D] = default

    for B, H, T, D in [(4, 16, 8192, 64), (2, 8, 16384, 128)]:
        q, k, v, log_f = make_inputs(B, H, H, T, D, "none")
        qc, kc, vc = (t.transpose(1, 2) for t in (q, k, v))
        gate = log_f.transpose(1, 2)
        decay, dg = decays(gate)
        delta = torch.full((B, H), -1e9, device="cuda")
        scale = 1 / math.sqrt(D)
        dout = torch.randn_like(qc)
        flops = 4 * B * H * T * T * D / 2
        sdpa_f = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            qc, kc, vc, is_causal=True), warmup=25, rep=100, return_mode="median")
        print(f"D={D} sdpa fwd {sdpa_f:.3f} ms", flush=True)
        base = _CONFIGS[D]
        for cand in fwd_cands[D] if part in ("all", "fwd") else []:
            timed("fwd", D, cand, lambda c: TileConfig(*c, 16, 16, 16, 16, base.bwd_warps, base.bwd_stages),
                  lambda acp: op_forward(qc, kc, vc, decay, scale, plan=plan_arrays(dg, delta, T, D) if acp
                                         else (None, None)), sdpa_f, flops,
                  cand == (base.block_m, base.block_n, base.fwd_warps, base.fwd_stages))
        out, lse = op_forward(qc, kc, vc, decay, scale)
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (qc, kc, vc))
        o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        sdpa_b = triton.testing.do_bench(lambda: torch.autograd.grad(o, (qg, kg, vg), dout, retain_graph=True),
                                         warmup=25, rep=100, return_mode="median")
        print(f"D={D} sdpa bwd {sdpa_b:.3f} ms", flush=True)
        for cand in bwd_cands[D] if part in ("all", "bwd") else []:
            timed("bwd", D, cand, lambda c: TileConfig(base.block_m, base.block_n, base.fwd_warps, base.fwd_stages, *c),
                  lambda acp: op_backward(dout, qc, kc, vc, decay, out, lse, scale,
                                          plan=plan_arrays(dg, delta, T, D) if acp else (None, None)), sdpa_b, None,
                  cand == (base.m1, base.n1, base.m2, base.n2, base.bwd_warps, base.bwd_stages))
        # the API preamble: data threshold and the float64 decay cumsum
        for name, fn in [("threshold_from_data", lambda: threshold_from_data(qc, kc, scale, T)),
                         ("cumulative_decay", lambda: decays(gate))]:
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            results.append(dict(D=D, kind=name, ms=ms))
            print(f"D={D} {name} {ms:.3f} ms", flush=True)
        del q, k, v, qc, kc, vc, out, lse, dout
        torch.cuda.empty_cache()
    with open(json_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": results}, f, indent=1)


def overhead(json_path):
    """ACP cost when nothing is prunable, per component (CUDA-event medians via do_bench)."""
    from foxacp.ops import triton_attention

    def ms(fn):
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def torch_threshold(qc, kc, scale, T):
        """The "auto" threshold in PyTorch ops alone: the baseline of the fused threshold kernels
        (kernel-notes attempt 6). Norms in float32 over the (B, T, H, D) memory as laid out."""
        B, H, Hkv = qc.shape[0], qc.shape[1], kc.shape[1]
        q_max, k_max = (torch.linalg.vector_norm(t.transpose(1, 2), dim=-1, dtype=torch.float32).amax(1)
                        for t in (qc, kc))
        g = H // Hkv
        q_max = q_max.view(B, Hkv, g).amax(-1, keepdim=True).expand(-1, -1, g)
        return -(2.0 * q_max.reshape(B, H) * k_max.repeat_interleave(g, 1) * scale + math.log(T)) - 10.0

    rows = []
    for B, H, Hkv, T, D in [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[4]]:
        q, k, v, log_f = make_inputs(B, H, Hkv, T, D, "none")
        qc, kc, vc = (t.transpose(1, 2) for t in (q, k, v))
        gate = log_f.transpose(1, 2)
        scale = 1 / math.sqrt(D)
        decay, dg = decays(gate)
        delta = threshold_from_data(qc, kc, scale, T, LOG_EPS)
        plan = plan_arrays(dg, delta, T, D)
        local_spec = MaskSpec(B, H, T, T, None, None, dg, delta, "local", LOG_EPS)
        out, lse = op_forward(qc, kc, vc, decay, scale)
        dout = torch.randn_like(qc)
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v, log_f)]
        grads = torch.randn_like(q)
        r = dict(shape=(B, H, Hkv, T, D))
        r["threshold torch"] = ms(lambda: torch_threshold(qc, kc, scale, T))
        r["threshold fused"] = ms(lambda: triton_attention.acp_data_threshold(qc, kc, scale, T, LOG_EPS))
        # a float64 copy of the gate, then cumsum: the baseline of cumsum(dtype=float64) (kernel-notes attempt 6)
        r["decay f64 (.double().cumsum)"] = ms(lambda: (torch.cumsum(gate.double(), -1).float()))
        r["decay f64 (cumsum dtype=f64)"] = ms(lambda: decays(gate))
        r["decay f32 cumsum"] = ms(lambda: torch.cumsum(gate, -1))
        r["acp pre-pass"] = ms(lambda: plan_arrays(dg, delta, T, D))
        r["local plan (pre-pass + data bound)"] = ms(lambda: triton_attention.plan(local_spec, qc, kc, scale))
        r["op fwd dense"] = ms(lambda: op_forward(qc, kc, vc, decay, scale))
        r["op fwd acp"] = ms(lambda: op_forward(qc, kc, vc, decay, scale, plan=plan))
        r["op bwd dense"] = ms(lambda: op_backward(dout, qc, kc, vc, decay, out, lse, scale))
        r["op bwd acp"] = ms(lambda: op_backward(dout, qc, kc, vc, decay, out, lse, scale, plan=plan))
        with torch.no_grad():
            r["api fwd dense"] = ms(lambda: forgetting_attention(q, k, v, log_f, backend="triton"))
            r["api fwd acp auto"] = ms(lambda: forgetting_attention(q, k, v, log_f, backend="triton",
                                                                    adaptive_threshold="auto"))
            r["api fwd acp delta tensor"] = ms(lambda: forgetting_attention(q, k, v, log_f, backend="triton",
                                                                            adaptive_threshold=delta))
        r["api fwd+bwd dense"] = bench(lambda: forgetting_attention(*leaves, backend="triton"), True, grads)
        r["api fwd+bwd acp auto"] = bench(lambda: forgetting_attention(*leaves, backend="triton",
                                                                       adaptive_threshold="auto"), True, grads)
        r["api fwd+bwd acp local"] = bench(lambda: forgetting_attention(*leaves, backend="triton", adaptive_threshold="auto",
                                                                        acp_rule="local"), True, grads)
        # host time per API call (enqueue only): is the CPU on the critical path?
        with torch.no_grad():
            for name, kw in [("host us/call fwd dense", {}), ("host us/call fwd acp", {"adaptive_threshold": "auto"})]:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    forgetting_attention(q, k, v, log_f, backend="triton", **kw)
                r[name] = (time.perf_counter() - t0) / 20 * 1e6
                torch.cuda.synchronize()
        rows.append(r)
        print(json.dumps(r), flush=True)
        # per-kernel GPU times of one ACP forward + backward through the API
        if (B, H, T) == (8, 16, 4096):
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    forgetting_attention(*leaves, backend="triton", adaptive_threshold="auto").backward(grads)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60),
                  flush=True)
        del q, k, v, log_f, qc, kc, vc, out, lse, dout, leaves, grads
        torch.cuda.empty_cache()
    with open(json_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


def no_tma_rows(shape_ids, gates: str, rounds: int) -> list[dict]:
    """"fox dense no-tma" rows: SDPA and fox dense timed in a child process with the documented
    switch ``FOXACP_TRITON_TMA=0`` (read once, at import), each ratio against the child's own SDPA."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "no_tma.json")
        subprocess.run([sys.executable, __file__, "--no-flex", "--contenders", "sdpa causal,fox dense",
                        "--shapes", ",".join(map(str, shape_ids)), "--gates", gates, "--rounds", str(rounds),
                        "--json", out], env={**os.environ, "FOXACP_TRITON_TMA": "0"}, check=True)
        with open(out) as f:
            rows = json.load(f)["rows"]
    return [dict(r, contender="fox dense no-tma") for r in rows if r["contender"] == "fox dense"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--shapes", type=str, default=None, help="indices into SHAPES, e.g. 0,2")
    parser.add_argument("--gates", type=str, default=",".join(GATES))
    parser.add_argument("--json", type=str, default="attention_bench.json")
    parser.add_argument("--tune", action="store_true", help="time tile configs of the ops alone")
    parser.add_argument("--tune-part", choices=("all", "fwd", "bwd"), default="all")
    parser.add_argument("--overhead", action="store_true", help="ACP cost per component, nothing prunable")
    parser.add_argument("--compare-tma", action="store_true",
                        help="also time fox dense without TMA descriptors (child process, FOXACP_TRITON_TMA=0)")
    parser.add_argument("--contenders", type=str, default=None, help="only these, e.g. 'sdpa causal,fox dense'")
    parser.add_argument("--rounds", type=int, default=3, help="times each contender is timed, in turn (median)")
    args = parser.parse_args(argv)
    if args.tune:
        return tune(args.json, args.tune_part)
    if args.overhead:
        return overhead(args.json)
    shape_ids = [int(i) for i in args.shapes.split(",")] if args.shapes else [0] if args.quick else range(len(SHAPES))
    shapes = [SHAPES[i] for i in shape_ids]
    wanted = None if args.contenders is None else set(args.contenders.split(","))
    try:
        from fla.ops.forgetting_attn import parallel_forgetting_attn
    except ImportError:
        parallel_forgetting_attn = None

    device = torch.cuda.get_device_name()
    rows = []
    for B, H, Hkv, T, D in shapes:
        flops_fwd = 4 * B * H * T * T * D / 2  # causal: half of the score matrix, QK^T and PV
        for gate in args.gates.split(","):
            q, k, v, log_f = make_inputs(B, H, Hkv, T, D, gate)
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v, log_f)]
            grads = torch.randn_like(q)
            qh, kh, vh = (t.transpose(1, 2) for t in leaves[:3])
            contenders = {
                "sdpa causal": lambda: torch.nn.functional.scaled_dot_product_attention(
                    qh, kh, vh, is_causal=True, enable_gqa=H != Hkv).transpose(1, 2),
                "fox dense": lambda: forgetting_attention(*leaves, backend="triton"),
                "fox acp": lambda: forgetting_attention(*leaves, backend="triton", adaptive_threshold="auto"),
                "fox acp local": lambda: forgetting_attention(*leaves, backend="triton", adaptive_threshold="auto",
                                                              acp_rule="local"),
            }
            _, stats = forgetting_attention(q, k, v, log_f, backend="triton", adaptive_threshold="auto",
                                            acp_rule="local", return_stats=True)
            kept = {"fox acp": stats.paper_kept_fraction, "fox acp local": stats.kept_fraction}
            if hopper_ready(qh):
                contenders["hopper dense"] = lambda: forgetting_attention(*leaves, backend="hopper")
                contenders["hopper acp"] = lambda: forgetting_attention(*leaves, backend="hopper",
                                                                        adaptive_threshold="auto")
                _, stats = forgetting_attention(q, k, v, log_f, backend="hopper", adaptive_threshold="auto",
                                                return_stats=True)
                kept["hopper acp"] = stats.kept_fraction
            if parallel_forgetting_attn is not None:
                contenders["fla"] = lambda: parallel_forgetting_attn(*leaves[:3], leaves[3], scale=1 / math.sqrt(D))
            # Flex only where it fits: (B,H,T,T)-sized buffers at T=16k (OOM on 80 GB), 185 ms measured at D=128
            if not args.no_flex and T <= 8192 and D <= 64 and (wanted is None or any("flex" in n for n in wanted)):
                try:
                    flex, kept_flex = flex_contenders(*leaves, H, Hkv)
                    flex = {name: (lambda f=f: f().transpose(1, 2)) for name, f in flex.items()}
                    contenders.update(flex)
                    kept["flex acp"] = kept_flex
                except Exception as err:  # noqa: BLE001 - report and go on
                    print(f"flex skipped: {type(err).__name__}: {err}", file=sys.stderr)
            if wanted is not None:
                contenders = {name: fn for name, fn in contenders.items() if name in wanted}
            for mode in ("fwd", "fwd+bwd"):
                times = time_round_robin(contenders, mode == "fwd+bwd", grads, args.rounds)
                base = statistics.median(times["sdpa causal"]) if times.get("sdpa causal") else None
                for name, rounds in times.items():
                    ms = statistics.median(rounds)
                    flops = flops_fwd * (3.5 if mode == "fwd+bwd" else 1.0)  # bwd ~2.5x fwd matmuls
                    row = dict(device=device, B=B, H=H, Hkv=Hkv, T=T, D=D, gate=gate, mode=mode, contender=name,
                               ms=ms, ms_rounds=rounds, tflops=flops / ms / 1e9, vs_sdpa=ms / base if base else None,
                               kept=kept.get(name, 1.0))
                    rows.append(row)
                    spread = f"{min(rounds):.3f}-{max(rounds):.3f}"
                    print(f"{B:>2} {H:>3} {Hkv:>3} {T:>6} {D:>4} {gate:>6} {mode:>7} {name:>12} "
                          f"{ms:9.3f} ms ({spread}) {row['tflops']:7.1f} TF/s x{row['vs_sdpa'] or 0:5.2f} "
                          f"kept {row['kept']:.3f}", flush=True)
            del q, k, v, log_f, leaves, contenders
            torch.cuda.empty_cache()
    if args.compare_tma:
        rows += no_tma_rows(shape_ids, args.gates, args.rounds)
    with open(args.json, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                   "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, f, indent=1)
    print_table(rows)


def print_table(rows):
    print("\n| shape (B,H,Hkv,T,D) | gate | mode | SDPA ms | fox dense | fox dense no-TMA | fox ACP (kept) "
          "| fox ACP local (kept) | hopper dense | hopper ACP (kept) | flex causal (no gate) | flex dense | flex ACP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    keyed = {}
    for r in rows:
        keyed.setdefault((r["B"], r["H"], r["Hkv"], r["T"], r["D"], r["gate"], r["mode"]), {})[r["contender"]] = r
    for key, group in keyed.items():
        *shape, gate, mode = key
        def cell(name):
            r = group.get(name)
            return "-" if r is None else f"{r['ms']:.2f} (x{r['vs_sdpa']:.2f})"
        sdpa = group.get("sdpa causal")
        def acp_cell(name):
            r = group.get(name)
            return "-" if r is None else f"{r['ms']:.2f} (x{r['vs_sdpa']:.2f}, {r['kept']:.2f})"
        print(f"| {tuple(shape)} | {gate} | {mode} | {sdpa['ms'] if sdpa else float('nan'):.2f} | "
              f"{cell('fox dense')} | {cell('fox dense no-tma')} | {acp_cell('fox acp')} | {acp_cell('fox acp local')} "
              f"| {cell('hopper dense')} | {acp_cell('hopper acp')} | {cell('flex causal')} | {cell('flex dense')} | {cell('flex acp')} |")


if __name__ == "__main__":
    main()
