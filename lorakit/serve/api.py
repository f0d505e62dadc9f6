"""The HTTP API: OpenAI's completions, chat completions and models endpoints, vLLM's adapter loading endpoints,
``/health`` and Prometheus ``/metrics``, over an :class:`~lorakit.serve.scheduler.Engine`.

Every error has OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 (malformed JSON or UTF-8,
bad fields), 403 (an adapter path outside the adapter root), 404 (an unknown model, adapter or route), 405 (a wrong
method), 409 (a name whose unloaded adapter still runs), 413 (a body over the limit), 415 (a body that is not JSON),
503 (busy) and, for a bug, 500. A bad request never reaches the model, and a failing one never stops the server.

The event loop only moves bytes: a body over ``max_request_bytes`` is refused before it is read (by its
Content-Length, or by counting while reading), and JSON parsing, chat templates and tokenization run in worker
threads, so one large request cannot hold up ``/health`` or the streams of other clients.

:func:`create_app` assembles the application; the endpoints are in :mod:`lorakit.serve.routes`, what they do without
FastAPI in :mod:`lorakit.serve.protocol`. FastAPI, the serve extra, is imported only when an app is built, so
``lorakit.serve`` imports without it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from types import ModuleType
from typing import Any

from ..core.errors import InvalidValue, MissingDependency
from .protocol import error_body
from .sampling import RequestError
from .scheduler import Engine

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]


def _fastapi() -> ModuleType:
    try:
        import fastapi
    except ImportError as err:
        raise MissingDependency("lorakit serve needs FastAPI and uvicorn: pip install 'lorakit[serve]'") from err
    return fastapi


DRAIN_BYTES = 64 * 2**20  # refused bodies up to this size are read to their end (and thrown away), not reset


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 in OpenAI's shape before the app sees it.

    A declared Content-Length over the limit is refused before any of the body is read; a chunked body is counted
    while it arrives and refused as soon as it passes the limit. A body within the limit is read whole here (the
    endpoints read it whole anyway) and handed on unchanged.

    After a 413, the server (uvicorn) reads the rest of the body and drops it, so that the client, which may still
    be sending, gets to read the answer; above :data:`DRAIN_BYTES` declared, the connection is closed instead.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        if limit < 1:
            raise InvalidValue(f"max_request_bytes must be at least 1, got {limit}")
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, f"the request body has {int(declared)} bytes",
                               close=int(declared) > DRAIN_BYTES)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away while sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(send, f"the request body has more than {self.limit} bytes")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            # The body once, then what the server says next (a disconnect, which streaming responses listen for).
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: str, close: bool = False) -> None:
        message = f"{size}; this server accepts at most {self.limit} (--max-request-bytes)"
        content = json.dumps({"error": error_body(413, message)}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        # Once the answer is sent, the server reads the rest of the body and throws it away: a socket closed with
        # unread data resets the connection, and the client would lose the 413 it has not read yet. A body too
        # large to be worth that gets the reset: its connection is closed at once.
        await send({"type": "http.response.start", "status": 413,
                    "headers": headers + ([(b"connection", b"close")] if close else [])})
        await send({"type": "http.response.body", "body": content})


def create_app(engine: Engine, max_request_bytes: int | None = None) -> Any:
    """The FastAPI application serving ``engine``.

    Args:
        engine: The engine to serve.
        max_request_bytes: The largest request body accepted; larger ones get 413 (default: the engine's
            ``max_request_bytes``).
    """
    fastapi = _fastapi()
    from starlette.exceptions import HTTPException

    # The endpoints' module imports FastAPI and pydantic at its top: it loads here, once FastAPI is known present.
    from .routes import (
        chat_completions,
        completions,
        health,
        http_error,
        internal_error,
        load_lora_adapter,
        metrics,
        models,
        playground,
        request_body,
        request_error,
        unload_lora_adapter,
    )
    from .schema import ChatRequest, CompletionRequest, LoadRequest, UnloadRequest

    app = fastapi.FastAPI(title="lorakit serve", description="One base model, many LoRA adapters, OpenAI's API.")
    app.state.engine = engine
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(HTTPException, http_error)  # unknown routes, wrong methods
    app.add_exception_handler(Exception, internal_error)  # a bug: still OpenAI's body (the traceback goes to the log)
    limit = engine.max_request_bytes if max_request_bytes is None else max_request_bytes
    app.add_middleware(BodyLimit, limit=limit)
    app.add_api_route("/", playground, methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    # The endpoints read and validate their bodies themselves, in a worker thread; the schemas are given here for
    # the OpenAPI page (/docs).
    app.add_api_route("/v1/completions", completions, methods=["POST"], openapi_extra=request_body(CompletionRequest))
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                      openapi_extra=request_body(ChatRequest))
    app.add_api_route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"],
                      openapi_extra=request_body(LoadRequest))
    app.add_api_route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"],
                      openapi_extra=request_body(UnloadRequest))
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app
