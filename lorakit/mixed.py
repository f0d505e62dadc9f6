"""Mixed batches: row i of a batch uses adapter ``adapter_names[i]``, in one batched pass.

Punica's BGMV idea in plain torch: the A and B of the adapters in the batch are zero-padded to one rank and
stacked (slot 0 is all zeros: the base model), each row gathers its slot, and two batched matmuls give every row
its own update. No Python loop over sub-batches; the stacks are built once and reused while no weight changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .layers import LoraLinear


def add_mixed_batch_update(layer: LoraLinear, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` plus, for each row, the update of that row's adapter (the routing set on ``layer``)."""
    from .layers import _update_dtype

    index, names = layer._routing
    dtype = _update_dtype(x, next(iter(layer.adapters.values())).lora_A)
    stacked = stacked_weights(layer, names, dtype)
    if stacked is None:
        return result
    a, b = stacked  # (n+1, r_max, in), (n+1, out, r_max)
    a_rows, b_rows = a[index], b[index]  # (batch, r_max, in), (batch, out, r_max): BGMV's gather
    xs = x.to(dtype)
    rows = xs.reshape(xs.shape[0], -1, xs.shape[-1])  # (batch, tokens per row, in)
    xa = torch.bmm(rows, a_rows.transpose(1, 2))  # (batch, tokens, r_max)
    delta = torch.bmm(xa, b_rows.transpose(1, 2))  # (batch, tokens, out)
    return result + delta.reshape(*x.shape[:-1], delta.shape[-1]).to(result.dtype)


def stacked_weights(layer: LoraLinear, names: list[str], dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A and B of ``names`` zero-padded to one rank and stacked in ``dtype``, scaling folded into B; slot 0 is
    zero. None when no adapter in ``names`` lives (unmerged) on this layer.

    Cached on the layer while no adapter tensor changes (inference); rebuilt, differentiably, when training.
    """
    live = [n for n in names if n in layer.adapters and n not in layer.merged_adapters]
    if not live:
        return None
    for n in live:
        if layer.adapters[n].use_dora:
            raise ValueError(f"adapter {n!r} uses DoRA, which mixed batches (adapter_names=...) do not support")
    params = [p for n in live for p in (layer.adapters[n].lora_A, layer.adapters[n].lora_B)]
    key = (tuple(names), dtype, tuple((p._version, p.data_ptr(), p.dtype) for p in params))
    differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if not differentiable and layer._stack_cache is not None and layer._stack_cache[0] == key:
        return layer._stack_cache[1]
    r_max = max(layer.adapters[n].r for n in live)
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
        layer._stack_cache = (key, stacked)
    return stacked
