"""Metric sinks: JSONL always, TensorBoard when installed, a tqdm bar on rank 0."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm import tqdm


class MetricLogger:
    """Writes one JSON object per call to ``<out_dir>/metrics.jsonl`` (and TensorBoard scalars)."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb_dir = Path(out_dir) / "tensorboard" if tensorboard else None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self._tb = _tensorboard_writer(self._tb_dir)

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
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in _flatten(record):
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


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
