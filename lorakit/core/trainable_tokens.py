"""Trainable tokens (PEFT's ``trainable_token_indices``): a few rows of an embedding trained in full.

Instead of a low-rank update, the adapter holds new values for the chosen rows of the weight; the forward looks
tokens up in ``W0`` with those rows replaced (``W0.index_copy(0, indices, rows)``), so every other token keeps
its frozen embedding and only ``len(indices) × dim`` values train. Merging writes the rows into the base weight and
unmerging puts the replaced ones back, both exactly. A model whose output head shares the embedding's weight
(tied embeddings) gets the same rows in the head through a layer tied to the embedding's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidType, InvalidValue
from .layer_base import LoraLayer


class TokenRows(nn.Module):
    """One adapter's trainable rows: ``trainable_tokens_delta`` (len(indices), dim) for the token ids in
    ``token_indices`` (PEFT's name: the tensor holds the new rows themselves, not a difference)."""

    def __init__(self, token_indices: Sequence[int], weight: torch.Tensor) -> None:
        super().__init__()
        self.token_indices = list(token_indices)
        index = torch.tensor(self.token_indices, dtype=torch.long, device=weight.device)
        self.register_buffer("index", index, persistent=False)
        # Start from the rows as they are, so a new adapter changes nothing until it trains.
        self.trainable_tokens_delta = nn.Parameter(weight.detach().index_select(0, index).clone())

    def extra_repr(self) -> str:
        return f"token_indices={self.token_indices}"


class TrainableTokensLayer(LoraLayer):
    """Trainable rows on an ``nn.Embedding`` (or an ``nn.Linear`` whose rows are tokens: an output head).

    ``tied_to``: the embedding's layer, when this head shares its weight; the two then share their adapters.
    """

    def __init__(self, base: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise InvalidType(f"trainable tokens work on Embedding and Linear layers, not {type(base).__name__}")
        super().__init__(base)
        self.in_features, self.out_features = base.weight.shape[1], base.weight.shape[0]
        self.tied_to = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        if tied_to is not None:
            self.adapters = tied_to.adapters  # the same rows, trained once
        self._replaced: dict[str, torch.Tensor] = {}  # rows overwritten by merge(), put back by unmerge()

    def add_adapter(self, name: str, *args, **kwargs) -> None:
        raise InvalidValue(f"this {type(self.base).__name__} holds trainable tokens; PEFT does not put LoRA on such "
                           f"a layer, and neither does lorakit (train the rows with trainable_token_indices instead)")

    def add_tokens(self, name: str, token_indices: Sequence[int]) -> TokenRows:
        """Create adapter ``name`` training rows ``token_indices`` (starting from their current values)."""
        if name in self.adapters:
            raise InvalidValue(f"adapter {name!r} already exists on this layer")
        rows = self.base.weight.shape[0]
        bad = [i for i in token_indices if not 0 <= i < rows]
        if bad:
            raise InvalidValue(f"trainable_token_indices {bad} out of range: this {type(self.base).__name__} has "
                               f"{rows} rows (token ids 0..{rows - 1})")
        adapter = TokenRows(token_indices, self.base.weight)
        self.adapters[name] = adapter
        return adapter

    def delta_weight(self, name: str) -> torch.Tensor:
        raise InvalidValue(f"adapter {name!r} trains whole token rows here, not a low-rank update; it has no B·A")

    def _weight_with(self, names: Sequence[str], weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with the rows of adapters ``names`` in place (a new tensor; differentiable in the rows)."""
        seen: set[int] = set()
        for name in names:
            adapter = self.adapters[name]
            if seen & set(adapter.token_indices):
                raise InvalidValue(f"active adapters train overlapping token rows ({sorted(seen & set(adapter.token_indices))}); "
                                   f"activate adapters with disjoint trainable_token_indices")
            seen |= set(adapter.token_indices)
            weight = weight.index_copy(0, adapter.index, adapter.trainable_tokens_delta.to(weight.dtype))
        return weight

    def _apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base
        if isinstance(base, nn.Embedding):
            return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)
        return F.linear(x, weight, base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        if self.routing is not None:
            return self._routed(x)
        names = self._unmerged_active()
        if not names:
            return self.base(x)
        return self._apply(x, self._weight_with(names, self.base.weight))

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        """A mixed batch: each row is looked up with the rows of its own adapter."""
        index, names = self.routing.index, self.routing.names
        if x.shape[0] != index.numel():
            raise InvalidValue(f"adapter_names has {index.numel()} entries but the batch has {x.shape[0]} rows; "
                               f"give one adapter name per row")
        result = self.base(x)
        for slot, name in enumerate(names, start=1):
            rows = index == slot
            if name in self.adapters and name not in self.merged_adapters and bool(rows.any()):
                mine = self._apply(x, self._weight_with([name], self.base.weight))
                result = torch.where(rows.view(-1, *([1] * (result.dim() - 1))), mine, result)
        return result

    def merge(self, names: Sequence[str] | None = None) -> None:
        """Write the rows of adapters (default: the active ones) into the base weight; the replaced rows are kept."""
        for name in self.active_adapters if names is None else names:
            if name not in self.adapters or name in self.merged_adapters:
                continue
            if not self.tied_to:  # a tied head sees the rows through the shared weight
                adapter = self.adapters[name]
                weight = self.base.weight
                with torch.no_grad():
                    self._replaced[name] = weight.index_select(0, adapter.index).clone()
                    weight.index_copy_(0, adapter.index, adapter.trainable_tokens_delta.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put the rows merged adapters replaced back, newest first (exactly the values they had)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._replaced:
                with torch.no_grad():
                    self.base.weight.index_copy_(0, self.adapters[name].index, self._replaced.pop(name))

    def merged_weight(self, names: Sequence[str], base: torch.Tensor | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = self.base.weight.detach() if base is None else base
        live = [n for n in names if n in self.adapters and n not in self.merged_adapters]
        return self._weight_with(live, weight).detach().to(dtype or weight.dtype)

    def merged_bias(self, names: Sequence[str]) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def extra_repr(self) -> str:
        tied = ", tied to the input embedding" if self.tied_to else ""
        return f"active={self.active_adapters}, merged={self.merged_adapters}{tied}"
