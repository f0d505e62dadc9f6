"""The endpoints of the HTTP API, one function per route, and its two exception handlers. Each endpoint finds the
engine on its application (``request.app.state.engine``); :func:`~lorakit.serve.api.create_app` registers them.

This module imports FastAPI and pydantic, the serve extra, so only ``create_app`` imports it. (No
``from __future__ import annotations`` here: FastAPI reads the request bodies from the endpoints' annotations,
which must stay real classes.)
"""

import functools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import fastapi
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .protocol import (
    chat_chunk,
    chat_ids,
    collect,
    completion_chunk,
    error_body,
    prometheus_text,
    sampling_params,
    sse,
    submit,
    usage,
)
from .sampling import RequestError
from .schema import ChatRequest, CompletionRequest, LoadRequest, UnloadRequest


def error_response(status: int, message: str) -> JSONResponse:
    """OpenAI's error body with ``status``."""
    return JSONResponse({"error": error_body(status, message)}, status_code=status)


async def request_error(_: Any, err: RequestError) -> JSONResponse:
    return error_response(err.status, err.message)


async def validation_error(_: Any, err: RequestValidationError) -> JSONResponse:
    # FastAPI answers 422 by default; OpenAI's clients expect 400 and one message naming the bad fields.
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                         for e in err.errors())
    return error_response(400, f"invalid request: {problems}")


def streaming(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, not cached or buffered by proxies on the way."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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
    return {"object": "list", "data": data}


async def completions(request: fastapi.Request, body: CompletionRequest) -> Any:
    engine = request.app.state.engine
    adapter = engine.resolve(body.model)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
        raise RequestError(400, "prompt is an empty list")
    prompts = [engine.tokenizer(text)["input_ids"] for text in texts]
    params = sampling_params(engine, body, body.max_tokens if body.max_tokens is not None else 16,
                             max(map(len, prompts)))
    requests, queue = await submit(engine, prompts, adapter, params)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        include = bool((body.stream_options or {}).get("include_usage"))
        return streaming(sse(requests, queue, functools.partial(completion_chunk, head), include))
    events = await collect(requests, queue)
    return {**head, "choices": [{"index": i, "text": e.text, "logprobs": None, "finish_reason": e.finish_reason}
                                for i, e in enumerate(events)], "usage": usage(events)}


async def chat_completions(request: fastapi.Request, body: ChatRequest) -> Any:
    engine = request.app.state.engine
    adapter = engine.resolve(body.model)
    ids = chat_ids(engine, body.messages)
    params = sampling_params(engine, body, body.max_completion_tokens or body.max_tokens, len(ids))
    requests, queue = await submit(engine, [ids], adapter, params)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if body.stream
            else "chat.completion", "created": int(time.time()), "model": body.model}
    if body.stream:
        role = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]}
        include = bool((body.stream_options or {}).get("include_usage"))
        return streaming(sse(requests, queue, functools.partial(chat_chunk, head), include, opening=[role]))
    (event,) = await collect(requests, queue)
    return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text},
                                 "logprobs": None, "finish_reason": event.finish_reason}],
            "usage": usage([event])}


async def load_lora_adapter(request: fastapi.Request, body: LoadRequest) -> PlainTextResponse:
    # The load waits for the scheduler thread; a worker thread waits for it, not the event loop.
    await run_in_threadpool(request.app.state.engine.load_adapter, body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: fastapi.Request, body: UnloadRequest) -> PlainTextResponse:
    await run_in_threadpool(request.app.state.engine.unload_adapter, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def metrics(request: fastapi.Request) -> PlainTextResponse:
    return PlainTextResponse(prometheus_text(request.app.state.engine.snapshot()),
                             media_type="text/plain; version=0.0.4")
