"""The CPU fast paths of a LoRA layer's forward, kept apart so that the layer's forward reads as the formula.

Each path computes the same sum as the plain one, ``W0·x + Σ scaling·B·A·x``, only in another order or dtype:

- **Products in the order the BLAS likes**: ``(A·xᵀ)ᵀ`` rather than ``x·Aᵀ`` (a GEMM with r rows and ``tokens``
  columns runs on the BLAS's fast path; one with r columns does not), and in inference the update accumulates into
  the base output in place (one fused GEMM-add, no new tensor): :func:`add_lora`.
- **The base GEMM accumulating onto the update** (:func:`base_accumulates`, :func:`update_then_base`): in fp32
  inference on enough tokens, the low-rank product writes the output first and the base GEMM adds onto it, so the
  output is read and written once less.
- **The update's dtype under CPU autocast** (:func:`update_dtype`): bf16 where this CPU's rank-r bf16 products are
  fast, else fp32. Whether they are fast is measured where the run's precision is measured
  (:func:`lorakit.models.devices.low_precision_updates_fast`) and set on the layers with
  :func:`set_low_precision_updates`; a layer never told takes the fp32 update, which is right on every CPU.

Timings of each path are in bench/README.md (``bench/overhead.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules import module as torch_module

if TYPE_CHECKING:
    from .layers import LoraLinear

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Fewer tokens than this (decoding) gain nothing from accumulating into the base GEMM; measured between 8 tokens
# (slower) and 1024 (faster): bench/README.md.
ACCUMULATE_MIN_TOKENS = 128


def set_low_precision_updates(model: nn.Module, fast: bool) -> None:
    """Tell every LoRA layer of ``model`` whether its update may run in bf16/fp16 under CPU autocast (``fast``:
    this CPU's rank-r low-precision products are at most twice fp32's time, see
    :func:`lorakit.models.devices.low_precision_updates_fast`)."""
    from .layer_base import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.low_precision_updates = fast


def update_dtype(x: torch.Tensor, lora_a: torch.Tensor, low_precision_fast: bool = False) -> torch.dtype:
    """The dtype the low-rank update is computed in.

    On GPUs, whose bf16/fp16 GEMMs are fast at any shape: the activations' dtype when it is bf16/fp16 (no fp32
    copy of them); otherwise the adapter's dtype. On CPUs the speed of low-precision products depends on the
    processor (many times slower than fp32 on AVX2-only CPUs, faster on those with AVX-512 BF16 or AMX). So on CPU,
    a bf16/fp16 input or adapter under autocast gets its update in the autocast dtype only when
    ``low_precision_fast`` says this CPU's rank-r products in it are fast: the fp32 alternative costs casts and
    fp32 temporaries of every layer's output. Otherwise a low-precision input or adapter gets its update in fp32,
    rounded once into the output (as PEFT's fp32 adapters do).
    """
    if x.device.type == "cpu" and (x.dtype in LOW_PRECISION or lora_a.dtype in LOW_PRECISION):
        if low_precision_fast and torch.is_autocast_enabled("cpu"):
            autocast = torch.get_autocast_dtype("cpu")
            if autocast in LOW_PRECISION:
                return autocast
        return torch.float32
    return x.dtype if x.device.type == "cuda" and x.dtype in LOW_PRECISION else lora_a.dtype


def add_lora(result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
             low_precision_fast: bool = False) -> torch.Tensor:
    """``result + scaling·B·A·x`` with two GEMMs and no extra elementwise pass over the output."""
    dtype = update_dtype(x, lora_a, low_precision_fast)
    autocast = torch.is_autocast_enabled(x.device.type)
    if dtype == torch.float32 and x.device.type == "cpu" and autocast:
        with torch.autocast("cpu", enabled=False):
            return add_lora(result, x, lora_a, lora_b, scaling, low_precision_fast)
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    if not autocast and not x2.dtype == lora_a.dtype == lora_b.dtype == dtype:
        x2, lora_a, lora_b = x2.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    xa = torch.mm(lora_a, x2.t()).t()  # (tokens, r) as A·xᵀ, a transposed view: the BLAS's fast orientation
    out2 = result.reshape(-1, result.shape[-1])  # (tokens, out)
    # In-place ops are not autocast, so under autocast the update goes through the out-of-place addmm.
    inplace = not torch.is_grad_enabled() and result.is_contiguous() and not autocast
    if out2.dtype != xa.dtype:  # the update is computed in another dtype than the base output
        delta = torch.mm(xa, lora_b.t())  # (tokens, out)
        if inplace:
            out2.add_(delta, alpha=scaling)  # a mixed-dtype add rounds once, as PEFT's fp32 adapters do
            return result
        return torch.add(result, delta.view_as(result), alpha=scaling).to(result.dtype)
    if inplace:  # inference: accumulate into the base output in place (one fused GEMM + add, no new tensor)
        out2.addmm_(xa, lora_b.t(), alpha=scaling)
        return result
    return torch.addmm(out2, xa, lora_b.t(), alpha=scaling).view_as(result)


def base_accumulates(layer: LoraLinear, x: torch.Tensor) -> bool:
    """Whether ``layer`` may run its base product itself, accumulating onto the update (:func:`update_then_base`).

    Each condition is what that reordering needs to give the plain path's result:

    - inference (no gradients): the reordered sum has no autograd formula of its own;
    - at least :data:`ACCUMULATE_MIN_TOKENS` tokens: fewer (decoding) gain nothing;
    - the layer enabled, no mixed-batch routing: those take their own paths;
    - a bare ``nn.Linear`` whose call would run nothing but ``F.linear`` (no hooks, no replaced ``forward``): the
      base is not called, so nothing else it would run may be skipped;
    - on CPU, input, weight and adapters in fp32, no autocast: the path it was measured to win on;
    - plain LoRA adapters (no DoRA, no ``lora_bias``): those add terms the reordered sum lacks.
    """
    base = layer.base
    if (torch.is_grad_enabled() or x.numel() < ACCUMULATE_MIN_TOKENS * x.shape[-1]
            or layer.disabled or layer.routing is not None
            or type(base) is not nn.Linear or _has_hooks(base)
            or x.device.type != "cpu" or x.dtype != torch.float32 or base.weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")):
        return False
    active = layer._unmerged_active()
    return bool(active) and all(
        not (ad := layer.adapters[n]).use_dora and ad.lora_B_bias is None and ad.lora_A.dtype == torch.float32
        for n in active)


def update_then_base(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """``W0·x + b + Σ scaling·B·A·x`` with the update computed first and the base GEMM accumulating onto it.

    Same sum as the plain path, in another order (float reassociation only), but the (tokens, out) output is
    written by the first low-rank GEMM and then read once by the base GEMM's in-kernel accumulate, instead of being
    read and written again by an ``addmm_`` after the base.
    """
    base = layer.base
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    out = None
    for name in layer._unmerged_active():
        adapter = layer.adapters[name]
        xa = torch.mm(adapter.lora_A, adapter.dropout(x2).t()).t()  # (tokens, r), as in add_lora
        if out is None and base.bias is None:
            out = torch.mm(xa * adapter.scaling, adapter.lora_B.t())  # (tokens, out)
        elif out is None:
            out = torch.addmm(base.bias, xa, adapter.lora_B.t(), alpha=adapter.scaling)  # (tokens, out)
        else:
            out.addmm_(xa, adapter.lora_B.t(), alpha=adapter.scaling)
    out.addmm_(x2, base.weight.t())  # the base product, accumulated in the GEMM
    return out.view(*x.shape[:-1], out.shape[-1])


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run more than its class's ``forward``: hooks of its own or global ones
    (the conditions of ``nn.Module.__call__``'s fast path), or a ``forward`` replaced on the instance."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)
