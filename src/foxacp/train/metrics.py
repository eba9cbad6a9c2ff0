"""Metric sinks: JSONL always, TensorBoard when installed, a tqdm bar on rank 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm


class MetricLogger:
    """Writes one JSON object per call to ``<out_dir>/metrics.jsonl`` (and TensorBoard scalars)."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

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
    """All records of a metrics.jsonl file (the last run's lines win on resumed steps)."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")
