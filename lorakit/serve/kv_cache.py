"""The KV cache of a running batch: rows join it and leave it.

Joining left-pads the shorter cache with zero keys/values (the attention mask hides them), so every row's real
tokens end at the same column, then concatenates along the batch. Only plain full-attention layers
(``DynamicLayer``) can be joined; other caches (sliding windows, ...) run the batch to its end first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def new_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def joinable(cache: Any) -> bool:
    """Whether this cache's tensors can be padded and concatenated (plain full-attention layers)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _rebuilt(cache: Any, transform: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    from transformers import DynamicCache

    return DynamicCache([(transform(layer.keys), transform(layer.values)) for layer in cache.layers])


def left_pad_cache(cache: Any, width: int) -> Any:
    """The cache with zero keys/values on the left up to ``width`` tokens (masked out by the attention mask)."""
    pad = width - cache.get_seq_length()
    return cache if pad == 0 else _rebuilt(cache, lambda t: F.pad(t, (0, 0, pad, 0)))  # (batch, heads, width, dim)


def concat_caches(first: Any, second: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache([(torch.cat([a.keys, b.keys]), torch.cat([a.values, b.values]))
                         for a, b in zip(first.layers, second.layers)])


def slice_cache(cache: Any, start: int) -> Any:
    return _rebuilt(cache, lambda t: t[:, :, start:].contiguous())
