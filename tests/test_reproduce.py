"""benchmarks/reproduce.py (issue 14's driver) end to end at toy size: every stage on CPU with gloo
processes, the outputs small, well-formed and where the report links them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("corpus", "train", "parity", "analysis", "eval", "throughput", "scaling")


def test_reproduce_toy_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    args = [sys.executable, str(REPO / "benchmarks" / "reproduce.py"), "--toy", "--out", str(out),
            "--work", str(tmp_path / "work")]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert {k: v["status"] for k, v in summary["stages"].items()} == dict.fromkeys(STAGES, "done")
    for stage in STAGES:
        assert json.loads((out / f"{stage}.json").read_text()) == summary[stage]
    corpus, train = summary["corpus"], summary["train"]
    assert corpus["documents"] == corpus["train_documents"] + corpus["val_documents"]
    assert corpus["tokens"] == corpus["train_tokens"] + corpus["val_tokens"] > 0
    assert train["schedule"]["planned_steps"] == train["steps"] == len(train["curve"])
    assert all(0 <= p["attention_pruned"] <= 1 and 0 <= p["total_pruned"] <= p["attention_pruned"]
               for p in train["curve"])
    assert summary["parity"]["acp_on_vs_off"]["steps"] == [1, summary["parity"]["steps"]]
    assert set(summary["throughput"]["rows"]) == {"fox_acp", "fox_dense", "transformer"}
    assert summary["scaling"]["scaling"][0]["tokens_per_s"].keys() == {"1", "2"}
    assert summary["scaling"]["reshard"][0]["gap"]["max_abs_diff"] < 1e-3  # float32: summation order only
    assert summary["eval"]["max_abs_token_loss_difference"] < 1e-3

    report = (out / "report.md").read_text()
    for section in ("## Corpus", "## 1. Attention FLOPs pruned over training", "## 2. Per-head savings",
                    "## 4. Loss", "## 5. Throughput with learned gates", "## 6. Scaling",
                    "## What differs from the paper"):
        assert section in report
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):  # every figure the report shows exists
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link

    files = [p for p in out.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 30e6
    assert all(len(p.relative_to(out).parts) <= 2 and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)


def test_reproduce_bad_arguments_name_the_argument(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    for bad, name in ((["--train-min", "30", "--deadline-min", "24"], "--train-min"),
                      (["--stages", "train,plots"], "--stages"), (["--gpus", "0"], "--gpus")):
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reproduce.py"), "--device", "cpu",
                               "--out", str(tmp_path / "o"), *bad], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 2 and name in done.stderr, done.stderr
