"""EleutherAI lm-eval-harness on a foxacp model through the HF wrapper and ``foxacp lm-eval``,
offline, on a local toy task.

The argument tests always run; the harness tests are skipped unless ``lm_eval`` is installed (the
``eval`` extra, ``pip install 'foxacp[eval]'``: about 50 packages; ``make test`` installs it, the
minimum-versions venv does not). See docs/lm-eval.md.
"""

import json

import pytest
import torch

from foxacp.analysis.lm_eval_cli import lm_eval_args

TASK_YAML = """\
task: foxacp_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


BOS = 256


def _toy(tmp_path, monkeypatch):
    """A random tiny FoX (Pro, ACP on) folder with the bytes tokenizer and a 4-document task folder."""
    from foxacp.models.hf_tokenizer import save_hf_tokenizer
    from foxacp.models import FoxForCausalLM, preset_config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    config = preset_config("fox-pro-tiny", vocab_size=257, bos_token_id=BOS, eos_token_id=BOS, acp=True,
                           fgate_bias_init="spread", fgate_min_decay=2, fgate_max_decay=64)
    FoxForCausalLM(config).save_pretrained(model_dir)
    save_hf_tokenizer("bytes", model_dir)

    data = tmp_path / "toy.jsonl"
    rows = [{"question": f"Is {a} plus {b} equal to", "choices": [f" {a + b}", f" {a + b + 1}"], "answer": 0}
            for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "foxacp_toy.yaml").write_text(TASK_YAML.format(data=data))
    return model_dir, tasks


def test_lm_eval_hf_toy_task(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_dir, tasks = _toy(tmp_path, monkeypatch)
    results = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=["foxacp_toy"],
                              task_manager=TaskManager(include_path=str(tasks)), device="cpu", batch_size=2)
    acc = results["results"]["foxacp_toy"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert results["samples"] is None or len(results["samples"]["foxacp_toy"]) == 4


def _encodings(monkeypatch):
    """Every token list lm-eval's hf model encodes, recorded."""
    from lm_eval.models.huggingface import HFLM

    seen = []
    encode = HFLM.tok_encode

    def recording(self, *args, **kwargs):
        ids = encode(self, *args, **kwargs)
        seen.append(list(ids))
        return ids

    monkeypatch.setattr(HFLM, "tok_encode", recording)
    return seen


@pytest.mark.parametrize("user_bos", [None, False])
def test_foxacp_lm_eval_command(tmp_path, monkeypatch, user_bos):
    """``foxacp lm-eval`` runs the toy task; BOS leads every encoded text unless the user turns it off."""
    pytest.importorskip("lm_eval")
    from foxacp.cli import main

    model_dir, tasks = _toy(tmp_path, monkeypatch)
    seen = _encodings(monkeypatch)
    model_args = f"pretrained={model_dir},dtype=float32" + ("" if user_bos is None else f",add_bos_token={user_bos}")
    out = tmp_path / "out"
    code = main(["lm-eval", "--model", "hf", "--model_args", model_args, "--tasks", "foxacp_toy",
                 "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2", "--output_path", str(out)])
    assert code == 0
    [written] = out.rglob("results_*.json")
    results = json.loads(written.read_text())
    assert 0.0 <= results["results"]["foxacp_toy"]["acc,none"] <= 1.0
    want = user_bos is None  # on unless the user's model_args turn it off
    assert seen and all((ids[0] == BOS) is want for ids in seen)


def test_lm_eval_args_bos():
    """``add_bos_token=True`` joins the ``--model_args`` of hf runs that do not set it, and nowhere else."""
    bos = "add_bos_token=True"
    assert lm_eval_args(["--model", "hf", "--tasks", "t"]) == ["--model", "hf", "--tasks", "t", "--model_args", bos]
    assert lm_eval_args(["run", "--model_args=pretrained=m"]) == ["run", f"--model_args=pretrained=m,{bos}"]
    assert lm_eval_args(["--", "-M", "hf", "-a", "pretrained=m", "dtype=float32"]) == \
        ["-M", "hf", "-a", f"pretrained=m,{bos}", "dtype=float32"]
    assert lm_eval_args(["--model_args", '{"pretrained": "m"}', "--tasks", "t"]) == \
        ["--model_args", '{"pretrained": "m", "add_bos_token": true}', "--tasks", "t"]
    for args in (["--model", "hf", "--model_args", "pretrained=m,add_bos_token=False"],
                 ["--model", "vllm", "--tasks", "t"], ["ls", "tasks"], ["run", "--help"], [],
                 ["--config", "eval.yaml"]):
        assert lm_eval_args(args) == args


def test_foxacp_lm_eval_without_lm_eval(monkeypatch, capsys):
    """No lm-eval: exit 2 and a message naming the extra."""
    import sys

    from foxacp.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)
    assert main(["lm-eval", "--model", "hf", "--tasks", "t"]) == 2
    assert "pip install 'foxacp[eval]'" in capsys.readouterr().err
