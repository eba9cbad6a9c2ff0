"""The preallocated decoding path (StaticFoxCache, captured as a CUDA graph on GPUs) gives the same
greedy tokens as the default FoxCache path; on CPU its steps run uncaptured."""

import pytest
import torch

from foxacp.models import FoxCache, StaticFoxCache
from foxacp.models.modeling import CACHE_NAME
from test_generation import VOCAB, left_padded, tiny


@pytest.mark.parametrize("arch", ["fox-pro", "transformer-pro", "fox-llama"])
def test_static_cache_greedy_equals_the_default_cache(arch):
    model = tiny(arch)
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,)) for n in (3, 8, 5)])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    default = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static.sequences, default.sequences)
    cache = getattr(static, CACHE_NAME)
    assert isinstance(cache, StaticFoxCache) and cache.get_seq_length() == ids.shape[1] + 7


def test_static_cache_beam_search_equals_the_default_cache():
    model = tiny("fox-pro")
    prompt = torch.randint(1, VOCAB, (2, 6))
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0)
    static = model.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(static, model.generate(prompt, **kwargs))


def test_static_cache_steps_match_the_default_cache_and_check_their_input():
    model = tiny("fox-pro")
    ids = torch.randint(1, VOCAB, (2, 9))
    new = torch.randint(1, VOCAB, (2, 3))
    default, static = FoxCache(2), StaticFoxCache(model.config, batch_size=2, max_length=12)
    with torch.no_grad():
        prefill = model(ids, past_key_values=static).logits
        torch.testing.assert_close(prefill, model(ids, past_key_values=default).logits)
        for t in range(3):
            torch.testing.assert_close(model(new[:, t:t + 1], past_key_values=static).logits,
                                       model(new[:, t:t + 1], past_key_values=default).logits, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="full"):
            model(new[:, :1], past_key_values=static)
        with pytest.raises(ValueError, match=r"input_ids of shape \(2, 1\)"):
            model(new, past_key_values=static)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        static.crop(-1)


def test_generate_captures_decoding_by_default_on_cuda_only(monkeypatch):
    from transformers import GenerationConfig
    from transformers.generation import GenerationMode

    model = tiny("fox-pro")
    greedy = GenerationConfig(do_sample=False)
    assert not model._captures_decoding(greedy, None)  # CPU: nothing to capture
    assert model._captures_decoding(GenerationConfig(cache_implementation="static"), None)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    assert model._captures_decoding(greedy, None)  # transformers 4 passes the assistant model (None)
    assert model._captures_decoding(greedy, GenerationMode.BEAM_SEARCH)  # transformers 5 passes the mode
    assert not model._captures_decoding(GenerationConfig(cache_implementation="dynamic"), None)
    assert not model._captures_decoding(GenerationConfig(prompt_lookup_num_tokens=3), None)  # needs crop()
    assert not model._captures_decoding(greedy, GenerationMode.ASSISTED_GENERATION)
    assert not model._captures_decoding(GenerationConfig(output_hidden_states=True), None)


def test_unsupported_cache_implementation_raises():
    model = tiny("fox-pro")
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(torch.randint(1, VOCAB, (1, 4)), max_new_tokens=2, cache_implementation="quantized",
                       pad_token_id=0)
