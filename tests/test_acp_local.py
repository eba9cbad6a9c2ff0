"""The data-aware ("local") ACP rule: the eps guarantee on adversarial inputs, forward and backward
computing the same pairs, every gradient against the reference on the same plan, and the gain."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foxacp import forgetting_attention
from foxacp.acp import MaskSpec, plan_tiles, threshold_from_data
from foxacp.ops.layout import SequenceLayout
from foxacp.ops.reference import attention_mass_pruned

from conftest import make_inputs

GATES = {"never": 30.0, "slow": 4.0, "fast": -1.0, "very_fast": -6.0}
LOG_EPS = -10.0


def local_plan(q, k, log_f, *, layout, block_m, block_n, log_eps=LOG_EPS):
    """The local rule's plan on ``block_m x block_n`` tiles, built as the API builds its spec."""
    qc, kc = q.transpose(1, 2), k.transpose(1, 2)
    B, H, Tq, D = qc.shape
    Tk = kc.shape[2]
    gate = log_f.transpose(1, 2).double()
    decay = gate.cumsum(-1)
    delta = threshold_from_data(qc, kc, D ** -0.5, Tk, log_eps).float()
    spec = MaskSpec(B, H, Tq, Tk, layout.key_lo, layout.key_hi, decay, delta, "local", log_eps)
    return plan_tiles(spec, block_m, block_n, q=qc, k=kc, sm_scale=D ** -0.5)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 150), H=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
       gate=st.sampled_from(list(GATES)), qk_scale=st.sampled_from([0.1, 1.0, 3.0]),
       shape=st.sampled_from(["causal", "packed", "tq<tk"]), tiles=st.sampled_from([(8, 8), (16, 8), (8, 16)]),
       seed=st.integers(0, 2**16))
def test_local_rule_keeps_the_eps_guarantee(T, H, group, gate, qk_scale, shape, tiles, seed):
    torch.manual_seed(seed)
    Tq = max(1, T // 3) if shape == "tq<tk" else T
    q, k, v, log_f = make_inputs(1, Tq, H * group, 16, Tk=T, Hkv=H, dtype=torch.float64, gate_logit=GATES[gate])
    q, k = q * qk_scale, k * qk_scale
    cu = torch.tensor(sorted({0, T // 3, T // 2, T})) if shape == "packed" and T > 2 else None
    layout = SequenceLayout.from_arguments(None, cu, 1, Tq, T, q.device)
    plan = local_plan(q, k, log_f, layout=layout, block_m=tiles[0], block_n=tiles[1])

    # forward (per query tile) and backward (per key tile) ranges describe the same pairs
    m = torch.arange(plan.num_q_tiles)[None, None, :, None]
    by_keys = (m >= plan.q_begin[:, :, None, :]) & (m < plan.q_end[:, :, None, :])
    assert torch.equal(by_keys, plan.to_dense())
    assert (plan.kept_tiles() <= plan.paper_kept_tiles()).all()  # never keeps more than the paper's rule

    pruned = attention_mass_pruned(q.transpose(1, 2), k.transpose(1, 2), plan.spec.decay,
                                   sm_scale=16 ** -0.5, spec=plan.spec, plan=plan)
    assert float(pruned.max()) <= math.exp(LOG_EPS)
    dense = forgetting_attention(q, k, v, log_f, cu_seqlens=cu, backend="reference")
    out = forgetting_attention(q, k, v, log_f, cu_seqlens=cu, backend="torch", acp_plan=plan)
    assert float((out - dense).abs().max()) <= 2 * math.exp(LOG_EPS) * float(v.abs().max())


def test_local_rule_gradients_match_the_reference_on_its_plan():
    torch.manual_seed(0)
    q, k, v, log_f = make_inputs(1, 130, 4, 16, Hkv=2, dtype=torch.float64, gate_logit=-2.0)
    layout = SequenceLayout.causal(1, 130)
    plan = local_plan(q, k, log_f, layout=layout, block_m=16, block_n=16)
    assert 0 < plan.kept_fraction() < 0.5  # it prunes here
    grads = {}
    for backend in ("torch", "reference"):
        args = [t.clone().requires_grad_(True) for t in (q, k, v, log_f)]
        out = forgetting_attention(*args, backend=backend, acp_plan=plan)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[backend] = [out.detach()] + [a.grad for a in args]
    for name, a, b in zip(["out", "dq", "dk", "dv", "dlog_fgate"], grads["torch"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_local_rule_prunes_more_than_the_paper_and_reports_both():
    """QK-normed q and k (|q| = |k| = sqrt(D), as QK-norm makes them), one gate per head: the local
    rule keeps fewer tiles, and the stats carry the paper rule's kept fraction of the same call."""
    torch.manual_seed(0)
    T, H, D = 1024, 3, 32
    q = torch.nn.functional.normalize(torch.randn(1, T, H, D), dim=-1) * D ** 0.5
    k = torch.nn.functional.normalize(torch.randn(1, T, H, D), dim=-1) * D ** 0.5
    v = torch.randn(1, T, H, D)
    log_f = torch.log(torch.exp(-1 / torch.tensor([8.0, 32.0, 128.0]))).expand(1, T, H).contiguous()
    _, paper = forgetting_attention(q, k, v, log_f, adaptive_threshold="auto", backend="torch", return_stats=True)
    _, local = forgetting_attention(q, k, v, log_f, adaptive_threshold="auto", acp_rule="local",
                                    backend="torch", return_stats=True)
    assert local.paper_kept_fraction == paper.kept_fraction
    assert local.kept_fraction < 0.9 * paper.kept_fraction
    assert local.summary()["paper_kept_fraction"] == paper.kept_fraction
