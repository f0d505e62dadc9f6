"""lorakit: exact, fast LoRA fine-tuning with PEFT's semantics and file format."""

from .config import LoraConfig
from .inject import find_targets
from .io import adapter_state_dict, set_adapter_state_dict
from .layers import LoraAdapter, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from .model import LoraModel, get_lora_model
from .quant import quantize
from .train_config import TrainConfig
from .trainer import train

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
