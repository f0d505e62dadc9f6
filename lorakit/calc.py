"""Parameter arithmetic from a config alone: the model is built on the meta device (no weights, no memory).

``count_parameters("llama-2-7b", LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))`` answers what PEFT's
``print_trainable_parameters`` would print, per-target details, and the adapter file size, for models you do
not have on disk. The presets carry the public dimensions of well-known architectures.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Any

import torch

from .config import LoraConfig

# Public architecture dimensions (from each model's published config.json).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-2-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)),
    "llama-2-13b": ("llama", dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                                  num_key_value_heads=40, intermediate_size=13824, vocab_size=32000)),
    "llama-2-70b": ("llama", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                  num_key_value_heads=8, intermediate_size=28672, vocab_size=32000)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=32000)),
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    "bert-base": ("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072, vocab_size=30522, num_labels=2)),
}


def preset_model(name: str) -> torch.nn.Module:
    """A preset architecture built on the meta device (Llama/Mistral/GPT-2 with their LM head, BERT as a
    2-label sequence classifier)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    try:
        import transformers
    except ImportError:
        raise ImportError("model presets need transformers: pip install 'lorakit[hf]'") from None
    family, dims = PRESETS[name]
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
    }[family]
    with torch.device("meta"):
        return model_class(config_class(**dims))


def count_parameters(model: torch.nn.Module, config: LoraConfig) -> dict[str, Any]:
    """What ``config`` adds to ``model`` (best built on the meta device), counted as PEFT counts.
    ``model`` itself is not changed (a copy is wrapped).

    Returns:
        ``trainable`` and ``total`` (PEFT's two numbers, modules_to_save copies included), ``line`` (PEFT's
        printed line), ``targets`` (one row per module name suffix: type, weight shape, count, params each and in
        all), ``adapter_bytes`` for fp32 and bf16 files (tensor data; the header adds a few KiB).
    """
    from .inject import describe_targets
    from .model import get_lora_model

    rows = describe_targets(model, config)
    groups: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
    for row in rows:
        leaf = row["name"].rsplit(".", 1)[-1]
        key = (leaf, row["type"], tuple(row["shape"]), row["r"])
        group = groups.setdefault(key, {"module": leaf, "type": row["type"], "shape": row["shape"], "r": row["r"],
                                        "count": 0, "params_each": row["params"], "params": 0})
        group["count"] += 1
        group["params"] += row["params"]
    base_total = sum(p.numel() for p in model.parameters())
    lora = get_lora_model(copy.deepcopy(model), config)  # on the meta device the copy costs no memory
    trainable, total = lora.get_nb_trainable_parameters()
    saved = trainable  # what the adapter file holds: LoRA tensors, trained heads and biases
    return {
        "trainable": trainable,
        "total": total,
        "base_total": base_total,
        "lora_params": sum(row["params"] for row in rows),
        "modules_to_save": [name for name, _ in lora._saved_modules()],
        "line": f"trainable params: {trainable:,d} || all params: {total:,d} || "
                f"trainable%: {100 * trainable / total:.4f}",
        "targets": list(groups.values()),
        "adapter_bytes": {"fp32": 4 * saved, "bf16": 2 * saved},
    }


def four_bit_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for one 4-bit (NF4/FP4) weight of ``numel`` values.

    Half a byte per value, plus one scale per block of ``blocksize`` values: an fp32 absmax, or with double
    quantization one byte per block plus an fp32 scale per 256 blocks and one fp32 offset. (The lookup tables,
    a few hundred bytes per layer, are left out.)
    """
    blocks = math.ceil(numel / blocksize)
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales
