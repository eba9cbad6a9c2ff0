"""Hugging Face integration: Auto classes, save/load round trip, CLI generate."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from foxacp.models import FoxConfig, FoxForCausalLM, FoxModel, preset_config

VOCAB = 97


@pytest.mark.parametrize("arch", ["fox-pro", "transformer-llama"])
def test_save_load_round_trip_is_bitwise(tmp_path, arch):
    extra = dict(fgate_bias_init="spread", acp=True) if arch.startswith("fox-") else {}
    config = preset_config(f"{arch}-tiny", vocab_size=VOCAB, num_key_value_heads=2, bos_token_id=0,
                           eos_token_id=0, **extra)
    model = FoxForCausalLM(config).eval()
    with torch.no_grad():  # make every parameter distinct from its init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "foxacp" and saved["architecture"] == arch
    assert saved["num_key_value_heads"] == 2 and saved["intermediate_size"] == config.intermediate_size

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is FoxForCausalLM
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for key in ("architecture", "acp", "acp_log_eps", "fgate_bias_init", "use_qk_norm", "padded_vocab_size"):
        assert getattr(loaded.config, key) == getattr(config, key), key


def test_auto_classes_know_foxacp(tmp_path):
    config = AutoConfig.for_model("foxacp", architecture="fox-llama", hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    assert isinstance(config, FoxConfig) and config.intermediate_size == 256
    base = AutoModel.from_config(config)
    assert isinstance(base, FoxModel)
    lm = AutoModelForCausalLM.from_config(config)
    assert isinstance(lm, FoxForCausalLM) and lm.lm_head.weight.shape == (128, 32)
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(again.to_dict()) == strip(config.to_dict())


def test_auto_model_loads_after_a_plain_import_foxacp(tmp_path):
    FoxForCausalLM(preset_config("fox-pro-tiny", vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path)
    code = ("import sys, foxacp; assert 'transformers' not in sys.modules, 'import foxacp must stay light'; "
            "from transformers import AutoModelForCausalLM; "
            f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}); "
            "assert type(model).__name__ == 'FoxForCausalLM', type(model)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bf16_load_and_forward(tmp_path):
    model = FoxForCausalLM(preset_config("fox-pro-tiny", vocab_size=VOCAB, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path)
    loaded = FoxForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        out = loaded(ids, labels=ids)
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    reference = model(ids, labels=ids).loss
    assert abs(out.loss.item() - reference.item()) < 0.05


def test_cli_generate_from_saved_model(tmp_path, capsys):
    from foxacp.cli import main

    model = FoxForCausalLM(preset_config("fox-pro-tiny", vocab_size=VOCAB, bos_token_id=0, eos_token_id=None))
    model.save_pretrained(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    ids = [int(t) for t in out[0].split(",")]
    assert ids[:3] == [1, 2, 3] and len(ids) == 8
    with torch.no_grad():
        expected = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert ids == expected[0].tolist()
