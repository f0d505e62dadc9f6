"""LoRA layers for linear layers and embeddings, and the choice of wrapper for a base module.

For a base layer with weight W0, each active adapter adds a low-rank update to its output:

    h = W0·x + (α/r)·B·A·dropout(x)        A: (r × in), B: (out × r), B = 0 at the start

``LoraAdapter`` (in :mod:`lorakit.core.layer_base`) holds one adapter's state (A, B, dropout, scaling, DoRA magnitude,
``lora_bias``). A ``LoraLayer`` wraps the base module (it keeps ``self.base``, never copies or subclasses it), holds
a ``ModuleDict`` of adapters by name and the list of active names, and can fold an adapter into the base weight
(``merge``) and take it out again (``unmerge``). Merging is computed in fp32 and cast back to the weight's dtype.
Convolutions are in :mod:`lorakit.core.conv_layers`, trainable tokens in :mod:`lorakit.core.trainable_tokens`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_paths
from .config import BASE_ROW  # noqa: F401 - re-exported: part of the layers' vocabulary
from .conv_layers import LoraConv, LoraConv1d, LoraConv2d, LoraConv3d, conv_shapes
from .errors import InvalidValue
from .layer_base import LoraAdapter, LoraLayer, is_4bit, is_conv1d
from .trainable_tokens import TrainableTokensLayer

__all__ = [
    "LoraAdapter",
    "LoraConv",
    "LoraConv1d",
    "LoraConv2d",
    "LoraConv3d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "TrainableTokensLayer",
    "is_4bit",
    "is_conv1d",
    "lora_shapes",
    "wrap",
]


class LoraLinear(LoraLayer):
    """LoRA around a linear layer: ``nn.Linear``, Hugging Face ``Conv1D`` or a bitsandbytes ``Linear4bit``.

    Conv1D stores its weight (in, out) (``fan_in_fan_out``); A and B keep the usual (r × in), (out × r)
    shapes, and only merging transposes the update.
    """

    supports_dora = True
    supports_lora_bias = True

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return lora_shapes(self.base, r)

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.fan_in_fan_out = is_conv1d(base)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``h = W0·x + Σ (α/r)·B·A·dropout(x)`` over the active adapters not merged into W0."""
        if not args and not kwargs and fast_paths.base_accumulates(self, x):
            return fast_paths.update_then_base(self, x)  # the same sum, the base GEMM accumulating onto the update
        result = self.base(x, *args, **kwargs)  # W0·x (+ bias)
        if self.disabled:
            return result
        if self.routing is not None:  # a mixed batch: each row gets its own adapter's update
            return self._add_routed_bias(self.routing.add_update(x, result))
        for name in self._unmerged_active():
            result = self._add_update(self.adapters[name], x, result)
        return result

    def _add_update(self, adapter: LoraAdapter, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + scaling·B·A·dropout(x)`` (+ ``scaling·lora_B_bias``), or DoRA's update."""
        if adapter.use_dora:
            return self._dora_forward(adapter, x, result)
        result = fast_paths.add_lora(result, adapter.dropout(x), adapter.lora_A, adapter.lora_B, adapter.scaling,
                                     self.low_precision_updates)
        if adapter.lora_B_bias is not None:
            result = result + (adapter.scaling * adapter.lora_B_bias).to(result.dtype)
        return result

    def _add_routed_bias(self, result: torch.Tensor) -> torch.Tensor:
        """A mixed batch: each row also gets the ``lora_bias`` of its own adapter (the stacked weights hold A, B)."""
        routing = self.routing
        if not routing.has_bias:  # known when the routing was set: no per-call scan of the adapters
            return result
        live = [n for n in routing.names if n in self.adapters and n not in self.merged_adapters]
        zero = result.new_zeros(self.out_features)
        rows = [zero] + [self.adapters[n].scaling * self.adapters[n].lora_B_bias.to(result.dtype)
                         if n in live and self.adapters[n].lora_B_bias is not None else zero for n in routing.names]
        per_row = torch.stack(rows).index_select(0, routing.index)  # (batch, out)
        return result + per_row.view(per_row.shape[0], *([1] * (result.dim() - 2)), -1)

    def delta_weight(self, name: str) -> torch.Tensor:
        adapter = self.adapters[name]
        delta = (adapter.lora_B.float() @ adapter.lora_A.float()) * adapter.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _rows(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return weight * (scale[None, :] if self.fan_in_fan_out else scale[:, None])

    def _add_delta(self, name: str, alpha: float) -> None:
        weight = self.base.weight
        if weight.dtype != torch.float32:
            return super()._add_delta(name, alpha)
        adapter = self.adapters[name]
        a, b = adapter.lora_A.detach().float(), adapter.lora_B.detach().float()
        # One fused GEMM-accumulate into the weight: no dense ΔW is materialized.
        if self.fan_in_fan_out:
            weight.data.addmm_(a.t(), b.t(), alpha=alpha * adapter.scaling)  # (in, out) += Aᵀ·Bᵀ
        else:
            weight.data.addmm_(b, a, alpha=alpha * adapter.scaling)  # (out, in) += B·A

    def _pissa_init(self, adapter: LoraAdapter) -> None:
        # PiSSA: A, B from the top-r singular triplets of W; the base keeps the residual W - scaling·B·A.
        weight = self.base.weight
        w = weight.detach().float()
        w = w.T if self.fan_in_fan_out else w  # (out, in)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = adapter.r
        root = (s[:r] / adapter.scaling).sqrt()
        adapter.lora_A.copy_((root[:, None] * vh[:r]).to(adapter.lora_A.dtype))  # (r, in)
        adapter.lora_B.copy_((u[:, :r] * root[None, :]).to(adapter.lora_B.dtype))  # (out, r)
        residual = w - adapter.scaling * adapter.lora_B.float() @ adapter.lora_A.float()
        weight.data.copy_((residual.T if self.fan_in_fan_out else residual).to(weight.dtype))

    # -- DoRA --------------------------------------------------------------------------------------------

    def _dora_weight_norm(self, adapter: LoraAdapter, weight: torch.Tensor | None = None) -> torch.Tensor:
        """‖W + scaling·B·A‖ per output row (W: the base weight unless given), in fp32, detached (DoRA §4.3)."""
        w = (self.base.weight if weight is None else weight).detach().float()
        w = w.T if self.fan_in_fan_out else w  # (out, in)
        delta = adapter.scaling * (adapter.lora_B.detach().float() @ adapter.lora_A.detach().float())
        return (w + delta).norm(p=2, dim=1)

    def _dora_forward(self, adapter: LoraAdapter, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # DoRA: W' = m · (W0 + s·B·A) / ‖W0 + s·B·A‖, so W'x = g·(W0·x) + g·s·B·A·x with g = m / ‖…‖ per row.
        g = (adapter.lora_magnitude_vector / self._dora_weight_norm(adapter)).to(result.dtype)  # (out,)
        xd = adapter.dropout(x)
        bias = self.base.bias
        if xd is x:
            base_out = result if bias is None else result - bias
        else:
            w = self.base.weight.T if self.fan_in_fan_out else self.base.weight
            base_out = F.linear(xd.to(w.dtype), w)
        lora = F.linear(F.linear(xd.to(adapter.lora_A.dtype), adapter.lora_A), adapter.lora_B) * adapter.scaling
        return result + (g - 1) * base_out + g * lora.to(result.dtype)

class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: A (r × num_embeddings) is looked up, then B (dim × r) projects it.

    As in PEFT, the default init puts zeros in A and a normal B, and the adapter's input (token ids) gets no
    dropout. With DoRA (PEFT's rule for embeddings) the magnitude runs over the embedding's dimensions: each
    column of the (num_embeddings × dim) weight W0 + ΔW is normalized over the vocabulary.
    """

    supports_dora = True

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return lora_shapes(self.base, r)

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__(base)
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim

    def _init_adapter(self, adapter: LoraAdapter, init: bool | str) -> None:
        with torch.no_grad():
            if init is True:
                nn.init.zeros_(adapter.lora_A)
                nn.init.normal_(adapter.lora_B)
            elif init == "gaussian":
                nn.init.normal_(adapter.lora_A)
                nn.init.zeros_(adapter.lora_B)
            elif init is False:
                nn.init.normal_(adapter.lora_A)
                nn.init.normal_(adapter.lora_B)
            else:
                super()._init_adapter(adapter, init)

    def _lookup(self, ids: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
        base = self.base
        return F.embedding(ids, lora_a.T, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)  # (..., r)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base(ids)
        if self.routing is not None and not self.disabled:
            index, names = self.routing.index, self.routing.names
            for slot, name in enumerate(names, start=1):
                rows = index == slot
                if name in self._unmerged_pool() and bool(rows.any()):
                    if self.adapters[name].use_dora:
                        raise InvalidValue("mixed batches (adapter_names=...) do not support DoRA adapters")
                    delta = self._delta(self.adapters[name], ids).to(result.dtype)
                    result = result + delta * rows.view(-1, *([1] * (result.dim() - 1))).to(result.dtype)
            return result
        for name in self._unmerged_active():
            adapter = self.adapters[name]
            delta = self._delta(adapter, ids).to(result.dtype)
            if adapter.use_dora:
                # W' = (W0 + ΔW)·g with g = m / ‖W0 + ΔW‖ per column: the looked-up row is (W0[id] + ΔW[id])·g.
                g = (adapter.lora_magnitude_vector / self._dora_weight_norm(adapter)).to(result.dtype)  # (dim,)
                result = g * (result + delta)
            else:
                result = result + delta
        return result

    def _unmerged_pool(self) -> list[str]:
        return [n for n in self.adapters if n not in self.merged_adapters]

    def _delta(self, adapter: LoraAdapter, ids: torch.Tensor) -> torch.Tensor:
        return (self._lookup(ids, adapter.lora_A) @ adapter.lora_B.T) * adapter.scaling

    def delta_weight(self, name: str) -> torch.Tensor:
        adapter = self.adapters[name]
        return (adapter.lora_B.float() @ adapter.lora_A.float()).T * adapter.scaling  # (num_embeddings, dim)

    def _rows(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return weight * scale[None, :]  # (num_embeddings, dim) · (dim,)

    def _dora_weight_norm(self, adapter: LoraAdapter, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = (self.base.weight if weight is None else weight).detach().float()  # (num_embeddings, dim)
        delta = adapter.scaling * (adapter.lora_B.detach().float() @ adapter.lora_A.detach().float()).T
        return (w + delta).norm(p=2, dim=0)  # (dim,)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)


def lora_shapes(module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A and B for rank ``r`` on a base ``module`` (Linear, Conv1D, Embedding or Conv1d/2d/3d)."""
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        return (r, fan_in), (fan_out, r)
    if isinstance(module, nn.Linear):
        return (r, module.in_features), (module.out_features, r)
    if isinstance(module, nn.Embedding):
        return (r, module.num_embeddings), (module.embedding_dim, r)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return conv_shapes(module, r)
    raise InvalidValue(f"LoRA wraps {SUPPORTED_TYPES} layers, not {type(module).__name__}")


def wrap(module: nn.Module) -> LoraLayer | None:
    """The LoRA wrapper for ``module``, or None if LoRA does not support its type."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    for kind, wrapper in ((nn.Conv1d, LoraConv1d), (nn.Conv2d, LoraConv2d), (nn.Conv3d, LoraConv3d)):
        if isinstance(module, kind):
            return wrapper(module)
    return None


SUPPORTED_TYPES = "Linear, Conv1D, Embedding, Conv1d, Conv2d, Conv3d"
