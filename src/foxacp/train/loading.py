"""Trained models from disk: one loader for training checkpoints, run folders and Hugging Face folders.

``load_trained_model(path)`` returns ``(model, meta)`` on CPU in float32. ``meta`` is what the
training recorded: ``step``, ``tokens``, ``tokenizer`` (a name such as ``"gpt2"`` or None) and
``config`` (the training config as a dict); it is ``{}`` for a Hugging Face folder that foxacp did
not export. ``foxacp export`` writes the same dict as ``foxacp_training.json`` next to the weights
(``write_training_meta``), and ``read_training_meta`` is the one reader of that file.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.store import read_json_object

TRAINING_META = "foxacp_training.json"
_META_KEYS = ("step", "tokens", "tokenizer", "config")


def is_hf_folder(path: str | Path) -> bool:
    """A save_pretrained folder: its config.json names a ``model_type`` (a run folder's config.json does not)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself or from a run folder (its newest checkpoint)."""
    from . import checkpoint

    path = Path(path)
    if (path / "trainer.json").exists():
        return path
    found = checkpoint.latest(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a Hugging Face folder (config.json with a model_type), "
                                f"a checkpoint (trainer.json) nor a run folder with checkpoints")
    return found


def read_training_meta(folder: str | Path) -> dict:
    """``foxacp_training.json`` of an exported folder (``{}`` when there is none)."""
    path = Path(folder) / TRAINING_META
    if not path.is_file():
        return {}
    meta = read_json_object(path)
    return meta


def write_training_meta(folder: str | Path, meta: dict) -> Path:
    """Write ``meta`` (step, tokens, tokenizer, config) as ``foxacp_training.json`` into ``folder``."""
    path = Path(folder) / TRAINING_META
    path.write_text(json.dumps({key: meta.get(key) for key in _META_KEYS}, indent=1))
    return path


def _from_checkpoint(path: str | Path):
    """``(FoxForCausalLM, trainer state)`` rebuilt from a training checkpoint or run folder, on CPU, float32."""
    from ..models import FoxForCausalLM, preset_config
    from . import checkpoint

    ckpt = resolve_checkpoint(path)
    state = json.loads((ckpt / "trainer.json").read_text())
    model_cfg = state["config"]["model"]
    sizes = {key: state[key] for key in ("vocab_size", "bos_token_id", "eos_token_id")}
    config = preset_config(model_cfg["preset"], **{**sizes, **model_cfg["overrides"]})
    model = FoxForCausalLM(config)
    checkpoint.load_model_weights(ckpt, model)
    return model, state


def load_trained_model(path: str | Path):
    """``(model, meta)`` from a Hugging Face folder, a training checkpoint or a run folder (see module doc)."""
    path = Path(path)
    if is_hf_folder(path):
        import torch
        from transformers import AutoModelForCausalLM

        import foxacp.models  # noqa: F401  (registers model_type "foxacp" with the Auto classes)

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model.eval(), read_training_meta(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder, checkpoint or run folder")
    model, state = _from_checkpoint(path)
    return model.eval(), {key: state.get(key) for key in _META_KEYS}
