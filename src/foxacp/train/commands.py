"""``foxacp train``, ``foxacp export`` and ``foxacp demo``."""

from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="pretrain a model (one process, or many under torchrun)")
    train.add_argument("--config", default=None, help="YAML preset (see configs/); omitted: the tiny CPU defaults")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.out_dir")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-3 model.overrides.acp=true")
    train.set_defaults(func=_train)

    export = subparsers.add_parser("export", help="write a checkpoint as a Hugging Face folder")
    export.add_argument("checkpoint", help="a checkpoint folder (…/checkpoints/step_N) or a run folder")
    export.add_argument("out", help="output folder for save_pretrained")
    export.set_defaults(func=_export)

    demo = subparsers.add_parser("demo", help="prepare the embedded corpus, train ACP on/off, write a report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo's)")
    demo.set_defaults(func=_demo)


def _train(args) -> int:
    from . import distributed
    from .config import load_config
    from .trainer import Trainer

    trainer = Trainer(load_config(args.config, args.overrides), resume=args.resume)
    try:
        trainer.fit()
    finally:
        trainer.close()
        distributed.shutdown()
    return 0


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself or from a run folder (its newest checkpoint)."""
    from . import checkpoint

    path = Path(path)
    if (path / "trainer.json").exists():
        return path
    found = checkpoint.latest(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint (no trainer.json) nor a run folder with checkpoints")
    return found


def model_from_checkpoint(path: str | Path):
    """``(FoxForCausalLM, trainer state)`` rebuilt from a training checkpoint, on CPU, float32."""
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


def _export(args) -> int:
    from ..models.hf_tokenizer import save_training_tokenizer

    model, state = model_from_checkpoint(args.checkpoint)
    model.save_pretrained(args.out)
    (Path(args.out) / "foxacp_training.json").write_text(json.dumps(
        {"step": state["step"], "tokens": state["tokens"], "tokenizer": state.get("tokenizer"),
         "config": state["config"]}, indent=1))
    if save_training_tokenizer(args.out, state) is None:
        print(f"note: no tokenizer written (the run's tokenizer {state.get('tokenizer')!r} is not available here)")
    print(f"wrote {args.out} (step {state['step']})")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps)
    return 0
