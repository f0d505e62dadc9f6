"""Chat prompts as a model sees them: a conversation rendered with the tokenizer's chat template, tokenized.

Training (the loss mask of an answer), evaluation, generation and the server all tokenize prompts here, so the
prompt tokens a model was trained after are exactly those it is given at inference time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and the assistant's generation prompt."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return encode(tokenizer, text)
