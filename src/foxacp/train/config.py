"""One typed training config: nested dataclasses, YAML presets, ``key=value`` overrides.

    cfg = load_config("fox-pro-125m-4k", ["optim.lr=1e-3", "run.max_steps=100"])

The shipped presets live in ``foxacp/configs`` (package data; ``configs/`` in the repository
points there) and load by name or by path. Every field is converted to its type and checked
when the config is built (bad keys and values raise ``ValueError`` naming the key and what it
accepts); presets only override fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class _Section:
    """Base of the config sections: on construction every field is converted to its declared type
    (``convert_value``) and then the section's own range checks run (``check``)."""

    key: ClassVar[str]  # the section's name in YAML and overrides, e.g. "run"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, convert_value(f"{self.key}.{f.name}", f.type, getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Range and choice checks of the section's fields (after type conversion)."""


@dataclass
class ModelSection(_Section):
    key: ClassVar[str] = "model"
    preset: str = "fox-pro-tiny"  # a name from foxacp.models presets
    overrides: dict = field(default_factory=dict)  # FoxConfig fields to change, e.g. {acp: true}

    def check(self) -> None:
        from ..models.config import PRESETS, preset_config

        _check_known("model.preset", self.preset, PRESETS)
        params = _fox_config_params()
        for name, value in self.overrides.items():
            _check_known("key", name, params, prefix="model.overrides.")
            self.overrides[name] = convert_value(f"model.overrides.{name}", params[name], value)
        try:  # the combination (e.g. acp on a model without forget gate) is checked by FoxConfig
            preset_config(self.preset, **self.overrides)
        except ValueError as err:
            raise ValueError(f"model (preset {self.preset!r} with overrides {self.overrides}): {err}") from None


@dataclass
class DataSection(_Section):
    key: ClassVar[str] = "data"
    source: str = "shakespeare"  # built-in corpus ("shakespeare", "python-code", "python-packages"), a token-store dir or a LongCrawl64 zarr
    tokenizer: str = "gpt2"  # used when a built-in corpus is prepared
    seq_len: int = 512  # training context L
    mode: str = "document"  # "document": windows inside one doc; "packed": docs joined by EOT
    packed_cu_seqlens: bool = False  # packed mode: stop attention and decay at document boundaries
    val_fraction: float = 0.05  # share of documents held out for evaluation
    max_docs: int | None = None  # cap on documents of a built-in corpus (quick runs)

    def check(self) -> None:
        _check(self.seq_len >= 1, f"data.seq_len must be >= 1, got {self.seq_len}")
        _check(self.mode in ("document", "packed"), f"data.mode must be 'document' or 'packed', got {self.mode!r}")
        _check(0.0 < self.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(self.max_docs is None or self.max_docs >= 1,
               f"data.max_docs must be >= 1 or null (null: every document), got {self.max_docs}")


@dataclass
class OptimSection(_Section):
    key: ClassVar[str] = "optim"
    lr: float = 2e-3  # peak learning rate (paper: 2e-3 for 125M/360M, 1e-3 for 760M)
    betas: tuple = (0.9, 0.95)  # AdamW betas of the paper
    weight_decay: float = 0.1  # on linear and embedding weights only
    grad_clip: float = 1.0  # global grad-norm clip
    warmup_tokens: int = 16_384  # linear warmup length in tokens (CPU-sized; paper: 2^28, paper-base.yaml)
    total_tokens: int = 1_000_000  # cosine decays to min_lr_ratio * lr here (CPU-sized: minutes on 2 cores)
    min_lr_ratio: float = 0.0  # paper decays to 0

    def check(self) -> None:
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip > 0, f"optim.grad_clip must be > 0, got {self.grad_clip}")
        _check(self.warmup_tokens >= 0, f"optim.warmup_tokens must be >= 0, got {self.warmup_tokens}")
        _check(self.total_tokens >= 1, f"optim.total_tokens must be >= 1, got {self.total_tokens}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class BatchSection(_Section):
    key: ClassVar[str] = "batch"
    global_tokens: int = 4096  # tokens per optimizer step over all ranks (CPU-sized; paper: 524,288)
    micro_batch: int = 4  # sequences per forward per rank; the rest is gradient accumulation

    def check(self) -> None:
        _check(self.global_tokens >= 1, f"batch.global_tokens must be >= 1, got {self.global_tokens}")
        _check(self.micro_batch >= 1, f"batch.micro_batch must be >= 1, got {self.micro_batch}")


@dataclass
class RunSection(_Section):
    key: ClassVar[str] = "run"
    out_dir: str = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard events
    seed: int = 0
    max_steps: int | None = None  # stop early (None: run until optim.total_tokens)
    time_budget_s: float | None = None  # wall clock (setup and compile included) to fit the schedule in; see Trainer
    budget_probe_steps: int = 5  # steps timed before the budget plan (the first, compiling, is left out)
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

    def check(self) -> None:
        _check(self.max_steps is None or self.max_steps >= 1,
               f"run.max_steps must be >= 1 or null (null: run until optim.total_tokens), got {self.max_steps}")
        _check(self.time_budget_s is None or self.time_budget_s > 0,
               f"run.time_budget_s must be > 0 or null (null: train until optim.total_tokens), got {self.time_budget_s}")
        _check(self.budget_probe_steps >= 2,
               f"run.budget_probe_steps must be >= 2 (the first step is left out of the timing), "
               f"got {self.budget_probe_steps}")
        _check(self.device in ("auto", "cpu", "cuda"), f"run.device must be auto, cpu or cuda, got {self.device!r}")
        _check(self.precision in ("auto", "bf16", "fp32"),
               f"run.precision must be auto, bf16 or fp32, got {self.precision!r}")
        _check(self.log_every >= 1, f"run.log_every must be >= 1, got {self.log_every}")
        _check(self.eval_every >= 0, f"run.eval_every must be >= 0 (0: only at the end), got {self.eval_every}")
        _check(self.eval_batches >= 1, f"run.eval_batches must be >= 1, got {self.eval_batches}")
        _check(self.ckpt_every >= 0,
               f"run.ckpt_every must be >= 0 (0: only at the end and on signals), got {self.ckpt_every}")
        _check(self.keep_last >= 1, f"run.keep_last must be >= 1, got {self.keep_last}")
        _check(self.keep_every >= 0, f"run.keep_every must be >= 0 (0: keep only the last run.keep_last), got {self.keep_every}")


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
        """The config from nested plain values (YAML); every key and value is checked."""
        sections = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        built = {}
        for name, values in raw.items():
            _check_known("config section", name, sections)
            values = {} if values is None else values
            _check(isinstance(values, dict), f"config section {name!r} must be a mapping of keys, got {values!r}")
            known = {f.name for f in dataclasses.fields(sections[name])}
            for key in values:
                _check_known("key", key, known, prefix=f"{name}.")
            built[name] = sections[name](**values)
        return cls(**built)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_known(what: str, name: str, known, prefix: str = "") -> None:
    """Raise naming ``name``, the closest known name and all known names, unless ``name`` is known."""
    if name in known:
        return
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    raise ValueError(f"unknown {what} {prefix}{name}{hint} (known: {', '.join(sorted(map(str, known)))})")


def _fox_config_params() -> dict[str, str]:
    """FoxConfig's constructor arguments and their declared types (as text, e.g. "bool | None")."""
    from ..models.config import FoxConfig

    params = inspect.signature(FoxConfig.__init__).parameters.values()
    return {p.name: p.annotation for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, str):  # YAML reads 1e6 as text
        value = float(value) if any(c in value.lower() for c in ".e") else int(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if not isinstance(value, (int, float)):
        raise ValueError(value)
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(value)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(value)
    return value


def _to_str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):  # run.out_dir=2024 reads as a number
        raise ValueError(value)
    return str(value)


def _to_tuple(value: Any) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ValueError(value)
    return tuple(_to_float(v) for v in value)


def _to_dict(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(value)
    return dict(value)


# declared type -> (converter, what it accepts, for error messages)
_CONVERTERS = {
    "bool": (_to_bool, "true or false (also 1/0, yes/no)"),
    "int": (_to_int, "a whole number"),
    "float": (_to_float, "a number"),
    "str": (_to_str, "text"),
    "tuple": (_to_tuple, "a list of numbers"),
    "dict": (_to_dict, "a mapping of keys to values"),
}


def convert_value(key: str, kind: str, value: Any) -> Any:
    """``value`` as the declared type ``kind`` (``"int"``, ``"bool | None"``, ...) of config key ``key``.

    Raises ``ValueError`` naming the key and what it accepts. Booleans parse only from
    true/false, 1/0, yes/no; whole numbers reject fractions (``128.7``); numbers may be text
    (YAML reads ``1e-3`` as text).
    """
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if base not in _CONVERTERS:  # a type of its own (none today): the class it goes to checks it
        return value
    converter, accepted = _CONVERTERS[base]
    if value is None and optional:
        return None
    try:
        return converter(value)
    except (TypeError, ValueError):
        accepted += " or null" if optional else ""
        raise ValueError(f"{key} must be {accepted}, got {value!r}") from None


def _parse_value(text: str, where: str) -> Any:
    """``text`` read as YAML (``1e-3``, ``true``, ``[0.9, 0.95]``); errors name ``where`` it came from."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{where} is not valid YAML: {err}") from None


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
        node[parts[-1]] = _parse_value(value, f"override {item!r}")
    return raw


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # package data: the paper presets


def shipped_configs() -> list[str]:
    """Names of the presets shipped with foxacp (``--config NAME``)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def resolve_config_path(spec: str | Path) -> Path:
    """A YAML file from a path, or from the name of a shipped preset (``fox-pro-125m-16k``)."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    close = difflib.get_close_matches(path.stem, shipped_configs(), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise FileNotFoundError(f"config {str(spec)!r} is neither a file nor a shipped preset{hint} "
                            f"(shipped: {', '.join(shipped_configs())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The config from a YAML file or shipped preset name (None: the defaults) and ``overrides``."""
    raw: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        raw = _parse_value(path.read_text(), f"config file {path}") or {}
        _check(isinstance(raw, dict), f"config file {path} must hold a mapping of sections, got {raw!r}")
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
