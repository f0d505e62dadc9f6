"""``lorakit serve``: one base model and many adapters over OpenAI's HTTP API."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import InvalidValue
from .base import Command
from .options import TrustOption, option
from .predict import DEVICES


@dataclass(kw_only=True)
class ServeOptions(TrustOption):
    model: str = option("default", "the base: 'default' (the embedded SmolLM2-135M-Instruct) or a causal-LM folder",
                        aliases=("--base",))
    adapter: list[str] = option(help="an adapter to serve under NAME (repeatable)", metavar="NAME=FOLDER",
                                repeat=True)
    device: str = option("auto", "where the model runs; auto: CUDA when present, else CPU", choices=DEVICES)
    host: str = option("127.0.0.1", "the address to listen on")
    port: int = option(8000, "the port")
    max_adapters: int = option(8, "most adapters in memory at once; the least recently used is evicted and reloaded "
                                  "from its folder when asked for again")
    adapter_root: str | None = option(None, "allow /v1/load_lora_adapter for folders under DIR, and serve a request "
                                            "whose model names an adapter folder in DIR by loading it on first use "
                                            "(default: runtime loading is off)", metavar="DIR")
    max_batch_size: int = option(32, "most requests decoded together")
    max_tokens: int = option(1024, "the largest max_tokens a request may ask for")
    max_request_bytes: int = option(2**20, "the largest request body accepted; larger ones get 413 (default: "
                                           "1048576, 1 MiB)")
    dtype: str = option("float32", "the base model's weights", choices=("float32", "bfloat16"))
    quantize: str | None = option(None, "serve on a 4-bit base, as QLoRA adapters were trained", choices=("nf4", "fp4"))
    merge: bool = option(False, "fold the one --adapter into the base and serve only it (the base model's speed)")
    served_model_name: str | None = option(None, "the base's name in requests (default: SmolLM2-135M-Instruct, or "
                                                 "the folder's name)")
    log_level: str = option("info", "uvicorn's log level", choices=("critical", "error", "warning", "info", "debug"))


def adapter_folders(items: list[str]) -> dict[str, str]:
    """``NAME=FOLDER`` pairs as a dict, with an error naming a pair written otherwise."""
    adapters = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise InvalidValue(f"--adapter {item!r}: write NAME=FOLDER, e.g. --adapter support=runs/support")
        adapters[name] = folder
    return adapters


def run(opts: ServeOptions) -> int:
    from ..serve import build_engine, serve

    engine = build_engine(opts.model, adapter_folders(opts.adapter), dtype=opts.dtype, quantize=opts.quantize,
                          merge=opts.merge, served_model_name=opts.served_model_name, max_adapters=opts.max_adapters,
                          adapter_root=opts.adapter_root, max_batch_size=opts.max_batch_size,
                          max_tokens=opts.max_tokens, max_request_bytes=opts.max_request_bytes,
                          trust_remote_code=opts.trust_remote_code, device=opts.device)
    served = ", ".join([engine.base_name] + sorted(engine.adapters))
    print(f"lorakit serve: {served} on http://{opts.host}:{opts.port} (OpenAI API under /v1, the playground at /)",
          flush=True)
    serve(engine, host=opts.host, port=opts.port, log_level=opts.log_level)
    return 0


COMMAND = Command("serve", "serve a base model and many adapters over OpenAI's HTTP API",
                  "Serve one base model and many LoRA adapters over HTTP with OpenAI's API: POST /v1/completions and "
                  "/v1/chat/completions (\"stream\": true for server-sent events), GET /v1/models; the request's "
                  "\"model\" picks the adapter (or the base). Adapters are loaded and unloaded at runtime with POST "
                  "/v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name} (vLLM's "
                  "names). Requests for different adapters are batched together. GET /health, GET /metrics "
                  "(Prometheus).", ServeOptions, run)
