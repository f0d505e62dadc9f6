"""The HTTP API: OpenAI's completions, chat completions and models endpoints, vLLM's adapter loading endpoints,
``/health`` and Prometheus ``/metrics``, over an :class:`~lorakit.serve.scheduler.Engine`.

Client mistakes get OpenAI's error body ``{"error": {"message", "type", "code"}}`` with 400 (bad fields or JSON),
403 (an adapter path outside the adapter root), 404 (an unknown model or adapter), 409 (a name whose unloaded adapter
still runs) or 503 (busy); a bad request never reaches the model, and a failing one never stops the server.

:func:`create_app` assembles the application; the endpoints are in :mod:`lorakit.serve.routes`, what they do without
FastAPI in :mod:`lorakit.serve.protocol`. FastAPI, the serve extra, is imported only when an app is built, so
``lorakit.serve`` imports without it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .sampling import RequestError
from .scheduler import Engine


def _fastapi() -> ModuleType:
    try:
        import fastapi
    except ImportError as err:
        raise ImportError("lorakit serve needs FastAPI and uvicorn: pip install 'lorakit[serve]'") from err
    return fastapi


def create_app(engine: Engine) -> Any:
    """The FastAPI application serving ``engine``."""
    fastapi = _fastapi()
    from fastapi.exceptions import RequestValidationError

    # The endpoints' module imports FastAPI and pydantic at its top: it loads here, once FastAPI is known present.
    from .routes import (
        chat_completions,
        completions,
        health,
        load_lora_adapter,
        metrics,
        models,
        request_error,
        unload_lora_adapter,
        validation_error,
    )

    app = fastapi.FastAPI(title="lorakit serve", description="One base model, many LoRA adapters, OpenAI's API.")
    app.state.engine = engine
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app
