"""Checkpoints: model, optimizer, data position, step/tokens and RNG states, written atomically.

Layout of ``<out_dir>/checkpoints/step_00000123/``:

- one process: ``model.safetensors``, ``optimizer.pt`` and ``rng.pt`` (tensors and plain
  containers only, loaded with ``weights_only=True``: no pickle code runs);
- several processes (FSDP2): a sharded ``torch.distributed.checkpoint`` folder ``dcp/`` that
  loads on any number of processes (resharding);
- ``trainer.json``: step, tokens, loader state, the config.

Everything is written into ``step_X.tmp`` and renamed when complete, so a killed run never
leaves a checkpoint that loads half-written. ``latest()`` picks the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out_dir``, or None."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    complete = [(step, p) for step, p in found if (p / "trainer.json").exists()]
    return max(complete)[1] if complete else None


def rng_state() -> dict:
    """CPU, Python and this process's current CUDA device's generator states.

    Only the current device: a process may resume where another number of GPUs is visible.
    """
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _is_distributed() else 0


def save(out_dir: str | Path, step: int, model, optimizer, trainer_state: dict, keep_last: int = 3) -> Path:
    """Write checkpoint ``step`` atomically; prune to the newest ``keep_last``. Returns its path."""
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    distributed = _is_distributed()
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if distributed:
        torch.distributed.barrier()
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "dcp"))
        torch.save({"rank": _rank(), **rng_state()}, tmp / f"rng_rank{_rank()}.pt")
        torch.distributed.barrier()
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
    if _rank() == 0:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep_last)
    if distributed:
        torch.distributed.barrier()
    return final


def load(path: str | Path, model, optimizer=None) -> dict:
    """Restore model (and optimizer, RNG) from ``path``; returns the trainer state dict."""
    path = Path(path)
    state = json.loads((path / "trainer.json").read_text())
    if (path / "dcp").is_dir():
        load_dcp(path / "dcp", model, optimizer)
        rng_file = path / f"rng_rank{_rank()}.pt"
        if rng_file.exists():  # same world size: each rank gets its own stream back
            set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path / "model.safetensors")))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state


def load_dcp(folder: Path, model, optimizer=None) -> None:
    """Load a sharded checkpoint into ``model`` (sharded or not) and optionally the optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        model_state = get_model_state_dict(model)
        dcp.load({"model": model_state}, checkpoint_id=str(folder))
        set_model_state_dict(model, model_state)
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    bundle = {"model": model_state, "optimizer": optim_state}
    dcp.load(bundle, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optimizer"])


def load_model_weights(path: str | Path, model) -> dict:
    """Model weights only (for export and evaluation); returns the trainer state."""
    path = Path(path)
    state = json.loads((path / "trainer.json").read_text())
    if (path / "dcp").is_dir():
        load_dcp(path / "dcp", model)
    else:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path / "model.safetensors")))
    return state


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob("step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    for file in folder.iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
