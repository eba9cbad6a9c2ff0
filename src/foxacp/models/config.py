"""``FoxConfig``: one Hugging Face config for the four architectures, and the paper's presets.

Architectures (``architecture=``):

===================== ============ ======= ================================ ==========
name                  forget gate  RoPE    Pro extras (QK-norm, KV-shift,   MLP ratio
                                           output norm + gate)
===================== ============ ======= ================================ ==========
``fox-pro``           yes          no      yes                              3.5
``fox-llama``         yes          no      no                               4
``transformer-pro``   no           yes     yes                              3.5
``transformer-llama`` no           yes     no                               4
===================== ============ ======= ================================ ==========

The MLP width is ``256 * ceil(hidden_size * ratio * 2/3 / 256)`` unless ``intermediate_size`` is
given. Every Pro extra can be switched on or off on its own (``use_qk_norm``, ``use_kv_shift``,
``use_output_gate``); ``None`` takes the architecture's default.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from ..ops.acp import ACP_RULES
from ..ops.backends import BACKEND_NAMES as ATTENTION_BACKENDS

ARCHITECTURES = ("fox-pro", "fox-llama", "transformer-pro", "transformer-llama")
FGATE_BIAS_INITS = ("zero", "spread")


def mlp_intermediate_size(hidden_size: int, ratio: float) -> int:
    """SwiGLU width: ``256 * ceil(hidden_size * ratio * 2/3 / 256)``."""
    return 256 * math.ceil(hidden_size * ratio * 2 / 3 / 256)


class FoxConfig(PretrainedConfig):
    """Configuration of :class:`~foxacp.models.FoxForCausalLM` (``model_type="foxacp"``).

    Field names follow Hugging Face where one exists. Derived fields (``num_key_value_heads``,
    ``head_dim``, ``intermediate_size``, the Pro switches) are resolved at construction, so a
    saved ``config.json`` states every size explicitly. Invalid combinations raise ``ValueError``.
    """

    model_type = "foxacp"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        architecture: str = "fox-pro",
        vocab_size: int = 50257,  # GPT-2 BPE, as in the paper
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,  # None: no GQA (= num_attention_heads)
        head_dim: int | None = None,  # None: hidden_size // num_attention_heads
        intermediate_size: int | None = None,  # None: from mlp_ratio (see mlp_intermediate_size)
        mlp_ratio: float | None = None,  # None: 3.5 for Pro, 4 for LLaMA
        rms_norm_eps: float = 1e-5,
        qk_norm_eps: float | None = None,  # None: rms_norm_eps (the reference code's QK-norm uses 1e-5)
        rope_theta: float = 500000.0,  # Transformer baselines only
        max_position_embeddings: int = 16384,  # informative: FoX has no position limit
        initializer_range: float = 0.02,
        use_qk_norm: bool | None = None,  # None: Pro default (per-head RMSNorm on q and k)
        use_kv_shift: bool | None = None,  # None: Pro default (data-dependent token shift of k, v)
        use_output_gate: bool | None = None,  # None: Pro default (per-head out norm * sigmoid gate)
        fgate_bias_init: str = "zero",  # "zero": f = 0.5 at init (paper); "spread": log-spaced
        fgate_min_decay: float = 8.0,  # "spread": shortest per-head decay length 1/(1-f), tokens
        fgate_max_decay: float = 65536.0,  # "spread": longest per-head decay length, tokens
        acp: bool = False,  # Adaptive Computation Pruning in forgetting attention
        acp_log_eps: float = -10.0,  # ACP bound: pruned attention mass <= e^acp_log_eps
        acp_decode: bool = False,  # ACP also in decoding steps (<= 64 new tokens against a cache)
        acp_rule: str = "paper",  # ACP bound: "paper" (arXiv 2504.06949) or "local" (data-aware, ops/acp.py)
        attention_backend: str = "auto",  # forgetting_attention backend ("auto": hopper on sm90+, else triton on GPU)
        activation_checkpointing: bool = False,  # recompute each block in backward
        pad_vocab_size_multiple: int = 64,  # LM-head rows padded (50257 -> 50304) for fast GEMMs
        loss_chunk_size: int = 2048,  # tokens per chunk of the chunked cross-entropy
        use_cache: bool = True,
        bos_token_id: int | None = 50256,
        eos_token_id: int | None = 50256,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {architecture!r}")
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers),
                            ("num_attention_heads", num_attention_heads),
                            ("pad_vocab_size_multiple", pad_vocab_size_multiple),
                            ("loss_chunk_size", loss_chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("activation_checkpointing", activation_checkpointing),
                            ("use_qk_norm", use_qk_norm), ("use_kv_shift", use_kv_shift),
                            ("use_output_gate", use_output_gate)):
            # bool("false") is True: a text value would switch the feature on silently (acp and
            # acp_decode are checked by update_acp)
            if not (isinstance(value, bool) or (value is None and name.startswith("use_"))):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if num_key_value_heads < 1 or num_attention_heads % num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_key_value_heads})")
        if head_dim is None:
            if hidden_size % num_attention_heads != 0:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                                 f"({num_attention_heads}), or give head_dim")
            head_dim = hidden_size // num_attention_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        is_pro = architecture.endswith("-pro")
        is_fox = architecture.startswith("fox-")
        if mlp_ratio is None:
            mlp_ratio = 3.5 if is_pro else 4.0
        if intermediate_size is None:
            intermediate_size = mlp_intermediate_size(hidden_size, mlp_ratio)
        if not is_fox and head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if fgate_bias_init not in FGATE_BIAS_INITS:
            raise ValueError(f"fgate_bias_init must be one of {list(FGATE_BIAS_INITS)}, got {fgate_bias_init!r}")
        if not 1.0 <= fgate_min_decay <= fgate_max_decay:
            raise ValueError(f"need 1 <= fgate_min_decay <= fgate_max_decay, got "
                             f"{fgate_min_decay} and {fgate_max_decay}")

        self.architecture = architecture
        self.acp = False
        self.update_acp(acp=acp, acp_log_eps=acp_log_eps, acp_decode=acp_decode, acp_rule=acp_rule,
                        attention_backend=attention_backend)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.mlp_ratio = mlp_ratio
        self.rms_norm_eps = rms_norm_eps
        self.qk_norm_eps = rms_norm_eps if qk_norm_eps is None else qk_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_qk_norm = is_pro if use_qk_norm is None else bool(use_qk_norm)
        self.use_kv_shift = is_pro if use_kv_shift is None else bool(use_kv_shift)
        self.use_output_gate = is_pro if use_output_gate is None else bool(use_output_gate)
        self.fgate_bias_init = fgate_bias_init
        self.fgate_min_decay = float(fgate_min_decay)
        self.fgate_max_decay = float(fgate_max_decay)
        self.activation_checkpointing = bool(activation_checkpointing)
        self.pad_vocab_size_multiple = pad_vocab_size_multiple
        self.loss_chunk_size = loss_chunk_size
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def update_acp(self, *, acp: bool | None = None, acp_log_eps: float | None = None,
                   acp_decode: bool | None = None, acp_rule: str | None = None,
                   attention_backend: str | None = None) -> None:
        """Check and set the attention settings (``None`` keeps a value): the one place they are
        validated. Forgetting-attention layers read them from this object at every call."""
        if acp_log_eps is not None and (isinstance(acp_log_eps, bool) or not isinstance(acp_log_eps, (int, float))
                                        or not acp_log_eps < 0):
            raise ValueError(f"acp_log_eps must be a negative number, got {acp_log_eps!r}")
        for name, flag in (("acp", acp), ("acp_decode", acp_decode)):
            if flag is not None and not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        if acp and not self.uses_forget_gate:
            raise ValueError(f"acp=True needs a forget gate; architecture {self.architecture!r} has none")
        if acp_rule is not None and acp_rule not in ACP_RULES:
            raise ValueError(f"acp_rule must be one of {list(ACP_RULES)}, got {acp_rule!r}")
        if attention_backend is not None and attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {list(ATTENTION_BACKENDS)}, "
                             f"got {attention_backend!r}")
        for name, value, kind in (("acp", acp, bool), ("acp_log_eps", acp_log_eps, float),
                                  ("acp_decode", acp_decode, bool), ("acp_rule", acp_rule, str),
                                  ("attention_backend", attention_backend, str)):
            if value is not None:
                setattr(self, name, kind(value))

    @property
    def uses_forget_gate(self) -> bool:
        return self.architecture.startswith("fox-")

    @property
    def uses_rope(self) -> bool:
        return not self.uses_forget_gate

    @property
    def padded_vocab_size(self) -> int:
        """LM-head rows: ``vocab_size`` rounded up to ``pad_vocab_size_multiple``."""
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m


# Presets: the paper's sizes (vocab 50257) and tiny CPU ones. Presets only override fields.
_SIZES = {
    "125m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12),
    "360m": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16),
    "760m": dict(num_hidden_layers=24, hidden_size=1536, num_attention_heads=24),
    # CPU tests and demos: 2 layers, d 64, 4 heads of 16, 512-token vocab
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512,
                 max_position_embeddings=2048, bos_token_id=511, eos_token_id=511),
    # a slightly larger CPU model for demos: 4 layers, d 128, 4 heads of 32
    "small": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=512,
                  max_position_embeddings=4096, bos_token_id=511, eos_token_id=511),
}
PRESETS: dict[str, dict] = {}
for _arch in ARCHITECTURES:
    for _size, _fields in _SIZES.items():
        _fields = dict(_fields, architecture=_arch)
        if _arch.startswith("transformer-") and _size == "760m":
            _fields["num_attention_heads"] = 12  # the paper's Transformer 760M: 12 heads of 128
        PRESETS[f"{_arch}-{_size}"] = _fields


def preset_config(name: str, **overrides) -> FoxConfig:
    """``FoxConfig`` of preset ``name`` (see ``PRESETS``) with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return FoxConfig(**{**PRESETS[name], **overrides})
