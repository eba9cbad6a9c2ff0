"""The captured decoding path on a GPU: a StaticFoxCache step recorded as a CUDA graph gives the
logits of the FoxCache path, and generate() uses it by default on CUDA. Skipped without CUDA."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from foxacp.models import FoxCache, FoxForCausalLM, StaticFoxCache, preset_config  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["fox-pro", "transformer-pro", "fox-llama"])
def test_captured_steps_match_the_default_cache(arch, dtype):
    torch.manual_seed(0)
    extra = dict(fgate_bias_init="spread") if arch.startswith("fox-") else {}
    config = preset_config(f"{arch}-small", num_key_value_heads=2, **extra)
    model = FoxForCausalLM(config).cuda().to(dtype).eval()
    ids = torch.randint(1, config.vocab_size, (3, 300), device="cuda")
    new = torch.randint(1, config.vocab_size, (3, 6), device="cuda")
    default, static = FoxCache(config.num_hidden_layers), StaticFoxCache(config, 3, 320, device="cuda", dtype=dtype)
    tol = 1e-2 if dtype == torch.float32 else 6e-2
    with torch.no_grad():
        model(ids, past_key_values=default)
        model(ids, past_key_values=static)
        for t in range(6):
            want = model(new[:, t:t + 1], past_key_values=default).logits.float()
            got = model(new[:, t:t + 1], past_key_values=static).logits.float()
            assert (got - want).norm() / want.norm() < tol, t
    assert static.decode_graph is not None  # steps 2.. replayed the graph


def test_generate_with_a_static_cache_replays_a_graph():
    from foxacp.models.modeling import CACHE_NAME

    torch.manual_seed(0)
    config = preset_config("fox-pro-small", fgate_bias_init="spread")
    model = FoxForCausalLM(config).cuda().eval()
    prompt = torch.randint(1, config.vocab_size, (2, 64), device="cuda")
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = model.generate(prompt, return_dict_in_generate=True, **kwargs)  # captured by default on CUDA
    cache = getattr(out, CACHE_NAME)
    assert isinstance(cache, StaticFoxCache) and cache.decode_graph is not None
    assert out.sequences.shape == (2, 76) and cache.get_seq_length() == 75
    # the prefill is the uncaptured path's, so the first token agrees (later ones may differ only on near-ties)
    uncaptured = model.generate(prompt, cache_implementation="dynamic", **kwargs)
    assert torch.equal(out.sequences[:, :65], uncaptured[:, :65])
