"""Check ``foxacp convert`` against the FoX reference code and write the CPU test's fixture.

For each variant (FoX Pro, FoX LLaMA, Transformer Pro) this builds a tiny model with the
reference's own code (github.com/zhixuan-lin/forgetting-transformer, not vendored: bring its
source), gives it random weights, saves it with ``save_pretrained`` as the reference does, computes
its logits, converts the folder with foxacp and compares foxacp's float32 logits. It exits 1 when
any variant misses ``TOLERANCE``. With ``--out`` it writes, per variant, the fixture of
``tests/test_convert.py``: the reference folder (``config.json`` + ``model.safetensors``) and
``expected.safetensors`` (``input_ids``, ``attention_mask`` with the last row left-padded, the
reference's ``logits``, zero at padded positions) plus ``expected.json``.

The reference needs from its repository only ``src/forgetting_transformer/ops/`` and
``src/forgetting_transformer/model/forgetting_transformer/`` (its top-level ``__init__`` is not
needed: the script imports the subpackages directly), and the ``einops`` package. Its attention
kernel takes float16/bfloat16 only, so it runs under autocast (``--dtype``) and foxacp in float32.
``--device cpu`` runs the reference's Triton kernels in Triton's interpreter (about 30 s; set
TRITON_INTERPRET=1); the few CUDA-only pieces around them are emulated (``_emulate_cuda_pieces``).

    R=<a checkout of the reference>; S=.scratch-refsrc   # .scratch*/ is git-ignored
    mkdir -p $S/src/forgetting_transformer/model $S/deps
    cp -r $R/src/forgetting_transformer/ops $S/src/forgetting_transformer/
    cp -r $R/src/forgetting_transformer/model/forgetting_transformer $S/src/forgetting_transformer/model/
    cp -r <site-packages>/einops $S/deps/                 # unless einops is installed
    PYTHONPATH=src:$S/src:$S/deps python benchmarks/convert_check.py --out tests/fixtures/reference_fox \
        --reference-commit $(git -C $R rev-parse HEAD)
    # without a GPU: TRITON_INTERPRET=1 ... --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from foxacp.models import FoxForCausalLM
from foxacp.models.convert import convert_checkpoint

# The reference's models, tiny (fixtures of a few hundred kB): 2 heads of 16 (its kernel takes
# head dims 16, 32, 64 or 128).
COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_heads=2, norm_eps=1e-6,
              bos_token_id=None, eos_token_id=None, max_position_embeddings=None, use_cache=False)
PRO = dict(use_k_shift=True, use_v_shift=True, qk_norm=True, use_output_gate=True, use_output_norm=True,
           hidden_ratio=3.5)
VARIANTS = {
    "pro": dict(COMMON, **PRO),  # intermediate size by the reference's rule: 256
    "llama": dict(COMMON, intermediate_size=64),
    "transformer-pro": dict(COMMON, **PRO, fgate_type="none", use_rope=True),
}
TOLERANCE = 1e-2  # max|foxacp - reference| / max|reference|, as in tests/test_convert.py


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="fixture root to write (e.g. tests/fixtures/reference_fox)")
    parser.add_argument("--refsrc", default=".scratch-refsrc/src", help="folder holding forgetting_transformer/")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (interpreter)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                        help="the reference's autocast dtype")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--pad", type=int, default=9, help="left padding of the batch's last row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-commit", default=None, help="recorded in expected.json")
    return parser.parse_args()


def import_reference(refsrc: str):
    """The reference's config and model classes, imported without its top-level package
    (whose ``__init__`` pulls in every baseline model)."""
    root = Path(refsrc).resolve() / "forgetting_transformer"
    if not (root / "model" / "forgetting_transformer" / "modeling_forgetting_transformer.py").is_file():
        raise SystemExit(f"the reference's source is not under {root} (see this script's docstring)")
    for name, path in (("forgetting_transformer", root), ("forgetting_transformer.model", root / "model")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules.setdefault(name, package)
    module = importlib.import_module("forgetting_transformer.model.forgetting_transformer")
    model_class = module.ForgettingTransformerForCausalLM
    if not isinstance(getattr(model_class, "_tied_weights_keys", None), (dict, type(None))):
        # transformers >= 5 wants a {target: source} dict here; these models tie nothing.
        model_class._tied_weights_keys = None
    return module.ForgettingTransformerConfig, model_class


def _emulate_cuda_pieces():
    """For ``--device cpu``: the reference computes its SwiGLU with a CUDA jiterator kernel, enters
    a CUDA device context around its Triton calls, picks tile configs from the GPU's compute
    capability or by timing them, and picks its compute dtype from CUDA autocast only. Replace
    the first by the same formula in torch, skip the second, use fixed tiles (tiles change speed,
    not results), and answer the last from CPU autocast."""
    glu = importlib.import_module("forgetting_transformer.model.forgetting_transformer.glu_linear")
    glu.swiglu_fwd = lambda x, y: (F.silu(x.float()) * y.float()).to(x.dtype)
    glu.glu_fwd = lambda x, y: (torch.sigmoid(x.float()) * y.float()).to(x.dtype)
    utils = importlib.import_module("forgetting_transformer.model.forgetting_transformer.fla_utils")
    utils.custom_device_ctx = lambda index: contextlib.nullcontext()
    torch.cuda.device = lambda index: contextlib.nullcontext()  # the RoPE kernel's device context
    from triton.runtime.autotuner import Autotuner  # imported here: only the interpreter run needs it

    Autotuner._bench = lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0]  # all equal: the first runs
    attention = importlib.import_module("forgetting_transformer.ops.forgetting_attention")
    attention.get_fwd_config = lambda *args: (64, 32, 1, 4)  # BLOCK_M, BLOCK_N, stages, warps
    enabled, get_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
    torch.is_autocast_enabled = lambda *a: enabled("cpu") if a == ("cuda",) else enabled(*a)
    torch.get_autocast_dtype = lambda device: get_dtype("cpu" if device == "cuda" else device)


def randomize_(model, seed: int) -> None:
    """Weights far from the reference's init, so that every mapping error shows in the logits:
    linear weights N(0, 1/fan_in), norm scales 1 + 0.3 N(0, 1), forget-gate biases U(0, 4).
    Token embeddings (and, with QK-norm, the q and k projections) are made so small that the
    RMSNorms' eps changes the result: a wrong ``norm_eps``/QK-norm eps mapping shows too."""
    qk_names = ("q_proj.weight", "k_proj.weight", "k_proj.linear.weight") if model.config.qk_norm else ()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if name.endswith("fgate_proj.bias"):
                value = 4 * torch.rand(param.shape, generator=g)
            elif "norm" in name:
                value = 1 + 0.3 * noise
            elif "embeddings" in name:
                value = 1e-3 * noise  # mean square 1e-6 = norm_eps
            elif name.endswith(qk_names):
                value = 3e-3 * noise / param.shape[-1] ** 0.5  # q, k mean square ~1e-5 = the QK-norm eps
            else:
                value = noise / param.shape[-1] ** 0.5
            param.copy_(value)


def inputs(args, vocab_size: int):
    """``(input_ids, attention_mask)``: random ids; the last row left-padded by ``--pad`` tokens."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, vocab_size, (args.batch, args.seq_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, :args.pad] = 0
    return ids, mask


def reference_logits(model, ids, mask, device, dtype):
    """The reference's logits in float32, zero at padded positions (whose outputs mean nothing)."""
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=dtype):
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, return_dict=True,
                    output_attentions=False, output_hidden_states=False)
    return out.logits.float().cpu() * mask[..., None]


def foxacp_logits(folder: Path, ids, mask, device):
    model = FoxForCausalLM.from_pretrained(str(folder)).float().to(device).eval()
    model.set_attention_backend("torch")  # float32 end to end: the reference's dtype is the only noise
    with torch.no_grad():
        return model(ids.to(device), attention_mask=mask.to(device)).logits.float().cpu() * mask[..., None]


def check_variant(name: str, fields: dict, classes, args, device, dtype, work: Path) -> dict:
    """Build, save, convert and compare one variant; returns its numbers (and writes its fixture)."""
    config_class, model_class = classes
    torch.manual_seed(args.seed)
    model = model_class(config_class(**fields))
    randomize_(model, args.seed)
    model = model.to(device).eval()
    ids, mask = inputs(args, fields["vocab_size"])
    expected = reference_logits(model, ids, mask, device, dtype)
    ref_dir = work / name if args.out is None else Path(args.out) / name
    ref_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(ref_dir))
    convert_checkpoint(ref_dir, work / f"{name}-foxacp")
    got = foxacp_logits(work / f"{name}-foxacp", ids, mask, device)
    scale = expected.abs().max().item()
    error = (got - expected).abs().max().item()
    result = {"variant": name, "max_abs_error": error, "max_abs_logit": scale, "relative": error / scale,
              "argmax_agreement": (got.argmax(-1) == expected.argmax(-1))[mask.bool()].float().mean().item(),
              "reference_dtype": args.dtype, "device": str(device),
              "reference_commit": args.reference_commit, "tolerance": TOLERANCE,
              "passed": error <= TOLERANCE * scale}
    if args.out is not None:
        save_file({"input_ids": ids, "attention_mask": mask, "logits": expected},
                  str(ref_dir / "expected.safetensors"))
        (ref_dir / "expected.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> int:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu needs TRITON_INTERPRET=1 in the environment (set before Triton loads)")
    dtype = getattr(torch, args.dtype)
    classes = import_reference(args.refsrc)
    if device.type == "cpu":
        _emulate_cuda_pieces()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fields in VARIANTS.items():
            results.append(check_variant(name, fields, classes, args, device, dtype, Path(tmp)))
            print(json.dumps(results[-1]))
    failed = [r["variant"] for r in results if not r["passed"]]
    print(f"FAILED: {failed}" if failed else f"all {len(results)} variants match the reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
