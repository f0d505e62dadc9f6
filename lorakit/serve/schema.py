"""The request bodies of the HTTP API (pydantic models): OpenAI's fields, and vLLM's for loading adapters.

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send more (``user``, ...) still work.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic


class Body(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore", protected_namespaces=())


class Sampling(Body):
    """Fields shared by completions and chat. ``model`` names the adapter, or the base model."""

    model: str
    max_tokens: int | None = pydantic.Field(default=None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes


class CompletionRequest(Sampling):
    prompt: str | list[str]


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(Sampling):
    messages: list[Message] = pydantic.Field(min_length=1)
    max_completion_tokens: int | None = pydantic.Field(default=None, ge=1)  # OpenAI's newer name for max_tokens


class LoadRequest(Body):
    lora_name: str
    lora_path: str


class UnloadRequest(Body):
    lora_name: str
