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

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

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
    "update_dtype",
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
        if not args and not kwargs and self._base_can_accumulate(x):
            return self._update_then_base(x)
        result = self.base(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.routing is not None:
            return self._add_routed_bias(self.routing.add_update(x, result))
        for name in self._unmerged_active():
            adapter = self.adapters[name]
            if adapter.use_dora:
                result = self._dora_forward(adapter, x, result)
            else:
                result = _add_lora(result, adapter.dropout(x), adapter.lora_A, adapter.lora_B, adapter.scaling)
                if adapter.lora_B_bias is not None:
                    result = result + (adapter.scaling * adapter.lora_B_bias).to(result.dtype)
        return result

    def _base_can_accumulate(self, x: torch.Tensor) -> bool:
        """Whether this call may run the base product itself, accumulating onto the update (inference only).

        Only for a bare fp32 ``nn.Linear`` on CPU whose call would run nothing but ``F.linear`` (no hooks of its own
        or global, no replaced ``forward``), with plain LoRA adapters (no DoRA, no ``lora_bias``), no routing, and
        at least ``_ACCUMULATE_MIN_TOKENS`` tokens.
        """
        base = self.base
        # Few tokens (decoding) gain nothing from it: on a 2-core Zen 4 the reordered layer was slower at 8 tokens
        # (decode 8×1 overhead +15% against +7%) and faster at 1024 (prefill 8×128 +2.8% against +4.9%).
        if (x.numel() < _ACCUMULATE_MIN_TOKENS * x.shape[-1] or self.disabled or self.routing is not None
                or torch.is_grad_enabled() or type(base) is not nn.Linear or x.device.type != "cpu"
                or x.dtype != torch.float32 or base.weight.dtype != torch.float32
                or torch.is_autocast_enabled("cpu") or _has_hooks(base)):
            return False
        active = self._unmerged_active()
        return bool(active) and all(
            not (ad := self.adapters[n]).use_dora and ad.lora_B_bias is None and ad.lora_A.dtype == torch.float32
            for n in active)

    def _update_then_base(self, x: torch.Tensor) -> torch.Tensor:
        """``W0·x + b + Σ scaling·B·A·x`` with the update computed first and the base GEMM accumulating onto it.

        Same sum as the plain path, in another order (float reassociation only), but the (tokens, out) output is
        written by the first low-rank GEMM and then read once by the base GEMM's in-kernel accumulate, instead of
        being read and written again by an ``addmm_`` after the base: on a 2-core Zen 4 that is ~2% of the layer's
        time at 1024 tokens.
        """
        base = self.base
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        out = None
        for name in self._unmerged_active():
            adapter = self.adapters[name]
            xa = torch.mm(adapter.lora_A, adapter.dropout(x2).t()).t()  # (tokens, r): see _add_lora for the order
            if out is None and base.bias is None:
                out = torch.mm(xa * adapter.scaling, adapter.lora_B.t())  # (tokens, out)
            elif out is None:
                out = torch.addmm(base.bias, xa, adapter.lora_B.t(), alpha=adapter.scaling)  # (tokens, out)
            else:
                out.addmm_(xa, adapter.lora_B.t(), alpha=adapter.scaling)
        out.addmm_(x2, base.weight.t())  # the base product, accumulated in the GEMM
        return out.view(*x.shape[:-1], out.shape[-1])

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

_LOW_PRECISION = (torch.bfloat16, torch.float16)


_ACCUMULATE_MIN_TOKENS = 128  # see LoraLinear._base_can_accumulate; between the measured 8 (slower) and 1024


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run more than its class's ``forward``: hooks of its own or global ones
    (the conditions of ``nn.Module.__call__``'s fast path), or a ``forward`` replaced on the instance."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def update_dtype(x: torch.Tensor, lora_a: torch.Tensor) -> torch.dtype:
    """The dtype the low-rank update is computed in.

    On GPUs, whose bf16/fp16 GEMMs are fast at any shape: the activations' dtype when it is bf16/fp16 (no fp32
    copy of them); otherwise the adapter's dtype. On CPUs it depends on the processor: on an AVX2 machine a
    (1024×8)·(8×1536) bf16 product is ~80× slower than in fp32, while on one with AVX-512 BF16 or AMX it is
    faster than fp32. So on CPU, a bf16/fp16 input or adapter under autocast (lorakit's trainer keeps a frozen base
    in bf16) gets its update in the autocast dtype where that is measured to be fast
    (:func:`low_precision_rank_products_are_fast`): the fp32 alternative costs casts and fp32 temporaries of every
    layer's output, which took a 2-core Zen 4 ~40% longer per layer (forward and backward) than the base product
    alone. Otherwise a low-precision input or adapter gets its update in fp32, rounded once into the output (as
    PEFT's fp32 adapters do).
    """
    if x.device.type == "cpu" and (x.dtype in _LOW_PRECISION or lora_a.dtype in _LOW_PRECISION):
        if torch.is_autocast_enabled("cpu"):
            autocast = torch.get_autocast_dtype("cpu")
            if autocast in _LOW_PRECISION and low_precision_rank_products_are_fast(autocast):
                return autocast
        return torch.float32
    return x.dtype if x.device.type == "cuda" and x.dtype in _LOW_PRECISION else lora_a.dtype


_RANK_PRODUCTS_FAST: dict[torch.dtype, bool] = {}  # what this process measured, by dtype


@torch.compiler.assume_constant_result  # compiled blocks run it while tracing and keep the answer as a constant
def low_precision_rank_products_are_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU's rank-8 products in ``dtype`` (bf16/fp16) are fast: at most twice fp32's time.

    The margin is wide on purpose: CPUs differ by far more than timing noise (on an AVX2 machine bf16 takes ~80×
    fp32's time, on a Zen 4 with AVX-512 BF16 about 0.4×), and near parity the low precision still wins, as the
    fp32 path also pays casts of every layer's input and output. Measured once per process (a few milliseconds,
    :func:`time_rank_products`).
    """
    if dtype not in _RANK_PRODUCTS_FAST:
        _RANK_PRODUCTS_FAST[dtype] = time_rank_products(dtype) <= 2 * time_rank_products(torch.float32)
    return _RANK_PRODUCTS_FAST[dtype]


def time_rank_products(dtype: torch.dtype) -> float:
    """Seconds for the two products of a rank-8 update of a 1024-wide layer over 256 tokens in ``dtype``, in the
    order the layers compute them: the best of five rounds after a warm-up, without autocast or gradients."""
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(256, 1024, generator=gen).to(dtype)
        a = torch.randn(8, 1024, generator=gen).to(dtype)
        b = torch.randn(1024, 8, generator=gen).to(dtype)
        times = []
        for _ in range(6):  # the first round warms the kernels up
            start = time.perf_counter()
            torch.mm(torch.mm(a, x.t()).t(), b.t())  # (tokens, r) as A·xᵀ, transposed; then ·Bᵀ
            times.append(time.perf_counter() - start)
        return min(times[1:])


def _add_lora(result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              scaling: float) -> torch.Tensor:
    """``result + scaling·B·A·x`` with two GEMMs and no extra elementwise pass over the output."""
    dtype = update_dtype(x, lora_a)
    autocast = torch.is_autocast_enabled(x.device.type)
    if dtype == torch.float32 and x.device.type == "cpu" and autocast:
        with torch.autocast("cpu", enabled=False):
            return _add_lora(result, x, lora_a, lora_b, scaling)
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    if not autocast and not x2.dtype == lora_a.dtype == lora_b.dtype == dtype:
        x2, lora_a, lora_b = x2.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    # A·xᵀ rather than x·Aᵀ: a GEMM with r rows and `tokens` columns runs on the BLAS's fast path, one with r
    # columns does not (on a 2-core Zen 4, x·Aᵀ for 1024 tokens × 576 → 8 takes ~1.5× as long as A·xᵀ).
    xa = torch.mm(lora_a, x2.t()).t()  # (tokens, r), a transposed view
    out2 = result.reshape(-1, result.shape[-1])  # (tokens, out)
    # In-place ops are not autocast, so under autocast the update goes through the out-of-place addmm.
    inplace = not torch.is_grad_enabled() and result.is_contiguous() and not autocast
    if out2.dtype != xa.dtype:  # the update is computed in another dtype than the base output
        delta = torch.mm(xa, lora_b.t())  # (tokens, out)
        if inplace:
            out2.add_(delta, alpha=scaling)  # a mixed-dtype add rounds once, as PEFT's fp32 adapters do
            return result
        return torch.add(result, delta.view_as(result), alpha=scaling).to(result.dtype)
    if inplace:
        # Inference: accumulate into the base output in place (one fused GEMM + add, no new tensor).
        out2.addmm_(xa, lora_b.t(), alpha=scaling)
        return result
    return torch.addmm(out2, xa, lora_b.t(), alpha=scaling).view_as(result)


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
