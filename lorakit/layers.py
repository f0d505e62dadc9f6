"""LoRA layers: a frozen base layer plus low-rank updates.

For a base layer with weight W0, each active adapter adds a low-rank update to its output:

    h = W0·x + (α/r)·B·A·dropout(x)        A: (r × in), B: (out × r), B = 0 at the start

``LoraAdapter`` holds one adapter's state (A, B, dropout, scaling, DoRA magnitude). A ``LoraLayer`` wraps
the base module (it keeps ``self.base``, never copies or subclasses it), holds a ``ModuleDict`` of adapters by
name and the list of active names, and can fold an adapter into the base weight (``merge``) and take it out
again (``unmerge``). Merging is computed in fp32 and cast back to the weight's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import BASE_ROW  # noqa: F401 - re-exported: part of the layers' vocabulary


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer (``Linear4bit``): its own weight is packed bytes, not a float matrix.

    (A LoRA layer around one is not: its ``weight`` is the base's, not a parameter of its own.)"""
    return type(module._parameters.get("weight")).__name__ == "Params4bit"


class LoraAdapter(nn.Module):
    """One adapter's trainable state on one layer.

    ``lora_A`` is (r × in) and ``lora_B`` is (out × r) for linear layers; for Conv2d they carry the base's
    kernel: A (r × in × kh × kw), B (out × r × 1 × 1). ``scaling`` is α/r, or α/√r with rsLoRA.
    ``lora_magnitude_vector`` (out,) exists only for DoRA.
    """

    def __init__(
        self,
        a_shape: Sequence[int],
        b_shape: Sequence[int],
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        dora_features: int | None = None,
    ) -> None:
        super().__init__()
        self.r = r
        self.lora_alpha = lora_alpha
        self.dropout_p = float(lora_dropout)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A = nn.Parameter(torch.zeros(*a_shape))
        self.lora_B = nn.Parameter(torch.zeros(*b_shape))
        self.lora_magnitude_vector = nn.Parameter(torch.ones(dora_features)) if dora_features else None

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


def _store(weight: torch.Tensor, value: torch.Tensor) -> None:
    """Write an fp32 result into a weight of any dtype, in place (other references to it stay valid)."""
    weight.data.copy_(value.to(weight.dtype))


def _add_to(weight: torch.Tensor, delta: torch.Tensor, alpha: float = 1.0) -> None:
    """``weight += alpha·delta`` computed in fp32: in place for fp32 weights, through fp32 for the others."""
    if weight.dtype == torch.float32:
        weight.data.add_(delta, alpha=alpha)
    else:
        _store(weight, weight.float().add_(delta, alpha=alpha))


class LoraLayer(nn.Module):
    """Base class of the wrappers: the frozen ``base`` module plus adapters by name.

    Subclasses define the adapter shapes, the update's forward and the update as a dense weight.
    """

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
        # (a ``lorakit.mixed.Routing``, set by ``LoraModel.mixed_batch``).
        self.routing = None
        # DoRA merges rescale rows of the base weight; the factor is kept to undo it exactly.
        self._dora_merge_scale: dict[str, torch.Tensor] = {}
        # Mixed-batch weights stacked per adapter list, reused while the adapters' tensors are unchanged
        # (kept by ``lorakit.mixed.stacked_weights``; cleared here whenever the adapters change).
        self.stack_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- shapes ------------------------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``layer.weight`` keeps working)."""
        return self.base.weight

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of A and B for rank ``r`` on this layer."""
        return lora_shapes(self.base, r)

    # -- adapters ----------------------------------------------------------------------------------------

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> LoraAdapter:
        """Create adapter ``name`` on this layer, initialized as ``init_lora_weights`` says."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if use_dora and not isinstance(self, LoraLinear):
            raise ValueError(f"use_dora is supported for Linear and Conv1D layers, not {type(self.base).__name__}")
        a_shape, b_shape = self.adapter_shapes(r)
        adapter = LoraAdapter(a_shape, b_shape, r, lora_alpha, lora_dropout, use_rslora,
                              dora_features=self.out_features if use_dora else None)
        # Adapters of a half-precision (or quantized) base live in fp32, as PEFT keeps them, for stable training.
        weight = self.base.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        adapter.to(device=weight.device, dtype=dtype)
        self._init_adapter(adapter, init_lora_weights)
        self.adapters[name] = adapter
        self.stack_cache = None
        if use_dora:
            with torch.no_grad():
                adapter.lora_magnitude_vector.copy_(self._dora_weight_norm(adapter))
        return adapter

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
                raise ValueError(f"init_lora_weights must be True, False, 'gaussian' or 'pissa'; got {init!r}")

    def _pissa_init(self, adapter: LoraAdapter) -> None:
        raise ValueError(f"init_lora_weights='pissa' is supported for Linear and Conv1D layers, "
                         f"not {type(self.base).__name__}")

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting it")
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
        """Fold adapters (default: the active ones) into the base weight, in fp32, and record it."""
        weight = self.base.weight
        for name in self.active_adapters if names is None else names:
            if name not in self.adapters or name in self.merged_adapters:
                continue
            if is_4bit(self.base):
                raise ValueError("merging into a 4-bit base weight would round it to 4 bits again (lossy, and "
                                 "unmerge could not undo it); use merge_and_unload(), which returns dense layers, "
                                 "or merge_and_unload(requantize=True)")
            with torch.no_grad():
                adapter = self.adapters[name]
                if adapter.use_dora:
                    scale = adapter.lora_magnitude_vector.float() / self._dora_weight_norm(adapter)
                    self._dora_merge_scale[name] = scale
                    _store(weight, self._rows(weight.float() + self.delta_weight(name), scale))
                else:
                    self._add_delta(name, alpha=1.0)
            self.merged_adapters.append(name)

    def _add_delta(self, name: str, alpha: float) -> None:
        """``W += alpha·ΔW`` for adapter ``name``, computed in fp32."""
        _add_to(self.base.weight, self.delta_weight(name), alpha=alpha)

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
                scale = adapter.lora_magnitude_vector.detach().float() / self._dora_weight_norm(adapter, w32)
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
                    _store(weight, w32 - self.delta_weight(name))
                else:
                    self._add_delta(name, alpha=-1.0)

    def _rows(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Multiply each output row of a base-shaped weight by ``scale`` (out,)."""
        raise NotImplementedError  # only LoraLinear supports DoRA

    def _dora_weight_norm(self, adapter: LoraAdapter, weight: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # only LoraLinear supports DoRA

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}"


class LoraLinear(LoraLayer):
    """LoRA around a linear layer: ``nn.Linear``, Hugging Face ``Conv1D`` or a bitsandbytes ``Linear4bit``.

    Conv1D stores its weight (in, out) (``fan_in_fan_out``); A and B keep the usual (r × in), (out × r)
    shapes, and only merging transposes the update.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.fan_in_fan_out = is_conv1d(base)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.routing is not None:
            return self.routing.add_update(x, result)
        for name in self._unmerged_active():
            adapter = self.adapters[name]
            if adapter.use_dora:
                result = self._dora_forward(adapter, x, result)
            else:
                result = _add_lora(result, adapter.dropout(x), adapter.lora_A, adapter.lora_B, adapter.scaling)
        return result

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


def update_dtype(x: torch.Tensor, lora_a: torch.Tensor) -> torch.dtype:
    """The dtype the low-rank update is computed in.

    On CPUs, bf16/fp16 GEMMs whose inner dimension is the rank fall off the fast kernels (on an AVX2 machine a
    (1024×8)·(8×1536) bf16 product is ~80× slower than in fp32), while the update costs only ~r/in of the base
    layer's FLOPs. So on CPU the update is computed in fp32; elsewhere in the adapter's dtype.
    """
    if x.device.type == "cpu" and (x.dtype in _LOW_PRECISION or lora_a.dtype in _LOW_PRECISION):
        return torch.float32
    return lora_a.dtype


def _add_lora(result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              scaling: float) -> torch.Tensor:
    """``result + scaling·B·A·x`` with two GEMMs and no extra elementwise pass over the output."""
    dtype = update_dtype(x, lora_a)
    autocast = torch.is_autocast_enabled(x.device.type)
    if dtype == torch.float32 and x.device.type == "cpu" and autocast:
        with torch.autocast("cpu", enabled=False):
            return _add_lora(result, x, lora_a, lora_b, scaling)
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    if not autocast:
        x2, lora_a, lora_b = x2.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    xa = torch.mm(x2, lora_a.t())  # (tokens, r)
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
    dropout.
    """

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
                    delta = self._delta(self.adapters[name], ids).to(result.dtype)
                    result = result + delta * rows.view(-1, *([1] * (result.dim() - 1))).to(result.dtype)
            return result
        for name in self._unmerged_active():
            result = result + self._delta(self.adapters[name], ids).to(result.dtype)
        return result

    def _unmerged_pool(self) -> list[str]:
        return [n for n in self.adapters if n not in self.merged_adapters]

    def _delta(self, adapter: LoraAdapter, ids: torch.Tensor) -> torch.Tensor:
        return (self._lookup(ids, adapter.lora_A) @ adapter.lora_B.T) * adapter.scaling

    def delta_weight(self, name: str) -> torch.Tensor:
        adapter = self.adapters[name]
        return (adapter.lora_B.float() @ adapter.lora_A.float()).T * adapter.scaling  # (num_embeddings, dim)


class LoraConv2d(LoraLayer):
    """LoRA around ``nn.Conv2d``: A is a conv with the base's kernel, stride and padding into r channels,
    B a 1×1 conv back to the output channels."""

    def __init__(self, base: nn.Conv2d) -> None:
        if base.groups != 1:
            raise ValueError(f"LoRA on Conv2d needs groups=1, got groups={base.groups}")
        super().__init__(base)
        self.in_features, self.out_features = base.in_channels, base.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.routing is not None and not self.disabled:
            raise ValueError("mixed batches (adapter_names=...) support Linear and Embedding layers, not Conv2d")
        base = self.base
        for name in self._unmerged_active():
            adapter = self.adapters[name]
            xd = adapter.dropout(x).to(adapter.lora_A.dtype)
            xa = F.conv2d(xd, adapter.lora_A, None, base.stride, base.padding, base.dilation)  # (N, r, H', W')
            result = result + (F.conv2d(xa, adapter.lora_B) * adapter.scaling).to(result.dtype)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        adapter = self.adapters[name]
        b = adapter.lora_B.float()[:, :, 0, 0]  # (out, r)
        return torch.einsum("or,rihw->oihw", b, adapter.lora_A.float()) * adapter.scaling


def lora_shapes(module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A and B for rank ``r`` on a base ``module`` (Linear, Conv1D, Embedding or Conv2d)."""
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        return (r, fan_in), (fan_out, r)
    if isinstance(module, nn.Linear):
        return (r, module.in_features), (module.out_features, r)
    if isinstance(module, nn.Embedding):
        return (r, module.num_embeddings), (module.embedding_dim, r)
    if isinstance(module, nn.Conv2d):
        return (r, module.in_channels, *module.kernel_size), (module.out_channels, r, 1, 1)
    raise ValueError(f"LoRA wraps {SUPPORTED_TYPES} layers, not {type(module).__name__}")


def wrap(module: nn.Module) -> LoraLayer | None:
    """The LoRA wrapper for ``module``, or None if LoRA does not support its type."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    return None


SUPPORTED_TYPES = "Linear, Conv1D, Embedding, Conv2d"
