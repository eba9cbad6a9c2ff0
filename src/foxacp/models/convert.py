"""Convert a checkpoint of the FoX reference implementation into a foxacp Hugging Face folder.

The reference (github.com/zhixuan-lin/forgetting-transformer) saves its models, and the paper's
released checkpoints, as ``ForgettingTransformerForCausalLM`` folders (``model_type``
``"forgetting_transformer-project_fox"``, written by its ``save_model.py``): ``config.json``, the
weights (``model.safetensors`` or ``pytorch_model.bin``, possibly sharded) and a tokenizer.
:func:`convert_checkpoint` maps the config and every weight; anything foxacp cannot represent
exactly (a key it does not know, a setting the reference supports and foxacp does not) raises
:class:`ConversionError` naming it. Nothing is guessed and nothing is dropped silently.

Config (reference field -> ``FoxConfig`` field)::

    fgate_type="full", use_rope=False     architecture "fox-*"
    fgate_type="none", use_rope=True      architecture "transformer-*" (the paper's Transformer (Pro))
    qk_norm, use_k_shift = use_v_shift,   use_qk_norm, use_kv_shift, use_output_gate ("*-pro" when all
    use_output_gate = use_output_norm      three are on, else "*-llama" with the switches stated)
    vocab_size, hidden_size,              same names
    num_hidden_layers, initializer_range,
    use_cache, bos/eos/pad_token_id
    num_heads                             num_attention_heads
    hidden_ratio, intermediate_size       mlp_ratio; intermediate_size by the reference's rule
                                          (256 * ceil(int(hidden * ratio * 2/3) / 256)) when None
    norm_eps                              rms_norm_eps (block norms, final norm, output norm)
    (library default 1e-5)                qk_norm_eps (the reference's QK-norm never receives norm_eps)
    rope_base                             rope_theta
    log_pruning_tolerance                 acp=True, acp_log_eps (FoX only; None: acp=False)
    max_position_embeddings               same (None: the tokenizer's model_max_length, else foxacp's)
    tie_word_embeddings=True              untied copy: lm_head = the embedding (same logits)

Accepted and not mapped, because the reference model never reads them: ``elementwise_affine``,
``attention_bias``, ``fuse_norm``, ``fuse_cross_entropy``, and the generic Hugging Face fields.
Refused: ``num_kv_heads``/``window_size`` other than None, ``hidden_act`` other than ``"swish"``,
``fgate_type`` ``"bias_only"``/``"fixed"`` or other gate/RoPE combinations, ``fgate_bias_init``,
``decay_time_min/max``, only one of ``use_k_shift``/``use_v_shift``, only one of
``use_output_gate``/``use_output_norm``, ``ogate_act`` other than ``"sigmoid"``.

Weights (``P = model.layers.{i}.``; ``d`` hidden, ``H`` heads, ``D = d / H``, ``I`` MLP width)::

    reference                              foxacp                                   change
    model.embeddings.weight                model.embed_tokens.weight
    model.norm.weight                      model.norm.weight
    lm_head.weight (V, d)                  lm_head.weight (padded V, d)             zero rows appended
    P attn_norm.weight                     P input_layernorm.weight
    P mlp_norm.weight                      P post_attention_layernorm.weight
    P attn.q_proj.weight                   P self_attn.q_proj.weight
    P attn.k_proj.weight                   P self_attn.k_proj.weight                (no KV-shift)
    P attn.k_proj.linear.weight            P self_attn.k_proj.weight                (KV-shift)
    P attn.k_proj.shift_proj.weight        P self_attn.k_shift_proj.weight          (KV-shift)
    P attn.v_proj[.linear|.shift_proj]...  P self_attn.v_proj / v_shift_proj        as for k
    P attn.o_proj.weight                   P self_attn.o_proj.weight
    P attn.fgate_proj.weight / .bias       P self_attn.fgate_proj.weight / .bias    (FoX)
    P attn.q_norm.weight (d,)              P self_attn.q_norm.weight (H, D)         reshaped
    P attn.q_norm.weight (D,) shared       P self_attn.q_norm.weight (H, D)         repeated per head
    P attn.k_norm.weight                   P self_attn.k_norm.weight                as q_norm
    P attn.ogate_proj.weight               P self_attn.g_proj.weight
    P attn.output_norm.weight (d,)         P self_attn.o_norm.weight (H, D)         reshaped
    P mlp.gate_proj.weight (2I, d)         P mlp.gate_proj.weight (rows :I),        split: the reference
                                           P mlp.up_proj.weight (rows I:)           gates with the first half
    P mlp.down_proj.weight                 P mlp.down_proj.weight

The reference's ``ForgettingTransformerForCausalLM`` covers FoX (LLaMA and Pro) and the
Transformer (Pro); its Transformer (LLaMA) baseline is another model class and is not converted.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import FoxConfig

REFERENCE_MODEL_TYPE = "forgetting_transformer-project_fox"
REFERENCE_ARCHITECTURE = "ForgettingTransformerForCausalLM"
# The reference's RMSNorm/GroupNorm default eps, which its QK-norm always uses.
REFERENCE_QK_NORM_EPS = 1e-5

# What the reference's config class fills in for a field that config.json leaves out.
REFERENCE_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 2048, "hidden_ratio": 4, "intermediate_size": None,
    "num_hidden_layers": 24, "num_heads": 32, "num_kv_heads": None, "hidden_act": "swish",
    "window_size": None, "max_position_embeddings": 2048, "initializer_range": 0.02,
    "elementwise_affine": True, "norm_eps": 1e-6, "use_cache": True, "pad_token_id": None,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "attention_bias": False,
    "fuse_norm": True, "fuse_cross_entropy": True, "rope_base": 500000.0, "use_rope": False,
    "use_output_gate": False, "ogate_act": "sigmoid", "fgate_type": "full", "fgate_bias_init": False,
    "decay_time_min": None, "decay_time_max": None, "use_output_norm": False, "qk_norm": False,
    "qk_norm_share_param_across_head": False, "use_k_shift": False, "use_v_shift": False,
    "log_pruning_tolerance": None,
}
# Hugging Face bookkeeping that says nothing about the network.
_BOOKKEEPING_KEYS = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
                     "_name_or_path", "_commit_hash", "_attn_implementation_autoset"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


class ConversionError(ValueError):
    """The source folder is not a reference checkpoint foxacp can represent exactly."""


# ---- config ------------------------------------------------------------------------------------
def _generic_config_keys() -> set[str]:
    """Fields every Hugging Face config carries (return_dict, output_attentions, ...)."""
    from transformers import PretrainedConfig

    return set(PretrainedConfig().to_dict()) | _BOOKKEEPING_KEYS


def read_reference_config(raw: Mapping) -> dict:
    """The reference config with its class defaults filled in.

    Raises :class:`ConversionError` for another ``model_type``/architecture or keys that neither
    the reference config nor Hugging Face's generic config has.
    """
    if raw.get("model_type") != REFERENCE_MODEL_TYPE:
        raise ConversionError(f"config.json: model_type is {raw.get('model_type')!r}, expected "
                              f"{REFERENCE_MODEL_TYPE!r} (the reference's {REFERENCE_ARCHITECTURE})")
    architectures = raw.get("architectures")
    if architectures is not None and list(architectures) != [REFERENCE_ARCHITECTURE]:
        raise ConversionError(f"config.json: architectures is {architectures}, expected [{REFERENCE_ARCHITECTURE!r}]")
    generic = _generic_config_keys()
    unknown = sorted(k for k in raw if k not in REFERENCE_DEFAULTS and k not in generic)
    if unknown:
        raise ConversionError(f"config.json: unknown keys {unknown} (not fields of the reference's config)")
    return {**REFERENCE_DEFAULTS, **{k: v for k, v in raw.items() if k in REFERENCE_DEFAULTS}}


def _unsupported_settings(ref: Mapping) -> list[str]:
    """One line per reference setting foxacp cannot represent (empty when all can be)."""
    problems = []
    gate_rope = (ref["fgate_type"], bool(ref["use_rope"]))
    if gate_rope not in (("full", False), ("none", True)):
        problems.append(f"fgate_type={ref['fgate_type']!r} with use_rope={ref['use_rope']} (foxacp has FoX: "
                        "'full' without RoPE, and the Transformer: 'none' with RoPE)")
    for key, ok, expected in (
        ("num_kv_heads", ref["num_kv_heads"] is None, "None"),
        ("window_size", ref["window_size"] is None, "None"),
        ("hidden_act", ref["hidden_act"] == "swish", "'swish'"),
        ("fgate_bias_init", not ref["fgate_bias_init"], "False"),
        ("decay_time_min", ref["decay_time_min"] is None, "None"),
        ("decay_time_max", ref["decay_time_max"] is None, "None"),
        ("use_v_shift", bool(ref["use_v_shift"]) == bool(ref["use_k_shift"]), "equal to use_k_shift"),
        ("use_output_norm", bool(ref["use_output_norm"]) == bool(ref["use_output_gate"]),
         "equal to use_output_gate (foxacp's output gate always has the output norm)"),
        ("ogate_act", not ref["use_output_gate"] or ref["ogate_act"] == "sigmoid", "'sigmoid'"),
    ):
        if not ok:
            problems.append(f"{key}={ref[key]!r} (foxacp needs {expected})")
    if ref["hidden_size"] % ref["num_heads"] != 0:
        problems.append(f"hidden_size={ref['hidden_size']} is not a multiple of num_heads={ref['num_heads']}")
    tolerance = ref["log_pruning_tolerance"]
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance < 0):
        problems.append(f"log_pruning_tolerance={tolerance!r} (must be a negative number)")
    return problems


def _mlp_ratio(ref: Mapping) -> float:
    return 4.0 if ref["hidden_ratio"] is None else float(ref["hidden_ratio"])  # the reference reads None as 4


def reference_intermediate_size(ref: Mapping) -> int:
    """The reference's MLP width: ``intermediate_size``, else ``int(d * ratio * 2/3)`` rounded up to 256."""
    if ref["intermediate_size"] is not None:
        return int(ref["intermediate_size"])
    return 256 * math.ceil(int(ref["hidden_size"] * _mlp_ratio(ref) * 2 / 3) / 256)


def convert_config(raw: Mapping, *, model_max_length: int | None = None, **overrides) -> FoxConfig:
    """``FoxConfig`` for a reference ``config.json`` dict (see the module docstring's table).

    ``model_max_length``: the tokenizer's, used for ``max_position_embeddings`` when the
    reference leaves it None. ``overrides``: foxacp-only fields (e.g. ``pad_vocab_size_multiple``).
    """
    ref = read_reference_config(raw)
    problems = _unsupported_settings(ref)
    if problems:
        raise ConversionError("the reference config has settings foxacp cannot represent: " + "; ".join(problems))
    is_fox = ref["fgate_type"] == "full"
    extras = dict(use_qk_norm=bool(ref["qk_norm"]), use_kv_shift=bool(ref["use_k_shift"]),
                  use_output_gate=bool(ref["use_output_gate"]))
    flavour = "pro" if all(extras.values()) else "llama"
    max_positions = ref["max_position_embeddings"] or model_max_length
    fields = dict(
        architecture=f"{'fox' if is_fox else 'transformer'}-{flavour}",
        vocab_size=ref["vocab_size"], hidden_size=ref["hidden_size"],
        num_hidden_layers=ref["num_hidden_layers"], num_attention_heads=ref["num_heads"],
        intermediate_size=reference_intermediate_size(ref),
        mlp_ratio=_mlp_ratio(ref),
        rms_norm_eps=float(ref["norm_eps"]), qk_norm_eps=REFERENCE_QK_NORM_EPS,
        rope_theta=float(ref["rope_base"]), initializer_range=ref["initializer_range"],
        acp=is_fox and ref["log_pruning_tolerance"] is not None,
        use_cache=ref["use_cache"], bos_token_id=ref["bos_token_id"], eos_token_id=ref["eos_token_id"],
        pad_token_id=ref["pad_token_id"], tie_word_embeddings=False, **extras,
    )
    if fields["acp"]:
        fields.update(acp_log_eps=float(ref["log_pruning_tolerance"]), acp_rule="paper")  # the reference's bound
    if max_positions:
        fields["max_position_embeddings"] = int(max_positions)
    return FoxConfig(**{**fields, **overrides})


# ---- weights -----------------------------------------------------------------------------------
class _Source:
    """The reference state dict, consumed key by key (so leftovers can be reported)."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.remaining = dict(state)

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.remaining:
            raise ConversionError(f"weight {key!r} is missing from the reference checkpoint")
        tensor = self.remaining.pop(key)
        if tuple(tensor.shape) != tuple(shape):
            raise ConversionError(f"weight {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        return tensor


def _head_norm(src: _Source, key: str, heads: int, head_dim: int, shared: bool = False) -> torch.Tensor:
    """A reference norm scale ``(d,)`` (or ``(D,)`` when ``shared`` by all heads) as foxacp's ``(H, D)``."""
    if shared:
        return src.take(key, (head_dim,)).expand(heads, head_dim).clone()
    return src.take(key, (heads * head_dim,)).reshape(heads, head_dim).clone()


def _convert_layer(src: _Source, out: dict, i: int, ref: Mapping, config: FoxConfig) -> None:
    d, H, D, inter = config.hidden_size, config.num_attention_heads, config.head_dim, config.intermediate_size
    p = f"model.layers.{i}."  # the same block prefix on both sides
    a, b = p + "attn.", p + "self_attn."
    out[p + "input_layernorm.weight"] = src.take(p + "attn_norm.weight", (d,))
    out[p + "post_attention_layernorm.weight"] = src.take(p + "mlp_norm.weight", (d,))
    out[b + "q_proj.weight"] = src.take(a + "q_proj.weight", (H * D, d))
    for name in ("k", "v"):
        if config.use_kv_shift:
            out[b + f"{name}_proj.weight"] = src.take(a + f"{name}_proj.linear.weight", (H * D, d))
            out[b + f"{name}_shift_proj.weight"] = src.take(a + f"{name}_proj.shift_proj.weight", (H, d))
        else:
            out[b + f"{name}_proj.weight"] = src.take(a + f"{name}_proj.weight", (H * D, d))
    out[b + "o_proj.weight"] = src.take(a + "o_proj.weight", (d, H * D))
    if config.uses_forget_gate:
        out[b + "fgate_proj.weight"] = src.take(a + "fgate_proj.weight", (H, d))
        out[b + "fgate_proj.bias"] = src.take(a + "fgate_proj.bias", (H,))
    if config.use_qk_norm:
        shared = bool(ref["qk_norm_share_param_across_head"])
        out[b + "q_norm.weight"] = _head_norm(src, a + "q_norm.weight", H, D, shared)
        out[b + "k_norm.weight"] = _head_norm(src, a + "k_norm.weight", H, D, shared)
    if config.use_output_gate:
        out[b + "g_proj.weight"] = src.take(a + "ogate_proj.weight", (H * D, d))
        out[b + "o_norm.weight"] = _head_norm(src, a + "output_norm.weight", H, D)
    gate_up = src.take(p + "mlp.gate_proj.weight", (2 * inter, d))
    out[p + "mlp.gate_proj.weight"] = gate_up[:inter].clone()  # the reference's gate is the first half
    out[p + "mlp.up_proj.weight"] = gate_up[inter:].clone()
    out[p + "mlp.down_proj.weight"] = src.take(p + "mlp.down_proj.weight", (d, inter))


def convert_state_dict(state: Mapping[str, torch.Tensor], raw_config: Mapping,
                       config: FoxConfig) -> dict[str, torch.Tensor]:
    """foxacp state dict for a reference one (see the module docstring's table).

    ``raw_config``: the reference ``config.json`` dict; ``config``: from :func:`convert_config`.
    Every reference key must be consumed: leftovers and missing or misshapen weights raise
    :class:`ConversionError` naming them.
    """
    ref = read_reference_config(raw_config)
    src = _Source(state)
    V, d = config.vocab_size, config.hidden_size
    out = {"model.embed_tokens.weight": src.take("model.embeddings.weight", (V, d)),
           "model.norm.weight": src.take("model.norm.weight", (d,))}
    for i in range(config.num_hidden_layers):
        _convert_layer(src, out, i, ref, config)
    embedding = out["model.embed_tokens.weight"]
    if ref["tie_word_embeddings"]:
        head = src.remaining.pop("lm_head.weight", embedding)  # tied heads are often not saved
        if tuple(head.shape) != (V, d) or not torch.equal(head, embedding):
            raise ConversionError("tie_word_embeddings=True but lm_head.weight differs from model.embeddings.weight")
    else:
        head = src.take("lm_head.weight", (V, d))
    padded = head.new_zeros(config.padded_vocab_size, d)  # foxacp's padded rows are zero, sliced off the logits
    padded[:V] = head
    out["lm_head.weight"] = padded
    if src.remaining:
        raise ConversionError(f"reference weights foxacp has no place for: {sorted(src.remaining)}")
    return out


# ---- folders -----------------------------------------------------------------------------------
def _load_weight_files(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: (sharded) safetensors, else (sharded) pytorch_model.bin."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{single}.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / single).is_file():
            files = [single]
        else:
            continue
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(_load_one(folder / name))
        return state
    raise ConversionError(f"{folder}: no model.safetensors or pytorch_model.bin (nor a sharded index)")


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _tokenizer_max_length(folder: Path) -> int | None:
    """``model_max_length`` of the folder's tokenizer (the reference writes its training length), if any."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("model_max_length")
    return int(value) if isinstance(value, int) and 0 < value < 10**9 else None


def tokenizer_note(folder: str | Path) -> str | None:
    """A warning when the folder's tokenizer names a class transformers does not have, else None.

    The paper's checkpoints use the reference's ``JSONGPT2Tokenizer`` (GPT-2 BPE on JSON-escaped
    text, as LongCrawl64 was tokenized); loading it needs the reference's tokenizer module.
    """
    import transformers

    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return None
    name = json.loads(path.read_text()).get("tokenizer_class")
    if not name or hasattr(transformers, name):
        return None
    return (f"the tokenizer files were copied as they are; their class {name!r} is not part of transformers, so "
            "AutoTokenizer needs the code that defines it (for JSONGPT2Tokenizer: `import "
            "forgetting_transformer.tokenizer` from the reference repository)")


def convert_checkpoint(src: str | Path, out: str | Path, **overrides):
    """Convert the reference folder ``src`` into the foxacp folder ``out``; returns the model.

    Writes ``save_pretrained`` output (config + safetensors, the source's dtype) and copies the
    source's tokenizer files unchanged. ``out`` must not exist or be empty. ``overrides``:
    foxacp-only config fields (e.g. ``acp=True``).
    """
    from .modeling import FoxForCausalLM

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src}: no config.json (expected a reference Hugging Face folder)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} exists and is not an empty folder")
    raw = json.loads((src / "config.json").read_text())
    config = convert_config(raw, model_max_length=_tokenizer_max_length(src), **overrides)
    state = convert_state_dict(_load_weight_files(src), raw, config)
    with torch.device("meta"):  # no init: every parameter comes from the checkpoint
        model = FoxForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return model
