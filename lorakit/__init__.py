"""lorakit: exact, fast LoRA fine-tuning with PEFT's semantics and file format."""

from .config import LoraConfig
from .inject import find_targets
from .io import adapter_state_dict, set_adapter_state_dict
from .layers import LoraAdapter, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from .model import LoraModel, get_lora_model

__all__ = [
    "LoraAdapter",
    "LoraConfig",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraModel",
    "adapter_state_dict",
    "find_targets",
    "get_lora_model",
    "set_adapter_state_dict",
]

__version__ = "0.1.0"
