"""Trainer: config checks, schedule, exact resume (also after SIGKILL), signals, NaN stop,
2-process FSDP2 (gloo) equals 1 process, export to Hugging Face."""

import json
import math
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


from foxacp.train import checkpoint
from foxacp.train.config import OptimSection, load_config
from foxacp.train.optim import lr_at
from foxacp.train.trainer import Trainer, TrainingDiverged

from conftest import write_byte_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A small byte-level token store: 12 documents of pseudo-English."""
    return write_byte_store(tmp_path_factory.mktemp("corpus"), n_docs=12, words_per_doc=700)


def overrides(store_dir, out_dir, **extra):
    base = {
        "data.source": store_dir, "data.seq_len": 128, "data.val_fraction": 0.2, "model.preset": "fox-pro-tiny",
        "model.overrides.acp": True, "batch.global_tokens": 512, "batch.micro_batch": 2,
        "optim.warmup_tokens": 1024, "optim.total_tokens": 512 * 8, "optim.lr": 0.003, "run.out_dir": out_dir,
        "run.log_every": 1, "run.progress": False, "run.tensorboard": False, "run.eval_batches": 1,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def train(store_dir, out_dir, resume=False, **extra) -> list[dict]:
    trainer = Trainer(load_config(None, overrides(store_dir, out_dir, **extra)), resume=resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def losses(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="data.mode"):
        load_config(None, ["data.mode=windows"])
    with pytest.raises(ValueError, match="multiple of data.seq_len"):
        load_config(None, ["batch.global_tokens=1000", "data.seq_len=512"])
    with pytest.raises(ValueError, match="unknown key optim.learning_rate"):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="must be a number"):
        load_config(None, ["optim.lr=fast"])
    cfg = load_config(REPO / "configs" / "fox-pro-125m-16k.yaml", ["optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4 and cfg.data.seq_len == 16384 and cfg.model.overrides["acp"] is True


def test_defaults_are_cpu_sized():
    """``foxacp train`` without --config: the tiny model on the built-in corpus, minutes on a CPU."""
    cfg = load_config(None)
    steps = cfg.optim.total_tokens // cfg.batch.global_tokens
    assert cfg.model.preset == "fox-pro-tiny" and cfg.batch.global_tokens <= 8192 and steps <= 500
    assert cfg.optim.warmup_tokens <= cfg.optim.total_tokens // 10
    paper = load_config(REPO / "configs" / "fox-pro-125m-4k.yaml")
    assert paper.batch.global_tokens == 524_288 and paper.optim.warmup_tokens == 2**28


def test_schedule_warmup_then_cosine_to_zero():
    cfg = OptimSection(lr=1.0, warmup_tokens=100, total_tokens=1100)
    assert lr_at(0, cfg) == 0 and lr_at(50, cfg) == 0.5 and lr_at(100, cfg) == 1.0
    assert math.isclose(lr_at(600, cfg), 0.5) and lr_at(1100, cfg) == 0.0 and lr_at(5000, cfg) == 0.0


def test_all_paper_configs_load():
    names = sorted(p.name for p in (REPO / "configs").glob("*-*m-*k.yaml"))
    assert len(names) == 36
    for name in names:
        load_config(REPO / "configs" / name)


def test_resume_is_exact(store_dir, tmp_path):
    straight = tmp_path / "straight"
    train(store_dir, straight, run__max_steps=6)
    split = tmp_path / "split"
    train(store_dir, split, run__max_steps=3)
    train(store_dir, split, resume=True, run__max_steps=6)
    assert losses(straight) == losses(split)  # bitwise



def test_time_budget_plans_the_schedule(store_dir, tmp_path, monkeypatch):
    """After the probe steps the cosine is fitted to the budget (warmup scaled alike), logged,
    checkpointed and kept on resume; the cosine ends at the planned last step."""
    import foxacp.train.trainer as trainer_module

    clock = iter(range(0, 10**6, 10))  # every perf_counter() call advances 10 s
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: float(next(clock)))
    out = tmp_path / "budget"
    records = train(store_dir, out, run__time_budget_s=150, run__budget_probe_steps=3, optim__total_tokens=512 * 100,
                    optim__warmup_tokens=512 * 10, run__ckpt_every=2)
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    plan = next(r["schedule"] for r in logged if "schedule" in r)
    assert plan["step_time_s"] == 10.0 and 3 < plan["planned_steps"] < 100
    assert plan["total_tokens"] == 512 * plan["planned_steps"] and plan["warmup_tokens"] == plan["total_tokens"] // 10
    assert len(records) == plan["planned_steps"] and records[-1]["lr"] < 0.05 * 0.003  # the step before 0
    assert json.loads((checkpoint.latest(out) / "trainer.json").read_text())["schedule"] == plan
    shutil.rmtree(checkpoint.latest(out))
    resumed = Trainer(load_config(None, overrides(store_dir, out, run__time_budget_s=150)), resume=True)
    resumed.close()
    assert 3 < resumed.step < plan["planned_steps"] and resumed.schedule == plan and resumed.total_steps == plan["planned_steps"]
    with pytest.raises(ValueError, match="run.time_budget_s"):
        load_config(None, ["run.time_budget_s=0"])

def test_metrics_report_acp_flops(store_dir, tmp_path):
    records = train(store_dir, tmp_path, run__max_steps=2, model__overrides__fgate_bias_init="zero",
                    data__seq_len=512, batch__global_tokens=1024, data__val_fraction=0.1)
    flops = records[-1]["flops_per_token"]
    acp = records[-1]["acp"]
    assert 0 < acp["kept_fraction"] < 1 and len(acp["layer_kept_fraction"]) == 2
    assert all(t is not None and t < 0 for t in acp["layer_threshold"])
    assert math.isclose(flops["attention_computed"], flops["attention_dense"] * acp["kept_fraction"])
    assert flops["attention_skipped"] > 0


def test_nan_loss_stops_and_keeps_last_checkpoint(store_dir, tmp_path):
    train(store_dir, tmp_path, run__max_steps=2)
    good = checkpoint.latest(tmp_path)
    trainer = Trainer(load_config(None, overrides(store_dir, tmp_path, run__max_steps=4)), resume=True)
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        trainer.fit()
    trainer.close()
    assert checkpoint.latest(tmp_path) == good


def _cli(store_dir, out_dir, *extra, resume=False):
    args = [sys.executable, "-m", "foxacp", "train", *(["--resume"] if resume else []),
            *overrides(store_dir, out_dir, **dict(e.split("=", 1) for e in extra))]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_until(ready, proc, what: str, timeout=120):
    """Poll ``ready()`` while the subprocess runs; fail with its output if it exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.05)
    raise AssertionError(f"no {what} appeared")


def _wait_for_checkpoint(out_dir, step, proc):
    def ready():
        found = checkpoint.latest(out_dir)
        return found is not None and int(found.name.split("_")[1]) >= step
    _wait_until(ready, proc, f"checkpoint of step {step}")


def test_sigkill_then_resume_matches_uninterrupted(store_dir, tmp_path):
    straight = tmp_path / "straight"
    train(store_dir, straight, run__max_steps=6)
    killed = tmp_path / "killed"
    proc = _cli(store_dir, killed, "run.max_steps=6", "run.ckpt_every=1")
    _wait_for_checkpoint(killed, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = _cli(store_dir, killed, "run.max_steps=6", "run.ckpt_every=1", resume=True)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert losses(killed) == losses(straight)  # later lines of a re-run step replace earlier ones


def test_sigterm_writes_checkpoint(store_dir, tmp_path):
    proc = _cli(store_dir, tmp_path, "run.max_steps=1000", "optim.total_tokens=10000000")
    _wait_for_metrics(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output  # schedulers requeue on 143
    assert "stopped by signal" in output
    latest = checkpoint.latest(tmp_path)
    state = json.loads((latest / "trainer.json").read_text())
    assert state["step"] >= 1 and state["step"] == max(losses(tmp_path))


def _wait_for_metrics(out_dir, proc):
    path = Path(out_dir) / "metrics.jsonl"
    _wait_until(lambda: path.exists() and path.read_text().strip(), proc, "metrics line")


def test_two_process_fsdp_matches_one_process(store_dir, tmp_path):
    one = tmp_path / "one"
    train(store_dir, one, run__max_steps=3)
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "foxacp",
            "train", *overrides(store_dir, two, run__max_steps=3)]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys()
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-5), (step, a[step], b[step])
    # the sharded checkpoint loads into a single process (resharding 2 -> 1)
    trainer = Trainer(load_config(None, overrides(store_dir, two, run__max_steps=4)), resume=True)
    assert trainer.step == 3
    trainer.fit()
    trainer.close()


def test_export_loads_with_auto_model(store_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import foxacp.models  # noqa: F401  (registers the auto classes)

    train(store_dir, tmp_path / "run", run__max_steps=1)
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "foxacp", "export", str(tmp_path / "run"), str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 200, (1, 16))
    assert model(ids).logits.shape == (1, 16, model.config.vocab_size)


def test_acp_comparison_writes_report(store_dir, tmp_path):
    from foxacp.analysis.demo import run_acp_comparison

    summary = run_acp_comparison(None, overrides(store_dir, tmp_path, data__seq_len=256, batch__global_tokens=512,
                                                 data__val_fraction=0.1), tmp_path, steps=2, title="t")
    assert "speed-up" in summary
    for name in ("report.md", "loss.png", "step_time.png", "kept_fraction.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["runs"]["acp_off"]["mean_kept_fraction"] == 1.0
    assert data["runs"]["acp_on"]["final_loss"] == pytest.approx(data["runs"]["acp_off"]["final_loss"], abs=1e-3)


def test_multi_gpu_benchmark_runs_on_cpu(store_dir, tmp_path):
    """benchmarks/multi_gpu.py end to end with 2 gloo processes: parity, resharded resume both
    ways, noise floor and scaling, report and JSON written (the script the GPU results come from)."""
    out = tmp_path / "multi"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    args = [sys.executable, str(REPO / "benchmarks" / "multi_gpu.py"), "--out", str(out), "--device", "cpu",
            "--gpus", "2", "--data", str(store_dir), "--global-tokens", "512", "--micro-tokens", "128",
            "--parity-preset", "fox-pro-tiny", "--parity-context", "64", "--parity-steps", "4",
            "--scaling-presets", "fox-pro-tiny", "--scaling-context", "64", "--scaling-steps", "3", "--warmup", "1"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    comparisons = summary["parity"]["comparisons"]
    assert set(comparisons) == {"1 GPU vs 2 GPUs", "2->1 GPU resumed vs 2 GPUs", "1->2 GPUs resumed vs 1 GPU"}
    for gap in comparisons.values():  # float32 on CPU: the same numbers up to summation order
        assert gap["max_abs_diff"] < 1e-3, comparisons
    assert comparisons["2->1 GPU resumed vs 2 GPUs"]["steps"] == [3, 4]
    assert summary["scaling"][0]["tokens_per_s"]["1"] > 0 and summary["scaling"][0]["efficiency"]["1"] == 1.0
    assert (out / "report.md").exists() and (out / "loss_curves.png").exists()
