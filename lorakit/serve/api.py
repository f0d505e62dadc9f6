"""The HTTP API: OpenAI's completions, chat completions and models endpoints, vLLM's adapter loading endpoints,
``/health`` and Prometheus ``/metrics``, over an :class:`~lorakit.serve.engine.Engine`.

Client mistakes get OpenAI's error body ``{"error": {"message", "type", "code"}}`` with 400 (bad fields or JSON),
403 (an adapter path outside the adapter root), 404 (an unknown model or adapter) or 503 (busy); a bad request
never reaches the model, and a failing one never stops the server.

(No ``from __future__ import annotations`` here: FastAPI reads the request models from the endpoints' annotations,
which must stay real classes.)
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from .engine import Engine, Event, Request
from .sampling import RequestError, SamplingParams


def _fastapi():
    try:
        import fastapi
    except ImportError as err:
        raise ImportError("lorakit serve needs FastAPI and uvicorn: pip install 'lorakit[serve]'") from err
    return fastapi


def create_app(engine: Engine) -> Any:
    """The FastAPI application serving ``engine``."""
    fastapi = _fastapi()
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from .schema import ChatRequest, CompletionRequest, LoadRequest, Message, Sampling, UnloadRequest

    app = fastapi.FastAPI(title="lorakit serve", description="One base model, many LoRA adapters, OpenAI's API.")

    def error_response(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": error_body(status, message)}, status_code=status)

    @app.exception_handler(RequestError)
    async def request_error(_: Any, err: RequestError) -> JSONResponse:
        return error_response(err.status, err.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Any, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                             for e in err.errors())
        return error_response(400, f"invalid request: {problems}")

    def sampling(body: Sampling, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        if body.n != 1:
            raise RequestError(400, f"n={body.n}: this server returns one choice per prompt (n=1)")
        if max_tokens is None:  # OpenAI's chat default: as much as the context allows, here within --max-tokens
            max_tokens = max(1, min(engine.max_tokens, engine.context_length - prompt_len))
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stop,
                              seed=body.seed, ignore_eos=body.ignore_eos)

    def chat_ids(messages: list[Message]) -> list[int]:
        from ..training.data import prompt_ids

        if not getattr(engine.tokenizer, "chat_template", None):
            raise RequestError(400, "this model's tokenizer has no chat template; use /v1/completions")
        chat = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else "".join(part.text for part in m.content)} for m in messages]
        try:
            return prompt_ids(engine.tokenizer, chat)
        except Exception as err:  # noqa: BLE001 - templates refuse some conversations (jinja's raise_exception)
            raise RequestError(400, f"the chat template refused these messages: {err}") from None

    async def run(prompts: list[list[int]], adapter: str | None, params: SamplingParams
                  ) -> tuple[list[Request], asyncio.Queue]:
        """Submit one request per prompt; their events arrive on the queue as (choice index, event)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        requests = []
        for index, ids in enumerate(prompts):
            def emit(event: Event, index: int = index) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))

            requests.append(Request(ids, adapter, params, emit))
        try:
            for request in requests:
                engine.submit(request)
        except RequestError:
            for request in requests:
                request.cancelled = True
            raise
        return requests, queue

    async def collect(requests: list[Request], queue: asyncio.Queue) -> list[Event]:
        """The whole text and the final event of each request."""
        texts = [""] * len(requests)
        finals: list[Event | None] = [None] * len(requests)
        try:
            while any(f is None for f in finals):
                index, event = await queue.get()
                if event.error is not None:
                    raise event.error
                texts[index] += event.text
                if event.final:
                    finals[index] = event
        finally:
            for request in requests:
                request.cancelled = True  # no-op for finished ones; stops the rest if this task was cancelled
        return [Event(text=t, finish_reason=f.finish_reason, prompt_tokens=f.prompt_tokens,
                      completion_tokens=f.completion_tokens) for t, f in zip(texts, finals)]

    def usage(events: list[Event]) -> dict[str, int]:
        prompt = sum(e.prompt_tokens for e in events)
        completion = sum(e.completion_tokens for e in events)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def sse(requests: list[Request], queue: asyncio.Queue, chunk: Any, include_usage: bool,
                  opening: list[dict[str, Any]] = ()) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's shape: ``opening`` chunks, one chunk per piece of text, then per choice a
        chunk with its ``finish_reason`` and no text, the usage chunk if asked for, and ``[DONE]``."""

        def data(payload: dict[str, Any]) -> str:
            if include_usage and "usage" not in payload:
                payload = {**payload, "usage": None}  # OpenAI: null on every chunk but the last
            return f"data: {json.dumps(payload)}\n\n"

        finals: list[Event | None] = [None] * len(requests)
        try:
            for payload in opening:
                yield data(payload)
            while any(f is None for f in finals):
                index, event = await queue.get()
                if event.error is not None:
                    yield data({"error": error_body(event.error.status, event.error.message)})
                    break
                if event.text:
                    yield data(chunk(index, event.text, None))
                if event.final:
                    finals[index] = event
                    yield data(chunk(index, None, event.finish_reason))
            else:
                if include_usage:
                    yield data({**chunk(0, None, None), "choices": [], "usage": usage(finals)})
            yield "data: [DONE]\n\n"
        finally:
            for request in requests:
                request.cancelled = True  # the client went away: free the rows

    def streaming(generator: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(generator, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(engine.stats.started)
        data = []
        if engine.base_name is not None:
            data.append({"id": engine.base_name, "object": "model", "created": created, "owned_by": "lorakit",
                         "root": engine.base_name, "parent": None})
        for name, path in sorted(engine.adapters.items()):
            data.append({"id": name, "object": "model", "created": created, "owned_by": "lorakit",
                         "root": str(path), "parent": engine.base_name})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        adapter = engine.resolve(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise RequestError(400, "prompt is an empty list")
        prompts = [engine.tokenizer(text)["input_ids"] for text in texts]
        params = sampling(body, body.max_tokens if body.max_tokens is not None else 16, max(map(len, prompts)))
        requests, queue = await run(prompts, adapter, params)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            def chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
                return {**head, "choices": [{"index": index, "text": text or "", "logprobs": None,
                                             "finish_reason": finish}]}

            include = bool((body.stream_options or {}).get("include_usage"))
            return streaming(sse(requests, queue, chunk, include))
        events = await collect(requests, queue)
        return {**head, "choices": [{"index": i, "text": e.text, "logprobs": None, "finish_reason": e.finish_reason}
                                    for i, e in enumerate(events)], "usage": usage(events)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        adapter = engine.resolve(body.model)
        ids = chat_ids(body.messages)
        params = sampling(body, body.max_completion_tokens or body.max_tokens, len(ids))
        requests, queue = await run([ids], adapter, params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if body.stream
                else "chat.completion", "created": int(time.time()), "model": body.model}
        if body.stream:
            def chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
                delta = {"content": text} if text is not None else {}
                return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}]}

            role = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]}
            include = bool((body.stream_options or {}).get("include_usage"))
            return streaming(sse(requests, queue, chunk, include, opening=[role]))
        (event,) = await collect(requests, queue)
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text},
                                     "logprobs": None, "finish_reason": event.finish_reason}],
                "usage": usage([event])}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadRequest) -> PlainTextResponse:
        await run_in_threadpool(engine.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadRequest) -> PlainTextResponse:
        await run_in_threadpool(engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine.snapshot()), media_type="text/plain; version=0.0.4")

    return app


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
            503: "service_unavailable"}.get(status, "server_error")
    return {"message": message, "type": kind, "code": status}


def prometheus_text(values: dict[str, float]) -> str:
    """Prometheus' text format: ``lorakit_<name> <value>``, counters for ``*_total``, gauges otherwise."""
    lines = []
    for name, value in values.items():
        lines.append(f"# TYPE lorakit_{name} {'counter' if name.endswith('_total') else 'gauge'}")
        lines.append(f"lorakit_{name} {value}")
    return "\n".join(lines) + "\n"
