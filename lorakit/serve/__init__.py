"""``lorakit serve``: one base model, many LoRA adapters, OpenAI's HTTP API (FastAPI + uvicorn).

    engine = build_engine("default", {"support": "runs/support", "sql": "runs/sql"})
    serve(engine, port=8000)          # or: lorakit serve --adapter support=runs/support --adapter sql=runs/sql

A request's ``model`` field picks the adapter (or the base). Requests for different adapters are decoded in one
batch (see :mod:`lorakit.serve.scheduler`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.errors import InvalidValue, MissingDependency
from ..core.quant import quantize as to_4bit
from ..models.devices import resolve_device
from ..models.embedded_models import build_model, model_source, require_transformers
from ..models.model import LoraModel
from .api import create_app
from .protocol import prometheus_text
from .request import Event, Request
from .sampling import RequestError, SamplingParams
from .scheduler import Engine

__all__ = ["Engine", "Event", "Request", "RequestError", "SamplingParams", "build_engine", "create_app",
           "prometheus_text", "serve"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def base_name_for(spec: str) -> str:
    """The name requests use for the base model: SmolLM2's short name for 'default', else the folder's name."""
    return "SmolLM2-135M-Instruct" if spec == "default" else Path(spec).resolve().name


def build_engine(base: str = "default", adapters: dict[str, str | Path] | None = None, *, dtype: str = "float32",
                 quantize: str | None = None, merge: bool = False, served_model_name: str | None = None,
                 trust_remote_code: bool = False, device: str = "auto", **engine_args: Any) -> Engine:
    """Load a base model and its tokenizer and start an :class:`Engine` on them.

    Args:
        base: 'default' (the embedded SmolLM2-135M-Instruct) or a Hugging Face causal-LM folder.
        adapters: Adapters served from the start, name -> folder.
        dtype: 'float32' or 'bfloat16' for the base model's weights.
        quantize: 'nf4' or 'fp4' to serve on a 4-bit base (as QLoRA adapters were trained).
        merge: Fold the one adapter into the base and serve only it, under its name: the base model's speed,
            no runtime loading (with ``quantize``, the merged layers are quantized again).
        served_model_name: The base's name in requests (default: see :func:`base_name_for`).
        trust_remote_code: Run Python code that ships in the base's folder (``auto_map`` in its config.json or
            tokenizer_config.json); without it such a base is refused.
        device: 'auto' (CUDA when present, else CPU), 'cpu' or 'cuda'.
        engine_args: ``max_adapters``, ``adapter_root``, ``max_batch_size``, ``max_tokens``, ``max_request_bytes``
            (see :class:`Engine`).

    Raises:
        ValueError: An unknown dtype, a base that is not a causal LM or that ships code without
            ``trust_remote_code``, an adapter that does not load, or ``merge`` without exactly one adapter.
    """
    if dtype not in DTYPES:
        raise InvalidValue(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    adapters = dict(adapters or {})
    if merge and len(adapters) != 1:
        raise InvalidValue(f"merged mode serves exactly one adapter; got {len(adapters)}: {sorted(adapters)}")
    if merge and engine_args.get("adapter_root") is not None:
        raise InvalidValue("merged mode serves one fixed adapter; it cannot load others (drop --adapter-root)")
    model = build_model(base, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if not hasattr(model, "generate") or not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise InvalidValue(f"{base!r} is a {type(model).__name__}; lorakit serve needs a causal language model")
    if quantize is not None:
        to_4bit(model, quantize)
    model.to(resolve_device(device))  # adapters loaded later follow their base layers' device
    tokenizer = require_transformers().AutoTokenizer.from_pretrained(
        str(model_source(base, trust_remote_code)), trust_remote_code=trust_remote_code)
    name = served_model_name or base_name_for(base)
    if merge:
        ((name, path),) = adapters.items()
        # On a 4-bit base the merged layers are rounded to 4 bits again, so the model stays as small as asked.
        model = LoraModel.from_pretrained(model, path, name).merge_and_unload(**({"requantize": True} if quantize else {}))
        adapters = {}
    return Engine(model, tokenizer, base_name=name, adapters=adapters, **engine_args)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``engine`` over HTTP until interrupted (Ctrl-C), then stop its scheduler. Request bodies are limited
    to ``engine.max_request_bytes``."""
    try:
        import uvicorn
    except ImportError as err:
        raise MissingDependency("lorakit serve needs FastAPI and uvicorn: pip install 'lorakit[serve]'") from err
    try:
        uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level)
    finally:
        engine.close()
