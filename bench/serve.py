"""lorakit serve under load: 32 concurrent clients spread over 8 adapters, against the same load on one adapter.

Starts `lorakit serve` (the embedded SmolLM2-135M-Instruct, fp32) on a free loopback port with 8 random r=16
q,k,v,o adapters, then runs each scenario in turn, alternating, `--rounds` times:

- mixed: client i asks adapter i % 8 (so every batch mixes 8 adapters);
- single: every client asks the same adapter (every batch uses one adapter: the plain forward);
- structured: as mixed, and every request has a `response_format` JSON schema: an array of at least 20 documents
  of one of the five test schemas (tests/serve/schemas: nested objects, enums, arrays, patterns), so that the
  grammar cannot end before `--max-tokens` and the tokens are the same as mixed's. Its tokens/s against mixed's is
  the cost of structured output, and the server's `/metrics` say how much of its wall time went to the masks.

Each client sends `--requests` completions one after the other (half of the clients stream them as server-sent
events), `--max-tokens` tokens each with `ignore_eos`, so both scenarios generate the same number of tokens.
Every response is checked: status 200, `finish_reason` "length", the full token count. Target: 0 errors and
mixed throughput >= 0.8x single.

    python bench/serve.py [--clients 32] [--adapters 8] [--requests 2] [--max-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

SCHEMAS = Path(__file__).resolve().parents[1] / "tests" / "serve" / "schemas"
PROMPTS = ["Write a haiku about the sea.", "What is the capital of France? Answer in one sentence.",
           "List three uses of a paperclip.", "Explain LoRA to a five-year-old.",
           "Translate 'good morning' into Spanish and German.", "Give me a name for a grey cat."]


def make_adapters(folder: Path, n: int) -> dict[str, Path]:
    """``n`` random r=16 adapters on SmolLM2's attention projections (random B too: a real, nonzero update)."""
    from lorakit import LoraConfig, get_lora_model
    from lorakit.models.embedded_models import load_default_model

    model = load_default_model()
    lora = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                "o_proj"]), "a0")
    paths = {}
    for i in range(n):
        name = f"a{i}"
        if i:
            lora.add_adapter(name, lora.peft_config["a0"])
        torch.manual_seed(i)
        with torch.no_grad():
            for _, layer in lora.lora_layers():
                layer.adapters[name].lora_B.normal_(0, 0.01)
        lora.save_pretrained(folder, adapter_names=[name])  # an adapter not named "default" goes to folder/name
        paths[name] = folder / name
    return paths


def response_formats() -> list[dict]:
    """The structured scenario's formats: for each test schema, an array of at least 20 such documents."""
    formats = []
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = {"type": "array", "items": json.loads(path.read_text()), "minItems": 20}
        formats.append({"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema}})
    return formats


async def client(http: httpx.AsyncClient, adapter: str, requests: int, max_tokens: int, stream: bool,
                 seed: int, stats: dict, formats: list[dict]) -> None:
    for k in range(requests):
        body = {"model": adapter, "prompt": PROMPTS[(seed + k) % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        if formats:
            body["response_format"] = formats[(seed + k) % len(formats)]
        try:
            if stream:
                body.update(stream=True, stream_options={"include_usage": True})
                tokens, finish = 0, None
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"status {response.status_code}")
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(chunk["error"]["message"])
                        if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                            finish = chunk["choices"][0]["finish_reason"]
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            else:
                response = await http.post("/v1/completions", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"status {response.status_code}: {response.text[:200]}")
                result = response.json()
                tokens, finish = result["usage"]["completion_tokens"], result["choices"][0]["finish_reason"]
            if finish != "length" or tokens != max_tokens:
                raise RuntimeError(f"incomplete: finish_reason {finish}, {tokens} of {max_tokens} tokens")
            stats["tokens"] += tokens
            stats["done"] += 1
        except Exception as err:  # noqa: BLE001 - counted and shown
            stats["errors"].append(f"{adapter}: {err}")


async def scenario(url: str, adapters: list[str], clients: int, requests: int, max_tokens: int,
                   formats: list[dict] | None = None) -> dict:
    stats = {"tokens": 0, "done": 0, "errors": []}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, adapters[i % len(adapters)], requests, max_tokens, i % 2 == 1, i, stats,
                                      formats or []) for i in range(clients)))
        seconds = time.perf_counter() - start
    return {**stats, "seconds": seconds, "tokens_per_s": stats["tokens"] / seconds,
            "expected": clients * requests}


def wait_until_serving(server: subprocess.Popen, url: str, server_log: Callable[[], str]) -> bool:
    """Wait (up to 300 s) until ``/health`` answers; False, with the server's log printed, if it exited first."""
    deadline = time.time() + 300
    while True:
        if server.poll() is not None:
            print(server_log(), file=sys.stderr)
            return False
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            raise TimeoutError("lorakit serve did not start within 300 s")
        time.sleep(0.5)


def metric(url: str, name: str) -> float:
    """One value of the server's ``/metrics``."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return next(float(line.split()[1]) for line in lines if line.startswith(f"lorakit_{name} "))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="completions per client and scenario")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="times each scenario runs (alternating)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(Path(tmp), args.adapters)
        port = free_port()
        command = [sys.executable, "-m", "lorakit", "serve", "--port", str(port), "--log-level", "warning",
                   "--max-adapters", str(args.adapters), "--max-batch-size", str(args.clients)]
        for name, path in paths.items():
            command += ["--adapter", f"{name}={path}"]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_until_serving(server, url, server.stderr.read):
                return 1
            names = list(paths)
            formats = response_formats()
            # warm-up: every adapter resident, caches hot, the grammar engine's vocabulary read
            asyncio.run(scenario(url, names, args.clients, 1, 4, formats))
            runs: dict[str, list[dict]] = {"single": [], "mixed": [], "structured": []}
            for _ in range(args.rounds):
                runs["single"].append(asyncio.run(scenario(url, names[:1], args.clients, args.requests,
                                                           args.max_tokens)))
                runs["mixed"].append(asyncio.run(scenario(url, names, args.clients, args.requests, args.max_tokens)))
                before = metric(url, "grammar_mask_seconds_total")
                runs["structured"].append(asyncio.run(scenario(url, names, args.clients, args.requests,
                                                               args.max_tokens, formats)))
                runs["structured"][-1]["mask_seconds"] = metric(url, "grammar_mask_seconds_total") - before
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            server.terminate()
            server.wait(timeout=60)

    print(f"\nlorakit serve, SmolLM2-135M-Instruct fp32, {args.clients} concurrent clients x {args.requests} "
          f"completions x {args.max_tokens} tokens (half streamed), {args.rounds} rounds, medians\n")
    print("| load | adapters | requests | errors | wall (s) | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    result = {}
    for label, runs_ in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in runs_)
        errors = sum(len(r["errors"]) for r in runs_)
        done = sum(r["done"] for r in runs_)
        wall = statistics.median(r["seconds"] for r in runs_)
        adapters = 1 if label == "single" else args.adapters
        print(f"| {label} | {adapters} | {done}/{sum(r['expected'] for r in runs_)} | {errors} | {wall:.1f} | "
              f"{tps:.0f} |")
        result[label] = {"tokens_per_s": tps, "errors": errors, "done": done}
        for r in runs_:
            for error in r["errors"][:5]:
                print(f"    error: {error}")
    ratio = result["mixed"]["tokens_per_s"] / result["single"]["tokens_per_s"]
    print(f"\nthroughput mixed / single: {ratio:.2f}x (target >= 0.8)")
    structured = result["structured"]["tokens_per_s"] / result["mixed"]["tokens_per_s"]
    print(f"throughput structured / mixed: {structured:.2f}x (the cost of response_format)")
    masks = sum(r["mask_seconds"] for r in runs["structured"]) / sum(r["seconds"] for r in runs["structured"])
    print(f"the server's time in grammar masks: {masks:.1%} of the structured loads' wall time")
    largest = [line for line in metrics.splitlines() if line.startswith(("lorakit_largest_batch",
                                                                         "lorakit_mixed_adapter"))]
    print("server:", "; ".join(largest))
    ok = ratio >= 0.8 and all(r["errors"] == 0 for r in result.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
