"""Checkpoints: model, optimizer, data position, step/tokens and RNG states, written atomically.

Layout of ``<out_dir>/checkpoints/step_00000123/``:

- one process: ``model.safetensors``, ``optimizer.pt`` and ``rng.pt`` (tensors and plain
  containers only, loaded with ``weights_only=True``);
- several processes (FSDP2): a sharded ``torch.distributed.checkpoint`` folder ``dcp/`` that
  loads on any number of processes (resharding);
- ``trainer.json``: step, tokens, loader state, the config;
- ``checksums.json``: size and SHA-256 of every other file, written last.

Writing. Everything is written into ``step_X.tmp`` and renamed when complete, so a killed run
never leaves a checkpoint that loads half-written. Saving a step that already exists moves the
old folder to ``step_X.old`` before the new one takes its name and deletes it only afterwards:
at every instant one complete copy of the step is on disk under a name that ``newest_verified``
finds. A failed write (a full disk, say) removes the ``.tmp`` and raises ``CheckpointError``
naming the cause.

Reading. Loading never runs code from a checkpoint. One-process files are safetensors and
weights-only ``torch.load``. A ``dcp/`` folder's ``.metadata`` is a pickle: it is read with an
unpickler that builds only DCP's own metadata classes (plus ``torch.Size``, dtypes, layouts and
paths) and refuses every other global, and DCP's non-tensor entries (optimizer hyperparameters)
are loaded weights-only. Anything else raises ``CheckpointError``; no opt-in turns this off.
``load`` verifies the checksums first; ``newest_verified`` gives the newest checkpoint of a run
that verifies and the newer ones it skipped, with the reason.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step_(\d+)(\.old)?$")  # .old: a complete copy being replaced by a re-save
CHECKSUMS = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, does not verify, or holds something loading refuses."""


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _step_folders(out_dir: str | Path) -> list[Path]:
    """Checkpoint folders (``step_X``, and ``step_X.old`` left by an interrupted re-save),
    newest first; for one step the ``step_X`` folder comes before its ``.old`` copy."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), m.group(2) is None, p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for *_, p in sorted(found, reverse=True)]


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out_dir`` (not verified), or None."""
    return next((p for p in _step_folders(out_dir) if (p / "trainer.json").exists()), None)


def newest_verified(out_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``out_dir`` whose files match their checksums (None if no
    checkpoint does), and the newer folders skipped on the way, each with the reason."""
    skipped = []
    for folder in _step_folders(out_dir):
        problem = verify(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def verify(path: str | Path) -> str | None:
    """None when every file of checkpoint ``path`` matches ``checksums.json``; else the reason."""
    path = Path(path)
    if not (path / CHECKSUMS).is_file():
        return f"no {CHECKSUMS} (the write did not finish, or an older foxacp wrote it)"
    try:
        expected = json.loads((path / CHECKSUMS).read_text())["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in expected.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{CHECKSUMS} is not readable"
    if "trainer.json" not in expected:
        return f"{CHECKSUMS} does not list trainer.json"
    unlisted = sorted(set(_files(path)) - set(expected))
    if unlisted:
        return f"{unlisted[0]} is not listed in {CHECKSUMS}"
    for name, (size, digest) in sorted(expected.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written (truncated or overwritten)"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum (the file changed after it was written)"
    return None


def _files(folder: Path) -> list[str]:
    """Relative paths of the files under ``folder`` (recursively), except the checksum list."""
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file() and f.name != CHECKSUMS)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checksums(folder: Path) -> None:
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
             for name in _files(folder)}
    (folder / CHECKSUMS).write_text(json.dumps({"files": files}, indent=1))


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


# ----------------------------------------------------------------------------- writing
def save(out_dir: str | Path, step: int, model, optimizer, trainer_state: dict, keep_last: int = 3,
         keep_every: int = 0) -> Path:
    """Write checkpoint ``step`` atomically, then prune to the newest ``keep_last`` (plus every
    step that is a multiple of ``keep_every``, when that is > 0). Returns its path."""
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        _write_state(tmp, model, optimizer)
        if _rank() == 0:
            (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
            _write_checksums(tmp)
            _fsync_files(tmp)
    except BaseException as exc:  # DCP reports failures as a BaseException
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(exc):
            raise CheckpointError(f"no space left on device (ENOSPC) while writing checkpoint {final}; the partial "
                                  f"{tmp.name} was removed. Free space under {root} or lower run.keep_last") from exc
        raise
    if _rank() == 0:
        _move_into_place(tmp, final)
        _prune(root, keep_last, keep_every)
    if _is_distributed():
        torch.distributed.barrier()
    return final


def _write_state(folder: Path, model, optimizer) -> None:
    """Model, optimizer and RNG files into ``folder``: sharded (DCP) under torchrun, else plain."""
    if _is_distributed():
        torch.distributed.barrier()  # rank 0 has created the folder
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder / "dcp"))
        _torch_save({"rank": _rank(), **rng_state()}, folder / f"rng_rank{_rank()}.pt")
        torch.distributed.barrier()  # every rank's files are written before rank 0 lists them
        return
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # full state dicts keyed by parameter name: they load into a sharded model too (set_state_dict)
    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    save_file({k: v.detach().contiguous() for k, v in model_state.items()}, str(folder / "model.safetensors"))
    _torch_save(optim_state, folder / "optimizer.pt")
    _torch_save(rng_state(), folder / "rng.pt")


class _WriteAll:
    """A binary file whose ``write`` writes every byte or raises ``OSError`` (an unbuffered file
    may write fewer bytes on a full disk, and torch then fails with an error naming no cause)."""

    def __init__(self, raw):
        self._raw = raw

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        while view:
            written = self._raw.write(view)
            if not written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb", buffering=0) as raw:
        torch.save(obj, _WriteAll(raw))


def _is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk (ENOSPC)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc):  # safetensors and DCP report it in their own error types
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; an existing ``final`` is kept as ``.old`` until then."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)


def _prune(root: Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and those with ``step % keep_every
    == 0``), unfinished ``.tmp`` folders, and ``.old`` copies; an ``.old`` copy whose step has no
    other folder (a re-save was interrupted) gets its name back instead."""
    for old in root.glob("step_*.old"):
        final = old.with_name(old.name[: -len(".old")])
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    for leftover in root.glob("step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for step, old in steps[:-keep_last]:
        if not (keep_every and step % keep_every == 0):
            shutil.rmtree(old, ignore_errors=True)


def _fsync_files(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            _fsync(file)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- reading
def load(path: str | Path, model, optimizer=None, *, verify_files: bool = True) -> dict:
    """Restore model (and optimizer, RNG) from ``path``; returns the trainer state dict.

    Raises ``CheckpointError`` when the files do not match their checksums (``verify_files=False``
    when the caller has just verified them).
    """
    path = Path(path)
    if verify_files:
        _require_verified(path)
    state = json.loads((path / "trainer.json").read_text())
    if (path / "dcp").is_dir():
        load_dcp(path / "dcp", model, optimizer)
        rng_file = path / f"rng_rank{_rank()}.pt"
        if rng_file.exists():  # same world size: each rank gets its own stream back
            set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        _load_full(path, model, optimizer)
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state


def load_model_weights(path: str | Path, model) -> dict:
    """Model weights only (for export and evaluation), after verifying; returns the trainer state."""
    path = Path(path)
    _require_verified(path)
    state = json.loads((path / "trainer.json").read_text())
    if (path / "dcp").is_dir():
        load_dcp(path / "dcp", model)
    else:
        _load_full(path, model)
    return state


def _load_full(path: Path, model, optimizer=None) -> None:
    """A one-process checkpoint's weights (and optimizer state) into ``model``, whether it is
    sharded (under torchrun) or not: every process reads the full tensors and keeps its shard."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    weights = load_file(str(path / "model.safetensors"))
    if optimizer is None:
        set_full_weights(model, weights)
    else:
        full = StateDictOptions(full_state_dict=True)
        set_state_dict(model, optimizer, model_state_dict=weights,
                       optim_state_dict=torch.load(path / "optimizer.pt", weights_only=True), options=full)


def set_full_weights(model, weights: dict) -> None:
    """Full (unsharded) tensors by parameter name into ``model``, sharded or not; names and shapes must match."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def _require_verified(path: Path) -> None:
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} does not verify: {problem}")


def load_dcp(folder: Path, model, optimizer=None) -> None:
    """Load a sharded checkpoint into ``model`` (sharded or not) and optionally the optimizer,
    with DCP's reader and planner restricted so that nothing in ``folder`` can run code."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        model_state = get_model_state_dict(model)
        _dcp_load({"model": model_state}, folder)
        set_model_state_dict(model, model_state)
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    bundle = {"model": model_state, "optimizer": optim_state}
    _dcp_load(bundle, folder)
    set_state_dict(model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optimizer"])


def _dcp_load(state: dict, folder: Path) -> None:
    """``dcp.load`` in place with the safe reader and planner; a refusal raises ``CheckpointError``
    (DCP itself would report it inside its own exception, as text)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    _read_dcp_metadata(folder / ".metadata")  # refused metadata fails here, with its own message
    reader_cls, planner_cls = _safe_dcp_io()
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(state, storage_reader=reader_cls(str(folder)), planner=planner_cls())
    except CheckpointException as exc:
        refused = [error for error, _ in exc.failures.values() if isinstance(error, CheckpointError)]
        if refused:
            raise refused[0] from exc
        raise


def _read_dcp_metadata(path: Path):
    """DCP's ``.metadata`` pickle, unpickled with ``_MetadataUnpickler``; checked to be DCP metadata."""
    from torch.distributed.checkpoint.metadata import Metadata

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the DCP folder is incomplete")
    with open(path, "rb") as fh:
        metadata = _MetadataUnpickler(fh).load()
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"  # every class defined there is plain data
_SAFE_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict"),
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and refuses every global but DCP's metadata classes,
    ``torch.Size``, dtypes, layouts and paths: no callable that could run code is reachable."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == _DCP_METADATA_MODULE and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise CheckpointError(f"DCP metadata refers to {module}.{name}, which loading refuses "
                              f"(only DCP's own metadata classes are allowed)")


@functools.cache
def _safe_dcp_io():
    """DCP's file reader and load planner, changed only in how they unpickle (built on first use:
    importing torch.distributed.checkpoint takes a second)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            if hasattr(self, "_get_metadata_path"):
                path = self._get_metadata_path(kwargs.get("rank"))
            else:  # torch 2.8 keeps one metadata file and has no helper for its path
                path = self.fs.concat_path(self.path, ".metadata")
            metadata = _read_dcp_metadata(Path(path))
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"DCP entry {fqn} holds more than plain data; loading refuses it: {exc}") from exc
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeReader, SafePlanner
