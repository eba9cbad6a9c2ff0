"""One typed training config: nested dataclasses, YAML presets, ``key=value`` overrides.

    cfg = load_config("configs/fox-pro-125m-4k.yaml", ["optim.lr=1e-3", "run.max_steps=100"])

Every field is validated when the config is built; presets only override fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelSection:
    preset: str = "fox-pro-tiny"  # a name from foxacp.models presets
    overrides: dict = field(default_factory=dict)  # FoxConfig fields to change, e.g. {acp: true}


@dataclass
class DataSection:
    source: str = "shakespeare"  # built-in corpus ("shakespeare", "python-code"), a token-store dir or a LongCrawl64 zarr
    tokenizer: str = "gpt2"  # used when a built-in corpus is prepared
    seq_len: int = 512  # training context L
    mode: str = "document"  # "document": windows inside one doc; "packed": docs joined by EOT
    packed_cu_seqlens: bool = False  # packed mode: stop attention and decay at document boundaries
    val_fraction: float = 0.05  # share of documents held out for evaluation
    max_docs: int | None = None  # cap on documents of a built-in corpus (quick runs)

    def __post_init__(self):
        _check(self.seq_len >= 1, "data.seq_len must be >= 1")
        _check(self.mode in ("document", "packed"), f"data.mode must be 'document' or 'packed', got {self.mode!r}")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction must be in (0, 1)")


@dataclass
class OptimSection:
    lr: float = 2e-3  # peak learning rate (paper: 2e-3 for 125M/360M, 1e-3 for 760M)
    betas: tuple = (0.9, 0.95)  # AdamW betas of the paper
    weight_decay: float = 0.1  # on linear and embedding weights only
    grad_clip: float = 1.0  # global grad-norm clip
    warmup_tokens: int = 16_384  # linear warmup length in tokens (CPU-sized; paper: 2^28, paper-base.yaml)
    total_tokens: int = 1_000_000  # cosine decays to min_lr_ratio * lr here (CPU-sized: minutes on 2 cores)
    min_lr_ratio: float = 0.0  # paper decays to 0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        _check(self.lr > 0, "optim.lr must be > 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas must be two values in [0, 1)")
        _check(self.total_tokens > 0 and self.warmup_tokens >= 0, "optim token counts must be positive")
        _check(self.grad_clip > 0, "optim.grad_clip must be > 0")


@dataclass
class BatchSection:
    global_tokens: int = 4096  # tokens per optimizer step over all ranks (CPU-sized; paper: 524,288)
    micro_batch: int = 4  # sequences per forward per rank; the rest is gradient accumulation

    def __post_init__(self):
        _check(self.global_tokens >= 1 and self.micro_batch >= 1, "batch sizes must be >= 1")


@dataclass
class RunSection:
    out_dir: str = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard events
    seed: int = 0
    max_steps: int | None = None  # stop early (None: run until optim.total_tokens)
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda"
    precision: str = "auto"  # "bf16" autocast, "fp32"; auto = bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute blocks in backward to save memory
    log_every: int = 10  # steps between metric lines
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 4  # micro-batches per evaluation
    ckpt_every: int = 0  # steps between checkpoints (0: only at the end / on signals)
    keep_last: int = 3  # checkpoints kept on disk
    init_from: str | None = None  # start from these weights: a checkpoint, run or Hugging Face folder (not on resume)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this, for good (0: none)
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed
    wandb_project: str | None = None  # also log to this Weights & Biases project (needs pip install wandb)

    def __post_init__(self):
        _check(self.device in ("auto", "cpu", "cuda"), f"run.device must be auto/cpu/cuda, got {self.device!r}")
        _check(self.precision in ("auto", "bf16", "fp32"), f"run.precision must be auto/bf16/fp32, got {self.precision!r}")
        _check(self.keep_last >= 1, "run.keep_last must be >= 1")
        _check(self.keep_every >= 0, "run.keep_every must be >= 0 (0: keep only the last run.keep_last)")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    batch: BatchSection = field(default_factory=BatchSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        _check(self.batch.global_tokens % self.data.seq_len == 0,
               f"batch.global_tokens ({self.batch.global_tokens}) must be a multiple of data.seq_len ({self.data.seq_len})")

    @property
    def global_sequences(self) -> int:
        return self.batch.global_tokens // self.data.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        _check(not unknown, f"unknown config sections {sorted(unknown)}; expected {sorted(sections)}")
        built = {}
        for name, section_field in ((f.name, f) for f in dataclasses.fields(cls)):
            section_cls = section_field.default_factory
            values = raw.get(name) or {}
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(values) - known
            _check(not bad, f"unknown keys {sorted(bad)} in section '{name}'; known: {sorted(known)}")
            built[name] = section_cls(**{k: _coerce(section_cls, k, v) for k, v in values.items()})
        return cls(**built)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


_NUMBER_TYPES = {"float": float, "int": int, "int | None": int, "float | None": float}


def _coerce(section_cls, key: str, value: Any) -> Any:
    """Numbers written as strings (YAML reads ``1e-3`` as text) become the field's type."""
    kind = _NUMBER_TYPES.get(next(f.type for f in dataclasses.fields(section_cls) if f.name == key))
    if kind is None or value is None or isinstance(value, bool):
        return value
    try:
        return kind(float(value)) if kind is int and isinstance(value, str) else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{section_cls.__name__}.{key} must be a number, got {value!r}") from None


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` (and ``model.overrides.field=value``) strings to a raw dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ValueError(f"override key {key!r} must name a section and a field, e.g. optim.lr")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r} goes through a non-section value")
        node[parts[-1]] = _parse_value(value)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        base = raw.pop("base", None)  # presets may extend another preset file
        if base is not None:
            parent = load_config(path.parent / base).to_dict()
            raw = _merge(parent, raw)
    return TrainConfig.from_dict(apply_overrides(raw, overrides or []))


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
