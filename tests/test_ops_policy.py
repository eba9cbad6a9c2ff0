"""What the op does with bad values inside valid tensors: ACP never changes an output that the
dense path computes as finite, and inputs that break the ACP bound are refused by name."""

import pytest
import torch

from foxacp import forgetting_attention

from conftest import make_inputs


def both(q, k, v, log_f, **acp):
    dense = forgetting_attention(q, k, v, log_f, backend="torch")
    pruned = forgetting_attention(q, k, v, log_f, backend="torch", **acp)
    return dense, pruned


@pytest.mark.parametrize("rule", ["paper", "local"])
def test_nan_in_q_leaves_other_rows_as_dense(rule):
    q, k, v, log_f = make_inputs(2, 200, 4, 8, Hkv=2, gate_logit=-2.0)
    q[0, 150, 1, 3] = float("nan")
    dense, pruned = both(q, k, v, log_f, adaptive_threshold="auto", acp_rule=rule)
    finite = torch.isfinite(dense)
    assert (~finite).any() and finite.sum() > 0.9 * finite.numel()
    torch.testing.assert_close(pruned[finite], dense[finite], rtol=0, atol=1e-3)
    assert torch.equal(torch.isfinite(pruned), finite)


@pytest.mark.parametrize("rule", ["paper", "local"])
def test_nan_gate_leaves_earlier_rows_as_dense(rule):
    q, k, v, log_f = make_inputs(1, 300, 2, 8, gate_logit=-2.0)
    log_f[0, 200, 0] = float("nan")
    dense, pruned = both(q, k, v, log_f, adaptive_threshold=-8.0, acp_rule=rule)
    torch.testing.assert_close(pruned[:, :200], dense[:, :200], rtol=0, atol=1e-3)
    finite = torch.isfinite(dense)
    torch.testing.assert_close(pruned[finite], dense[finite], rtol=0, atol=1e-3)


def test_positive_log_fgate_is_refused_under_acp():
    q, k, v, log_f = make_inputs(1, 64, 2, 8)
    log_f[0, 10, 1] = 0.5
    forgetting_attention(q, k, v, log_f, backend="torch")  # dense: plain math, allowed
    with pytest.raises(ValueError, match="log_fgate must be <= 0"):
        forgetting_attention(q, k, v, log_f, backend="torch", adaptive_threshold=-5.0)


def test_increasing_cumulative_gate_is_refused_under_acp():
    q, k, v, log_f = make_inputs(1, 64, 2, 8)
    c = log_f.cumsum(1)
    c[0, 30, 0] += 5.0
    with pytest.raises(ValueError, match="cumulative_gate must be non-increasing"):
        forgetting_attention(q, k, v, c, backend="torch", adaptive_threshold=-5.0, cumulative_gate=True)


def test_empty_batch_and_meta_tensors_are_named():
    q, k, v, log_f = make_inputs(1, 16, 2, 8)
    with pytest.raises(ValueError, match="B >= 1"):
        forgetting_attention(q[:0], k[:0], v[:0], log_f[:0], backend="torch")
    meta = [t.to("meta") for t in (q, k, v, log_f)]
    with pytest.raises(ValueError, match="device 'meta'"):
        forgetting_attention(*meta)


def test_acp_plan_must_fit_the_call():
    q, k, v, log_f = make_inputs(1, 100, 2, 8, gate_logit=-2.0)
    _, stats = forgetting_attention(q, k, v, log_f, backend="torch", adaptive_threshold=-4.0, return_stats=True)
    out = forgetting_attention(q, k, v, log_f, backend="reference", acp_plan=stats.plan)
    torch.testing.assert_close(out, forgetting_attention(q, k, v, log_f, backend="torch", adaptive_threshold=-4.0))
    with pytest.raises(ValueError, match="acp_plan was made for"):
        forgetting_attention(q[:, :50], k[:, :50], v[:, :50], log_f[:, :50], backend="torch", acp_plan=stats.plan)
    with pytest.raises(TypeError, match="acp_plan must be"):
        forgetting_attention(q, k, v, log_f, backend="torch", acp_plan="plan")
