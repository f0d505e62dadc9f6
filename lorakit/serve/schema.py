"""The request bodies of the HTTP API (pydantic models): OpenAI's fields, and vLLM's for loading adapters.

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send more (``user``, ...) still work.
Known fields are checked strictly, as OpenAI does: a string is not a number ("0.5"), a number not a boolean, and
NaN or infinities are no numbers at all. The optional fields that OpenAI's reference marks nullable take ``null`` as
"the default", since OpenAI's client library sends ``null`` for an argument given as ``None``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import pydantic

T = TypeVar("T")
# A list whose validation stops at its first bad item: a megabyte of bad items would otherwise make as many errors,
# for seconds, holding the GIL (pydantic validates in Rust) and so the event loop.
List = Annotated[list[T], pydantic.Field(fail_fast=True)]


class Body(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore", protected_namespaces=(), strict=True, allow_inf_nan=False)


class StreamOptions(Body):
    include_usage: bool | None = None


class JsonSchemaFormat(Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = pydantic.Field(alias="schema")  # ``schema`` would shadow pydantic's method
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class Sampling(Body):
    """Fields shared by completions and chat. ``model`` names the adapter, or the base model."""

    model: str
    max_tokens: int | None = pydantic.Field(default=None, ge=1)
    temperature: float | None = None  # None: 1
    top_p: float | None = None  # None: 1
    stop: str | List[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None  # None: 1
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes
    response_format: ResponseFormat | None = None  # JSON (matching a schema) enforced while decoding


class CompletionRequest(Sampling):
    prompt: str | List[str]
    logprobs: int | None = pydantic.Field(default=None, ge=0, le=20)  # the top alternatives per token


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: str | List[TextPart]


class ChatRequest(Sampling):
    messages: List[Message] = pydantic.Field(min_length=1)
    max_completion_tokens: int | None = pydantic.Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = pydantic.Field(default=None, ge=0, le=20)  # needs logprobs: true


class LoadRequest(Body):
    lora_name: str
    lora_path: str


class UnloadRequest(Body):
    lora_name: str
