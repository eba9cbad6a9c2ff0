"""``foxacp lm-eval ARGS`` (or ``python -m foxacp.analysis.lm_eval_cli ARGS``): EleutherAI's
``lm-eval`` command with foxacp's model type registered first (plain ``lm_eval --model hf`` does not
know ``model_type="foxacp"``) and BOS on for the ``hf`` model.

Every argument goes to lm-eval; the one change: for ``--model hf`` (lm-eval's default),
``add_bos_token=True`` joins ``--model_args`` unless the arguments already set ``add_bos_token``
(the paper's evaluation prepends BOS to every text). Needs the ``eval`` extra
(``pip install 'foxacp[eval]'``). See docs/lm-eval.md.
"""

from __future__ import annotations

import argparse
import json
import sys

EVAL_EXTRA = "pip install 'foxacp[eval]'"
# lm-eval's names of its Hugging Face model (lm_eval/models/huggingface.py); None: --model not given (hf)
HF_MODELS = (None, "hf", "hf-auto", "huggingface")
LM_EVAL_COMMANDS = ("run", "ls", "validate")


def _option_value(args: list[str], *names: str) -> str | None:
    """The value of the last ``--name VALUE`` / ``--name=VALUE`` in ``args``, else None."""
    value = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1:]
    return value


def _with_bos(value: str) -> str:
    """A ``--model_args`` value (``k=v,k=v`` or a JSON object) with ``add_bos_token=True`` added."""
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return json.dumps({**parsed, "add_bos_token": True})
    return f"{value},add_bos_token=True" if value else "add_bos_token=True"


def lm_eval_args(args: list[str]) -> list[str]:
    """``args`` for lm-eval with ``add_bos_token=True`` added to the ``--model_args`` of an hf run
    that does not set ``add_bos_token`` itself.

    Added to the value of the last ``--model_args`` (right whether lm-eval merges repeated
    ``--model_args``, as 0.4.10+ does, or keeps the last), else as ``--model_args add_bos_token=True``.
    """
    args = list(args[1:] if args[:1] == ["--"] else args)
    command = args[0] if args and args[0] in LM_EVAL_COMMANDS else None
    if command not in (None, "run") or not args or any(a in ("-h", "--help") for a in args):
        return args
    if _option_value(args, "--model", "-M") not in HF_MODELS:
        return args
    if any("add_bos_token" in a for a in args):
        return args
    last = max((i for i, a in enumerate(args) if a in ("--model_args", "-a") or a.startswith("--model_args=")),
               default=None)
    if last is None:
        if _option_value(args, "--config", "-C") is not None:
            # a --model_args here would replace the YAML's whole model_args: set add_bos_token there
            return args
        return args + ["--model_args", "add_bos_token=True"]
    if args[last].startswith("--model_args="):
        args[last] = "--model_args=" + _with_bos(args[last][len("--model_args="):])
    elif last + 1 < len(args) and not args[last + 1].startswith("-"):
        args[last + 1] = _with_bos(args[last + 1])
    else:
        args.insert(last + 1, "add_bos_token=True")
    return args


def _import_cli_evaluate():
    try:
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError as err:  # lm-eval, or one of its dependencies
        what = "lm-eval is not installed" if (err.name or "").partition(".")[0] == "lm_eval" else str(err)
        raise ValueError(f"{what}; {EVAL_EXTRA} installs it") from None
    return cli_evaluate


def run_lm_eval(args: list[str]) -> int:
    """Run lm-eval's command line on ``args`` (after :func:`lm_eval_args`); returns its exit code."""
    cli_evaluate = _import_cli_evaluate()
    import foxacp.models  # noqa: F401  (registers model_type "foxacp" with AutoConfig / AutoModelForCausalLM)

    saved = sys.argv
    sys.argv = ["lm-eval", *lm_eval_args(args)]
    try:
        cli_evaluate()
    except SystemExit as stop:  # lm-eval's argparse (bad arguments, --help)
        if stop.code is None or isinstance(stop.code, int):
            return int(stop.code or 0)
        print(stop.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "lm-eval", help="EleutherAI lm-evaluation-harness on a foxacp HF folder (BOS on)",
        usage="foxacp lm-eval [lm-eval arguments ...]", add_help=False,
        # no option prefix: every word, `--model` and `--help` included, lands in ARGS for lm-eval
        prefix_chars="\0",
        epilog="Every argument goes to lm-eval (`foxacp lm-eval run --help` lists them); for --model hf, "
               "add_bos_token=True joins --model_args unless add_bos_token is set. "
               f"Needs the eval extra: {EVAL_EXTRA}. See docs/lm-eval.md.")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for lm-eval")
    p.set_defaults(func=lambda args: run_lm_eval(args.lm_eval_args))


def main() -> None:
    try:
        code = run_lm_eval(sys.argv[1:])
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
