"""Fault injection on checkpoints (CPU, small): crafted DCP files never run code, a non-finite
gradient or weight never reaches a checkpoint, damaged checkpoints are skipped on resume, a
re-save never leaves a step without a complete copy, a full disk is named and cleaned up."""

import errno
import io
import json
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from foxacp.train import checkpoint
from foxacp.train.checkpoint import CheckpointError
from foxacp.train.config import load_config
from foxacp.train.trainer import Trainer, TrainingDiverged

from test_train import overrides, store_dir  # noqa: F401  (store_dir is a fixture)


class _RunsCode:
    """Unpickling this creates ``marker``: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tiny_model_and_optimizer():
    model = torch.nn.Linear(3, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save_tiny(out_dir: Path, step: int, **kwargs) -> Path:
    model, optimizer = _tiny_model_and_optimizer()
    return checkpoint.save(out_dir, step, model, optimizer, {"tokens": step}, **kwargs)


def _dcp_save(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(folder))


def _tiny_trainer(store, out_dir, **extra) -> Trainer:
    """A two-layer ACP model on 32-token windows: a step takes well under a second."""
    args = overrides(store, out_dir, **{"data__seq_len": 32, "batch__global_tokens": 64, "run__max_steps": 2, **extra})
    return Trainer(load_config(None, args))


# ----------------------------------------------------------------------------- 1. no code execution
def test_crafted_dcp_metadata_never_runs_code(tmp_path):
    folder = tmp_path / "checkpoints" / "step_00000001"
    (folder / "dcp").mkdir(parents=True)
    marker = tmp_path / "marker"
    (folder / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    (folder / "trainer.json").write_text(json.dumps({"step": 1, "tokens": 1}))
    checkpoint._write_checksums(folder)  # an attacker can write matching checksums too
    assert checkpoint.verify(folder) is None
    model, optimizer = _tiny_model_and_optimizer()
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        checkpoint.load_model_weights(folder, model)
    with pytest.raises(CheckpointError, match="refuses"):
        checkpoint.load(folder, model, optimizer)
    assert not marker.exists()


def test_dcp_loads_plain_data_and_refuses_pickled_entries(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    source, source_optim = _tiny_model_and_optimizer()
    model_state, optim_state = get_state_dict(source, source_optim)
    _dcp_save({"model": model_state, "optimizer": optim_state}, tmp_path / "good")
    model, optimizer = _tiny_model_and_optimizer()
    checkpoint.load_dcp(tmp_path / "good", model, optimizer)  # DCP's real metadata passes the filter
    assert torch.equal(model.weight, source.weight)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], source_optim.state_dict()["state"][0]["exp_avg"])

    marker = tmp_path / "marker"
    optim_state["param_groups"][0]["lr"] = _RunsCode(marker)  # a non-tensor entry is stored as a pickle
    _dcp_save({"model": model_state, "optimizer": optim_state}, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="optimizer.param_groups.*plain data"):
        checkpoint.load_dcp(tmp_path / "bad", model, optimizer)
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. divergence
def test_nan_gradient_with_finite_loss_never_reaches_a_checkpoint(store_dir, tmp_path):  # noqa: F811
    trainer = _tiny_trainer(store_dir, tmp_path, run__ckpt_every=1)
    good = trainer.save_checkpoint()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.model.layers[0].self_attn.q_proj.weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(TrainingDiverged, match=rf"step 1: the gradient norm is nan \(loss [0-9.]+\).*{good}"):
        trainer.fit()
    trainer.close()
    assert checkpoint.latest(tmp_path) == good
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the optimizer did not step


def test_non_finite_weight_is_named_as_divergence_with_acp(store_dir, tmp_path):  # noqa: F811
    trainer = _tiny_trainer(store_dir, tmp_path, run__ckpt_every=1)
    assert trainer.model_config.acp
    good = trainer.save_checkpoint()
    step = trainer.optimizer.step

    def overflowing_step(*args, **kwargs):  # an update that overflows one weight
        step(*args, **kwargs)
        with torch.no_grad():
            trainer.model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")

    trainer.optimizer.step = overflowing_step
    with pytest.raises(TrainingDiverged, match=rf"step 1: weight .*q_proj.weight is not finite.*{good}"):
        trainer.fit()
    assert checkpoint.latest(tmp_path) == good
    # NaN weights everywhere: ACP's threshold check fails in the forward; still named divergence
    trainer.optimizer.step = step
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"step 1: weight \S+ is not finite \(adaptive_threshold"):
        trainer.fit()
    trainer.close()


# ----------------------------------------------------------------------------- 3. integrity
def _truncate(file: Path) -> None:
    with open(file, "r+b") as fh:
        fh.truncate(file.stat().st_size // 2)


def _scribble(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def test_resume_falls_back_to_newest_checkpoint_that_verifies(store_dir, tmp_path, capsys):  # noqa: F811
    trainer = _tiny_trainer(store_dir, tmp_path, run__keep_last=5)
    for step in range(4):
        trainer.step = step
        trainer.save_checkpoint()
    trainer.close()
    root = checkpoint.checkpoint_root(tmp_path)
    _truncate(root / "step_00000003" / "model.safetensors")
    _scribble(root / "step_00000002" / "optimizer.pt")  # same size: only the checksum sees it
    (root / "step_00000001" / "rng.pt").unlink()
    capsys.readouterr()

    resumed = _tiny_trainer(store_dir, tmp_path)
    assert resumed.resume() and resumed.step == 0
    out = capsys.readouterr().out
    assert "step_00000003: model.safetensors has" in out and "truncated" in out
    assert "step_00000002: optimizer.pt does not match its checksum" in out
    assert "step_00000001: rng.pt is missing" in out
    with pytest.raises(CheckpointError, match="does not verify: model.safetensors has"):
        checkpoint.load_model_weights(root / "step_00000003", resumed.model)

    _scribble(root / "step_00000000" / "trainer.json")
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies:\n.*step_00000003"):
        resumed.resume()
    resumed.close()


# ----------------------------------------------------------------------------- 4. re-saving a step
class _Killed(BaseException):
    """Stands for SIGKILL between two of the renames and deletes that put a re-saved step in place."""


def test_resaving_a_step_always_leaves_one_complete_copy(tmp_path, monkeypatch):
    _save_tiny(tmp_path, 1)
    _save_tiny(tmp_path, 2)
    real = {"replace": os.replace, "rmtree": shutil.rmtree}
    kill_at, kills = 1, 0
    while True:  # kill the re-save at its first, second, ... rename or delete
        calls = []

        def dying(name):
            def call(*args, **kwargs):
                calls.append(name)
                if len(calls) == kill_at:
                    raise _Killed
                return real[name](*args, **kwargs)
            return call

        monkeypatch.setattr(os, "replace", dying("replace"))
        monkeypatch.setattr(shutil, "rmtree", dying("rmtree"))
        try:
            _save_tiny(tmp_path, 2)
        except _Killed:
            kills += 1
        else:
            break
        finally:
            monkeypatch.undo()
        found, _ = checkpoint.newest_verified(tmp_path)
        assert found is not None and found.name.startswith("step_00000002"), (kill_at, calls, found)
        model, optimizer = _tiny_model_and_optimizer()
        assert checkpoint.load(found, model, optimizer)["step"] == 2
        _save_tiny(tmp_path, 2)  # the next save tidies up: .old renamed back or deleted, .tmp deleted
        assert sorted(p.name for p in checkpoint.checkpoint_root(tmp_path).iterdir()) == ["step_00000001",
                                                                                          "step_00000002"]
        kill_at += 1
    assert kills >= 3  # every rename and delete of the swap was interrupted once


# ----------------------------------------------------------------------------- 8. disk full
def test_disk_full_is_named_and_the_partial_checkpoint_removed(tmp_path, monkeypatch):
    good = _save_tiny(tmp_path, 1)

    def full_disk(obj, file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            Path(file).write_bytes(b"partial")
        else:
            file.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"no space left on device \(ENOSPC\).*step_00000002"):
        _save_tiny(tmp_path, 2)
    assert [p.name for p in checkpoint.checkpoint_root(tmp_path).iterdir()] == [good.name]
    assert checkpoint.verify(good) is None


def test_short_writes_on_a_full_disk_are_named(tmp_path, monkeypatch):
    """On a full disk an unbuffered file writes fewer bytes instead of failing, and torch.save
    then stops with "enforce fail at inline_container.cc", naming no cause."""
    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            return 0

    real_open = open
    monkeypatch.setattr(checkpoint, "open", lambda path, mode="r", *args, **kwargs: FullDisk() if mode == "wb"
                        else real_open(path, mode, *args, **kwargs), raising=False)
    with pytest.raises(CheckpointError, match=r"ENOSPC.*step_00000001"):
        _save_tiny(tmp_path, 1)
    assert list(checkpoint.checkpoint_root(tmp_path).iterdir()) == []


# ----------------------------------------------------------------------------- issue 17: what users expect
def test_keep_every_keeps_those_steps_besides_the_last(tmp_path):
    for step in range(1, 8):
        _save_tiny(tmp_path, step, keep_last=2, keep_every=3)
    assert sorted(p.name for p in checkpoint.checkpoint_root(tmp_path).iterdir()) == [
        "step_00000003", "step_00000006", "step_00000007"]


def test_resume_drops_metrics_past_the_resumed_step(store_dir, tmp_path, capsys):  # noqa: F811
    trainer = _tiny_trainer(store_dir, tmp_path, run__max_steps=3, run__ckpt_every=2)
    trainer.fit()
    trainer.close()
    shutil.rmtree(checkpoint.checkpoint_root(tmp_path) / "step_00000003")  # killed before its checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 1.')  # and in the middle of a line
    resumed = _tiny_trainer(store_dir, tmp_path, run__max_steps=3, run__ckpt_every=2)
    assert resumed.resume() and resumed.step == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "loss" in line] == [1, 2]
    capsys.readouterr()
    resumed.fit()
    resumed.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s == 3] == [3, 3]  # one training line, one final validation line
    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"done: step 3, validation loss {final['val_loss']:.4f}, checkpoint " in capsys.readouterr().out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(out_dir: Path) -> dict:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_checkpoints_move_between_one_process_and_torchrun(store_dir, tmp_path, monkeypatch):  # noqa: F811
    """Step 1 in one process, step 2 under torchrun (one gloo process: FSDP2 and DCP), step 3 in
    one process again: the losses are those of three steps straight."""
    from foxacp.train import distributed

    def run(out_dir, steps, resume):
        trainer = _tiny_trainer(store_dir, out_dir, run__max_steps=steps)
        assert not resume or trainer.resume()
        trainer.fit()
        trainer.close()
        return trainer

    run(tmp_path / "straight", 3, resume=False)
    moved = tmp_path / "moved"
    run(moved, 1, resume=False)
    with monkeypatch.context() as env:
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())}.items():
            env.setenv(key, value)
        try:
            assert run(moved, 2, resume=True).info.distributed
        finally:
            distributed.shutdown()
    assert (checkpoint.latest(moved) / "dcp").is_dir()
    run(moved, 3, resume=True)
    straight = _losses(tmp_path / "straight")
    assert _losses(moved).keys() == straight.keys()
    for step, loss in _losses(moved).items():
        assert loss == pytest.approx(straight[step], rel=1e-5), step


def test_wandb_sink_resumes_its_run_and_is_named_when_missing(store_dir, tmp_path, monkeypatch):  # noqa: F811
    import types

    inits, logged = [], []
    fake = types.SimpleNamespace(init=lambda **kwargs: inits.append(kwargs) or types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)), finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trainer = _tiny_trainer(store_dir, tmp_path, run__max_steps=1, run__wandb_project="fox")
    trainer.fit()
    trainer.close()
    assert logged[0][0] == 1 and "loss" in logged[0][1] and "acp/kept_fraction" in logged[0][1]
    resumed = Trainer(load_config(None, overrides(store_dir, tmp_path, data__seq_len=32, batch__global_tokens=64,
                                                  run__max_steps=2, run__wandb_project="fox")), resume=True)
    resumed.close()
    assert [i["project"] for i in inits] == ["fox", "fox"] and inits[0]["id"] == inits[1]["id"]
    assert inits[1]["resume"] == "allow"

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ValueError, match="run.wandb_project='fox'.*wandb is not installed: pip install wandb"):
        _tiny_trainer(store_dir, tmp_path, run__wandb_project="fox")


def test_init_from_a_run_folder_or_a_hugging_face_folder(store_dir, tmp_path):  # noqa: F811
    source = _tiny_trainer(store_dir, tmp_path / "source", run__max_steps=1)
    source.fit()
    source.close()
    source.model.save_pretrained(tmp_path / "hf")
    for origin in (tmp_path / "source", tmp_path / "hf"):
        started = _tiny_trainer(store_dir, tmp_path / f"from_{origin.name}", run__init_from=origin,
                                data__seq_len=64, batch__global_tokens=128)  # e.g. a longer context
        assert started.step == 0
        for name, value in source.model.state_dict().items():
            assert torch.equal(started.model.state_dict()[name], value), (origin, name)
        started.close()
    with pytest.raises(ValueError, match="run.init_from=.*nowhere.*not a checkpoint folder"):
        _tiny_trainer(store_dir, tmp_path / "bad", run__init_from=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="run.init_from=.*source"):  # another model size: shapes differ
        _tiny_trainer(store_dir, tmp_path / "bad", run__init_from=tmp_path / "source",
                      model__overrides__hidden_size=32)
