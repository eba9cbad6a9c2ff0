"""FoX (LLaMA / Pro) and Transformer (LLaMA / Pro) language models, Hugging Face compatible.

``FoxConfig`` picks the architecture; ``FoxForCausalLM`` is the model (``generate()``,
``save_pretrained``/``from_pretrained``, ACP statistics, optimizer groups); ``preset_config``
gives the paper's sizes. Importing this package registers ``model_type="foxacp"`` with
``AutoConfig``/``AutoModelForCausalLM``.
"""

from .cache import EvictingFoxCache, FoxCache, LayerCache, StaticFoxCache
from .config import ARCHITECTURES, PRESETS, FoxConfig, mlp_intermediate_size, preset_config
from .loss import chunked_cross_entropy
from .modeling import FoxForCausalLM, FoxModel, FoxPreTrainedModel, fgate_bias_values, register_auto_classes

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "EvictingFoxCache",
    "FoxCache",
    "FoxConfig",
    "FoxForCausalLM",
    "FoxModel",
    "FoxPreTrainedModel",
    "LayerCache",
    "chunked_cross_entropy",
    "fgate_bias_values",
    "mlp_intermediate_size",
    "preset_config",
    "StaticFoxCache",
    "register_auto_classes",
]
