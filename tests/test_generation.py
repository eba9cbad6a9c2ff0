"""generate() through the FoxCache: every decoding step feeds only the new token(s), on every
supported transformers (CI runs this file on the newest and on the lowest one); beam search,
cropping and prompt-lookup decoding give the same tokens as the uncached reference."""

from contextlib import contextmanager

import pytest
import torch
from transformers import Cache, DynamicCache

from foxacp.models import FoxCache, FoxForCausalLM, preset_config
from foxacp.models.modeling import CACHE_NAME

VOCAB = 97
ARCHS = ["fox-pro", "transformer-pro"]  # FoX with KV-shift, and RoPE + KV-shift


def tiny(arch: str) -> FoxForCausalLM:
    fields = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=None, num_key_value_heads=2)
    if arch.startswith("fox-"):
        fields.update(fgate_bias_init="spread", fgate_min_decay=2.0, fgate_max_decay=256.0)
    return FoxForCausalLM(preset_config(f"{arch}-tiny", **fields)).eval()


@contextmanager
def recorded_steps(model: FoxForCausalLM):
    """Yield a list that fills with ``(cached, new)`` for every forward of ``model.model``: positions
    already in the cache and positions fed in that call."""
    steps = []

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        fed = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        steps.append((cache.get_seq_length() if cache is not None else 0, fed.shape[1]))

    handle = model.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield steps
    finally:
        handle.remove()


def assert_incremental(steps, prompt_length: int, max_new_per_step: int = 1, crops: bool = False):
    """The prefill feeds the prompt into an empty cache; every later call continues the cache of the
    previous one (less what was cropped, where ``crops``) and feeds at most ``max_new_per_step`` tokens."""
    assert steps[0] == (0, prompt_length), steps[:3]
    assert len(steps) > 1
    for (cached, fed), (next_cached, next_fed) in zip(steps, steps[1:]):
        assert next_cached > 0 and 1 <= next_fed <= max_new_per_step, steps
        assert next_cached <= cached + fed if crops else next_cached == cached + fed, steps


def left_padded(prompts):
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    return ids, mask


MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_steps_feed_only_new_tokens(arch, mode):
    model = tiny(arch)
    prompt = torch.randint(1, VOCAB, (2, 7))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, pad_token_id=0, **MODES[mode])
    torch.manual_seed(1)
    with recorded_steps(model) as steps:
        out = model.generate(prompt, **kwargs)
    assert_incremental(steps, prompt.shape[1])
    assert len(steps) == 6  # the prefill gives the first token, one step per further token
    torch.manual_seed(1)
    with recorded_steps(model) as uncached:
        reference = model.generate(prompt, use_cache=False, **kwargs)
    assert [fed for _, fed in uncached] == list(range(7, 13))  # the reference re-reads everything
    assert torch.equal(out, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_feeds_only_new_tokens(arch):
    model = tiny(arch)
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,)) for n in (3, 8, 5)])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with recorded_steps(model) as steps:
        batch = model.generate(ids, **kwargs)
    assert_incremental(steps, ids.shape[1])
    assert torch.equal(batch, model.generate(ids, use_cache=False, **kwargs))


def test_generate_continues_from_a_returned_cache():
    model = tiny("fox-pro")
    prompt = torch.randint(1, VOCAB, (2, 7))
    kwargs = dict(do_sample=False, pad_token_id=0)
    full = model.generate(prompt, max_new_tokens=8, **kwargs)
    first = model.generate(prompt, max_new_tokens=4, return_dict_in_generate=True, **kwargs)
    cache = getattr(first, CACHE_NAME)
    assert isinstance(cache, FoxCache) and cache.get_seq_length() == 10  # the last token is not fed yet
    with recorded_steps(model) as steps:
        second = model.generate(first.sequences, max_new_tokens=4, **{CACHE_NAME: cache}, **kwargs)
    assert steps == [(10, 1), (11, 1), (12, 1), (13, 1)]
    assert torch.equal(second, full)


def test_generate_from_inputs_embeds_feeds_only_new_tokens():
    model = tiny("fox-pro")
    prompt = torch.randint(1, VOCAB, (2, 7))
    kwargs = dict(do_sample=False, pad_token_id=0, max_new_tokens=4, attention_mask=torch.ones_like(prompt))
    with recorded_steps(model) as steps:
        out = model.generate(inputs_embeds=model.get_input_embeddings()(prompt), **kwargs)
    assert steps == [(0, 7), (7, 1), (8, 1), (9, 1)]
    assert torch.equal(out, model.generate(prompt, **kwargs)[:, 7:])


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_lookup_decoding_equals_greedy(arch):
    model = tiny(arch)
    prompt = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]])  # repeats: the lookup finds drafts
    # eos given: transformers 4.56's prompt lookup fails without one
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=VOCAB - 1)
    greedy = model.generate(prompt, **kwargs)
    with recorded_steps(model) as steps:
        drafted = model.generate(prompt, prompt_lookup_num_tokens=3, **kwargs)
    assert torch.equal(drafted, greedy)
    assert steps[0][0] == 0
    assert_incremental([(0, prompt.shape[1])] + steps[1:], prompt.shape[1], max_new_per_step=4, crops=True)
    assert any(fed > 1 for _, fed in steps[1:]), steps  # drafts were verified in one call
    crops = [c + f - nc for (c, f), (nc, _) in zip(steps, steps[1:])]
    assert any(n > 0 for n in crops), steps  # and rejected ones were cropped away


def prefilled(model, ids, chunks=(1,), mask=None, **cache_kwargs) -> FoxCache:
    """A cache filled with ``ids`` in one prefill, then in calls of ``chunks`` positions each."""
    cache = FoxCache(model.config.num_hidden_layers, **cache_kwargs)
    head = ids.shape[1] - sum(chunks)
    with torch.no_grad():
        model(ids[:, :head], attention_mask=None if mask is None else mask[:, :head], past_key_values=cache)
        for n in chunks:
            head += n
            model(ids[:, head - n:head], attention_mask=None if mask is None else mask[:, :head],
                  past_key_values=cache)
    return cache


def next_logits(model, cache: FoxCache, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("arch", ARCHS + ["fox-llama"])
def test_crop_equals_the_shorter_cache(arch):
    model = tiny(arch)
    ids = torch.randint(1, VOCAB, (2, 20))
    new = torch.randint(1, VOCAB, (2, 3))
    reference = next_logits(model, prefilled(model, ids[:, :14]), new)
    for length in (-6, 14):  # transformers 5 passes -removed, 4 the length to keep
        cache = prefilled(model, ids, chunks=(4, 1, 1))  # the cut spans several calls
        cache.crop(length)
        assert cache.get_seq_length() == 14
        torch.testing.assert_close(next_logits(model, cache, new), reference, rtol=1e-4, atol=1e-4)
    cache = prefilled(model, ids)
    cache.crop(0)
    assert cache.get_seq_length() == 20
    cache.crop(-20)
    assert cache.get_seq_length() == 0 and cache.memory_bytes() == 0
    with torch.no_grad():
        torch.testing.assert_close(next_logits(model, cache, ids), model(ids).logits, rtol=1e-4, atol=1e-4)


def test_crop_past_max_crop_raises():
    model = tiny("fox-pro")
    cache = prefilled(model, torch.randint(1, VOCAB, (1, 12)), max_crop=4)
    cache.crop(-4)
    with pytest.raises(ValueError, match="at most max_crop=4"):
        cache.crop(-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_reorder_and_repeat_select_batch_rows(arch):
    model = tiny(arch)
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,)) for n in (9, 4, 7)])
    new = torch.randint(1, VOCAB, (3, 2))
    rows = torch.tensor([2, 0, 0])
    cache = prefilled(model, ids, chunks=(1, 1), mask=mask)
    cache.reorder_cache(rows)
    reference = next_logits(model, prefilled(model, ids[rows], chunks=(1, 1), mask=mask[rows]), new[rows])
    torch.testing.assert_close(next_logits(model, cache, new[rows]), reference, rtol=1e-4, atol=1e-4)
    cache = prefilled(model, ids[:2], chunks=(1,), mask=mask[:2])
    cache.batch_repeat_interleave(2)
    twice = torch.tensor([0, 0, 1, 1])
    reference = next_logits(model, prefilled(model, ids[twice], chunks=(1,), mask=mask[twice]), new[twice % 3])
    torch.testing.assert_close(next_logits(model, cache, new[twice % 3]), reference, rtol=1e-4, atol=1e-4)


def test_fox_cache_is_a_transformers_cache():
    model = tiny("fox-pro")
    assert isinstance(FoxCache(2), Cache)
    ids = torch.randint(1, VOCAB, (1, 5))
    with pytest.raises(TypeError, match="must be a foxacp FoxCache"):
        model(ids, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="not both"):
        model(ids, past_key_values=FoxCache(2), cache=FoxCache(2))
    cache = FoxCache(2)
    out = model(ids, cache=cache, use_cache=True)  # transformers >= 5.24's name works on every version
    assert cache.get_seq_length() == 5 and getattr(out, CACHE_NAME) is cache


def test_cache_decay_continues_the_one_shot_decay():
    """The gate cumsum a cache continues step by step (``initial`` = its last value) is the one
    :func:`foxacp.ops.cumulative_decay` takes over the whole sequence at once, left padding included."""
    from foxacp.ops import cumulative_decay
    from foxacp.ops.layout import SequenceLayout

    gates = torch.nn.functional.logsigmoid(torch.randn(2, 3, 40) + 2)
    seq_start = torch.tensor([0, 7])
    whole, _ = cumulative_decay(gates, SequenceLayout.left_padded(seq_start, 40))
    parts = [cumulative_decay(gates[..., :25], SequenceLayout.left_padded(seq_start, 25))[0]]
    for t in range(25, 40):
        parts.append(cumulative_decay(gates[..., t:t + 1], SequenceLayout.left_padded(seq_start, t + 1),
                                      initial=parts[-1][..., -1])[0])
    torch.testing.assert_close(torch.cat(parts, dim=-1), whole, rtol=0, atol=1e-5)
    assert torch.equal(whole[1, :, :7], torch.zeros(3, 7))  # padding does not decay

    model = tiny("fox-pro")
    prompt, mask = left_padded([torch.randint(1, VOCAB, (n,)) for n in (30, 23)])
    one_shot, stepped = FoxCache(model.config.num_hidden_layers), FoxCache(model.config.num_hidden_layers)
    with torch.no_grad():
        model(prompt, attention_mask=mask, past_key_values=one_shot, use_cache=True)
        model(prompt[:, :20], attention_mask=mask[:, :20], past_key_values=stepped, use_cache=True)
        for t in range(20, 30):
            model(prompt[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=stepped, use_cache=True)
    for a, b in zip(one_shot.layers, stepped.layers):
        torch.testing.assert_close(b.decay, a.decay, rtol=0, atol=1e-5)


def test_cumulative_decay_rejects_what_it_cannot_continue():
    from foxacp.ops import cumulative_decay
    from foxacp.ops.layout import SequenceLayout

    gates = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="initial must have shape"):
        cumulative_decay(gates, initial=torch.zeros(2))
    with pytest.raises(ValueError, match="packed layout"):
        cumulative_decay(gates, SequenceLayout.packed(torch.tensor([0, 2, 5]), 5), initial=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="more than the layout"):
        cumulative_decay(gates, SequenceLayout.causal(1, 3))
