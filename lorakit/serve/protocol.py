"""OpenAI's API over the engine, without the web framework: request bodies parsed and checked, request fields to
sampling parameters and prompt ids, prompts submitted and their events gathered (whole or as server-sent events),
OpenAI's chunk, usage and error objects, and Prometheus' text format for ``/metrics``.

The endpoints (:mod:`lorakit.serve.routes`) are thin FastAPI functions around these. :func:`parse_body`,
:func:`completion_ids` and :func:`chat_ids` cost CPU time in proportion to the body: the endpoints run them in worker
threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from .request import Event, Request
from .sampling import RequestError, SamplingParams, TokenLogprob
from .scheduler import Engine

if TYPE_CHECKING:  # pydantic is the serve extra's, imported only once an app is built
    import pydantic

    from .schema import Body, ChatRequest, CompletionRequest, Message, Sampling

# (choice index, text, finish reason, log-probabilities) -> chunk
Chunk = Callable[[int, str | None, str | None, dict[str, Any] | None], dict[str, Any]]

MAX_PROMPTS = 128  # prompts in one /v1/completions request, times n
MAX_N = 16  # choices per prompt


def parse_body(schema: type[Body], raw: bytes, content_type: str | None) -> Body:
    """A request body as ``schema``: UTF-8 JSON whose fields have the right types (see :mod:`~lorakit.serve.schema`).

    Raises:
        RequestError: 415 for a Content-Type that is not JSON; 400 for a body that is not UTF-8, not JSON, or whose
            fields are missing, of the wrong type or out of range (the message names each of them).
    """
    import pydantic

    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise RequestError(415, f"the body is {media}; send JSON with Content-Type: application/json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"the body is not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        return schema.model_validate_json(text)
    except pydantic.ValidationError as err:
        raise RequestError(400, f"invalid request: {invalid_fields(err)}") from None


def invalid_fields(err: pydantic.ValidationError, most: int = 5) -> str:
    """One line naming the first ``most`` bad fields and what is wrong with each (never the value: it may be
    megabytes)."""
    problems = err.errors(include_url=False, include_input=False)
    line = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in problems[:most])
    return line + (f"; and {len(problems) - most} more" if len(problems) > most else "")


def completion_ids(engine: Engine, body: CompletionRequest) -> list[list[int]]:
    """The token ids of each prompt of a completions request.

    Raises:
        RequestError: 400 for an empty list of prompts or more than :data:`MAX_PROMPTS`.
    """
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
        raise RequestError(400, "prompt is an empty list")
    if len(texts) > MAX_PROMPTS:
        raise RequestError(400, f"prompt is a list of {len(texts)} prompts; one request takes at most {MAX_PROMPTS}")
    return [engine.tokenizer(text)["input_ids"] for text in texts]


def sampling_params(engine: Engine, body: Sampling, max_tokens: int | None, prompt_len: int,
                    logprobs: int | None = None, grammar: str | None = None) -> SamplingParams:
    """A request's sampling fields as :class:`SamplingParams` (``max_tokens`` None: as many as fit; other fields
    None: OpenAI's defaults), with the ``grammar`` of its ``response_format`` (see :func:`grammar`).

    Raises:
        RequestError: 400 for ``n`` outside 1..:data:`MAX_N`.
    """
    if body.n is not None and not 1 <= body.n <= MAX_N:
        raise RequestError(400, f"n={body.n} is outside 1..{MAX_N}")
    if max_tokens is None:  # OpenAI's chat default: as much as the context allows, here within --max-tokens
        max_tokens = max(1, min(engine.max_tokens, engine.context_length - prompt_len))
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, stop=stop, seed=body.seed,
                          ignore_eos=body.ignore_eos, logprobs=logprobs, grammar=grammar)


def grammar(engine: Engine, body: Sampling) -> str | None:
    """The compiled grammar of a request's ``response_format`` (None: free text). The server's first structured
    request makes the grammar engine read the whole vocabulary, and a new schema is compiled: call it from a worker
    thread.

    Raises:
        RequestError: 400 for a schema the grammar engine does not support (the message names the feature).
    """
    if body.response_format is None:
        return None
    return engine.grammars.compile(body.response_format.model_dump(by_alias=True, exclude_none=True))


def chat_logprobs(body: ChatRequest) -> int | None:
    """How many alternatives a chat request asks log-probabilities of (None: none asked).

    Raises:
        RequestError: 400 for ``top_logprobs`` without ``logprobs: true`` (as OpenAI refuses it).
    """
    if not body.logprobs:
        if body.top_logprobs is not None:
            raise RequestError(400, "top_logprobs needs logprobs: true")
        return None
    return body.top_logprobs or 0


class LogprobFormat:
    """Token log-probabilities in OpenAI's shapes for one response: completions' ``tokens`` / ``token_logprobs`` /
    ``top_logprobs`` / ``text_offset`` lists, or chat's ``content`` list of ``{token, logprob, bytes,
    top_logprobs}``. Called once per piece of a choice, in order (a stream's chunks): the completions' text
    offsets go on from the previous piece of the same choice."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self._offsets: dict[int, int] = {}

    def __call__(self, index: int, items: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        if items is None:
            return None
        if self.chat:
            return {"content": [{**self._token(t.token, t.logprob),
                                 "top_logprobs": [self._token(i, lp) for i, lp in t.top]} for t in items]}
        tokens = [self._text(t.token) for t in items]
        offsets = list(itertools.accumulate((len(t) for t in tokens), initial=self._offsets.get(index, 0)))
        self._offsets[index] = offsets[-1]
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [{self._text(i): lp for i, lp in t.top} for t in items], "text_offset": offsets[:-1]}

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text = self._text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def include_usage(body: Sampling) -> bool:
    """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
    return bool(body.stream_options and body.stream_options.include_usage)


def chat_ids(engine: Engine, messages: list[Message]) -> list[int]:
    """The prompt ids of a conversation, through the tokenizer's chat template.

    Raises:
        RequestError: 400 when the tokenizer has no chat template or its template refuses the messages.
    """
    from ..models.chat import prompt_ids

    if not getattr(engine.tokenizer, "chat_template", None):
        raise RequestError(400, "this model's tokenizer has no chat template; use /v1/completions")
    chat = [{"role": m.role, "content": m.content if isinstance(m.content, str)
             else "".join(part.text for part in m.content)} for m in messages]
    try:
        return prompt_ids(engine.tokenizer, chat)
    except Exception as err:  # noqa: BLE001 - templates refuse some conversations (jinja's raise_exception)
        raise RequestError(400, f"the chat template refused these messages: {err}") from None


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int, event: Event) -> None:
    # Called on the scheduler thread: the queue belongs to the event loop's thread.
    loop.call_soon_threadsafe(queue.put_nowait, (index, event))


def choices(body: Sampling) -> int:
    """The choices per prompt a request asks for (``n``; None: 1)."""
    return body.n or 1


async def submit(engine: Engine, prompts: list[list[int]], adapter: str | None, params: SamplingParams, n: int = 1
                 ) -> tuple[list[Request], asyncio.Queue]:
    """Submit ``n`` requests per prompt (choice ``i * n + j`` is prompt i's j-th; the engine prefills each prompt
    once for them); their events arrive on the queue as (choice index, event). With a ``seed``, choice j samples
    with ``seed + j``: the same request gives the same choices, alone or batched with others.

    Raises:
        RequestError: The engine refused a request (none of them runs then), 400 for more than
            :data:`MAX_PROMPTS` choices in all.
    """
    if len(prompts) * n > MAX_PROMPTS:
        raise RequestError(400, f"{len(prompts)} prompts x n={n} are {len(prompts) * n} choices; one request takes "
                                f"at most {MAX_PROMPTS}")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    seeded = [params if params.seed is None or j == 0 else dataclasses.replace(params, seed=params.seed + j)
              for j in range(n)]
    requests = [Request(ids, adapter, seeded[j], functools.partial(_put, loop, queue, i * n + j))
                for i, ids in enumerate(prompts) for j in range(n)]
    try:
        for request in requests:
            engine.submit(request)
    except RequestError:
        for request in requests:
            request.cancelled = True
        raise
    return requests, queue


async def collect(requests: list[Request], queue: asyncio.Queue) -> list[Event]:
    """The whole text and the final event of each request.

    Raises:
        RequestError: The first error event.
    """
    texts = [""] * len(requests)
    scored: list[list[TokenLogprob] | None] = [None] * len(requests)
    finals: list[Event | None] = [None] * len(requests)
    try:
        while any(f is None for f in finals):
            index, event = await queue.get()
            if event.error is not None:
                raise event.error
            texts[index] += event.text
            if event.logprobs is not None:
                scored[index] = (scored[index] or []) + event.logprobs
            if event.final:
                finals[index] = event
    finally:
        for request in requests:
            request.cancelled = True  # no-op for finished ones; stops the rest if this task was cancelled
    return [Event(text=t, finish_reason=f.finish_reason, prompt_tokens=f.prompt_tokens,
                  completion_tokens=f.completion_tokens, logprobs=lp) for t, lp, f in zip(texts, scored, finals)]


def usage(events: list[Event], n: int = 1) -> dict[str, int]:
    """OpenAI's usage object: the tokens of the prompts (each once, however many choices it has) and of the
    answers."""
    prompt = sum(e.prompt_tokens for e in events[::n])
    completion = sum(e.completion_tokens for e in events)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_chunk(head: dict[str, Any], index: int, text: str | None, finish: str | None,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A streamed ``/v1/completions`` chunk: ``head`` (id, object, created, model) and one choice."""
    return {**head, "choices": [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}]}


def chat_chunk(head: dict[str, Any], index: int, text: str | None, finish: str | None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A streamed ``/v1/chat/completions`` chunk: ``head`` and one choice whose delta holds the text, if any."""
    delta = {"content": text} if text is not None else {}
    return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def sse_data(payload: dict[str, Any], include_usage: bool) -> str:
    """One server-sent event carrying ``payload``."""
    if include_usage and "usage" not in payload:
        payload = {**payload, "usage": None}  # OpenAI: null on every chunk but the last
    return f"data: {json.dumps(payload)}\n\n"


async def sse(requests: list[Request], queue: asyncio.Queue, chunk: Chunk, include_usage: bool,
              opening: Sequence[dict[str, Any]] = (), logprobs: LogprobFormat | None = None, n: int = 1
              ) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's shape: ``opening`` chunks, one chunk per piece of text (with its tokens'
    log-probabilities when asked for), then per choice a chunk with its ``finish_reason`` and no text (with the
    log-probabilities of tokens that made no text, if any), the usage chunk if asked for, and ``[DONE]``."""
    finals: list[Event | None] = [None] * len(requests)
    try:
        for payload in opening:
            yield sse_data(payload, include_usage)
        while any(f is None for f in finals):
            index, event = await queue.get()
            if event.error is not None:
                yield sse_data({"error": error_body(event.error.status, event.error.message)}, include_usage)
                break
            scored = logprobs(index, event.logprobs) if logprobs is not None and event.logprobs else None
            if event.text:
                yield sse_data(chunk(index, event.text, None, scored), include_usage)
                scored = None
            if event.final:
                finals[index] = event
                yield sse_data(chunk(index, None, event.finish_reason, scored), include_usage)
        else:
            if include_usage:
                yield sse_data({**chunk(0, None, None, None), "choices": [], "usage": usage(finals, n)},
                               include_usage)
        yield "data: [DONE]\n\n"
    finally:
        for request in requests:
            request.cancelled = True  # the client went away: free the rows


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = {403: "permission_error", 404: "not_found_error", 409: "conflict_error", 503: "service_unavailable"
            }.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"message": message, "type": kind, "param": None, "code": status}


def prometheus_text(values: dict[str, float]) -> str:
    """Prometheus' text format: ``lorakit_<name> <value>``, counters for ``*_total``, gauges otherwise."""
    lines = []
    for name, value in values.items():
        lines.append(f"# TYPE lorakit_{name} {'counter' if name.endswith('_total') else 'gauge'}")
        lines.append(f"lorakit_{name} {value}")
    return "\n".join(lines) + "\n"
