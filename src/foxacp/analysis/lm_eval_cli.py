"""``python -m foxacp.analysis.lm_eval_cli ARGS``: EleutherAI's ``lm_eval`` command with foxacp's
model type registered first (plain ``lm_eval --model hf`` does not know ``model_type="foxacp"``).

Every argument goes to lm-eval unchanged; see docs/lm-eval.md.
"""

from __future__ import annotations

import foxacp.models  # noqa: F401  (registers model_type "foxacp" with AutoConfig / AutoModelForCausalLM)


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        raise SystemExit(f"lm-eval is not installed ({err}); pip install 'lm-eval[hf]'") from None
    cli_evaluate()


if __name__ == "__main__":
    main()
