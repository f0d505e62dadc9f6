"""LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): B learns ``loraplus_lr_ratio`` times faster than A.

The parameter groups are PEFT's ``create_loraplus_optimizer``'s, in its order:

1. A, and any other trainable tensor of 2 or more dimensions: ``lr``, decay ``loraplus_weight_decay``.
2. The A and B of adapters on embeddings: ``loraplus_lr_embedding`` (1e-6), decay ``loraplus_weight_decay``.
3. B, and other 1-D tensors such as DoRA magnitudes: ``lr · loraplus_lr_ratio``, decay ``loraplus_weight_decay``.
4. Biases (the base's and ``lora_B_bias``) and LayerNorm tensors: ``lr · loraplus_lr_ratio``, no decay.

(Trained heads fall into the first group with their weight and the last with their bias, and trainable-token
rows into the first, as in PEFT.)
``lorakit train --loraplus-lr-ratio R`` uses these groups with ``--weight-decay`` as ``loraplus_weight_decay``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import InvalidValue
from ..core.layer_base import LoraAdapter
from ..core.layers import LoraEmbedding, LoraLayer

LORAPLUS_LR_EMBEDDING = 1e-6  # PEFT's default for adapters on embeddings


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float, *,
                          loraplus_lr_embedding: float = LORAPLUS_LR_EMBEDDING,
                          loraplus_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The four optimizer parameter groups of LoRA+ for the trainable parameters of ``model`` (see the module
    docstring); groups may be empty.

    Raises:
        ValueError: ``lr`` or ``loraplus_lr_ratio`` not a positive number, ``loraplus_lr_embedding`` or
            ``loraplus_weight_decay`` not a number >= 0.
    """
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not (number(lr) and lr > 0):
        raise InvalidValue(f"lr must be a positive number, got {lr!r}")
    if not (number(loraplus_lr_embedding) and loraplus_lr_embedding >= 0):
        raise InvalidValue(f"loraplus_lr_embedding must be a number >= 0 (the learning rate of adapters on "
                           f"embeddings), got {loraplus_lr_embedding!r}")
    if not (number(loraplus_weight_decay) and loraplus_weight_decay >= 0):
        raise InvalidValue(f"loraplus_weight_decay must be a number >= 0, got {loraplus_weight_decay!r}")
    if not (number(loraplus_lr_ratio) and loraplus_lr_ratio > 0):
        raise InvalidValue(f"loraplus_lr_ratio must be a positive number (B's learning rate over A's), "
                           f"got {loraplus_lr_ratio!r}")
    # Only LoRA adapters have A and B; trainable-token rows (TokenRows) have neither and, 2-D, join group 1.
    adapters = [adapter for m in model.modules() if isinstance(m, LoraLayer) for adapter in m.adapters.values()
                if isinstance(adapter, LoraAdapter)]
    b_ids = {id(adapter.lora_B) for adapter in adapters}
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, LoraEmbedding)
                     for adapter in m.adapters.values() for p in (adapter.lora_A, adapter.lora_B)}
    # Biases (the base's and lora_B_bias) and tensors of LayerNorm modules are not decayed: Hugging Face's Trainer
    # rule, which PEFT applies to every name containing "bias".
    no_decay_ids = {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
                    if name == "bias" or isinstance(m, nn.LayerNorm)}
    no_decay_ids |= {id(adapter.lora_B_bias) for adapter in adapters if adapter.lora_B_bias is not None}
    group_a: list[nn.Parameter] = []
    embedding: list[nn.Parameter] = []
    group_b: list[nn.Parameter] = []
    group_b_no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_ids:
            embedding.append(param)
        elif id(param) in b_ids or param.ndim == 1:
            (group_b_no_decay if id(param) in no_decay_ids else group_b).append(param)
        else:
            group_a.append(param)
    return [
        {"params": group_a, "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": embedding, "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": group_b, "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": group_b_no_decay, "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, loraplus_lr_embedding: float = LORAPLUS_LR_EMBEDDING,
                              loraplus_weight_decay: float = 0.0, **kwargs: Any) -> torch.optim.Optimizer:
    """PEFT's ``create_loraplus_optimizer``: ``optimizer_cls`` over :func:`loraplus_param_groups`, with ``kwargs``
    (betas, eps, ...) passed on.

    Example:
        >>> optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    """
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding=loraplus_lr_embedding,
                                   loraplus_weight_decay=loraplus_weight_decay)
    return optimizer_cls(groups, lr=lr, **kwargs)
