"""Metric sinks: JSONL always, TensorBoard when installed, Weights & Biases when asked for, a tqdm
bar on rank 0.

The W&B run id is kept in ``<out_dir>/wandb_run_id``, so a resumed training continues the same
W&B run (``wandb`` is an optional dependency: ``pip install wandb``).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from tqdm import tqdm


class MetricLogger:
    """Writes one JSON object per call to ``<out_dir>/metrics.jsonl`` (and TensorBoard / W&B scalars).

    ``wandb_project``: log to that W&B project too (``resume``: continue this folder's W&B run).
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: str | None = None, resume: bool = False, config: dict | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb_dir = Path(out_dir) / "tensorboard" if tensorboard else None
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self._tb = _tensorboard_writer(self._tb_dir)
        if wandb_project is not None:
            self._wandb = _wandb_run(wandb_project, Path(out_dir), resume, config)

    def rewind(self, step: int) -> None:
        """Forget what was logged after ``step`` (a resumed run logs those steps again): drop those
        lines of metrics.jsonl and purge those TensorBoard events."""
        if not self.enabled:
            return
        self._file.close()
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)
        if self._tb is not None:
            self._tb.close()
            self._tb = _tensorboard_writer(self._tb_dir, purge_step=step + 1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {key: value for key, value in _flatten(record)
                   if isinstance(value, (int, float)) and key != "step" and math.isfinite(value)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


def _step_of(line: str) -> float:
    """The step of a metrics line (0 if it names none; infinity for a line torn by a kill)."""
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return math.inf


def _tensorboard_writer(folder: Path | None, purge_step: int | None = None):
    """A SummaryWriter on ``folder`` (None when ``folder`` is None or tensorboard is not installed)."""
    if folder is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def _wandb_run(project: str, out_dir: Path, resume: bool, config: dict | None):
    """A W&B run in ``project``; on ``resume``, the run whose id ``out_dir/wandb_run_id`` holds."""
    try:
        import wandb
    except ImportError:
        raise ValueError(f"run.wandb_project={project!r} asks for Weights & Biases, but wandb is not installed: "
                         "pip install wandb, or leave run.wandb_project unset") from None
    id_file = out_dir / "wandb_run_id"
    if resume and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(out_dir), config=config)


def _flatten(record: dict, prefix: str = ""):
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + "/")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, (int, float)):
                    yield f"{name}/{i}", item
        else:
            yield name, value


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")
