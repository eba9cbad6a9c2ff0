"""Models: config validation, presets, decoding cache, loss, gradients, ACP, training (CPU, tiny)."""

import math

import pytest
import torch
import torch.nn.functional as F

from foxacp.models import (
    ARCHITECTURES,
    PRESETS,
    FoxCache,
    FoxConfig,
    FoxForCausalLM,
    chunked_cross_entropy,
    fgate_bias_values,
    preset_config,
)
from foxacp.ops import threshold_from_qk_norm

VOCAB = 97  # odd on purpose: the LM head is padded to 128 rows


def tiny(arch="fox-pro", **overrides):
    fields = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=None, num_key_value_heads=2,
                  fgate_bias_init="spread", fgate_min_decay=2.0, fgate_max_decay=256.0)
    fields.update(overrides)
    if not arch.startswith("fox-"):
        fields = {k: v for k, v in fields.items() if not k.startswith("fgate")}
    return FoxForCausalLM(preset_config(f"{arch}-tiny", **fields)).eval()


# ---------------------------------------------------------------------------- config and presets
@pytest.mark.parametrize("kwargs, message", [
    (dict(architecture="fox-gpt"), "architecture must be one of"),
    (dict(num_attention_heads=4, num_key_value_heads=3, hidden_size=64), "multiple of num_key_value_heads"),
    (dict(hidden_size=100, num_attention_heads=3), "divisible by num_attention_heads"),
    (dict(fgate_bias_init="random"), "fgate_bias_init"),
    (dict(fgate_min_decay=100.0, fgate_max_decay=10.0), "fgate_min_decay"),
    (dict(acp=True, architecture="transformer-pro"), "needs a forget gate"),
    (dict(acp_log_eps=0.5), "acp_log_eps"),
    (dict(architecture="transformer-llama", hidden_size=60, num_attention_heads=4), "even head_dim"),
    (dict(attention_backend="cuda"), "attention_backend"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FoxConfig(**kwargs)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("fox-pro-7b")


@pytest.mark.parametrize("name, paper_millions, non_embedding, intermediate", [
    ("fox-pro-125m", 125, 85_313_424, 1792),
    ("fox-llama-125m", 125, 85_064_592, 2048),
    ("transformer-pro-125m", 125, 85_202_688, 1792),
    ("transformer-llama-125m", 125, 84_953_856, 2048),  # 12 * (4 d^2 + 3 d 2048 + 2 d) + d
    ("fox-pro-360m", 360, 315_876_736, 2560),
    ("fox-llama-360m", 360, 308_725_120, 2816),
    ("transformer-pro-360m", 360, 315_483_136, 2560),
    ("transformer-llama-360m", 360, 308_331_520, 2816),
    ("fox-pro-760m", 760, 682_317_888, 3584),
    ("fox-llama-760m", 760, 680_437_824, 4096),
    ("transformer-pro-760m", 760, 680_547_840, 3584),
    ("transformer-llama-760m", 760, 679_552_512, 4096),
])
def test_preset_parameter_counts(name, paper_millions, non_embedding, intermediate):
    config = preset_config(name)
    assert config.vocab_size == 50257 and config.padded_vocab_size == 50304
    assert config.intermediate_size == intermediate
    with torch.device("meta"):
        counts = FoxForCausalLM(config).parameter_counts()
    assert counts["non_embedding"] == non_embedding
    assert counts["paper"] == non_embedding + 50257 * config.hidden_size
    # the paper's nominal sizes count the token embedding but not the LM head
    assert abs(counts["paper"] / 1e6 - paper_millions) / paper_millions < 0.025
    assert counts["total"] == counts["paper"] + 50257 * config.hidden_size


def test_preset_shapes():
    assert preset_config("transformer-pro-760m").num_attention_heads == 12
    assert preset_config("transformer-pro-760m").head_dim == 128
    assert preset_config("fox-pro-760m").head_dim == 64
    assert len(PRESETS) == 4 * 5
    for arch in ARCHITECTURES:
        cfg = preset_config(f"{arch}-125m")
        pro = arch.endswith("-pro")
        assert (cfg.use_qk_norm, cfg.use_kv_shift, cfg.use_output_gate) == (pro, pro, pro)
        assert cfg.uses_forget_gate == arch.startswith("fox-")


def test_cli_info_prints_presets(capsys):
    from foxacp.cli import main

    assert main(["info", "fox-pro-125m", "transformer-llama-tiny", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    import json

    rows = [json.loads(line) for line in lines]
    assert rows[0]["preset"] == "fox-pro-125m" and rows[0]["non_embedding"] == 85_313_424
    assert main(["info", "fox-pro-360m"]) == 0
    assert "367.34M" in capsys.readouterr().out


def test_fgate_spread_init_sets_decay_lengths():
    model = tiny("fox-pro", fgate_min_decay=4.0, fgate_max_decay=1024.0)
    bias = model.model.layers[1].self_attn.fgate_proj.bias.detach()
    lengths = 1.0 / (1.0 - torch.sigmoid(bias.double()))
    expected = torch.logspace(math.log10(4.0), math.log10(1024.0), 4, dtype=torch.float64)
    torch.testing.assert_close(lengths, expected, rtol=1e-5, atol=0)
    assert torch.equal(fgate_bias_values(2, 2.0, 2.0), torch.zeros(2))  # L = 2 is f = 0.5, bias 0
    zero = tiny("fox-pro", fgate_bias_init="zero")
    assert torch.count_nonzero(zero.model.layers[0].self_attn.fgate_proj.bias) == 0
    assert torch.count_nonzero(zero.lm_head.weight[VOCAB:]) == 0  # padded head rows start at zero


# ---------------------------------------------------------------------------- decoding cache
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_incremental_decoding_matches_full_forward(arch):
    model = tiny(arch)
    ids = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        full = model(ids).logits
        for chunks in ([1] * 37, [9, 1, 4, 7, 16]):
            cache, outs, pos = FoxCache(len(model.model.layers)), [], 0
            for n in chunks:
                out = model(ids[:, pos:pos + n], past_key_values=cache, use_cache=True)
                assert out.past_key_values is cache
                outs.append(out.logits)
                pos += n
            assert cache.get_seq_length() == 37
            torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-4)
    layer = cache[0]
    if arch.startswith("fox-"):
        assert layer.decay.dtype == torch.float32 and layer.decay.shape == (2, 37, 4)
        assert bool((layer.decay[:, 1:] <= layer.decay[:, :-1]).all())  # c is non-increasing
    if arch.endswith("-pro"):
        assert layer.shift_key.shape == (2, 2, 16)  # (B, Hkv, D)


@pytest.mark.parametrize("arch", ["fox-pro", "transformer-pro"])
def test_left_padded_prefill_and_decode_match_unpadded(arch):
    model = tiny(arch)
    lengths, T = [5, 12, 9], 12
    rows = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, T - len(row):] = row
        mask[b, T - len(row):] = 1
    extra = torch.randint(1, VOCAB, (3, 4))
    with torch.no_grad():
        cache = FoxCache(len(model.model.layers))
        pre = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        steps = []
        for t in range(4):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            steps.append(model(extra[:, t:t + 1], attention_mask=mask, past_key_values=cache, use_cache=True).logits)
        for b, row in enumerate(rows):
            ref = model(torch.cat([row, extra[b]])[None]).logits[0]
            n = len(row)
            torch.testing.assert_close(pre[b, T - n:], ref[:n], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(torch.cat(steps, 1)[b], ref[n:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_greedy_matches_argmax_loop(arch):
    model = tiny(arch)
    prompt = torch.randint(0, VOCAB, (2, 6))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_left_padded_batch_generate_equals_unpadded(arch):
    model = tiny(arch)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (3, 8, 5)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for b, p in enumerate(prompts):
        single = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[b, T - len(p):], single[0])


def test_generate_sampling_is_seeded():
    model = tiny("fox-pro")
    prompt = torch.randint(0, VOCAB, (3, 4))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=True, top_k=20,
                  temperature=0.9, pad_token_id=0)
    torch.manual_seed(1)
    a = model.generate(prompt, **kwargs)
    torch.manual_seed(1)
    b = model.generate(prompt, **kwargs)
    assert a.shape == (3, 12) and torch.equal(a, b) and int(a.max()) < VOCAB


# ---------------------------------------------------------------------------- loss
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_cross_entropy_matches_dense(chunk_size):
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(128, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (3, 11))
    targets[0, :4] = -100
    loss = chunked_cross_entropy(hidden, weight, targets, vocab_size=VOCAB, chunk_size=chunk_size)
    loss.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2[:VOCAB].t()).reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)
    assert torch.count_nonzero(weight.grad[VOCAB:]) == 0
    total = chunked_cross_entropy(hidden.detach(), weight.detach(), targets, vocab_size=VOCAB, reduction="sum")
    torch.testing.assert_close(total.double(), ref.detach() * (targets != -100).sum(), rtol=1e-6, atol=1e-6)


def test_model_loss_follows_hf_label_convention():
    model = tiny("fox-llama")
    ids = torch.randint(0, VOCAB, (2, 20))
    labels = ids.clone()
    labels[1, :5] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert out.logits.shape == (2, 20, VOCAB)
    shifted = model(ids[:, :-1], shift_labels=labels[:, 1:], return_logits=False)
    assert shifted.logits is None
    torch.testing.assert_close(shifted.loss, ref, rtol=1e-5, atol=1e-6)
    summed = model(ids, labels=labels, return_logits=False, num_items_in_batch=10).loss
    torch.testing.assert_close(summed, ref * (labels[:, 1:] != -100).sum() / 10, rtol=1e-5, atol=1e-6)
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, VOCAB)


# ---------------------------------------------------------------------------- gradients and training
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_parameter_gets_a_gradient(arch):
    model = tiny(arch, acp=arch.startswith("fox-")).train()
    ids = torch.randint(0, VOCAB, (2, 24))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, VOCAB, (2, 16))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        model = tiny("fox-pro", activation_checkpointing=checkpointing).train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
    model = tiny("transformer-pro").train()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert model.model.gradient_checkpointing
    model(ids, labels=ids).loss.backward()


def test_param_groups_decay_matrices_only():
    model = tiny("fox-pro")
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(skipped) and len(decayed) + len(skipped) == len(names)
    assert "model.embed_tokens.weight" in decayed and "lm_head.weight" in decayed
    assert "model.layers.0.self_attn.fgate_proj.weight" in decayed
    assert all(n.endswith("norm.weight") or n.endswith("fgate_proj.bias") for n in skipped), skipped
    assert "model.layers.0.self_attn.fgate_proj.bias" in skipped and "model.norm.weight" in skipped


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_trains(arch):
    torch.manual_seed(0)
    model = tiny(arch).train()
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=3e-3)
    ids = torch.randint(0, VOCAB, (4, 32))
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("arch", ["fox-pro", "transformer-llama"])
def test_packed_sequences_match_separate_ones(arch):
    model = tiny(arch)
    lengths = [7, 13, 4]
    seqs = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    cu = torch.tensor([0, 7, 20, 24], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], cu_seqlens=cu).logits[0]
        for s, seq in zip(cu[:-1].tolist(), seqs):
            torch.testing.assert_close(packed[s:s + len(seq)], model(seq[None]).logits[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- ACP
def _fast_forgetting(model, bias=-2.0):
    for layer in model.model.layers:
        layer.self_attn.fgate_proj.bias.data.fill_(bias)  # f ~ 0.12: ACP prunes most far tiles
    return model


@pytest.mark.parametrize("arch", ["fox-pro", "fox-llama"])
def test_acp_on_vs_off_within_bound(arch):
    T = 320
    ids = torch.randint(0, VOCAB, (2, T))
    dense = _fast_forgetting(tiny(arch, acp=False))
    pruned = _fast_forgetting(tiny(arch, acp=True))
    pruned.load_state_dict(dense.state_dict())
    pruned.collect_acp_stats(True)
    with torch.no_grad():
        logits_dense = dense(ids).logits
        logits_pruned = pruned(ids).logits
    # Each attention output moves by <= 2 eps max|v| (eps = e^-10); through 2 layers the logits
    # move by a small multiple of that.
    assert (logits_dense - logits_pruned).abs().max() < 1e-3
    stats = pruned.acp_stats()
    assert len(stats) == 2 and all(s is not None for s in stats)
    assert all(s.kept_fraction < 0.8 for s in stats), [s.kept_fraction for s in stats]
    summary = pruned.acp_summary()
    assert 0 < summary["kept_fraction"] < 0.8 and summary["flops_saved_fraction"] > 0.2
    thresholds = pruned.acp_thresholds(T)
    if arch == "fox-pro":
        attn = pruned.model.layers[0].self_attn
        expected = threshold_from_qk_norm(attn.q_norm.weight, attn.k_norm.weight, 16, T, -10.0)
        assert thresholds[0].shape == (4,) and torch.equal(thresholds[0], expected)
    else:
        assert thresholds == ["auto", "auto"]
    assert dense.acp_stats() == [None, None]


def test_acp_attention_error_within_eps_bound(monkeypatch):
    """A layer's forgetting-attention output moves by <= 2 eps max|v| with ACP (QK-norm threshold)."""
    import foxacp.models.attention as attention_module
    from foxacp.models.attention import AttentionContext

    model = _fast_forgetting(tiny("fox-pro", acp=True), bias=-1.0)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_norm.weight.mul_(2.0)  # larger scores: a tighter threshold, still a valid bound
    original = attention_module.forgetting_attention
    captured = []

    def spy(q, k, v, log_f, **kwargs):
        out, stats = original(q, k, v, log_f, **{**kwargs, "return_stats": True})
        dense = original(q, k, v, log_f, **{**kwargs, "adaptive_threshold": None, "return_stats": False})
        captured.append((out, dense, v, stats))
        return out
    monkeypatch.setattr(attention_module, "forgetting_attention", spy)
    with torch.no_grad():
        attn(torch.randn(2, 256, 64), AttentionContext())
    out, dense, v, stats = captured[0]
    eps = math.exp(attn.config.acp_log_eps)
    assert (out - dense).abs().max() <= 2 * eps * v.abs().max() + 1e-6
    assert stats.kept_fraction < 1.0


@pytest.mark.parametrize("acp_decode", [False, True])
def test_acp_decoding_matches_full_forward(acp_decode, monkeypatch):
    """Prefill + single-token steps match one full forward; the steps prune only with acp_decode."""
    import foxacp.models.attention as attention_module

    model = _fast_forgetting(tiny("fox-pro", acp=True, acp_decode=acp_decode))
    step_thresholds = []
    attend = attention_module.forgetting_attention

    def spy(q, *args, **kwargs):
        if q.shape[1] == 1:
            step_thresholds.append(kwargs["adaptive_threshold"])
        return attend(q, *args, **kwargs)

    monkeypatch.setattr(attention_module, "forgetting_attention", spy)
    ids = torch.randint(0, VOCAB, (1, 150))
    with torch.no_grad():
        full = model(ids).logits
        cache = FoxCache(2)
        first = model(ids[:, :130], past_key_values=cache, use_cache=True).logits
        rest = [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(130, 150)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, rtol=1e-3, atol=1e-3)
    assert len(step_thresholds) == 2 * 20  # 2 layers x 20 steps
    assert all((t is not None) == acp_decode for t in step_thresholds)


def test_runtime_switches():
    model = tiny("fox-pro")
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        base = model(ids).logits
        model.set_attention_backend("reference")
        torch.testing.assert_close(model(ids).logits, base, rtol=1e-5, atol=1e-5)
        model.set_acp(True, log_eps=-12.0, decode=True)
        assert model.config.acp and model.config.acp_decode and model.acp_thresholds(16)[0].shape == (4,)
        torch.testing.assert_close(model(ids).logits, base, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="forget gate"):
        tiny("transformer-llama").set_acp(True)
    with pytest.raises(ValueError, match="attention_backend"):
        model.set_attention_backend("flash")
