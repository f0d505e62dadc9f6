"""lorakit: exact, fast LoRA fine-tuning with PEFT's semantics and file format.

``import lorakit`` loads the core only (torch and safetensors); ``train`` and ``TrainConfig`` are imported from
:mod:`lorakit.training` on first use, so the trainer and transformers load only when training.
"""

from typing import TYPE_CHECKING, Any

from .core.config import LoraConfig
from .core.inject import find_targets
from .core.layers import LoraAdapter, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from .core.quant import quantize
from .files.io import adapter_state_dict, set_adapter_state_dict
from .models.model import LoraModel, get_lora_model

if TYPE_CHECKING:
    from .training import TrainConfig, train

__all__ = [
    "LoraAdapter",
    "LoraConfig",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraModel",
    "TrainConfig",
    "adapter_state_dict",
    "find_targets",
    "get_lora_model",
    "quantize",
    "set_adapter_state_dict",
    "train",
]

__version__ = "0.1.0"

_FROM_TRAINING = ("TrainConfig", "train")


def __getattr__(name: str) -> Any:
    if name in _FROM_TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
