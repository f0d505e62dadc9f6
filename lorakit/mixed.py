"""Mixed batches: row i of a batch uses adapter ``adapter_names[i]``, in one batched pass.

Punica's BGMV idea in plain torch: the A and B of the adapters in the batch are zero-padded to one rank and
stacked (slot 0 is all zeros: the base model), each row gathers its slot, and two batched matmuls give every row
its own update. No Python loop over sub-batches. The stacks are built when the batch's routing is set (once per
``forward`` or ``generate`` call, not once per layer call) and cached on the layer while no weight changes.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LoraLayer, LoraLinear, update_dtype


@dataclass
class Routing:
    """Which adapter each row of a batch uses, as one layer sees it."""

    index: torch.Tensor  # (batch,) slot of each row; 0 is the base model, i is names[i - 1]
    names: list[str]
    a: torch.Tensor | None = None  # (n+1, r_max, in): stacked A, for linear layers
    b: torch.Tensor | None = None  # (n+1, out, r_max): stacked B·scaling

    def add_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus, for each row, the update of that row's adapter (a linear layer's forward)."""
        if self.a is None:
            return result
        index = self.index
        if x.shape[0] != index.numel():
            raise rows_mismatch(index.numel(), x.shape[0])
        a_rows = self.a.index_select(0, index)  # (batch, r_max, in): BGMV's gather
        b_rows = self.b.index_select(0, index)  # (batch, out, r_max)
        xs = x.to(a_rows.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens per row, in)
        xa = torch.bmm(xs, a_rows.transpose(1, 2))  # (batch, tokens, r_max)
        b_rows = b_rows.to(xa.dtype)  # under autocast, bmm gave xa in the autocast dtype
        out = result.view(x.shape[0], -1, result.shape[-1]) if result.is_contiguous() else None
        if out is not None and out.dtype == xa.dtype and not torch.is_grad_enabled():
            out.baddbmm_(xa, b_rows.transpose(1, 2))  # accumulate in place: no (batch, tokens, out) temporary
            return result
        delta = torch.bmm(xa, b_rows.transpose(1, 2))  # (batch, tokens, out)
        return torch.add(result, delta.reshape(result.shape)).to(result.dtype)


def routing_for(layer: LoraLayer, index: torch.Tensor, names: list[str]) -> Routing:
    """The routing of one layer, with its stacked weights when it is a linear layer."""
    routing = Routing(index, names)
    if isinstance(layer, LoraLinear) and len(layer.adapters):
        first = next(iter(layer.adapters.values())).lora_A
        stacked = stacked_weights(layer, names, update_dtype(layer.base.weight, first))
        if stacked is not None:
            routing.a, routing.b = stacked
    return routing


def stacked_weights(layer: LoraLayer, names: list[str], dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A and B of ``names`` zero-padded to one rank and stacked in ``dtype``, scaling folded into B; slot 0 is
    zero. None when no adapter in ``names`` lives (unmerged) on this layer.

    Cached on the layer while no adapter tensor changes (inference); rebuilt, differentiably, when training.
    """
    live = [n for n in names if n in layer.adapters and n not in layer.merged_adapters]
    if not live:
        return None
    adapters = [layer.adapters[n] for n in live]
    assert not any(ad.use_dora for ad in adapters), "LoraModel.mixed_batch refuses DoRA adapters"
    params = [p for ad in adapters for p in (ad.lora_A, ad.lora_B)]
    # In-place updates (optimizer steps, loads) bump versions; moving the model replaces every tensor's storage;
    # adding or deleting an adapter clears the cache. (Writes through ``.data`` bypass version counters, as
    # everywhere in PyTorch.)
    key = (tuple(names), dtype, params[0].data_ptr(), tuple(p._version for p in params))
    differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if not differentiable and layer.stack_cache is not None and layer.stack_cache[0] == key:
        return layer.stack_cache[1]
    r_max = max(ad.r for ad in adapters)
    zero_a = params[0].new_zeros(r_max, layer.in_features, dtype=dtype)
    zero_b = params[0].new_zeros(layer.out_features, r_max, dtype=dtype)
    a_list, b_list = [zero_a], [zero_b]
    for name in names:
        if name in live:
            ad = layer.adapters[name]
            a_list.append(F.pad(ad.lora_A.to(dtype), (0, 0, 0, r_max - ad.r)))
            b_list.append(F.pad(ad.lora_B.to(dtype) * ad.scaling, (0, r_max - ad.r)))
        else:
            a_list.append(zero_a)
            b_list.append(zero_b)
    stacked = torch.stack(a_list), torch.stack(b_list)  # (n+1, r_max, in), (n+1, out, r_max)
    if not differentiable:
        layer.stack_cache = (key, stacked)
    return stacked


# -- checks and beam search: the arguments of a mixed-batch forward or generate ------------------------------------

_INPUT_KEYS = ("input_ids", "inputs_embeds", "inputs", "input_features", "pixel_values", "x")


def batch_rows(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int | None:
    """The number of rows of a forward or generate call's input (its first tensor argument), or None if unknown."""
    for value in [*args[:1], *(kwargs.get(key) for key in _INPUT_KEYS)]:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def check_rows(adapter_names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse ``adapter_names`` whose length is not the batch's number of rows (before any layer runs: an
    embedding layer would otherwise fail on mismatched shapes)."""
    rows = batch_rows(args, kwargs)
    if rows is not None and rows != len(adapter_names):
        raise rows_mismatch(len(adapter_names), rows)


def rows_mismatch(names: int, rows: int) -> ValueError:
    """The error for ``names`` adapter names given for a batch of ``rows`` rows."""
    return ValueError(f"adapter_names has {names} entries but the batch has {rows} rows; give one adapter name per "
                      f"row")


def copies_per_row(model: nn.Module, kwargs: Mapping[str, Any]) -> int:
    """How many rows Hugging Face's ``generate`` makes of each input row: ``max(num_beams, num_return_sequences)``,
    each read from the call's arguments, else its ``generation_config``, else the model's (the priority
    ``generate`` itself uses)."""
    configs = [kwargs.get("generation_config"), getattr(model, "generation_config", None)]

    def setting(key: str) -> int:
        for value in [kwargs.get(key), *(getattr(c, key, None) for c in configs if c is not None)]:
            if value is not None:
                try:  # operator.index: any integer type (numpy's too), never a float or bool
                    count = operator.index(value) if not isinstance(value, bool) else 0
                except TypeError:
                    count = 0
                if count < 1:
                    raise ValueError(f"{key} must be a positive integer, got {value!r}")
                return count
        return 1

    return max(setting("num_beams"), setting("num_return_sequences"))


def expand_for_generation(adapter_names: Sequence[str], copies: int) -> list[str]:
    """Each row's name repeated for its ``copies`` consecutive rows, as ``generate`` repeats the rows
    (``repeat_interleave``): ``["a", "b"]``, 2 → ``["a", "a", "b", "b"]``."""
    return [name for name in adapter_names for _ in range(copies)]
