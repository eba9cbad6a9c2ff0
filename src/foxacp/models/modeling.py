"""FoX and Transformer language models (LLaMA and Pro blocks) as Hugging Face models.

``FoxForCausalLM(config)`` builds whichever of the four architectures ``config.architecture``
names. Blocks are pre-norm: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, a final RMSNorm and an
untied LM head whose rows are padded to a multiple of 64 (logits are sliced back to
``vocab_size``; padded rows never receive probability).

Hugging Face conventions: ``labels`` are unshifted (the model shifts; -100 is ignored),
``attention_mask`` marks left padding (leading zeros; right padding needs no mask in a causal
model), the cache is a :class:`~foxacp.models.cache.FoxCache` passed as ``past_key_values`` or
``cache`` (the name transformers >= 5.24 uses; outputs carry it under the installed version's
name), and ``generate()`` works with greedy search, sampling, beam search, left-padded batches and
assisted decoding / prompt lookup, feeding the model only the positions its cache lacks. The model
imports nothing from ``torch.distributed``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # transformers >= 4.50 keeps GenerationMixin out of PreTrainedModel
    from transformers import GenerationMixin
except ImportError:  # pragma: no cover
    from transformers.generation import GenerationMixin
from transformers.generation import GenerationMode

from ..ops import AcpStats, threshold_from_qk_norm
from ..ops.layout import SequenceLayout
from .attention import AttentionContext, ForgetGateProjection, ForgettingAttentionLayer, SoftmaxAttentionLayer
from .cache import EvictingFoxCache, FoxCache, LayerCache, StaticFoxCache, eviction_page_size
from .config import FoxConfig
from .layers import HeadRMSNorm, RMSNorm, SwiGLU
from .loss import chunked_cross_entropy

# generate() modes that feed one token per row per step: they can use the captured decoding step
SINGLE_TOKEN_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH,
                      GenerationMode.BEAM_SAMPLE)

# transformers >= 5.24 calls the generation cache ``cache`` (generate()'s model kwargs and the output
# field), older versions ``past_key_values``.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
_NOT_PASSED = object()  # prepare_inputs_for_generation: next_sequence_length not given (transformers 4)

try:  # transformers 5: init functions that leave loaded weights alone
    from transformers import initialization as _init
except ImportError:  # transformers 4.x: plain torch init (it only inits missing weights)
    _init = None


def _init_fn(name: str):
    if _init is not None and hasattr(_init, name):
        return getattr(_init, name)
    fn = getattr(nn.init, name)

    def wrapped(tensor, *args, **kwargs):
        with torch.no_grad():
            return fn(tensor, *args, **kwargs)
    return wrapped


def _copy_(tensor: torch.Tensor, value: torch.Tensor) -> None:
    if getattr(tensor, "_is_hf_initialized", False):
        return
    with torch.no_grad():
        tensor.copy_(value)


def fgate_bias_values(num_heads: int, min_decay: float, max_decay: float) -> torch.Tensor:
    """Forget-gate biases whose decay lengths ``1 / (1 - f)`` are log-spaced over heads.

    ``f = 1 - 1/L`` for ``L`` from ``min_decay`` to ``max_decay``; bias ``= logit(f)``
    (so ``L = 2`` gives bias 0, the paper's default ``f = 0.5``).
    """
    lengths = torch.logspace(math.log10(min_decay), math.log10(max_decay), num_heads, dtype=torch.float64)
    f = 1.0 - 1.0 / lengths
    return (torch.log(f) - torch.log1p(-f)).float().clamp(min=-30.0)


class PaddedLMHead(nn.Linear):
    """LM head with ``padded_vocab_size`` rows; rows past ``vocab_size`` start (and stay) at zero
    weight and are masked out of the loss and the returned logits."""

    def __init__(self, hidden_size: int, vocab_size: int, padded_vocab_size: int):
        super().__init__(hidden_size, padded_vocab_size, bias=False)
        self.vocab_size = vocab_size


class FoxBlock(nn.Module):
    """Pre-norm block: attention (FoX or softmax), then SwiGLU MLP, each with a residual."""

    def __init__(self, config: FoxConfig, layer_idx: int):
        super().__init__()
        attention = ForgettingAttentionLayer if config.uses_forget_gate else SoftmaxAttentionLayer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class FoxPreTrainedModel(PreTrainedModel):
    config_class = FoxConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FoxBlock"]
    main_input_name = "input_ids"

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own cache (FoxCache)

    def _init_weights(self, module: nn.Module) -> None:
        # Called per module with direct parameters (transformers 5 skips parameter-less containers),
        # so everything special is decided at the leaf: the gate bias and the padded head rows.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init_fn("normal_")(module.weight, mean=0.0, std=std)
            if isinstance(module, ForgetGateProjection) and self.config.fgate_bias_init == "spread":
                values = fgate_bias_values(module.out_features, self.config.fgate_min_decay,
                                           self.config.fgate_max_decay)
                _copy_(module.bias, values.to(module.bias.device))
            elif module.bias is not None:
                _init_fn("zeros_")(module.bias)
            if isinstance(module, PaddedLMHead) and not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight[module.vocab_size:].zero_()
        elif isinstance(module, nn.Embedding):
            _init_fn("normal_")(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, HeadRMSNorm)):
            _init_fn("ones_")(module.weight)

    # ---- ACP introspection -------------------------------------------------------------------
    def _fox_layers(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (ForgettingAttentionLayer, SoftmaxAttentionLayer))]

    def collect_acp_stats(self, enabled: bool = True) -> None:
        """Make every forgetting-attention layer keep the :class:`AcpStats` of its last call."""
        for layer in self._fox_layers():
            if isinstance(layer, ForgettingAttentionLayer):
                layer.collect_stats = enabled
                if not enabled:
                    layer.last_stats = None

    def acp_stats(self) -> list[AcpStats | None]:
        """Per layer, the :class:`AcpStats` of the last forward (None where not collected)."""
        return [getattr(layer, "last_stats", None) for layer in self._fox_layers()]

    def acp_summary(self) -> dict:
        """Kept-tile fraction and attention FLOPs over all layers of the last forward."""
        stats = [s for s in self.acp_stats() if s is not None]
        if not stats:
            return {}
        kept = sum(int(s.kept_tiles.sum()) for s in stats)
        paper_kept = sum(int(s.paper_kept_tiles.sum()) for s in stats)
        causal = sum(int(s.causal_tiles.sum()) for s in stats)
        done = sum(int(s.flops_done.sum()) for s in stats)
        dense = sum(int(s.flops_dense.sum()) for s in stats)
        return {"kept_fraction": kept / causal if causal else 1.0,
                "paper_kept_fraction": paper_kept / causal if causal else 1.0,
                "flops_saved_fraction": 1.0 - done / dense if dense else 0.0,
                "flops_done": done, "flops_dense": dense,
                "kept_fraction_per_layer": [s.kept_fraction for s in stats]}

    def set_acp(self, enabled: bool, log_eps: float | None = None, decode: bool | None = None,
                rule: str | None = None) -> None:
        """Switch ACP on or off at run time (the layers read the config at each call);
        ``decode``: also in decoding steps (``config.acp_decode``); ``rule``: the bound
        (``config.acp_rule``); each unchanged if None."""
        self.config.update_acp(acp=enabled, acp_log_eps=log_eps, acp_decode=decode, acp_rule=rule)

    def set_attention_backend(self, backend: str) -> None:
        """Use ``backend`` (one of ``foxacp.ops.backends.BACKEND_NAMES``) for forgetting attention."""
        self.config.update_acp(attention_backend=backend)

    def acp_thresholds(self, seq_len: int) -> list:
        """Per layer, the ACP threshold used at key length ``seq_len`` (see
        :meth:`ForgettingAttentionLayer.acp_threshold`)."""
        return [layer.acp_threshold(seq_len) if isinstance(layer, ForgettingAttentionLayer) else None
                for layer in self._fox_layers()]

    # ---- optimizer and sizes ---------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on Linear and Embedding weights; none on norms and biases."""
        decay, no_decay, seen = [], [], set()
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                is_matrix = name == "weight" and isinstance(module, (nn.Linear, nn.Embedding))
                (decay if is_matrix else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def parameter_counts(self) -> dict[str, int]:
        """``total``, ``embedding`` (token embedding), ``lm_head`` (real vocab rows only),
        ``non_embedding`` (everything but those two) and ``paper`` (non-embedding plus the token
        embedding: the convention of the FoX paper's 125M / 360M / 760M)."""
        embed = self.get_input_embeddings().weight.numel()
        total = sum(p.numel() for p in self.parameters())
        head = self.get_output_embeddings() if hasattr(self, "lm_head") else None
        head_stored = head.weight.numel() if head is not None else 0
        head_real = self.config.vocab_size * self.config.hidden_size if head is not None else 0
        non_embedding = total - embed - head_stored
        return {"total": total - head_stored + head_real, "embedding": embed, "lm_head": head_real,
                "non_embedding": non_embedding, "paper": non_embedding + embed}


class FoxModel(FoxPreTrainedModel):
    """Embedding, blocks and final norm; returns hidden states (and the cache)."""

    def __init__(self, config: FoxConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FoxBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: FoxCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: FoxCache | None = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        cache = _given_cache(past_key_values, cache)
        if isinstance(cache, StaticFoxCache):
            raise TypeError("a StaticFoxCache is used through FoxForCausalLM (its decoding steps are captured)")
        if use_cache and cache is None:
            cache = FoxCache(self.config.num_hidden_layers)
        if cache is not None and cu_seqlens is not None:
            raise ValueError("cu_seqlens (packed sequences) cannot be combined with a generation cache")
        ctx = self._context(B, T, x.device, attention_mask, cache, cu_seqlens)

        checkpointing = (self.gradient_checkpointing or self.config.activation_checkpointing) \
            and self.training and torch.is_grad_enabled()
        hidden_states = [] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            layer_cache = cache[i] if cache is not None else None
            if checkpointing and layer_cache is None:
                x = checkpoint(block, x, ctx, None, use_reentrant=False)
            else:
                x = block(x, ctx, layer_cache)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        if cache is not None:
            cache.seen_tokens += T
            cache.seq_start = ctx.seq_start
        out = BaseModelOutputWithPast(last_hidden_state=x, **{CACHE_NAME: cache},
                                      hidden_states=tuple(hidden_states) if hidden_states is not None else None)
        return out if return_dict is not False else out.to_tuple()

    def decode_step(self, input_ids: torch.LongTensor, cache: StaticFoxCache) -> torch.Tensor:
        """Final hidden states ``(B, 1, d)`` of one new token per row against a :class:`StaticFoxCache`
        whose :meth:`~StaticFoxCache.begin_step` ran; fixed shapes, no host synchronisation."""
        ctx = AttentionContext()
        if self.config.uses_rope:
            ctx.positions = (cache.position - cache.seq_start)[:, None]
            ctx.sdpa_mask = cache.visible[:, None, None, :]
        x = self.embed_tokens(input_ids)
        for block, layer_cache in zip(self.layers, cache.layers):
            x = block(x, ctx, layer_cache)
        return self.norm(x)

    def _context(self, B: int, T: int, device, attention_mask, cache: FoxCache | None, cu_seqlens) -> AttentionContext:
        past = cache.get_seq_length() if cache is not None else 0
        total = past + T
        if cache is not None and past > 0:
            seq_start = cache.seq_start
        else:
            seq_start = _leading_padding(attention_mask, B, total, device)
        positions_k = torch.arange(past, total, device=device)  # key positions of this call
        ctx = AttentionContext(seq_start=seq_start)
        if seq_start is not None:
            ctx.layout = SequenceLayout.left_padded(seq_start, total, device)
            ctx.padding = positions_k[None, :] < seq_start[:, None]
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens needs batch size 1 (sequences packed along T), got B={B}")
            ctx.layout = SequenceLayout.packed(cu_seqlens, total, device)
            cu = ctx.layout.cu_seqlens
            ctx.restart = torch.zeros(1, T, dtype=torch.bool, device=device)
            ctx.restart[0, cu[:-1].clamp_max(T - 1)] = True
        if not self.config.uses_rope:
            return ctx
        # Transformer: RoPE positions and the SDPA mask.
        if cu_seqlens is not None:
            segment = torch.searchsorted(cu, positions_k, right=True) - 1
            ctx.positions = (positions_k - cu[segment])[None]
            ctx.segments = [int(b) for b in cu.tolist()]  # SDPA runs per packed sequence
        elif seq_start is not None:
            ctx.positions = (positions_k[None, :] - seq_start[:, None]).clamp_min(0)
            keys = torch.arange(total, device=device)
            visible = keys[None, :] <= positions_k[:, None]  # [T, Tk]
            own = keys[None, :] == positions_k[:, None]  # padded queries see themselves only
            real = keys[None, None, :] >= seq_start[:, None, None]  # [B, 1, Tk]
            ctx.sdpa_mask = (visible[None] & (real | own[None]))[:, None]
        else:
            ctx.positions = positions_k[None]
            if T == total:
                ctx.sdpa_causal = T > 1
            elif T > 1:
                keys = torch.arange(total, device=device)
                ctx.sdpa_mask = (keys[None, :] <= positions_k[:, None])[None, None]
        return ctx


def _given_cache(past_key_values, cache) -> FoxCache | StaticFoxCache | None:
    """The cache passed under either name (``past_key_values`` or ``cache``), checked to be foxacp's."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache as past_key_values or as cache, not both")
    given = cache if cache is not None else past_key_values
    if given is not None and not isinstance(given, (FoxCache, StaticFoxCache)):
        raise TypeError(f"the cache must be a foxacp FoxCache or StaticFoxCache (they keep the forget-gate and "
                        f"KV-shift state), got {type(given).__name__}")
    return given


def _leading_padding(attention_mask, B: int, total: int, device) -> torch.Tensor | None:
    """Leading zeros per row of a 2-D ``attention_mask`` (left padding), or None when there are none."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
        raise ValueError(f"attention_mask must be 2-D (batch, length) with batch {B}, "
                         f"got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[1] != total:
        raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, expected {total} "
                         f"(cached + new)")
    mask = attention_mask.to(device) != 0
    seq_start = (mask.long().cumsum(-1) == 0).sum(-1)
    if not bool(seq_start.any()):
        return None
    if bool((seq_start >= total).any()):
        raise ValueError("attention_mask has a row with no real token")
    return seq_start


class FoxForCausalLM(FoxPreTrainedModel, GenerationMixin):
    """Causal LM head on :class:`FoxModel`; see the module docstring for the conventions."""

    def __init__(self, config: FoxConfig):
        super().__init__(config)
        self.model = FoxModel(config)
        self.lm_head = PaddedLMHead(config.hidden_size, config.vocab_size, config.padded_vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: FoxCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seqlens: torch.Tensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        return_logits: bool = True,
        num_items_in_batch: int | torch.Tensor | None = None,
        cache: FoxCache | StaticFoxCache | None = None,
        **kwargs,
    ):
        """Next-token logits and, with ``labels`` (unshifted) or ``shift_labels`` (already aligned
        with the inputs), the mean cross-entropy over non-ignored targets (divided by
        ``num_items_in_batch`` instead when given). ``return_logits=False`` skips the
        ``(B, T, V)`` logits (training); the loss never materialises them in float32. With a
        :class:`StaticFoxCache`: see :meth:`_static_forward`."""
        cache = _given_cache(past_key_values, cache)
        if isinstance(cache, StaticFoxCache):
            if labels is not None or shift_labels is not None or cu_seqlens is not None:
                raise ValueError("a StaticFoxCache is for decoding: no labels, shift_labels or cu_seqlens")
            return self._static_forward(input_ids, attention_mask, inputs_embeds, cache, logits_to_keep)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens,
                             output_hidden_states=output_hidden_states, return_dict=True)
        hidden = outputs.last_hidden_state
        loss = None
        if labels is not None or shift_labels is not None:
            if shift_labels is None:
                hidden_in, targets = hidden[:, :-1], labels[:, 1:]
            else:
                hidden_in, targets = hidden, shift_labels
            total = chunked_cross_entropy(hidden_in, self.lm_head.weight, targets, vocab_size=self.config.vocab_size,
                                          chunk_size=self.config.loss_chunk_size, reduction="sum")
            if num_items_in_batch is None:
                denominator = (targets != -100).sum().clamp_min(1)
            else:
                denominator = num_items_in_batch
            loss = total / denominator
        logits = None
        if return_logits:
            if isinstance(logits_to_keep, int):
                kept = hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
            else:
                kept = hidden[:, logits_to_keep]
            logits = self.lm_head(kept)[..., :self.config.vocab_size]
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
                                     hidden_states=outputs.hidden_states)
        return out if return_dict is not False else out.to_tuple()

    def _static_forward(self, input_ids, attention_mask, inputs_embeds, cache: StaticFoxCache, logits_to_keep):
        """forward() with a :class:`StaticFoxCache`: the prompt goes through a :class:`FoxCache` that is
        then copied in; every later call feeds one token per row. On CUDA the first step runs
        eagerly (it also warms up) and the second records a CUDA graph that every step replays."""
        if cache.get_seq_length() == 0:
            prompt_cache = FoxCache(self.config.num_hidden_layers)
            logits = self(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                          past_key_values=prompt_cache, use_cache=True, logits_to_keep=logits_to_keep).logits
            cache.load(prompt_cache)
            return CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache})
        if input_ids is None or tuple(input_ids.shape) != (cache.batch_size, 1):
            raise ValueError(f"after the prompt, a StaticFoxCache takes input_ids of shape ({cache.batch_size}, 1), "
                             f"got {None if input_ids is None else tuple(input_ids.shape)}")
        if cache.get_seq_length() >= cache.max_length:
            raise ValueError(f"the StaticFoxCache is full ({cache.max_length} positions)")
        if input_ids.device.type != "cuda":
            logits = self._decode_step(input_ids, cache)
        elif cache.decode_graph is not None:
            logits = cache.decode_graph(input_ids)
        elif cache.warmed_up:
            cache.decode_graph = _DecodeGraph(lambda ids: self._decode_step(ids, cache), input_ids)
            logits = cache.decode_graph(input_ids)
        else:  # CUDA graphs want one run on a side stream before the capture
            side = torch.cuda.Stream(device=input_ids.device)
            side.wait_stream(torch.cuda.current_stream(input_ids.device))
            with torch.cuda.stream(side):
                logits = self._decode_step(input_ids, cache)
            torch.cuda.current_stream(input_ids.device).wait_stream(side)
            cache.warmed_up = True
        cache.seen_tokens += 1
        return CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache})

    @torch.no_grad()
    def _decode_step(self, input_ids: torch.LongTensor, cache: StaticFoxCache) -> torch.Tensor:
        """Logits ``(B, 1, V)`` of one token per row; writes it into ``cache`` and advances it."""
        cache.begin_step()
        hidden = self.model.decode_step(input_ids, cache)
        cache.end_step()
        return self.lm_head(hidden)[..., :self.config.vocab_size]

    def acp_eviction_cache(self, max_length: int, log_eps: float | None = None, evict_every: int = 64,
                           page_size: int | None = None) -> EvictingFoxCache:
        """An empty cache that drops the keys ACP prunes for good (pass it to ``generate()`` as the
        cache). ``max_length``: the longest context it will hold (prompt + new tokens; the
        threshold, and so the bound, is for that length); ``log_eps``: the bound's ``ln eps``
        (default ``config.acp_log_eps``); ``evict_every``, ``page_size`` (default
        :func:`~foxacp.models.cache.eviction_page_size` of ``max_length``): see
        :class:`~foxacp.models.cache.EvictingFoxCache`. Needs forgetting attention with QK-norm
        (the threshold then depends on the weights only)."""
        if not (self.config.uses_forget_gate and self.config.use_qk_norm):
            raise ValueError(f"ACP eviction needs a forget gate and QK-norm; architecture "
                             f"{self.config.architecture!r} with use_qk_norm={self.config.use_qk_norm} has not both")
        log_eps = self.config.acp_log_eps if log_eps is None else log_eps
        thresholds = [threshold_from_qk_norm(layer.q_norm.weight, layer.k_norm.weight, layer.head_dim, max_length,
                                             log_eps) if isinstance(layer, ForgettingAttentionLayer) else None
                      for layer in self._fox_layers()]
        return EvictingFoxCache(thresholds, self.config.num_key_value_heads, evict_every=evict_every,
                                page_size=eviction_page_size(max_length) if page_size is None else page_size)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, mode_or_assistant, batch_size: int,
                                      max_cache_length: int, *args, **kwargs) -> None:
        """generate() hook: start with an empty cache unless one is passed or ``use_cache`` is off
        (before the first step, so that assisted decoding finds it): a :class:`StaticFoxCache`
        where :meth:`_captures_decoding` says so, else a :class:`FoxCache`. ``mode_or_assistant``:
        the generation mode (transformers 5) or the assistant model (transformers 4)."""
        if generation_config.cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(f"FoxForCausalLM supports cache_implementation None, 'dynamic' (FoxCache) or 'static' "
                             f"(StaticFoxCache), got {generation_config.cache_implementation!r}")
        if generation_config.use_cache is False or model_kwargs.get(CACHE_NAME) is not None:
            super()._prepare_cache_for_generation(generation_config, model_kwargs, mode_or_assistant, batch_size,
                                                  max_cache_length, *args, **kwargs)
        elif self._captures_decoding(generation_config, mode_or_assistant):
            rows = max(generation_config.num_beams, generation_config.num_return_sequences or 1) * batch_size
            model_kwargs[CACHE_NAME] = StaticFoxCache(self.config, rows, max_cache_length + 1, device=self.device,
                                                      dtype=self.dtype)
        else:
            model_kwargs[CACHE_NAME] = FoxCache(self.config.num_hidden_layers)

    def _captures_decoding(self, generation_config, mode_or_assistant) -> bool:
        """Whether generate() decodes through a :class:`StaticFoxCache` (steps replayed as a CUDA
        graph): with ``cache_implementation="static"``, and by default on CUDA for greedy search,
        sampling and beam search unless hidden states are asked for. ``cache_implementation=
        "dynamic"`` opts out; assisted decoding and prompt lookup always use a (croppable) FoxCache."""
        if generation_config.cache_implementation is not None:
            return generation_config.cache_implementation == "static"
        if self.device.type != "cuda" or generation_config.output_hidden_states:
            return False
        mode = mode_or_assistant if isinstance(mode_or_assistant, GenerationMode) \
            else generation_config.get_generation_mode(mode_or_assistant)
        return mode in SINGLE_TOKEN_MODES

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, cache=None, next_sequence_length=_NOT_PASSED,
                                      cache_position=None, **kwargs):
        """Inputs of one generate() step: only the trailing positions the cache does not hold yet.

        Which positions are new: ``next_sequence_length`` trailing ones where transformers passes it
        (5.x; None means all of ``input_ids``), else the ``cache_position`` ones (4.x), else those
        past the cache length. Other keyword arguments go to ``forward`` unchanged.
        """
        cache = _given_cache(past_key_values, cache)
        past = cache.get_seq_length() if cache is not None else 0
        if inputs_embeds is not None and past == 0:
            inputs = {"inputs_embeds": inputs_embeds}
        else:
            new = _new_positions(input_ids.shape[1], past, next_sequence_length, cache_position)
            inputs = {"input_ids": input_ids[:, input_ids.shape[1] - new:]}
        return {**kwargs, **inputs, "past_key_values": cache, "attention_mask": attention_mask}


class _DecodeGraph:
    """One decoding step recorded as a CUDA graph: calling it copies the tokens into the recorded
    input and replays the graph."""

    def __init__(self, step, input_ids: torch.Tensor):
        self.input_ids = input_ids.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.input_ids)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the recorded output


def _new_positions(length: int, cached: int, next_sequence_length, cache_position) -> int:
    """How many trailing positions of a ``length``-long ``input_ids`` a generate() step must feed
    (see :meth:`FoxForCausalLM.prepare_inputs_for_generation`)."""
    if next_sequence_length is not _NOT_PASSED:
        new = length if next_sequence_length is None else int(next_sequence_length)
    elif cache_position is not None:
        new = len(cache_position)
    else:
        new = length - cached
    if not 0 < new <= length:
        raise ValueError(f"input_ids has {length} positions and the cache holds {cached}: nothing new to feed "
                         f"({new} positions); pass the whole sequence")
    return new


def register_auto_classes() -> None:
    """Register ``model_type="foxacp"`` with AutoConfig, AutoModel and AutoModelForCausalLM."""
    for register, args in ((AutoConfig.register, ("foxacp", FoxConfig)),
                           (AutoModel.register, (FoxConfig, FoxModel)),
                           (AutoModelForCausalLM.register, (FoxConfig, FoxForCausalLM))):
        try:
            register(*args)
        except ValueError:  # already registered (module reloaded)
            pass


register_auto_classes()
