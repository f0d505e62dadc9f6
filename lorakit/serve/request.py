"""What passes between the HTTP API and the scheduler: a :class:`Request` goes in, :class:`Event` s come back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .sampling import RequestError, SamplingParams, TokenLogprob


@dataclass
class Event:
    """What the engine tells a request's owner: a piece of text, then one final event with ``finish_reason``
    ("stop": a stop string or end of sequence; "length": ``max_tokens``) or ``error``. ``logprobs``: when the
    request asked for them, the tokens generated since the last event (the end-of-sequence token not among them)."""

    text: str = ""
    finish_reason: str | None = None
    error: RequestError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Request:
    """One generation: prompt token ids, the adapter to use (None: the base), sampling, and where events go.

    ``emit`` is called from the scheduler thread; it must not block.
    """

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: bool = False  # set by the owner (a client went away): the row leaves the batch at the next step
