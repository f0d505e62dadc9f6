"""Combining adapters into a new one, as PEFT's ``add_weighted_adapter``: ``linear``, ``cat``, ``svd``, ``ties``,
``dare_linear``, ``dare_ties``, ``magnitude_prune`` and the ``_svd`` variants of the last four.

With weights w_i and scalings s_i the updates are ``ΔW_i = s_i·B_i·A_i``:

- ``cat`` is the exact ``Σ w_i·ΔW_i`` (the ranks add up); ``svd`` its best rank-``svd_rank`` approximation.
- ``ties_svd``, ``dare_*_svd`` and ``magnitude_prune_svd`` merge the dense ``ΔW_i`` with that method (below), then
  keep the best rank-``svd_rank`` approximation of the result.
- ``linear``, ``ties``, ``dare_*`` and ``magnitude_prune`` (equal ranks only) merge the factors themselves, A with
  weights ``±√|w_i s_i|`` and B with ``√|w_i s_i|``: *not* the merge of the updates unless the adapters share a
  subspace. PEFT's definition, kept for compatibility.

The merges of tensors T_i (Yadav et al. 2023 for TIES, Yu et al. 2023 for DARE):

- ``magnitude_prune``: keep the ``density`` share of each T_i's entries largest in magnitude, then ``Σ w_i·T_i``.
- ``ties``: prune so, elect each entry's sign (``total``: the sign of ``Σ T_i``; ``frequency``: the sign most T_i
  have), then average the weighted entries that agree with it.
- ``dare_linear`` / ``dare_ties``: drop each entry with probability ``1 - density`` (a ``torch.bernoulli`` mask)
  and rescale the rest by ``1 / density``, then sum (``linear``) or elect and average (``ties``). The masks are
  drawn in PEFT's order: layer by layer, A's masks then B's (or one per dense update), adapter by adapter. The same
  seed still gives other masks than PEFT's: PEFT first draws the new adapter's random init, lorakit draws nothing
  before the masks (so a seed alone fixes them).

With a single adapter every type is ``linear`` (PEFT's rule: there is nothing to prune against). The new adapter
gets ``lora_alpha = r`` (scaling 1), so its A and B carry the whole update.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .errors import InvalidType, InvalidValue
from .layers import LoraEmbedding, LoraLayer
from .trainable_tokens import TrainableTokensLayer

if TYPE_CHECKING:
    from ..models.model import LoraModel

PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # these need a density
FACTOR_COMBINATIONS = ("linear", *PRUNING)
SVD_COMBINATIONS = ("svd", *(f"{method}_svd" for method in PRUNING))
COMBINATIONS = ("linear", "cat", "svd", *(t for method in PRUNING for t in (method, f"{method}_svd")))
SIGN_METHODS = ("total", "frequency")


@dataclasses.dataclass(frozen=True)
class _Merge:
    """How the tensors of one layer are merged: the method without ``_svd``, and its parameters."""

    method: str  # "linear" (a plain weighted sum) or one of PRUNING
    density: float | None
    majority_sign_method: str


def _max_rank(model: LoraModel, name: str) -> int:
    config = model.peft_config[name]
    return max([config.r, *config.rank_pattern.values()])


def _check(model: LoraModel, adapters: Sequence[str], weights: Sequence[float], combination_type: str,
           svd_rank: int | None, svd_clamp: float | None, density: float | None, majority_sign_method: str) -> None:
    """Refuse, by name, anything :func:`add_weighted_adapter` cannot combine (before the new adapter exists)."""
    if combination_type not in COMBINATIONS:
        raise InvalidValue(f"combination_type must be one of {', '.join(COMBINATIONS)}; got {combination_type!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise InvalidValue(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}; "
                           f"got {majority_sign_method!r}")
    if combination_type.removesuffix("_svd") in PRUNING and density is None and len(adapters) > 1:
        raise InvalidValue(f"combination_type={combination_type!r} needs a density in (0, 1] (the share of entries kept)")
    if density is not None and not (_is_number(density) and 0 < density <= 1):
        raise InvalidValue(f"density must be in (0, 1] (the share of entries kept); got {density!r}")
    if svd_clamp is not None and not (_is_number(svd_clamp) and 0 < svd_clamp <= 1):
        raise InvalidValue(f"svd_clamp must be a quantile in (0, 1]; got {svd_clamp!r}")
    if svd_rank is not None and not (isinstance(svd_rank, int) and not isinstance(svd_rank, bool) and svd_rank > 0):
        raise InvalidValue(f"svd_rank must be a positive integer or None (the largest rank of the adapters); "
                           f"got {svd_rank!r}")
    if not adapters:
        raise InvalidValue(f"adapters is empty; name at least one adapter to combine: {sorted(model.peft_config)}")
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown:
        raise InvalidValue(f"unknown adapter(s) {unknown}; adapters: {sorted(model.peft_config)}")
    if len(weights) != len(adapters):
        raise InvalidValue(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if any(model.peft_config[a].use_dora for a in adapters):
        raise InvalidValue("adapters using DoRA cannot be combined (their magnitude vectors do not add)")
    for option, what in (("lora_bias", "a bias on B (lora_bias)"), ("trainable_token_indices", "trainable tokens")):
        having = [a for a in adapters if getattr(model.peft_config[a], option)]
        if having:
            raise InvalidValue(f"adapter(s) {having} have {what}, which add_weighted_adapter cannot combine (only A and "
                               f"B are merged); merge them into the base one after another instead (merge_adapter)")
    shared = [path for path, module in model.saved_modules() if sum(a in module.modules_to_save for a in adapters) > 1]
    if shared:  # PEFT's rule: two trained heads on one module do not merge
        raise InvalidValue(f"adapters {adapters} have their own trained heads (modules_to_save) on the same module(s) "
                           f"{shared}, which cannot be combined; combine adapters with at most one head per module")
    ranks = [_max_rank(model, a) for a in adapters]
    if combination_type in FACTOR_COMBINATIONS and len(adapters) > 1:
        if len(set(ranks)) != 1:
            raise InvalidValue(f"combination_type={combination_type!r} needs adapters of equal rank, got ranks {ranks}; "
                               f"use 'cat' or an '_svd' type")
        for path, layer in _layers(model, adapters):  # rank_pattern can make them differ layer by layer
            here = {a: layer.adapters[a].r for a in adapters if a in layer.adapters}
            if len(set(here.values())) > 1:
                raise InvalidValue(f"combination_type={combination_type!r} needs adapters of equal rank on each layer, "
                                   f"but on {path} the ranks are {here} (rank_pattern); use 'cat' or an '_svd' type")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _layers(model: LoraModel, adapters: Sequence[str]) -> list[tuple[str, LoraLayer]]:
    """The LoRA layers holding any of ``adapters`` (never a trainable-tokens layer: it has no A and B)."""
    return [(path, layer) for path, layer in model.lora_layers()
            if not isinstance(layer, TrainableTokensLayer) and any(a in layer.adapters for a in adapters)]


def add_weighted_adapter(model: LoraModel, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         density: float | None = None, majority_sign_method: str = "total") -> None:
    """Add ``adapter_name``, the weighted combination of ``adapters`` (see the module docstring).

    Args:
        model: The model holding ``adapters``; the new adapter is added to it (not activated).
        adapters: Names of the adapters to combine (a list; a single ``str`` is refused).
        weights: One weight per adapter; negative weights subtract.
        adapter_name: Name of the new adapter.
        combination_type: One of :data:`COMBINATIONS`.
        svd_rank: Rank of the result of the ``svd`` types, a positive integer (default: the largest rank of
            ``adapters``); the other types have their own rank and ignore it.
        svd_clamp: ``svd`` types: clamp the new A and B to the ``svd_clamp`` quantile of their entries' values
            (in (0, 1]; default: no clamping).
        density: The share of entries kept by ``ties``, ``dare_*`` and ``magnitude_prune`` types, in (0, 1].
        majority_sign_method: ``ties`` and ``dare_ties`` types: ``"total"`` or ``"frequency"``.

    Raises:
        TypeError: ``adapters`` given as one ``str``.
        ValueError: No or unknown adapters, an unknown combination type, weights of the wrong length, unequal ranks
            (per layer, with ``rank_pattern``) for the factor types, a missing or out-of-range ``density``, a bad
            ``svd_rank`` or ``svd_clamp``, an unknown ``majority_sign_method``, DoRA adapters, adapters with
            ``lora_bias`` or trainable tokens, two adapters with trained heads on one module, or an existing
            ``adapter_name``.
    """
    if isinstance(adapters, str):
        raise InvalidType(f"adapters must be a list of adapter names, got the string {adapters!r}; "
                          f"write [{adapters!r}] for one adapter")
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    _check(model, adapters, weights, combination_type, svd_rank, svd_clamp, density, majority_sign_method)
    if len(adapters) == 1:  # as PEFT: one adapter is only scaled, never pruned or truncated
        combination_type = "linear"
    ranks = [_max_rank(model, a) for a in adapters]
    if combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type in SVD_COMBINATIONS:
        new_rank = svd_rank or max(ranks)
    else:
        new_rank = ranks[0]
    method = combination_type.removesuffix("_svd")
    merge = _Merge("linear" if method in ("svd", "cat") else method, density, majority_sign_method)

    layers = _layers(model, adapters)
    first = model.peft_config[adapters[0]]
    config = dataclasses.replace(first, r=new_rank, lora_alpha=new_rank, use_rslora=False, use_dora=False,
                                 target_modules=[path for path, _ in layers], exclude_modules=None,
                                 layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={},
                                 init_lora_weights=True)
    # Not initialized (A and B stay zero, nothing is drawn): the values are written below, and DARE's masks then
    # depend only on the generator's state at this call.
    model.add_adapter(adapter_name, config, init_weights=False)
    try:
        with torch.no_grad():
            for _, layer in layers:
                present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
                if combination_type == "cat":
                    a, b = _cat(layer, present, new_rank)
                elif combination_type in SVD_COMBINATIONS:
                    a, b = _svd(layer, present, merge, new_rank, svd_clamp)
                else:
                    a, b = _factor_merge(layer, present, merge, new_rank)
                target = layer.adapters[adapter_name]
                target.lora_A.copy_(a.reshape(target.lora_A.shape))
                target.lora_B.copy_(b.reshape(target.lora_B.shape))
            for _, module in model.saved_modules():  # a trained head: the one adapter that has one here (_check)
                source = next((a for a in adapters if a in module.modules_to_save), None)
                if source is not None and adapter_name in module.modules_to_save:
                    module.modules_to_save[adapter_name].load_state_dict(module.modules_to_save[source].state_dict())
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


# -- merging tensors ---------------------------------------------------------------------------------------------


def _merge_tensors(tensors: Sequence[torch.Tensor], weights: torch.Tensor, method: str = "linear",
                  density: float | None = None, majority_sign_method: str = "total") -> torch.Tensor:
    """Merge same-shaped ``tensors`` with ``weights`` (n,) by ``method``: ``linear`` (the weighted sum), ``ties``,
    ``dare_linear``, ``dare_ties`` or ``magnitude_prune`` (see the module docstring). Internal: the caller has
    checked ``method`` and ``density`` (:func:`_check`)."""
    assert method == "linear" or (method in PRUNING and density is not None), (method, density)
    if method in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(t, density) for t in tensors]
    stacked = torch.stack(list(tensors))  # (n, *shape)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    # The sign is elected on the unweighted tensors; pruned entries (sign 0) never agree with it.
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if majority_sign_method == "total" else sign.sum(dim=0)
    agrees = sign == torch.where(votes >= 0, 1, -1)  # (n, *shape)
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density·numel)`` entries largest in magnitude set to zero."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` and rescaled by ``1 / density`` (the mean is kept)."""
    if density >= 1:
        return tensor  # draws nothing, as PEFT
    mask = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * mask / density


# -- one layer ---------------------------------------------------------------------------------------------------


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A as (r, fan_in) and B as (fan_out, r), in fp32, with the adapter's scaling."""
    adapter = layer.adapters[name]
    a = adapter.lora_A.float().reshape(adapter.r, -1)
    b = adapter.lora_B.float().reshape(adapter.lora_B.shape[0], adapter.r)
    return a, b, adapter.scaling


def _cat(layer: LoraLayer, present: list[tuple[str, float]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stacked, each block scaled by w_i·s_i, and B side by side: exactly ``Σ w_i·s_i·B_i·A_i``."""
    a_blocks, b_blocks = [], []
    for name, weight in present:
        a, b, scaling = _factors(layer, name)
        a_blocks.append(weight * scaling * a)
        b_blocks.append(b)
    a, b = torch.cat(a_blocks), torch.cat(b_blocks, dim=1)  # (Σr, fan_in), (fan_out, Σr)
    new_a, new_b = a.new_zeros(rank, a.shape[1]), b.new_zeros(b.shape[0], rank)
    new_a[:a.shape[0]], new_b[:, :b.shape[1]] = a, b  # adapters absent here leave zero rows
    return new_a, new_b


def _factor_merge(layer: LoraLayer, present: list[tuple[str, float]], merge: _Merge, rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor types: A and B merged separately, A with weights ±√|w·s|, B with √|w·s| (PEFT's definition).

    A layer whose rank is below ``rank`` (``rank_pattern``) gets zero rows of A and columns of B beyond its own:
    the same update, since the new adapter's scaling is 1."""
    adapters = [layer.adapters[name] for name, _ in present]
    ws = [weight * adapter.scaling for (_, weight), adapter in zip(present, adapters)]
    device = adapters[0].lora_A.device
    w_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in ws], device=device)
    w_b = torch.tensor([math.sqrt(abs(x)) for x in ws], device=device)
    merged = []
    for tensors, w in (([ad.lora_A.detach() for ad in adapters], w_a), ([ad.lora_B.detach() for ad in adapters], w_b)):
        merged.append(_merge_tensors(tensors, w, merge.method, merge.density, merge.majority_sign_method))
    a, b = merged  # (r, in, *kernel), (out, r, *1s)
    new_a, new_b = a.new_zeros(rank, *a.shape[1:]), b.new_zeros(b.shape[0], rank, *b.shape[2:])
    new_a[:a.shape[0]], new_b[:, :b.shape[1]] = a, b
    return new_a, new_b


def _svd(layer: LoraLayer, present: list[tuple[str, float]], merge: _Merge, rank: int, clamp: float | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``svd`` types: merge the dense updates, then the best rank-``rank`` factors of the result (Eckart–Young).

    The updates are merged in the base weight's layout (Conv1D: (in, out); Embedding: (num_embeddings, dim)), as
    PEFT merges them, so that DARE's masks fall on the same entries.
    """
    deltas = [layer.delta_weight(name).detach() for name, _ in present]
    weights = torch.tensor([w for _, w in present], device=deltas[0].device)
    delta = _merge_tensors(deltas, weights, merge.method, merge.density, merge.majority_sign_method)
    if delta.dim() > 2:  # a convolution's (out, in, *kernel)
        delta = delta.flatten(1)  # (out, in·kernel)
    elif isinstance(layer, LoraEmbedding) or getattr(layer, "fan_in_fan_out", False):
        delta = delta.T  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    b = u[:, :k] * s[:k]  # (out, k)
    a = vh[:k]  # (k, in)
    if clamp is not None:  # as PEFT: both factors clamped to one quantile of their entries
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    new_a, new_b = a.new_zeros(rank, a.shape[1]), b.new_zeros(b.shape[0], rank)
    new_a[:k], new_b[:, :k] = a, b  # a rank beyond the update's own leaves zero rows
    return new_a, new_b
