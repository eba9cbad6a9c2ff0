"""EleutherAI lm-eval-harness on a foxacp model through the HF wrapper, offline, on a local toy task.

Skipped unless ``lm_eval`` is installed (``pip install "lm-eval[hf]"``: about 50 packages, so it
is not a foxacp dependency). See docs/lm-eval.md.
"""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

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


def test_lm_eval_hf_toy_task(tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from foxacp.models.hf_tokenizer import save_hf_tokenizer
    from foxacp.models import FoxForCausalLM, preset_config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    config = preset_config("fox-pro-tiny", vocab_size=257, bos_token_id=256, eos_token_id=256, acp=True,
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

    results = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=["foxacp_toy"],
                              task_manager=TaskManager(include_path=str(tasks)), device="cpu", batch_size=2)
    acc = results["results"]["foxacp_toy"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert results["samples"] is None or len(results["samples"]["foxacp_toy"]) == 4
