"""ACP KV-cache eviction: keys dropped for good carry at most eps of any later query's attention
(the ACP bound), never-forgetting heads keep everything, and decoding stays within that bound."""

import math

import pytest
import torch

from foxacp.models import EvictingFoxCache, FoxCache, FoxForCausalLM, preset_config
from foxacp.models.attention import ForgettingAttentionLayer
from foxacp.models.modeling import CACHE_NAME
from foxacp.ops import threshold_from_qk_norm
from test_generation import VOCAB, left_padded, tiny

LOG_EPS = -10.0
# per query head: never forgets; forgets fast | two fast-forgetting heads (kv groups of 2 heads)
GATE_BIAS = [30.0, -4.0, -2.0, -1.0]


def adversarial_gates(model):
    for layer in model.modules():
        if isinstance(layer, ForgettingAttentionLayer):
            with torch.no_grad():
                layer.fgate_proj.weight.zero_()
                layer.fgate_proj.bias.copy_(torch.tensor(GATE_BIAS))
    return model


def decode(model, cache, ids, steps: int, record_queries=False):
    """Prefill ``ids`` then feed ``steps`` given tokens one at a time; the last step's logits (and
    the post-norm queries of each forgetting-attention layer in that step)."""
    queries = {}
    hooks = [layer.q_norm.register_forward_hook(lambda m, a, out, i=i: queries.__setitem__(i, out))
             for i, layer in enumerate(model.modules()) if isinstance(layer, ForgettingAttentionLayer)] \
        if record_queries else []
    with torch.no_grad():
        model(ids[:, :-steps], past_key_values=cache, use_cache=True)
        for t in range(ids.shape[1] - steps, ids.shape[1]):
            logits = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
    for hook in hooks:
        hook.remove()
    return logits, list(queries.values())


def test_evicted_keys_carry_at_most_eps_of_the_attention():
    model = adversarial_gates(tiny("fox-pro"))
    ids = torch.randint(1, VOCAB, (2, 90))
    evicting = model.acp_eviction_cache(max_length=90, log_eps=LOG_EPS, evict_every=1, page_size=1)
    full = FoxCache(model.config.num_hidden_layers)
    got, _ = decode(model, evicting, ids, steps=30)
    want, queries = decode(model, full, ids, steps=30, record_queries=True)
    eps = math.exp(LOG_EPS)
    modules = [m for m in model.modules() if isinstance(m, ForgettingAttentionLayer)]
    for layer, full_layer, q, module in zip(evicting.layers, full.layers, queries, modules):
        assert layer.start[0] == 0 and layer.kept()[0] == 90  # a never-forgetting head keeps every key
        assert 0 < layer.start[1] and layer.kept()[1] < 40  # the fast-forgetting group keeps a short window
        # exactly the keys ACP prunes for the last query in every row and head of the group
        delta = threshold_from_qk_norm(module.q_norm.weight, module.k_norm.weight, 16, 90, LOG_EPS)
        pruned = (full_layer.decay[:, -1:] - full_layer.decay < delta).sum(1)  # [B, H]
        assert layer.start == pruned.view(2, 2, 2).amin(dim=(0, 2)).tolist()
        # the mass the full cache's last query puts on the evicted keys (softmax of q.k/sqrt(D) + c_t - c_j)
        keys = full_layer.key.repeat_interleave(2, dim=2)  # [B, T, H, D]
        decay = (full_layer.decay[:, -1:] - full_layer.decay).transpose(1, 2)  # [B, H, T]
        scores = torch.einsum("bhd,bjhd->bhj", q[:, -1], keys) / 4 + decay
        weights = scores.softmax(-1)  # [B, H, T]
        for h in range(4):
            assert float(weights[:, h, :layer.start[h // 2]].sum(-1).max()) <= eps
    assert (got - want).abs().max() < 1e-3
    assert evicting.memory_bytes() < full.memory_bytes()


def test_generate_with_eviction_equals_the_full_cache():
    model = adversarial_gates(tiny("fox-pro"))
    prompt, mask = left_padded([torch.randint(1, VOCAB, (n,)) for n in (40, 31)])
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    cache = model.acp_eviction_cache(max_length=50, evict_every=4)
    assert torch.equal(model.generate(prompt, **{CACHE_NAME: cache}, **kwargs), model.generate(prompt, **kwargs))
    assert isinstance(cache, EvictingFoxCache) and cache.get_seq_length() == 49
    assert any(start > 0 for layer in cache.layers for start in layer.start)


def test_eviction_needs_forget_gate_and_qk_norm():
    with pytest.raises(ValueError, match="forget gate and QK-norm"):
        tiny("fox-llama").acp_eviction_cache(max_length=64)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        tiny("fox-pro").acp_eviction_cache(max_length=64).crop(-1)


def _cli_tokens(capsys, argv) -> list[list[int]]:
    """``foxacp generate`` (exit 0) and the token ids it printed, one list per sample."""
    from foxacp.cli import main

    assert main(argv) == 0
    out = capsys.readouterr().out
    return [[int(t) for t in line.split(",")] for line in out.splitlines() if line and line[0].isdigit()
            and "," in line], out


def test_cli_generate_acp_evict_matches_the_full_cache(tmp_path, capsys):
    adversarial_gates(tiny("fox-pro")).save_pretrained(tmp_path)
    prompt = ",".join(map(str, torch.randint(1, VOCAB, (70,), generator=torch.Generator().manual_seed(0)).tolist()))
    argv = ["generate", str(tmp_path), "--prompt-ids", prompt, "--max-new-tokens", "12", "--device", "cpu"]
    want, _ = _cli_tokens(capsys, argv)
    got, out = _cli_tokens(capsys, [*argv, "--acp-evict"])
    assert got == want and len(got) == 1 and len(got[0]) == 82
    kept = float(out.split("acp-evict: kept ")[1].split()[0])
    assert 0 < kept < 1 and "MiB" in out  # evicted after the prefill (>= evict_every=64)
    # sampling several rows at once goes through the same cache
    sampled = ["--num-samples", "2", "--temperature", "0.8", "--seed", "3"]
    assert _cli_tokens(capsys, [*argv, *sampled, "--acp-evict"])[0] == _cli_tokens(capsys, [*argv, *sampled])[0]


@pytest.mark.parametrize("extra", [["transformer-pro-tiny"], ["fox-llama-tiny"], ["fox-pro-tiny", "--acp"]])
def test_cli_generate_acp_evict_refuses_what_it_cannot_serve(extra, capsys):
    from foxacp.cli import main

    argv = ["generate", extra[0], "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--device", "cpu", "--acp-evict"]
    assert main([*argv, *extra[1:]]) == 2
    err = capsys.readouterr().err
    assert "--acp-evict" in err and "Traceback" not in err


def _stepwise_logits(model, cache, ids, mask, prompt: int, chunk: int = 1) -> torch.Tensor:
    """Logits of every position after ``prompt``, fed ``chunk`` tokens per call after the prompt."""
    out = []
    with torch.no_grad():
        model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache, use_cache=True)
        for t in range(prompt, ids.shape[1], chunk):
            end = min(t + chunk, ids.shape[1])
            out.append(model(ids[:, t:end], attention_mask=mask[:, :end], past_key_values=cache,
                             use_cache=True).logits)
    return torch.cat(out, dim=1)


# kv heads: one for all four query heads, GQA groups of 2, one per query head; chunk: tokens per call after the prompt
@pytest.mark.parametrize("kv_heads,page_size,chunk", [(1, 4, 1), (2, 16, 1), (2, 8, 5), (4, 4, 1), (4, 8, 5)])
def test_eviction_across_compactions_stays_within_the_bound(kv_heads, page_size, chunk):
    """Three left-padded rows, pages dropped and moved over many evictions, single tokens or chunks
    after the prompt: every logit within the bound of the full cache's; the kv head holding the
    never-forgetting query head keeps every position, the others keep a short window."""
    model = adversarial_gates(FoxForCausalLM(preset_config("fox-pro-tiny", vocab_size=VOCAB, bos_token_id=0,
                                                           eos_token_id=None, num_key_value_heads=kv_heads)).eval())
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,)) for n in (120, 111, 100)])
    evicting = model.acp_eviction_cache(max_length=120, log_eps=LOG_EPS, evict_every=8, page_size=page_size)
    got = _stepwise_logits(model, evicting, ids, mask, prompt=40, chunk=chunk)
    full = FoxCache(model.config.num_hidden_layers)
    want = _stepwise_logits(model, full, ids, mask, prompt=40)
    assert (got - want).abs().max() < 1e-3
    for layer in evicting.layers:
        assert layer.start[0] == 0 and layer.kept()[0] == 120
        if kv_heads > 1:
            assert all(kept < 40 for kept in layer.kept()[1:])
        # memory: the pool as allocated, within its headroom of the pages in use
        pools = [layer.keys, layer.values, layer.decays]
        assert layer.memory_bytes() >= sum(t.untyped_storage().nbytes() for t in pools)
        assert layer.keys.shape[0] <= layer.pages + 2 * (layer.pages // 16)
    if kv_heads > 1:  # (one kv head holds the never-forgetting query head: it keeps everything)
        assert evicting.memory_bytes() < full.memory_bytes()


def test_decoding_step_attends_all_heads_at_once_without_host_syncs(monkeypatch):
    """A decoding step of an evicting layer is two batched matmuls whatever the number of heads,
    reaches no other attention and reads nothing back to the host (eviction steps aside)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from foxacp.models import cache as cache_module

    calls = {"bmm": 0, "forgetting_attention": 0, "host": []}
    bmm, attend = cache_module._bmm_float32, cache_module.EvictingLayerCache.attend

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
                calls["host"].append(func)
            return func(*args, **(kwargs or {}))

    def counted_bmm(a, b):
        calls["bmm"] += 1
        return bmm(a, b)

    def watched_attend(self, *args):
        with HostReads():
            return attend(self, *args)

    model = adversarial_gates(FoxForCausalLM(preset_config("fox-pro-tiny", vocab_size=VOCAB, bos_token_id=0,
                                                           eos_token_id=None)).eval())  # 4 kv heads
    cache = model.acp_eviction_cache(max_length=200, evict_every=1000, page_size=8)
    ids = torch.randint(1, VOCAB, (2, 60))
    with torch.no_grad():
        model(ids[:, :50], past_key_values=cache, use_cache=True)
        for layer in cache.layers:  # several pages, some dropped, before the counted steps
            layer.evict()
        monkeypatch.setattr(cache_module, "_bmm_float32", counted_bmm)
        monkeypatch.setattr(cache_module, "forgetting_attention",
                            lambda *a, **k: calls.__setitem__("forgetting_attention", 1))
        monkeypatch.setattr(cache_module.EvictingLayerCache, "attend", watched_attend)
        for t in range(50, 60):
            model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
    layers = len(cache.layers)
    assert calls["bmm"] == 2 * layers * 10 and calls["forgetting_attention"] == 0
    assert calls["host"] == []
    assert all(layer.pages > layer.num_kv_heads for layer in cache.layers)


def test_beam_search_with_eviction_equals_the_full_cache():
    model = adversarial_gates(tiny("fox-pro"))
    prompt = torch.randint(1, VOCAB, (2, 40))
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    cache = model.acp_eviction_cache(max_length=48, evict_every=4, page_size=4)
    assert torch.equal(model.generate(prompt, **{CACHE_NAME: cache}, **kwargs), model.generate(prompt, **kwargs))


def test_eviction_cache_arguments_are_checked():
    model = tiny("fox-pro")
    for name in ("evict_every", "page_size"):
        with pytest.raises(ValueError, match=name):
            model.acp_eviction_cache(max_length=64, **{name: 0})
