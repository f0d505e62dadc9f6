"""The pieces every LoRA layer shares: ``LoraAdapter`` (one adapter's state) and ``LoraLayer`` (the wrapper base).

For a base layer with weight W0, each active adapter adds a low-rank update to its output:

    h = W0·x + (α/r)·(B·A·dropout(x) + b)        A: (r × in), B: (out × r), B = 0 at the start

(``b`` only with ``lora_bias``). The wrappers for each kind of base layer live in :mod:`lorakit.core.layers`,
:mod:`lorakit.core.conv_layers` and :mod:`lorakit.core.trainable_tokens`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidValue


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer (``Linear4bit``): its own weight is packed bytes, not a float matrix.

    (A LoRA layer around one is not: its ``weight`` is the base's, not a parameter of its own.)"""
    return type(module._parameters.get("weight")).__name__ == "Params4bit"


class LoraAdapter(nn.Module):
    """One adapter's trainable state on one layer.

    ``lora_A`` is (r × in) and ``lora_B`` is (out × r) for linear layers; for convolutions they carry the base's
    kernel: A (r × in × k…), B (out × r × 1…). ``scaling`` is α/r, or α/√r with rsLoRA.
    ``lora_magnitude_vector`` exists only for DoRA (shaped as PEFT saves it: (out,) for linear layers, (dim,) for
    embeddings, (1, out, 1…) for convolutions); ``lora_B_bias`` (out,) only with ``lora_bias``.
    """

    def __init__(
        self,
        a_shape: Sequence[int],
        b_shape: Sequence[int],
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        dora_shape: Sequence[int] | None = None,
        bias_features: int | None = None,
    ) -> None:
        super().__init__()
        self.r = r
        self.lora_alpha = lora_alpha
        self.dropout_p = float(lora_dropout)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A = nn.Parameter(torch.zeros(*a_shape))
        self.lora_B = nn.Parameter(torch.zeros(*b_shape))
        self.lora_magnitude_vector = nn.Parameter(torch.ones(*dora_shape)) if dora_shape else None
        self.lora_B_bias = nn.Parameter(torch.zeros(bias_features)) if bias_features else None

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        # p == 0 returns x itself: no copy on the hot path.
        if self.dropout_p and self.training:
            return F.dropout(x, self.dropout_p, training=True)
        return x

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}"


def store_weight(weight: torch.Tensor, value: torch.Tensor) -> None:
    """Write an fp32 result into a weight of any dtype, in place (other references to it stay valid)."""
    weight.data.copy_(value.to(weight.dtype))


def add_to_weight(weight: torch.Tensor, delta: torch.Tensor, alpha: float = 1.0) -> None:
    """``weight += alpha·delta`` computed in fp32: in place for fp32 weights, through fp32 for the others."""
    if weight.dtype == torch.float32:
        weight.data.add_(delta, alpha=alpha)
    else:
        store_weight(weight, weight.float().add_(delta, alpha=alpha))


class LoraLayer(nn.Module):
    """Base class of the wrappers: the frozen ``base`` module plus adapters by name.

    Subclasses define the adapter shapes, the update's forward and the update as a dense weight.
    """

    # What the subclass's forward implements (checked when an adapter is added).
    supports_dora = False
    supports_lora_bias = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Set only for the length of one mixed-batch forward/generate: which adapter each row uses
        # (a ``lorakit.core.mixed.Routing``, set by ``LoraModel.mixed_batch``).
        self.routing = None
        # DoRA merges rescale rows of the base weight; the factor is kept to undo it exactly.
        self._dora_merge_scale: dict[str, torch.Tensor] = {}
        # Mixed-batch weights stacked per adapter list, reused while the adapters' tensors are unchanged
        # (kept by ``lorakit.core.mixed.stacked_weights``; cleared here whenever the adapters change).
        self.stack_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        # Under CPU autocast, the update may run in bf16/fp16 (this CPU's low-precision rank-r products measured
        # fast: lorakit.core.fast_paths.set_low_precision_updates); else it runs in fp32.
        self.low_precision_updates = False

    # -- shapes ------------------------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``layer.weight`` keeps working)."""
        return self.base.weight

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of A and B for rank ``r`` on this layer."""
        raise NotImplementedError  # each subclass knows its base's layout

    # -- adapters ----------------------------------------------------------------------------------------

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: bool | str | None = True,
        lora_bias: bool = False,
    ) -> LoraAdapter:
        """Create adapter ``name`` on this layer, initialized as ``init_lora_weights`` says (None: A and B stay
        zero and the base is not touched, for an adapter whose values are loaded next)."""
        if name in self.adapters:
            raise InvalidValue(f"adapter {name!r} already exists on this layer")
        kind = type(self.base).__name__
        if use_dora and not self.supports_dora:
            raise InvalidValue(f"use_dora is supported for Linear, Conv1D, Embedding and Conv1d/2d/3d layers, not {kind}")
        if lora_bias and not self.supports_lora_bias:
            raise InvalidValue(f"lora_bias is supported for Linear, Conv1D and Conv1d/2d/3d layers, not {kind}")
        a_shape, b_shape = self.adapter_shapes(r)
        adapter = LoraAdapter(a_shape, b_shape, r, lora_alpha, lora_dropout, use_rslora,
                              dora_shape=self.magnitude_shape() if use_dora else None,
                              bias_features=self.out_features if lora_bias else None)
        # Adapters of a half-precision (or quantized) base live in fp32, as PEFT keeps them, for stable training.
        weight = self.base.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        adapter.to(device=weight.device, dtype=dtype)
        if init_lora_weights is not None:
            self._init_adapter(adapter, init_lora_weights)
        self.adapters[name] = adapter
        self.stack_cache = None
        if use_dora:
            with torch.no_grad():
                adapter.lora_magnitude_vector.copy_(self._dora_weight_norm(adapter).view_as(adapter.lora_magnitude_vector))
        return adapter

    def magnitude_shape(self) -> tuple[int, ...]:
        """The shape of a DoRA magnitude vector on this layer (PEFT's)."""
        return (self.out_features,)

    def _init_adapter(self, adapter: LoraAdapter, init: bool | str) -> None:
        with torch.no_grad():
            if init is True:
                nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
                nn.init.zeros_(adapter.lora_B)
            elif init == "gaussian":
                nn.init.normal_(adapter.lora_A, std=1 / adapter.r)
                nn.init.zeros_(adapter.lora_B)
            elif init is False:
                nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
                nn.init.normal_(adapter.lora_B, std=0.02)
            elif init == "pissa":
                self._pissa_init(adapter)
            else:
                raise InvalidValue(f"init_lora_weights={init!r}: lorakit loads adapters trained with this PEFT "
                                   f"initialization but cannot initialize new ones with it; use True, False, "
                                   f"'gaussian' or 'pissa'")

    def _pissa_init(self, adapter: LoraAdapter) -> None:
        raise InvalidValue(f"init_lora_weights='pissa' is supported for Linear and Conv1D layers, "
                           f"not {type(self.base).__name__}")

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise InvalidValue(f"adapter {name!r} is merged into the base weight; unmerge it before deleting it")
        del self.adapters[name]
        self.stack_cache = None
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Sequence[str]) -> None:
        """Make ``names`` (those of them this layer has) the active adapters, in that order."""
        self.active_adapters = [n for n in names if n in self.adapters]

    # -- the update --------------------------------------------------------------------------------------

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update of adapter ``name`` as a dense fp32 tensor shaped like the base weight."""
        raise NotImplementedError  # each subclass folds A and B its own way

    def _unmerged_active(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    # -- merge -------------------------------------------------------------------------------------------

    def merge(self, names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight, in fp32, and record it.

        Raises:
            ValueError: The layer is disabled: a disabled layer computes the base alone, and a merged update would
                bring the adapter back (PEFT's forward unmerges a disabled layer again; lorakit refuses instead).
        """
        weight = self.base.weight
        for name in self.active_adapters if names is None else names:
            if name not in self.adapters or name in self.merged_adapters:
                continue
            if self.disabled:
                raise InvalidValue(f"cannot merge adapter {name!r} while the adapter layers are disabled (a disabled "
                                   f"layer computes the base model alone); call enable_adapter_layers() first")
            if is_4bit(self.base):
                raise InvalidValue("merging into a 4-bit base weight would round it to 4 bits again (lossy, and "
                                   "unmerge could not undo it); use merge_and_unload(), which returns dense layers, "
                                   "or merge_and_unload(requantize=True)")
            with torch.no_grad():
                adapter = self.adapters[name]
                if adapter.lora_B_bias is not None:
                    self._bias_for_merge()  # refuse before the weight changes
                if adapter.use_dora:
                    scale = adapter.lora_magnitude_vector.float().reshape(-1) / self._dora_weight_norm(adapter)
                    self._dora_merge_scale[name] = scale
                    store_weight(weight, self._rows(weight.float() + self.delta_weight(name), scale))
                else:
                    self._add_delta(name, alpha=1.0)
                if adapter.lora_B_bias is not None:
                    add_to_weight(self._bias_for_merge(), adapter.lora_B_bias.float(), alpha=adapter.scaling)
            self.merged_adapters.append(name)

    def _bias_for_merge(self) -> torch.Tensor:
        bias = getattr(self.base, "bias", None)
        if bias is None:
            raise InvalidValue(f"an adapter with lora_bias cannot be merged into this {type(self.base).__name__}: it "
                               f"has no bias to fold the adapter's bias into")
        return bias

    def _add_delta(self, name: str, alpha: float) -> None:
        """``W += alpha·ΔW`` for adapter ``name``, computed in fp32."""
        add_to_weight(self.base.weight, self.delta_weight(name), alpha=alpha)

    def merged_weight(self, names: Sequence[str], base: torch.Tensor | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight with adapters ``names`` folded in (fp32 math), as a new tensor in ``dtype`` (default:
        the weight's); the layer is unchanged. ``base`` replaces the base weight (a 4-bit weight's dense copy)."""
        weight = self.base.weight.detach() if base is None else base
        w32 = weight.float().clone()
        for name in names:
            if name not in self.adapters or name in self.merged_adapters:
                continue
            adapter = self.adapters[name]
            if adapter.use_dora:  # normalized against the weight it is folded into, as merge() does
                scale = adapter.lora_magnitude_vector.detach().float().reshape(-1) / self._dora_weight_norm(adapter, w32)
                w32 = self._rows(w32 + self.delta_weight(name).detach(), scale)
            else:
                w32 += self.delta_weight(name).detach()
        return w32.to(dtype or weight.dtype)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again, newest first."""
        weight = self.base.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                if name in self._dora_merge_scale:
                    w32 = self._rows(weight.float(), 1.0 / self._dora_merge_scale.pop(name))
                    store_weight(weight, w32 - self.delta_weight(name))
                else:
                    self._add_delta(name, alpha=-1.0)
                bias = self.adapters[name].lora_B_bias
                if bias is not None:
                    add_to_weight(self.base.bias, bias.float(), alpha=-self.adapters[name].scaling)

    def merged_bias(self, names: Sequence[str]) -> torch.Tensor | None:
        """The base bias with the ``lora_bias`` of adapters ``names`` folded in (a new tensor), or the base's own
        bias (None if it has none) when none of them has one; the layer is unchanged."""
        bias = getattr(self.base, "bias", None)
        extra = [self.adapters[n] for n in names if n in self.adapters and n not in self.merged_adapters
                 and self.adapters[n].lora_B_bias is not None]
        if not extra:
            return bias
        b32 = self._bias_for_merge().detach().float().clone()
        for adapter in extra:
            b32 += adapter.scaling * adapter.lora_B_bias.detach().float()
        return b32.to(bias.dtype)

    def _rows(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Multiply the base-shaped weight by DoRA's ``scale`` along the axis the magnitude vector runs over."""
        raise NotImplementedError  # each DoRA-capable subclass knows its axis

    def _dora_weight_norm(self, adapter: LoraAdapter, weight: torch.Tensor | None = None) -> torch.Tensor:
        """‖W + ΔW‖ along the magnitude's axis, flattened, in fp32, detached (W: the base weight unless given)."""
        raise NotImplementedError  # each DoRA-capable subclass knows its axis

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}"
