"""``foxacp train`` and ``foxacp export``: arguments in, library calls out."""

from __future__ import annotations


def register(subparsers) -> None:
    train = subparsers.add_parser("train")
    train.add_argument("--config", default=None,
                       help="a shipped preset by name (e.g. fox-pro-125m-16k; see foxacp/configs) or a YAML "
                            "file; omitted: the tiny CPU defaults")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in run.out_dir (an error when there is none)")
    resume.add_argument("--auto-resume", action="store_true",
                        help="continue from the newest checkpoint in run.out_dir if there is one, else start "
                             "a new run (for jobs a scheduler may requeue)")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-3 model.overrides.acp=true")
    train.set_defaults(func=_train)

    export = subparsers.add_parser("export")
    export.add_argument("checkpoint", help="a checkpoint folder (…/checkpoints/step_N) or a run folder")
    export.add_argument("out", help="output folder for save_pretrained")
    export.set_defaults(func=_export)


def _train(args) -> int:
    """Train; the exit code is 128 + N when signal N stopped the run (after its checkpoint)."""
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # checked before torch loads: bad input fails fast
    from . import checkpoint, distributed
    from .trainer import Trainer

    has_checkpoint = checkpoint.latest(cfg.run.out_dir) is not None
    if args.resume and not has_checkpoint:
        raise FileNotFoundError(f"--resume: run.out_dir {cfg.run.out_dir} has no checkpoint to resume from "
                                f"(nothing under {checkpoint.checkpoint_root(cfg.run.out_dir)}); drop --resume "
                                f"to start a new run, or use --auto-resume to start one when there is none")
    trainer = Trainer(cfg, resume=has_checkpoint and (args.resume or args.auto_resume))
    try:
        trainer.fit()
    finally:
        trainer.close()
        distributed.shutdown()
    return 128 + trainer.stop_signal if trainer.stop_signal is not None else 0


def _export(args) -> int:
    from ..models.hf_tokenizer import save_training_tokenizer
    from .loading import load_trained_model, write_training_meta

    model, meta = load_trained_model(args.checkpoint)
    model.save_pretrained(args.out)
    write_training_meta(args.out, meta)
    if save_training_tokenizer(args.out, meta) is None:
        print(f"note: no tokenizer written (the run's tokenizer {meta.get('tokenizer')!r} is not available here)")
    print(f"wrote {args.out} (step {meta['step']})")
    return 0
