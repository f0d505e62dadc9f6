"""Structured output: text that is JSON matching a schema, enforced while decoding.

A request's ``response_format`` becomes a grammar (:meth:`Grammars.compile`, checked when the request arrives, so
an unsupported schema is a 400 before anything runs); each of its rows gets its own :class:`Constraint`, a matcher
of that grammar. At every step the matcher gives a bitmask over the vocabulary (one bit a token, 32 tokens an
``int32``); the tokens whose bit is clear get ``-inf`` logits before sampling, and the sampled token advances the
matcher. Rows of a batch have their own grammars (or none) and adapters.

The engine is llguidance, chosen for having no dependencies and compiling a schema in about a millisecond
(``bench/grammar_engines.py`` compares it with xgrammar and outlines-core; bench/README.md has the figures). JSON is
written compact, as ``json.dumps`` writes it (``", "`` and ``": "``, no other whitespace), unless the schema's
``x-guidance`` options say otherwise.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

import numpy as np
import torch

from .sampling import RequestError

# json.dumps' separators and no other whitespace: a small model cannot wander off into blank lines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_BYTES = 64 * 1024


class Grammars:
    """Compiles ``response_format`` s for one tokenizer. Thread-safe. The llguidance tokenizer, which reads the whole
    vocabulary and is the slow part, is built on first use: servers that never see a ``response_format`` never pay
    for it. Compiled schemas are cached (the 256 most recently used).

    Args:
        tokenizer: The model's Hugging Face tokenizer.
        vocab_size: The width of the model's logits (may exceed the tokenizer's vocabulary: those tokens are never
            allowed).
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._lltokenizer: Any = None
        self._compile = functools.lru_cache(maxsize=256)(self._compile_schema)  # a schema's JSON -> its grammar

    def lltokenizer(self) -> Any:
        with self._lock:
            if self._lltokenizer is None:
                try:
                    import llguidance.hf
                except ImportError:
                    raise RequestError(400, "response_format needs the llguidance package on the server "
                                            "(pip install 'lorakit[serve]')") from None
                size = max(self.vocab_size, len(self.tokenizer))
                self._lltokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=size)
            return self._lltokenizer

    def compile(self, response_format: dict[str, Any] | None) -> str | None:
        """The grammar of a request's ``response_format`` (None: free text).

        Raises:
            RequestError: 400 naming what is wrong: an unknown type, a missing or oversized schema, or a schema
                feature the engine does not support.
        """
        schema = json_schema(response_format)
        if schema is None:
            return None
        text = json.dumps(schema)  # key order kept: properties come out in it
        if len(text) > MAX_SCHEMA_BYTES:
            raise RequestError(400, f"response_format.json_schema.schema is longer than {MAX_SCHEMA_BYTES} bytes")
        return self._compile(text)

    def _compile_schema(self, schema: str) -> str:
        tokenizer = self.lltokenizer()  # first: it says so when llguidance is not installed
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error and not error.startswith("WARNING"):
            raise RequestError(400, f"response_format: the JSON schema is not supported: {error}")
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher of ``grammar`` (compiled by :meth:`compile`) for one row.

        Raises:
            RequestError: 400 when llguidance refuses the grammar after all.
        """
        return Constraint(self.lltokenizer(), grammar)

    def mask(self, logits: torch.Tensor, constraints: list[Constraint | None], eos_ids: set[int]) -> torch.Tensor:
        """``(rows, vocab)`` logits with ``-inf`` wherever row i's grammar (``constraints[i]``; None: no grammar)
        forbids the token now; ``logits`` itself when no row has a grammar. Once a row's document may end, every
        end-of-sequence token of the model is allowed, not only the tokenizer's.

        Each matcher writes its row of one bitmask; unpacking the bits and masking are then one operation each for
        the whole batch.
        """
        rows = [i for i, c in enumerate(constraints) if c is not None]
        if not rows:
            return logits
        words = (self.lltokenizer().vocab_size + 31) // 32
        bitmask = torch.empty((len(rows), words), dtype=torch.int32)  # (constrained rows, ceil(vocab / 32))
        for k, i in enumerate(rows):
            constraints[i].matcher.unsafe_compute_mask_ptr(bitmask[k].data_ptr(), words * 4)
        # Bit j of word w is token 32w + j: the words' bytes in little-endian order, each unpacked low bit first.
        little = np.ascontiguousarray(bitmask.numpy(), dtype="<i4")  # no copy on a little-endian machine
        bits = np.unpackbits(little.view(np.uint8), axis=-1, bitorder="little")  # (constrained rows, 32 * words)
        allowed = torch.from_numpy(bits[:, :logits.shape[-1]]).view(torch.bool)  # (constrained rows, vocab)
        eos = [t for t in eos_ids if t < logits.shape[-1]]
        for k, i in enumerate(rows):
            if constraints[i].matcher.is_accepting():
                allowed[k, eos] = True
        allowed = allowed.to(logits.device)
        if len(rows) == len(constraints):
            return torch.where(allowed, logits, float("-inf"))
        index = torch.tensor(rows, device=logits.device)
        out = logits.clone()
        out[index] = torch.where(allowed, logits[index], float("-inf"))
        return out


def json_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for: ``{"type": "json_object"}`` is any object,
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` its ``schema``; ``{"type": "text"}`` or
    None is no schema.

    Raises:
        RequestError: 400 for any other shape (the size of the schema is checked by :meth:`Grammars.compile`).
    """
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise RequestError(400, f"response_format.type={kind!r}: use 'text', 'json_object' or 'json_schema'")
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise RequestError(400, "response_format.json_schema.schema must be a JSON schema (an object)")
    return schema


class Constraint:
    """One row's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, lltokenizer: Any, grammar: str) -> None:
        import llguidance

        self.matcher = llguidance.LLMatcher(lltokenizer, grammar)
        if self.matcher.is_error():
            raise RequestError(400, f"response_format: {self.matcher.get_error()}")

    def advance(self, token: int) -> bool:
        """Take the sampled token; whether the document is complete (nothing but the end may follow).

        Raises:
            RequestError: 500 when the grammar rejects the token (sampling ignored the mask: a bug).
        """
        if not self.matcher.consume_token(token):
            raise RequestError(500, f"the grammar rejected token {token}: {self.matcher.get_error()}")
        return self.matcher.is_stopped()
