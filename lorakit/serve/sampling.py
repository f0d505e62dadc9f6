"""Per-request sampling and text output: what turns a row's logits into the text a client receives.

Each request carries its own :class:`SamplingParams` and random generator, so a seeded request gives the same
tokens whether it runs alone or in a batch with others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import InvalidValue


class RequestError(InvalidValue):
    """A client mistake, with the HTTP status the server answers it with (400, 403, 404, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def quoted(text: str, limit: int = 100) -> str:
    """``repr(text)``, cut after ``limit`` characters: error messages name what a client sent, which may be huge."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


MAX_STOP_CHARS = 256  # each stop string is searched for at every token: its length bounds that cost


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
        logprobs: Return each generated token's log-probability under the model (the log-softmax of its logits,
            before temperature and top_p; with a ``grammar``, over the tokens it allows) and those of the
            ``logprobs`` most likely tokens there (0: none); None: no log-probabilities.
        grammar: The llguidance grammar the text must follow (from ``response_format``, compiled by
            :class:`~lorakit.serve.grammar.Grammars`); None: free text.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    grammar: str | None = None

    def validate(self, max_tokens_limit: int) -> None:
        """Raise :class:`RequestError` (400) naming the first field outside its range."""
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise RequestError(400, f"max_tokens={self.max_tokens} is outside 1..{max_tokens_limit} "
                                    f"(the server's --max-tokens)")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(400, f"temperature={self.temperature} is outside 0..2")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(400, f"top_p={self.top_p} must be in (0, 1]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(400, f"logprobs={self.logprobs} is outside 0..{MAX_LOGPROBS}")
        if len(self.stop) > 4 or any(not 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            shown = [s if len(s) <= 20 else s[:20] + "..." for s in self.stop[:5]]
            raise RequestError(400, f"stop={shown!r}{'...' if len(self.stop) > 5 else ''}: give at most 4 non-empty "
                                    f"strings of at most {MAX_STOP_CHARS} characters")

    def generator(self) -> torch.Generator:
        """This request's random generator (CPU: the same draws on every device). Any integer seeds it."""
        seed = self.seed % 2**64 if self.seed is not None else int.from_bytes(os.urandom(8), "little")
        return torch.Generator().manual_seed(seed)


MAX_LOGPROBS = 20  # most alternatives a request may ask log-probabilities of (OpenAI's and vLLM's limit)


@dataclass
class TokenLogprob:
    """A generated token's log-probability, and the ``top`` most likely tokens' at that step, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The log-probability of ``token`` under ``(vocab,)`` ``logits`` (log-softmax in fp32) and the ``top`` best;
    tokens with ``-inf`` logits (forbidden by a grammar) are never among the best."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    pairs = []
    if top:
        best = logps.topk(top)
        pairs = [(i, lp) for i, lp in zip(best.indices.tolist(), best.values.tolist()) if lp > float("-inf")]
    return TokenLogprob(token, float(logps[token]), pairs)


GREEDY_BELOW = 1e-5  # temperatures this small are greedy (dividing by them overflows)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token of one row from its ``(vocab,)`` logits."""
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits.double().cpu() / params.temperature, dim=-1)  # (vocab,)
    if not torch.isfinite(probs).all():  # logits with inf/NaN in them: no distribution to sample from
        return int(logits.nan_to_num(nan=float("-inf")).argmax())
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Token ids in, text out: decodes incrementally, holds back what might still become a stop string or is
    half a UTF-8 character, and cuts the text at the first stop string.

    Only the last few tokens are decoded at each step (vLLM's scheme: the text of ``ids[prefix:]`` minus that of
    ``ids[prefix:read]``), so a long answer costs linear, not quadratic, time; decoding a window that starts
    inside the answer, not at its start, keeps the spaces that tokenizers attach to the next word.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # the complete characters decoded so far
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False
        self._prefix = self._read = 0  # the decoding window: ids[_prefix:_read] is already in self.text

    def add(self, token: int) -> str:
        """Append a token; return the new text that is safe to send now (may be empty; always, once stopped)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text += self._decode_new()
        search_from = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self.flush()
        safe = max(len(self.text) - self._partial_stop(), self.sent)
        piece, self.sent = self.text[self.sent:safe], safe
        return piece

    def _decode_new(self, final: bool = False) -> str:
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):  # half a character: wait for more
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(before):]

    def _partial_stop(self) -> int:
        """Length of the longest end of the text that begins a stop string (it may still complete it)."""
        for k in range(min(len(self.text), max((len(s) - 1 for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop if len(s) > k):
                return k
        return 0

    def flush(self) -> str:
        """The text not sent yet, at the end of generation (a last half character included, as ``decode`` does)."""
        if not self.stopped:
            self.text += self._decode_new(final=True)
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece
