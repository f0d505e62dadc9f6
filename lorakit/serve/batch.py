"""The running batch: the rows being decoded together, their KV cache and attention mask, and the mixed-adapter
routing kept set from one step to the next.

Rows are left-padded: every row's newest token is in the last column, and the mask marks the padding on the left.
Prefilled rows join with their own cache (the narrower of the two caches is padded on the left first); finished
rows leave at once, and columns that have become padding in every remaining row are cut off.

Only the scheduler thread touches a :class:`Batch`; other threads may read ``rows`` (a list that is replaced, not
changed in place, when rows leave).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..core.config import BASE_ROW
from ..models.model import LoraModel
from .grammar import Constraint
from .kv_cache import concat_caches, joinable, left_pad_cache, slice_cache
from .request import Event, Request
from .sampling import TextStream, TokenLogprob


@dataclass
class Row:
    """One request in the batch and its decoding state."""

    request: Request
    stream: TextStream
    generator: torch.Generator
    pending: int = -1  # the last sampled token, fed to the model at the next step
    position: int = 0  # the position id of ``pending``
    generated: int = 0
    scored: list[TokenLogprob] = field(default_factory=list)  # log-probs not sent yet (when the request asks)
    constraint: Constraint | None = None  # the grammar state of a request with a response_format

    def add(self, token: int, eos_ids: set[int], logprob: TokenLogprob | None = None, complete: bool = False
            ) -> Event | None:
        """Take the row's next token (and its log-probability, when the request asks for them): the event for its
        owner (None: no text to send yet). After a final event (an end-of-sequence token, a stop string, a
        ``complete`` structured document or ``max_tokens``) the row is done."""
        params = self.request.params
        self.generated += 1
        finish = None
        if token in eos_ids and not params.ignore_eos:
            finish, piece = "stop", self.stream.flush()
        else:
            if logprob is not None:
                self.scored.append(logprob)
            piece = self.stream.add(token)
            if self.stream.stopped:
                finish = "stop"
            elif complete:
                finish, piece = "stop", piece + self.stream.flush()
            elif self.generated >= params.max_tokens:
                finish, piece = "length", piece + self.stream.flush()
        if finish is None:
            self.pending = token
            return Event(text=piece, logprobs=self._take_scored()) if piece else None
        return Event(text=piece, finish_reason=finish, prompt_tokens=len(self.request.prompt_ids),
                     completion_tokens=self.generated, logprobs=self._take_scored())

    def _take_scored(self) -> list[TokenLogprob] | None:
        if self.request.params.logprobs is None:
            return None
        taken, self.scored = self.scored, []
        return taken


def left_padded(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: token ids, attention mask (1 for real tokens) and position ids."""
    width = max(len(ids) for ids in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (rows, width)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (rows, width)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (rows, width): left padding does not shift positions
    return ids, mask, positions


class Batch:
    """The rows decoded together.

    Attributes:
        rows: The running rows, in the order of the cache's batch dimension.
        cache: Their KV cache (None while no row runs).
        mask: ``(rows, cached tokens)``: 1 for real tokens, 0 for left padding (None while no row runs).
    """

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self._routing: tuple[tuple[str | None, ...], ExitStack] | None = None  # the mixed-batch routing now set

    def busy(self) -> set[str]:
        """The adapters the running rows use (they must stay in the model)."""
        return {row.request.adapter for row in self.rows if row.request.adapter is not None}

    def adapters(self) -> list[str | None]:
        """Each row's adapter (None: the base)."""
        return [row.request.adapter for row in self.rows]

    def join(self, rows: list[Row], cache: Any, mask: torch.Tensor) -> None:
        """Add prefilled rows, with their own ``cache`` and ``mask`` ``(rows, prompt width)``, to the batch."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.cache = concat_caches(left_pad_cache(self.cache, width), left_pad_cache(cache, width))
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                               F.pad(mask, (width - mask.shape[1], 0))])  # (rows, width)
        self.rows += rows

    def next_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's pending token and its position id, ``(rows, 1)`` each; the mask grows by their column."""
        ids = torch.tensor([[row.pending] for row in self.rows], device=device)  # (rows, 1)
        positions = torch.tensor([[row.position] for row in self.rows], device=device)  # (rows, 1)
        self.mask = F.pad(self.mask, (0, 1), value=1)  # (rows, cached + 1)
        return ids, positions

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices``; cut the columns that are now padding in every row."""
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        first = int(self.mask.any(0).nonzero()[0])  # the first column some row still attends to
        if first > 0 and joinable(self.cache):
            self.cache = slice_cache(self.cache, first)
            self.mask = self.mask[:, first:]

    def clear(self) -> None:
        """Drop every row (their owners are told by the caller)."""
        self.rows, self.cache, self.mask = [], None, None

    def routed(self, lora: LoraModel | None, adapters: Sequence[str | None]) -> AbstractContextManager:
        """The context in which ``lora`` computes row i with ``adapters[i]``.

        Rows with different adapters share one mixed-batch pass; its routing (the stacked A and B of every layer)
        stays set from one step to the next while the rows keep their adapters, since setting it walks every
        layer. Rows that all use one adapter take the plain forward with that adapter active.
        """
        if lora is None:
            return nullcontext()
        key = tuple(adapters)
        if len(set(key)) > 1:
            if self._routing is None or self._routing[0] != key:
                self.close_routing()
                stack = ExitStack()
                stack.enter_context(lora.mixed_batch([BASE_ROW if a is None else a for a in key]))
                self._routing = (key, stack)
            return nullcontext()
        self.close_routing()
        if key[0] is None:
            return lora.disable_adapter()
        if lora.active_adapters != [key[0]]:
            lora.set_adapter(key[0])
        return nullcontext()

    def close_routing(self) -> None:
        """Undo the mixed-batch routing, if set (before the model's adapters change, or after a failure)."""
        if self._routing is not None:
            self._routing[1].close()
            self._routing = None
