"""Per-request sampling and text output: what turns a row's logits into the text a client receives.

Each request carries its own :class:`SamplingParams` and random generator, so a seeded request gives the same
tokens whether it runs alone or in a batch with others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


class RequestError(ValueError):
    """A client mistake, with the HTTP status the server answers it with (400, 403, 404, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class SamplingParams:
    """OpenAI's sampling fields. ``temperature=0`` is greedy decoding (the same tokens as ``generate``).

    Attributes:
        max_tokens: Most tokens to generate.
        temperature: Softmax temperature; 0 picks the most likely token.
        top_p: Nucleus sampling: sample among the most likely tokens whose probabilities add up to ``top_p``.
        stop: Strings that end the text when generated (not included in the output); at most 4.
        seed: Seed of this request's random generator (None: a fresh random seed).
        ignore_eos: Keep generating after the end-of-sequence token (vLLM's extension; for benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def validate(self, max_tokens_limit: int) -> None:
        """Raise :class:`RequestError` (400) naming the first field outside its range."""
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise RequestError(400, f"max_tokens={self.max_tokens} is outside 1..{max_tokens_limit} "
                                    f"(the server's --max-tokens)")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(400, f"temperature={self.temperature} is outside 0..2")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(400, f"top_p={self.top_p} must be in (0, 1]")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise RequestError(400, f"stop={self.stop!r}: give at most 4 non-empty strings")

    def generator(self) -> torch.Generator:
        """This request's random generator (CPU: the same draws on every device)."""
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator().manual_seed(seed)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token of one row from its ``(vocab,)`` logits."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)  # (vocab,)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Token ids in, text out: decodes incrementally, holds back what might still become a stop string or is
    half a UTF-8 character, and cuts the text at the first stop string."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; return the new text that is safe to send now (may be empty)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        search_from = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self.flush()
        safe = len(self.text)
        if self.text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            safe -= 1
        safe = min(safe, len(self.text) - self._partial_stop())
        safe = max(safe, self.sent)
        piece, self.sent = self.text[self.sent:safe], safe
        return piece

    def _partial_stop(self) -> int:
        """Length of the longest end of the text that begins a stop string (it may still complete it)."""
        for k in range(max((len(s) - 1 for s in self.stop), default=0), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop if len(s) > k) and len(self.text) >= k:
                return k
        return 0

    def flush(self) -> str:
        """The text not sent yet (at the end of generation)."""
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece
