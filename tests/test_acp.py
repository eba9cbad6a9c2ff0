"""ACP: thresholds, tile bounds and the eps guarantee."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foxacp import forgetting_attention
from foxacp.acp import MaskSpec, threshold_from_data, threshold_from_qk_norm, tile_bounds
from foxacp.ops.reference import attention_mass_pruned

from conftest import make_inputs


def brute_force_keep(decay, delta, Tq, Tk, bm, bn):
    """Kept (m, n) tiles by the definition: causal tile whose largest decay >= delta."""
    off = Tk - Tq
    nq, nk = math.ceil(Tq / bm), math.ceil(Tk / bn)
    keep = torch.zeros(decay.shape[0], decay.shape[1], nq, nk, dtype=torch.bool)
    for m in range(nq):
        first, last = off + m * bm, off + min((m + 1) * bm, Tq) - 1
        for n in range(nk):
            if n * bn > last:
                continue
            k_last = min((n + 1) * bn, Tk) - 1
            keep[:, :, m, n] = decay[:, :, first] - decay[:, :, k_last] >= delta
    return keep


@settings(max_examples=40, deadline=None)
@given(Tq=st.integers(1, 90), extra=st.integers(0, 40), bm=st.sampled_from([1, 4, 16, 32]),
       bn=st.sampled_from([1, 8, 16, 64]), delta=st.floats(-30, 0), seed=st.integers(0, 2**16))
def test_tile_bounds_match_definition(Tq, extra, bm, bn, delta, seed):
    g = torch.Generator().manual_seed(seed)
    B, H, Tk = 2, 3, Tq + extra
    log_f = -torch.rand(B, H, Tk, generator=g, dtype=torch.float64) * torch.tensor([0.01, 0.5, 3.0])[None, :, None]
    decay = log_f.cumsum(-1)
    spec = MaskSpec(B, H, Tq, Tk, decay=decay, delta=torch.full((B, H), delta))
    plan = tile_bounds(spec, bm, bn)
    expected = brute_force_keep(decay, delta, Tq, Tk, bm, bn)
    assert torch.equal(plan.to_dense(), expected)
    # the key-side ranges describe the same tiles
    m = torch.arange(plan.num_q_tiles)
    by_key = (m[:, None] >= plan.q_begin[..., None, :]) & (m[:, None] < plan.q_end[..., None, :])
    assert torch.equal(by_key, expected)


def test_threshold_from_qk_norm_worked_values():
    ones = torch.ones(4, 64)
    for L, expected in [(4096, -34.3), (8192, -35.0), (16384, -35.7)]:
        delta = threshold_from_qk_norm(ones, ones, 64, L, -10.0)
        assert delta.shape == (4,)
        assert torch.allclose(delta, torch.full((4,), expected), atol=0.05)
    # GQA: k weights per kv head are repeated over their query group
    gk = torch.tensor([[1.0] * 8, [2.0] * 8])
    delta = threshold_from_qk_norm(torch.ones(4, 8), gk, 8, 100)
    assert delta[0] == delta[1] and delta[2] == delta[3] and delta[2] < delta[0]


GATES = {"never": 30.0, "slow": 5.0, "fast": -1.0, "very_fast": -6.0}


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 160), H=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2]),
       gate=st.sampled_from(list(GATES)), threshold=st.sampled_from(["auto", -2.0, -8.0]),
       qk_scale=st.sampled_from([0.3, 1.0, 2.0]), seed=st.integers(0, 2**16))
def test_eps_guarantee(T, H, group, gate, threshold, qk_scale, seed):
    torch.manual_seed(seed)
    log_eps = -10.0
    q, k, v, log_f = make_inputs(1, T, H * group, 16, Hkv=H, dtype=torch.float64, gate_logit=GATES[gate])
    q, k = q * qk_scale, k * qk_scale
    dense = forgetting_attention(q, k, v, log_f, backend="reference")
    out, stats = forgetting_attention(q, k, v, log_f, adaptive_threshold=threshold, log_eps=log_eps,
                                      backend="torch", return_stats=True)
    # a given delta guarantees eps = L exp(2U + delta) with U the data's bound on |s_ij|
    U = float(threshold_from_data(q.transpose(1, 2), k.transpose(1, 2), 16 ** -0.5, T, 0.0).neg().sub(math.log(T)).max()) / 2
    eps = math.exp(log_eps) if threshold == "auto" else min(1.0, T * math.exp(2 * U + threshold))
    decay = log_f.transpose(1, 2).double().cumsum(-1)
    pruned = attention_mass_pruned(q.transpose(1, 2), k.transpose(1, 2), decay, sm_scale=16 ** -0.5,
                                   spec=MaskSpec(1, H * group, T, T), plan=stats.plan)
    assert float(pruned.max()) <= eps
    assert float((out - dense).abs().max()) <= 2 * eps * float(v.abs().max())


def test_fast_gates_prune_and_slow_gates_do_not():
    q, k, v, log_f = make_inputs(1, 512, 2, 16, gate_logit=-3.0)
    _, fast = forgetting_attention(q, k, v, log_f, adaptive_threshold="auto", return_stats=True, backend="torch")
    q, k, v, log_f = make_inputs(1, 512, 2, 16, gate_logit=30.0)
    _, never = forgetting_attention(q, k, v, log_f, adaptive_threshold="auto", return_stats=True, backend="torch")
    assert fast.kept_fraction < 0.5 and fast.flops_saved_fraction > 0.5
    assert never.kept_fraction == 1.0 and never.flops_saved_fraction == 0.0
    assert fast.kept_tiles.shape == (1, 2) and torch.all(fast.kept_tiles <= fast.causal_tiles)
    summary = fast.summary()
    assert summary["flops_done"] < summary["flops_dense"]


def test_stats_without_acp_are_dense():
    q, k, v, log_f = make_inputs(2, 100, 2, 8)
    _, stats = forgetting_attention(q, k, v, log_f, return_stats=True, backend="torch")
    assert stats.kept_fraction == 1.0 and stats.threshold is None


@pytest.mark.parametrize("layout", ["seq_start", "cu_seqlens"])
def test_plan_respects_sequences(layout):
    T = 200
    q, k, v, log_f = make_inputs(1, T, 2, 8)
    kwargs = {"seq_start": torch.tensor([130])} if layout == "seq_start" else {
        "cu_seqlens": torch.tensor([0, 64, 130, 200])}
    _, stats = forgetting_attention(q, k, v, log_f, return_stats=True, backend="torch", **kwargs)
    _, plain = forgetting_attention(q, k, v, log_f, return_stats=True, backend="torch")
    assert int(stats.causal_tiles.sum()) < int(plain.causal_tiles.sum())
