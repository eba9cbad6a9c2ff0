"""Models and held-out windows for the analyses: one loader for checkpoints and HF folders.

``load_model(spec)`` accepts a training checkpoint or run folder (``model_from_checkpoint``) or a
Hugging Face folder (``AutoModelForCausalLM.from_pretrained``; importing :mod:`foxacp.models`
registers FoX models). It returns the model and what its training used (context length,
held-out fraction, tokenizer), so evaluations default to the training run's held-out split.

``heldout_windows(store, L, n)`` returns ``n`` rows ``(input_ids, labels)`` of ``L`` tokens from
the held-out documents, in order (no shuffling), as the training loader cuts them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str  # a short label for tables and plots
    source: str  # the path it came from
    train_seq_len: int | None = None
    val_fraction: float | None = None
    tokenizer: str | None = None
    step: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_fox(self) -> bool:
        return bool(getattr(self.model.config, "uses_forget_gate", False))


def load_model(spec: str | Path, name: str | None = None) -> LoadedModel:
    """A model from a training checkpoint / run folder or a Hugging Face folder, on CPU."""
    path = Path(spec)
    label = name or _label(path)
    if _is_hf_folder(path):
        import foxacp.models  # noqa: F401  (registers model_type "foxacp" with the Auto classes)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        meta_path = path / "foxacp_training.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        data = meta.get("config", {}).get("data", {})
        return LoadedModel(model.eval(), label, str(path), data.get("seq_len"), data.get("val_fraction"),
                           meta.get("tokenizer"), meta.get("step"))
    if path.exists():
        from ..train.commands import model_from_checkpoint

        model, state = model_from_checkpoint(path)
        data = state.get("config", {}).get("data", {})
        return LoadedModel(model.eval(), label, str(path), data.get("seq_len"), data.get("val_fraction"),
                           state.get("tokenizer"), state.get("step"))
    raise FileNotFoundError(f"{spec}: neither a Hugging Face folder (config.json) nor a checkpoint / run folder")


def _is_hf_folder(path: Path) -> bool:
    """A save_pretrained folder: its config.json names a ``model_type`` (a run folder's does not)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _label(path: Path) -> str:
    parts = [p for p in path.resolve().parts if p not in ("checkpoints",)]
    return "/".join(parts[-2:]) if parts and parts[-1].startswith("step_") else (parts[-1] if parts else str(path))


def fox_layers(model) -> list:
    from ..models.attention import ForgettingAttentionLayer

    return [m for m in model.modules() if isinstance(m, ForgettingAttentionLayer)]


def set_acp(model, enabled: bool) -> None:
    """Switch ACP on or off in a loaded FoX model (its config is the layers' one source)."""
    model.set_acp(bool(enabled))


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]


def open_data(source: str, tokenizer: str | None = None):
    from ..data import open_store

    return open_store(source, tokenizer=tokenizer or "gpt2")


def store_tokenizer(store, fallback: str | None = None):
    """The tokenizer the store was made with (or ``fallback``, a tokenizer name)."""
    from ..data import get_tokenizer

    if hasattr(store, "tokenizer"):
        return store.tokenizer()
    return get_tokenizer(getattr(store, "tokenizer_name", None) or fallback or "gpt2")


@dataclass
class Windows:
    input_ids: torch.Tensor  # (N, L) int64, each row starts with BOS
    labels: torch.Tensor  # (N, L) int64, input_ids shifted by one
    source: str  # which split/mode the rows came from (held-out documents unless it says otherwise)


def heldout_windows(store, seq_len: int, num: int, val_fraction: float = 0.05) -> Windows:
    """Up to ``num`` windows of ``seq_len`` tokens from the held-out documents, in order.

    Falls back, in this order, when the held-out documents are too short for ``seq_len``:
    held-out documents packed (joined with BOS), then all documents (training ones included);
    ``Windows.source`` says which was used.
    """
    from ..data import WindowLoader

    attempts = (("val", "document", "held-out documents"), ("val", "packed", "held-out documents, packed"),
                ("all", "document", "ALL documents (held-out ones too short)"),
                ("all", "packed", "ALL documents packed (documents too short)"))
    last_error = None
    for split, mode, label in attempts:
        try:
            loader = WindowLoader(store, seq_len, 1, mode=mode, split=split, val_fraction=val_fraction,
                                  shuffle=False)
        except ValueError as err:
            last_error = err
            continue
        count = min(num, loader.n_windows)
        # spread the rows over the split (first window of as many documents as possible)
        picks = sorted({int(round(i * (loader.n_windows - 1) / max(count - 1, 1))) for i in range(count)})
        batch = loader.make_batch(picks)
        return Windows(batch["input_ids"], batch["labels"], label)
    raise ValueError(f"no window of {seq_len} tokens in this store: {last_error}")
