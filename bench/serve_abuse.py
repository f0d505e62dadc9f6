"""lorakit serve under abuse: 1,000 malformed requests mixed with 64 well-behaved streaming clients.

Starts `lorakit serve` (the embedded SmolLM2-135M-Instruct, fp32) on a free loopback port with 2 random r=16 adapters
(bench/serve.py's), then at once:

- `--clients` well-behaved clients, each streaming `--requests` greedy completions of `--max-tokens` tokens
  (`ignore_eos`, with the usage chunk) for the base or an adapter;
- `--senders` concurrent senders of `--malformed` damaged requests, cycling through the cases of
  tests/serve/malformed.py (wrong types and ranges of every field, broken JSON and UTF-8, wrong content types, bodies
  over the 1 MiB limit by Content-Length and chunked, unknown routes, wrong methods, bad adapter loads);
- in a process of its own, a GET /health every 50 ms, from before the load until after it.

It counts 5xx answers (target 0), malformed requests not answered with their 4xx, well-behaved streams lost or
truncated (target 0: each must end with [DONE], finish "length", and carry `--max-tokens` tokens; how many also equal
the same request's greedy answer alone is shown), and /health latency p50/p99 (target p99 < 100 ms). Before and after
the load, the models listed and a greedy answer must be the same.

    python bench/serve_abuse.py [--clients 64] [--requests 1] [--max-tokens 32] [--malformed 1000] [--senders 8]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from serve import PROMPTS, free_port, make_adapters, wait_until_serving  # bench/serve.py

REPO = Path(__file__).resolve().parents[1]
LIMIT = 2**20  # the server's default --max-request-bytes
SERVER_MAX_TOKENS = 64
DEADLINE_S = 600  # the whole load, at most


def load_cases() -> Any:
    """tests/serve/malformed.py, by its path (it is test data, not a package of this folder)."""
    spec = importlib.util.spec_from_file_location("malformed", REPO / "tests" / "serve" / "malformed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["malformed"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} cores visible"


def sample_health(url: str, interval: float, stop: Any, out: Any, limit_s: float) -> None:
    """In its own process: GET /health every ``interval`` s until ``stop`` is set (or ``limit_s`` passes); send
    (start time, latency or None for a failure) pairs back through ``out``."""
    samples = []
    end = time.time() + limit_s
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set() and time.time() < end:
            start = time.time()
            t = time.perf_counter()
            try:
                ok = client.get("/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            samples.append((start, time.perf_counter() - t if ok else None))
            time.sleep(max(0.0, interval - (time.perf_counter() - t)))
    out.send(samples)


async def stream_one(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    """One well-behaved streamed completion; what arrived."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    got = {"status": None, "done": False, "finish": None, "tokens": 0, "text": "", "error": None}
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            got["status"] = response.status_code
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    got["done"] = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        got["error"] = chunk["error"]["message"]
                    for choice in chunk.get("choices") or []:
                        got["text"] += choice["text"]
                        got["finish"] = choice["finish_reason"] or got["finish"]
                    if chunk.get("usage"):
                        got["tokens"] = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as err:
        got["error"] = f"{type(err).__name__}: {err}"
    return got


async def well_behaved(http: httpx.AsyncClient, i: int, jobs: list[tuple[str, str]], requests: int,
                       max_tokens: int, results: list) -> None:
    for k in range(requests):
        model, prompt = jobs[(i + k) % len(jobs)]
        results.append((model, prompt, await stream_one(http, model, prompt, max_tokens)))


async def pieces(body: bytes) -> Any:
    """``body`` in 64 KiB pieces: httpx sends an async iterator chunked, without Content-Length."""
    for i in range(0, len(body), 65536):
        yield body[i:i + 65536]


async def sender(http: httpx.AsyncClient, cases: Any, remaining: list[int], tally: dict) -> None:
    while remaining[0] > 0:
        remaining[0] -= 1
        case = next(cases)
        content: Any = pieces(case.body) if case.chunked else case.body
        try:
            response = await http.request(case.method, case.path, content=content, headers=case.headers)
        except httpx.HTTPError as err:
            tally["transport"].append(f"{case.name}: {type(err).__name__}: {err}")
            continue
        status = response.status_code
        try:
            error = response.json()["error"]
            shape = set(error) == {"message", "type", "param", "code"} and error["code"] == status
        except (ValueError, KeyError, TypeError):
            shape = False
        tally["sent"] += 1
        tally["5xx"] += status >= 500
        tally["4xx_openai"] += 400 <= status < 500 and shape
        if status != case.status:
            tally["unexpected"].append(f"{case.name}: {status} (expected {case.status})")


async def load(url: str, jobs: list[tuple[str, str]], args: argparse.Namespace, cases: list) -> tuple[list, dict]:
    results: list = []
    tally: dict = {"sent": 0, "4xx_openai": 0, "5xx": 0, "unexpected": [], "transport": []}
    remaining = [args.malformed]
    limits = httpx.Limits(max_connections=args.clients + args.senders + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        cycle = itertools.cycle(cases)
        await asyncio.wait_for(asyncio.gather(
            *(well_behaved(http, i, jobs, args.requests, args.max_tokens, results) for i in range(args.clients)),
            *(sender(http, cycle, remaining, tally) for _ in range(args.senders))), DEADLINE_S)
    return results, tally


def greedy_alone(url: str, model: str, prompt: str, max_tokens: int) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="well-behaved streaming clients")
    parser.add_argument("--requests", type=int, default=1, help="streamed completions per well-behaved client")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per well-behaved completion")
    parser.add_argument("--malformed", type=int, default=1000, help="damaged requests in all")
    parser.add_argument("--senders", type=int, default=8, help="concurrent senders of damaged requests")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between /health probes")
    args = parser.parse_args()

    from lorakit.models.embedded_models import default_model_dir

    context = json.loads((default_model_dir() / "config.json").read_text())["max_position_embeddings"]
    malformed = load_cases()
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w+") as log:
        paths = make_adapters(Path(tmp), 2)
        cases = malformed.cases("a0", SERVER_MAX_TOKENS, LIMIT, context)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "lorakit", "serve", "--port", str(port), "--log-level", "warning",
                   "--max-batch-size", str(args.clients), "--max-tokens", str(SERVER_MAX_TOKENS),
                   "--adapter-root", tmp] + [f"--adapter={name}={path}" for name, path in paths.items()]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            def server_log() -> str:
                log.seek(0)
                return log.read()

            if not wait_until_serving(server, url, server_log):
                return 1
            models = ["SmolLM2-135M-Instruct", *paths]
            jobs = [(m, p) for p in PROMPTS for m in models]  # 18 distinct requests
            # What each request gives alone, one at a time: the answers the streams under load must match.
            alone = {job: greedy_alone(url, *job, args.max_tokens) for job in jobs}
            listed = httpx.get(f"{url}/v1/models").json()

            ctx = multiprocessing.get_context("spawn")
            stop, (receive, send) = ctx.Event(), ctx.Pipe(duplex=False)
            sampler = ctx.Process(target=sample_health, args=(url, args.interval, stop, send, DEADLINE_S + 120))
            sampler.start()
            time.sleep(3)  # idle samples first
            started = time.time()
            results, tally = asyncio.run(load(url, jobs, args, cases))
            ended = time.time()
            time.sleep(1)
            stop.set()
            samples = receive.recv() if receive.poll(60) else []
            sampler.join(timeout=30)

            unchanged = (httpx.get(f"{url}/v1/models").json() == listed
                         and all(greedy_alone(url, *job, args.max_tokens) == alone[job] for job in jobs[:3]))
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.seek(0)
            errors_logged = [line for line in log.read().splitlines() if "Traceback" in line or "ERROR" in line]

    complete = [(m, p, r) for m, p, r in results if r["status"] == 200 and r["done"] and r["finish"] == "length"
                and r["tokens"] == args.max_tokens and r["error"] is None]
    equal = sum(r["text"] == alone[(m, p)] for m, p, r in complete)
    under = [latency for start, latency in samples if started <= start <= ended]
    idle = [latency for start, latency in samples if start < started]
    failed_probes = sum(latency is None for latency in under + idle)
    under_ms = [1000 * x for x in under if x is not None]
    idle_ms = [1000 * x for x in idle if x is not None]
    expected = args.clients * args.requests

    print(f"\nlorakit serve under abuse, SmolLM2-135M-Instruct fp32, {cpu_model()}")
    print(f"{args.clients} streaming clients x {args.requests} x {args.max_tokens} tokens (greedy, base and 2 "
          f"adapters) with {args.malformed} malformed requests from {args.senders} senders; "
          f"load {ended - started:.1f} s\n")
    print("| measure | result | target |")
    print("|---|---:|---|")
    print(f"| malformed requests answered | {tally['sent']}/{args.malformed} | all |")
    print(f"| ... with 4xx in OpenAI's error shape | {tally['4xx_openai']} | all |")
    print(f"| ... with the status the tests expect | {tally['sent'] - len(tally['unexpected'])} | all |")
    print(f"| 5xx answers | {tally['5xx']} | 0 |")
    print(f"| well-behaved streams complete ([DONE], {args.max_tokens} tokens) | {len(complete)}/{expected} | all |")
    print(f"| ... lost or truncated | {expected - len(complete)} | 0 |")
    print(f"| ... text equal to the same request alone | {equal}/{expected} | |")
    if under_ms:
        print(f"| /health under load: p50 / p99 / max (ms), {len(under_ms)} probes | {percentile(under_ms, 0.5):.1f}"
              f" / {percentile(under_ms, 0.99):.1f} / {max(under_ms):.1f} | p99 < 100 |")
    if idle_ms:
        print(f"| /health idle: p50 / p99 (ms), {len(idle_ms)} probes | {percentile(idle_ms, 0.5):.1f} / "
              f"{percentile(idle_ms, 0.99):.1f} | |")
    print(f"| /health probes failed | {failed_probes} | 0 |")
    print(f"| models and greedy answers unchanged after | {'yes' if unchanged else 'NO'} | yes |")
    print(f"| tracebacks or errors in the server log | {len(errors_logged)} | 0 |")
    for line in (tally["unexpected"][:5] + tally["transport"][:5] + errors_logged[:5]
                 + [r["error"] for _, _, r in results if r["error"]][:5]):
        print(f"    {line}")
    ok = (tally["5xx"] == 0 and len(complete) == expected and under_ms and percentile(under_ms, 0.99) < 100
          and unchanged and tally["4xx_openai"] == args.malformed and not errors_logged)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
