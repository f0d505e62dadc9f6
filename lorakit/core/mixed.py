"""Mixed batches: row i of a batch uses adapter ``adapter_names[i]``, in one batched pass.

Punica's BGMV idea in plain torch: the A and B of the adapters in the batch are zero-padded to one rank and
stacked, and two batched matmuls give every row its own update. No Python loop over sub-batches. The stacks are
built when the batch's routing is set (once per ``forward`` or ``generate`` call, not once per layer call) and
cached on the layer while no weight changes, in one of two layouts:

* one stack entry per row (a base row's is zero) when the batch has no more rows than adapters plus one: no more
  memory than one entry per adapter, and no gather at all when the layer runs (the same row list hits the cache);
* otherwise one entry per adapter plus a zero slot 0 for the base. A forward with several tokens per row gathers
  each row's entry (BGMV) and runs two batched matmuls; a forward with one token per row (decode) skips the gather:
  every row goes through all the A's in one GEMM, the other adapters' columns are zeroed, and one GEMM through all
  the B's adds the update, so each adapter's weights are read once, however many rows use it.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidValue
from .fast_paths import update_dtype
from .layers import LoraLayer, LoraLinear


@dataclass
class Routing:
    """Which adapter each row of a batch uses, as one layer sees it."""

    index: torch.Tensor  # (batch,) slot of each row; 0 is the base model, i is names[i - 1]
    names: list[str]
    a: torch.Tensor | None = None  # (entries, r_max, in): stacked A, for linear layers
    b: torch.Tensor | None = None  # (entries, r_max, out): stacked (B·scaling)ᵀ
    per_row: bool = False  # entry i of the stacks is row i's; otherwise entry i is slot i (0: zero, the base)
    has_bias: bool = False  # some adapter in ``names`` has a ``lora_bias`` on this layer
    _mask: torch.Tensor | None = field(default=None, repr=False)  # (batch, n·r_max), built on first use

    def add_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus, for each row, the update of that row's adapter (a linear layer's forward)."""
        if self.a is None:
            return result
        rows = self.index.numel()
        if x.shape[0] != rows:
            raise rows_mismatch(rows, x.shape[0])
        if self.per_row:
            return self._add_batched(x, result, self.a, self.b)
        if x.numel() == rows * x.shape[-1]:
            return self._add_masked(x, result)
        # BGMV's gather: each row's own A and B, (batch, r_max, in) and (batch, r_max, out)
        return self._add_batched(x, result, self.a.index_select(0, self.index), self.b.index_select(0, self.index))

    @staticmethod
    def _add_batched(x: torch.Tensor, result: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor
                     ) -> torch.Tensor:
        xs = x.to(a_rows.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens per row, in)
        xa = torch.bmm(xs, a_rows.transpose(1, 2))  # (batch, tokens, r_max)
        b_rows = b_rows.to(xa.dtype)  # under autocast, bmm gave xa in the autocast dtype
        out = result.view(x.shape[0], -1, result.shape[-1]) if result.is_contiguous() else None
        if out is not None and out.dtype == xa.dtype and not torch.is_grad_enabled():
            out.baddbmm_(xa, b_rows)  # accumulate in place: no (batch, tokens, out) temporary
            return result
        delta = torch.bmm(xa, b_rows)  # (batch, tokens, out)
        return torch.add(result, delta.reshape(result.shape)).to(result.dtype)

    def _add_masked(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        r_max, in_features = self.a.shape[1:]
        a = self.a[1:].reshape(-1, in_features)  # (n·r_max, in): slot 0, the base's, is zero and left out
        bt = self.b[1:].reshape(-1, self.b.shape[-1])  # (n·r_max, out)
        x2 = x.to(a.dtype).reshape(-1, in_features)  # (batch, in)
        xa = torch.mm(x2, a.t())  # (batch, n·r_max)
        xa = xa * self.mask(r_max).to(xa.dtype)  # each row keeps its own adapter's columns
        bt = bt.to(xa.dtype)  # under autocast, mm gave xa in the autocast dtype
        out2 = result.view(-1, result.shape[-1]) if result.is_contiguous() else None
        if out2 is not None and out2.dtype == xa.dtype and not torch.is_grad_enabled():
            out2.addmm_(xa, bt)  # accumulate in place: no (batch, out) temporary
            return result
        delta = torch.mm(xa, bt)  # (batch, out)
        return torch.add(result, delta.reshape(result.shape)).to(result.dtype)

    def mask(self, r_max: int) -> torch.Tensor:
        """(batch, n·r_max): 1 on the r_max columns of each row's own adapter, 0 elsewhere (all 0: a base row)."""
        if self._mask is None:
            one_hot = F.one_hot(self.index, self.a.shape[0])[:, 1:].to(torch.float32)  # (batch, n)
            self._mask = one_hot.repeat_interleave(r_max, dim=1)  # (batch, n·r_max)
        return self._mask


def routing_for(layer: LoraLayer, index: torch.Tensor, names: list[str]) -> Routing:
    """The routing of one layer, with its stacked weights when it is a linear layer."""
    routing = Routing(index, names)
    if isinstance(layer, LoraLinear) and len(layer.adapters):
        first = next(iter(layer.adapters.values())).lora_A
        dtype = update_dtype(layer.base.weight, first, layer.low_precision_updates)
        # Per-row stacks hold no more entries than per-adapter ones (and need no gather when the layer runs).
        routing.per_row = index.numel() <= len(names) + 1
        entries = [names[i - 1] if i else None for i in index.tolist()] if routing.per_row else [None, *names]
        stacked = stacked_weights(layer, entries, dtype)
        if stacked is not None:
            routing.a, routing.b = stacked
        routing.has_bias = any(layer.adapters[n].lora_B_bias is not None for n in names
                               if n in layer.adapters and n not in layer.merged_adapters)
    return routing


def stacked_weights(layer: LoraLayer, entries: Sequence[str | None], dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A and Bᵀ of the adapters named in ``entries`` zero-padded to one rank and stacked in ``dtype``, scaling
    folded into B: (len(entries), r_max, in) and (len(entries), r_max, out). An entry that is None, or names an
    adapter this layer does not have (unmerged), is zero. None when no entry's adapter lives on this layer.

    Cached on the layer while no adapter tensor changes (inference); rebuilt, differentiably, when training.
    """
    live = [n for n in dict.fromkeys(entries) if n in layer.adapters and n not in layer.merged_adapters]
    if not live:
        return None
    adapters = [layer.adapters[n] for n in live]
    assert not any(ad.use_dora for ad in adapters), "LoraModel.mixed_batch refuses DoRA adapters"
    params = [p for ad in adapters for p in (ad.lora_A, ad.lora_B)]
    # In-place updates (optimizer steps, loads) bump versions; moving the model replaces every tensor's storage;
    # adding or deleting an adapter clears the cache. (Writes through ``.data`` bypass version counters, as
    # everywhere in PyTorch.) Tensors made under torch.inference_mode have no version counter, so a change to one
    # cannot be seen: their stacks are rebuilt at every call.
    versioned = not any(p.is_inference() for p in params)
    key = (tuple(entries), dtype, params[0].data_ptr(), tuple(p._version for p in params)) if versioned else None
    differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if key is not None and not differentiable and layer.stack_cache is not None and layer.stack_cache[0] == key:
        return layer.stack_cache[1]
    r_max = max(ad.r for ad in adapters)
    zero_a = params[0].new_zeros(r_max, layer.in_features, dtype=dtype)
    zero_b = params[0].new_zeros(r_max, layer.out_features, dtype=dtype)
    padded = {}
    for name in live:
        ad = layer.adapters[name]
        padded[name] = (F.pad(ad.lora_A.to(dtype), (0, 0, 0, r_max - ad.r)),  # (r_max, in)
                        F.pad(ad.lora_B.to(dtype).t() * ad.scaling, (0, 0, 0, r_max - ad.r)))  # (r_max, out)
    a_list = [padded[n][0] if n in padded else zero_a for n in entries]
    b_list = [padded[n][1] if n in padded else zero_b for n in entries]
    stacked = torch.stack(a_list), torch.stack(b_list)  # (entries, r_max, in), (entries, r_max, out)
    if key is not None and not differentiable:
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
                    raise InvalidValue(f"{key} must be a positive integer, got {value!r}")
                return count
        return 1

    return max(setting("num_beams"), setting("num_return_sequences"))


def expand_for_generation(adapter_names: Sequence[str], copies: int) -> list[str]:
    """Each row's name repeated for its ``copies`` consecutive rows, as ``generate`` repeats the rows
    (``repeat_interleave``): ``["a", "b"]``, 2 → ``["a", "a", "b", "b"]``."""
    return [name for name in adapter_names for _ in range(copies)]
