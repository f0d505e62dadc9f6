"""The endpoints of the HTTP API, one function per route, and its exception handlers. Each endpoint finds the
engine on its application (``request.app.state.engine``); :func:`~lorakit.serve.api.create_app` registers them.

The endpoints read their bodies themselves and hand parsing, chat templates and tokenization to a worker thread
(``run_in_threadpool``): on the event loop, those would hold up every other client for as long as they take.

This module imports FastAPI and pydantic, the serve extra, so only ``create_app`` imports it. (No
``from __future__ import annotations`` here, as FastAPI reads the endpoints' annotations.)
"""

import functools
import importlib.resources
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import fastapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .protocol import (
    LogprobFormat,
    chat_chunk,
    chat_ids,
    chat_logprobs,
    choices,
    collect,
    completion_chunk,
    completion_ids,
    error_body,
    grammar,
    include_usage,
    parse_body,
    prometheus_text,
    sampling_params,
    sse,
    submit,
    usage,
)
from .sampling import RequestError, quoted
from .schema import Body, ChatRequest, CompletionRequest, LoadRequest, UnloadRequest

B = TypeVar("B", bound=Body)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body with ``status``."""
    return JSONResponse({"error": error_body(status, message)}, status_code=status, headers=headers)


async def request_error(_: Any, err: RequestError) -> JSONResponse:
    return error_response(err.status, err.message)


async def http_error(request: fastapi.Request, err: HTTPException) -> JSONResponse:
    # Starlette's own errors: a path no route has (404), a method the route does not take (405).
    if err.status_code == 404:
        message = f"no endpoint {quoted(request.url.path)}; see /docs for the endpoints"
    elif err.status_code == 405:
        message = f"{request.method} is not allowed on {quoted(request.url.path)}"
        allowed = (err.headers or {}).get("Allow") or (err.headers or {}).get("allow")
        message += f"; use {allowed}" if allowed else ""
    else:
        message = str(err.detail)
    return error_response(err.status_code, message, err.headers)


async def internal_error(_: Any, err: Exception) -> JSONResponse:
    # Starlette logs the traceback after this answer: the client learns only that it was not its fault.
    return error_response(500, f"internal error ({type(err).__name__}); see the server log")


async def read_body(request: fastapi.Request, schema: type[B]) -> B:
    """The request's body checked against ``schema``, parsed in a worker thread (see :func:`parse_body`)."""
    raw = await request.body()  # at most --max-request-bytes: the BodyLimit middleware has read it
    return await run_in_threadpool(parse_body, schema, raw, request.headers.get("content-type"))


def request_body(schema: type[Body]) -> dict[str, Any]:
    """``openapi_extra`` that documents ``schema`` as a route's JSON body (its definitions inlined)."""
    full = schema.model_json_schema()
    definitions = full.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(value) for value in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(full)}}}}


def streaming(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, not cached or buffered by proxies on the way."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# The page may reach this server's API and nothing else: no script, style or font from anywhere.
PLAYGROUND_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                     "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@functools.lru_cache(maxsize=1)
def playground_html() -> str:
    return importlib.resources.files("lorakit.serve").joinpath("playground.html").read_text(encoding="utf-8")


async def playground() -> HTMLResponse:
    """The playground page: chat with the base or an adapter, two of them side by side (playground.html)."""
    return HTMLResponse(playground_html(), headers={"Content-Security-Policy": PLAYGROUND_POLICY,
                                                    "X-Content-Type-Options": "nosniff"})


async def health() -> dict[str, str]:
    return {"status": "ok"}


async def models(request: fastapi.Request) -> dict[str, Any]:
    engine = request.app.state.engine
    created = int(engine.stats.started)
    data = []
    if engine.base_name is not None:
        data.append({"id": engine.base_name, "object": "model", "created": created, "owned_by": "lorakit",
                     "root": engine.base_name, "parent": None})
    for name, path in sorted(engine.adapters.items()):
        data.append({"id": name, "object": "model", "created": created, "owned_by": "lorakit",
                     "root": str(path), "parent": engine.base_name})
    root = engine.slots.root
    for name in await run_in_threadpool(engine.loadable):  # under --adapter-root: loaded on first use
        data.append({"id": name, "object": "model", "created": created, "owned_by": "lorakit",
                     "root": str(root / name), "parent": engine.base_name})
    return {"object": "list", "data": data}


async def completions(request: fastapi.Request) -> Any:
    engine = request.app.state.engine
    body = await read_body(request, CompletionRequest)
    adapter = await run_in_threadpool(engine.resolve_or_load, body.model)  # may load it: off the loop
    prompts, rules = await run_in_threadpool(lambda: (completion_ids(engine, body), grammar(engine, body)))
    params = sampling_params(engine, body, body.max_tokens if body.max_tokens is not None else 16,
                             max(map(len, prompts)), body.logprobs, rules)
    n = choices(body)
    requests, queue = await submit(engine, prompts, adapter, params, n)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    logprobs = LogprobFormat(engine.tokenizer, chat=False)
    if body.stream:
        return streaming(sse(requests, queue, functools.partial(completion_chunk, head), include_usage(body),
                             logprobs=logprobs, n=n))
    events = await collect(requests, queue)
    return {**head, "choices": [{"index": i, "text": e.text, "logprobs": logprobs(i, e.logprobs),
                                 "finish_reason": e.finish_reason} for i, e in enumerate(events)],
            "usage": usage(events, n)}


async def chat_completions(request: fastapi.Request) -> Any:
    engine = request.app.state.engine
    body = await read_body(request, ChatRequest)
    adapter = await run_in_threadpool(engine.resolve_or_load, body.model)  # may load it: off the loop
    ids, rules = await run_in_threadpool(lambda: (chat_ids(engine, body.messages), grammar(engine, body)))
    params = sampling_params(engine, body, body.max_completion_tokens or body.max_tokens, len(ids),
                             chat_logprobs(body), rules)
    n = choices(body)
    requests, queue = await submit(engine, [ids], adapter, params, n)
    logprobs = LogprobFormat(engine.tokenizer, chat=True)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if body.stream
            else "chat.completion", "created": int(time.time()), "model": body.model}
    if body.stream:
        roles = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]} for i in range(n)]
        return streaming(sse(requests, queue, functools.partial(chat_chunk, head), include_usage(body),
                             opening=roles, logprobs=logprobs, n=n))
    events = await collect(requests, queue)
    return {**head, "choices": [{"index": i, "message": {"role": "assistant", "content": e.text},
                                 "logprobs": logprobs(i, e.logprobs), "finish_reason": e.finish_reason}
                                for i, e in enumerate(events)],
            "usage": usage(events, n)}


async def load_lora_adapter(request: fastapi.Request) -> PlainTextResponse:
    body = await read_body(request, LoadRequest)
    # The load waits for the scheduler thread; a worker thread waits for it, not the event loop.
    await run_in_threadpool(request.app.state.engine.load_adapter, body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: fastapi.Request) -> PlainTextResponse:
    body = await read_body(request, UnloadRequest)
    await run_in_threadpool(request.app.state.engine.unload_adapter, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def metrics(request: fastapi.Request) -> PlainTextResponse:
    return PlainTextResponse(prometheus_text(request.app.state.engine.snapshot()),
                             media_type="text/plain; version=0.0.4")
