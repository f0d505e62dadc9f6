"""Combining adapters into a new one: ``linear``, ``cat`` and ``svd``, as PEFT's ``add_weighted_adapter``.

With weights w_i and scalings s_i, the combined update is ``Σ w_i·s_i·B_i·A_i`` for ``cat`` (exact; the ranks
add up) and its best rank-``svd_rank`` approximation for ``svd``. ``linear`` (equal ranks only) mixes the
factors themselves, ``A = Σ ±√|w_i s_i|·A_i`` and ``B = Σ √|w_i s_i|·B_i``, which is *not* the sum of the
updates unless the adapters share a subspace: PEFT's definition, kept for compatibility.
The new adapter gets ``lora_alpha = r`` (scaling 1), so its A and B carry the whole update.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .layers import LoraConv2d, LoraLayer

if TYPE_CHECKING:
    from .model import LoraModel

COMBINATIONS = ("linear", "cat", "svd")


def _max_rank(model: LoraModel, name: str) -> int:
    config = model.peft_config[name]
    return max([config.r, *config.rank_pattern.values()])


def add_weighted_adapter(model: LoraModel, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> None:
    """Add ``adapter_name``, the weighted combination of ``adapters`` (see the module docstring).

    Raises:
        ValueError: Unknown adapters or combination type, weights of the wrong length, unequal ranks for
            ``linear``, DoRA adapters, or an existing ``adapter_name``.
    """
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {', '.join(COMBINATIONS)}; got {combination_type!r}")
    unknown = [a for a in adapters if a not in model.peft_config]
    if not adapters or unknown:
        raise ValueError(f"unknown adapter(s) {unknown or adapters}; adapters: {sorted(model.peft_config)}")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if any(model.peft_config[a].use_dora for a in adapters):
        raise ValueError("adapters using DoRA cannot be combined (their magnitude vectors do not add)")
    ranks = [_max_rank(model, a) for a in adapters]
    if combination_type == "linear" and len(set(ranks)) != 1:
        raise ValueError(f"combination_type='linear' needs adapters of equal rank, got ranks {ranks}; use 'cat' or 'svd'")
    new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
    if new_rank <= 0:
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")

    layers = [(path, layer) for path, layer in model.lora_layers() if any(a in layer.adapters for a in adapters)]
    first = model.peft_config[adapters[0]]
    config = dataclasses.replace(first, r=new_rank, lora_alpha=new_rank, use_rslora=False, use_dora=False,
                                 target_modules=[path for path, _ in layers], exclude_modules=None,
                                 layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={},
                                 init_lora_weights=True)
    model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for _, layer in layers:
                a, b = _combine(layer, adapters, weights, combination_type, new_rank)
                target = layer.adapters[adapter_name]
                target.lora_A.copy_(a.reshape(target.lora_A.shape))
                target.lora_B.copy_(b.reshape(target.lora_B.shape))
            for _, module in model.saved_modules():  # trained heads: taken from the first adapter that has one
                source = next((a for a in adapters if a in module.modules_to_save), None)
                if source is not None and adapter_name in module.modules_to_save:
                    module.modules_to_save[adapter_name].load_state_dict(module.modules_to_save[source].state_dict())
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A as (r, fan_in) and B as (fan_out, r), in fp32, with the adapter's scaling."""
    adapter = layer.adapters[name]
    a = adapter.lora_A.float().reshape(adapter.r, -1)
    b = adapter.lora_B.float().reshape(adapter.lora_B.shape[0], adapter.r)
    return a, b, adapter.scaling


def _combine(layer: LoraLayer, adapters: list[str], weights: list[float], how: str, rank: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
    fan_in = layer.adapters[present[0][0]].lora_A[0].numel()
    fan_out = layer.adapters[present[0][0]].lora_B.shape[0]
    new_a = torch.zeros(rank, fan_in)
    new_b = torch.zeros(fan_out, rank)
    if how == "linear":
        for name, weight in present:
            a, b, scaling = _factors(layer, name)
            ws = weight * scaling
            new_a += math.copysign(math.sqrt(abs(ws)), ws) * a
            new_b += math.sqrt(abs(ws)) * b
    elif how == "cat":
        col = 0
        for name, weight in present:
            a, b, scaling = _factors(layer, name)
            new_a[col: col + a.shape[0]] = weight * scaling * a
            new_b[:, col: col + a.shape[0]] = b
            col += a.shape[0]
    else:  # svd: best rank-r approximation (Eckart–Young) of the weighted sum of the updates
        delta = sum(weight * scaling * (b @ a) for a, b, scaling, weight in
                    ((*_factors(layer, name), weight) for name, weight in present))  # (fan_out, fan_in)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel())
        new_b[:, :k] = u[:, :k] * s[:k]
        new_a[:k] = vh[:k]
    if isinstance(layer, LoraConv2d):
        new_b = new_b[:, :, None, None]
    return new_a, new_b
