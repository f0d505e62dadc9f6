"""`lorakit serve` under abuse, in a short budget: while 16 well-behaved clients stream completions (base and two
adapters), other clients send every damaged request of :mod:`.malformed`, trickle their bodies a few bytes at a time
or send headers and then nothing, hang up in the middle of a stream, and ask for adapters that cannot load. The
server runs in its own process (as users run it) and a third process probes ``/health``.

What must hold: no 5xx, every damaged request gets the status it is meant to, every good stream completes with all
its tokens, the hung-up streams are cancelled (nothing left running or queued), ``/health`` answers within 100 ms at
the 99th percentile, and afterwards the models and a greedy answer are what they were.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import PROMPTS, free_port, httpx
from .malformed import cases

MAX_TOKENS = 64  # the server's --max-tokens
GOOD_CLIENTS = 16
GOOD_TOKENS = 48
HANG_UPS = 8
TRICKLERS = 4
SILENT = 4
HEALTH_EVERY_S = 0.05


# A process of its own that probes /health every HEALTH_EVERY_S until its stdin closes, then prints the latencies
# (null: a failed probe) as JSON. It says "ready" once its first probe is answered.
PROBE = """
import json, sys, threading, time
import httpx
url, every = sys.argv[1], float(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies = []
with httpx.Client(base_url=url, timeout=5) as client:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            ok = client.get("/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        latencies.append(time.perf_counter() - start if ok else None)
        if len(latencies) == 1:
            print("ready", flush=True)
        time.sleep(every)
print(json.dumps(latencies), flush=True)
"""


@pytest.fixture(scope="module")
def server(tiny_llama_dir, root) -> Any:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lorakit", "serve", "--model", tiny_llama_dir, "--port", str(port),
               "--log-level", "warning", "--max-tokens", str(MAX_TOKENS), "--max-batch-size", str(GOOD_CLIENTS),
               "--max-request-bytes", str(64 * 1024), "--adapter-root", str(root), "--served-model-name", "base",
               f"--adapter=a={root / 'a'}", f"--adapter=b={root / 'b'}"]
    log_path = Path(root).parent / f"serve-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log,
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.time() + 120
    while True:
        assert process.poll() is None and time.time() < deadline, "the server did not start"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        yield url, process, log_path
    finally:
        process.terminate()
        process.wait(timeout=60)


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {name.removeprefix("lorakit_"): float(value) for name, value in
            (line.split() for line in text.splitlines() if line and not line.startswith("#"))}


def _greedy(url: str, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


async def _good_stream(http: httpx.AsyncClient, model: str, prompt: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": GOOD_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    got: dict[str, Any] = {"status": None, "done": False, "finish": None, "tokens": 0}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        got["status"] = response.status_code
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                got["done"] = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    got["finish"] = choice["finish_reason"] or got["finish"]
                if chunk.get("usage"):
                    got["tokens"] = chunk["usage"]["completion_tokens"]
    return got


async def _hang_up(http: httpx.AsyncClient, model: str) -> bool:
    """Start a long stream and close the connection after its first chunk; whether a chunk came."""
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return True
    return False


async def _trickle(port: int, silent: bool) -> bytes:
    """A raw client that sends its headers, then its body a few bytes every 50 ms (or, ``silent``, nothing for
    two seconds before giving up); the server's first line of answer, if any."""
    body = json.dumps({"model": "base", "prompt": "Hi", "max_tokens": 2, "temperature": 0}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode())
    await writer.drain()
    if silent:
        await asyncio.sleep(2)
        writer.close()
        return b""
    for i in range(0, len(body), 4):
        writer.write(body[i:i + 4])
        await writer.drain()
        await asyncio.sleep(0.05)
    line = await asyncio.wait_for(reader.readline(), 60)
    writer.close()
    return line


async def _damaged(http: httpx.AsyncClient, todo: list, tally: dict) -> None:
    while todo:
        case = todo.pop()
        content: Any = case.body
        if case.chunked:
            async def pieces(body: bytes = case.body) -> Any:
                for i in range(0, len(body), 65536):
                    yield body[i:i + 65536]
            content = pieces()
        response = await http.request(case.method, case.path, content=content, headers=case.headers)
        tally["5xx"] += response.status_code >= 500
        if response.status_code != case.status:
            tally["unexpected"].append(f"{case.name}: {response.status_code} (expected {case.status})")


async def _load(url: str, port: int) -> dict:
    models = ["base", "a", "b"]
    todo = cases("a", MAX_TOKENS, 64 * 1024)
    tally: dict[str, Any] = {"5xx": 0, "unexpected": [], "damaged": len(todo)}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        async def bad_adapter(name: str) -> int:  # an adapter under --adapter-root that cannot load, or no such one
            response = await http.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
            tally["5xx"] += response.status_code >= 500
            return response.status_code

        good, hung, trickled, bad, _ = await asyncio.gather(
            asyncio.gather(*(_good_stream(http, models[i % 3], PROMPTS[i % len(PROMPTS)])
                             for i in range(GOOD_CLIENTS))),
            asyncio.gather(*(_hang_up(http, models[i % 3]) for i in range(HANG_UPS))),
            asyncio.gather(*(_trickle(port, silent=i >= TRICKLERS) for i in range(TRICKLERS + SILENT))),
            asyncio.gather(*(bad_adapter(name) for name in ("corrupt", "nan", "listconfig", "dora", "missing",
                                                            "../a", "/etc/passwd"))),
            asyncio.gather(*(_damaged(http, todo, tally) for _ in range(4))))
    return {"good": good, "hung": hung, "trickled": trickled, "bad_adapters": bad, **tally}


def test_the_server_under_abuse_keeps_every_good_stream_and_its_health(server):
    url, process, log_path = server
    port = int(url.rsplit(":", 1)[1])
    listed = httpx.get(f"{url}/v1/models", timeout=10).json()
    answers = {model: _greedy(url, model, PROMPTS[1]) for model in ("base", "a")}

    prober = subprocess.Popen([sys.executable, "-c", PROBE, url, str(HEALTH_EVERY_S)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert prober.stdout.readline().strip() == "ready"
        time.sleep(1)  # idle probes first
        got = asyncio.run(asyncio.wait_for(_load(url, port), 240))
    finally:
        output = prober.communicate(input="", timeout=60)[0]  # closing its stdin stops it
    latencies = json.loads(output.strip().splitlines()[-1])

    assert got["5xx"] == 0
    assert not got["unexpected"], got["unexpected"][:10]
    assert all(g["status"] == 200 and g["done"] and g["finish"] == "length" and g["tokens"] == GOOD_TOKENS
               for g in got["good"]), got["good"]
    assert all(got["hung"])
    assert all(line.startswith(b"HTTP/1.1 200") for line in got["trickled"][:TRICKLERS]), got["trickled"]
    assert all(400 <= status < 500 for status in got["bad_adapters"]), got["bad_adapters"]

    deadline = time.time() + 30  # the hung-up streams are cancelled, not left decoding
    while (metrics := _metrics(url))["running"] or metrics["queue_depth"]:
        assert time.time() < deadline, metrics
        time.sleep(0.1)
    assert metrics["requests_cancelled_total"] >= HANG_UPS
    assert httpx.get(f"{url}/v1/models", timeout=10).json() == listed
    assert {model: _greedy(url, model, PROMPTS[1]) for model in ("base", "a")} == answers

    measured = sorted(x for x in latencies if x is not None)
    assert len(measured) >= 40 and len(measured) == len(latencies), f"{len(latencies)} probes, some failed"
    p99 = measured[min(len(measured) - 1, int(0.99 * len(measured)))]
    assert p99 < 0.1, f"/health p99 {1000 * p99:.0f} ms over {len(measured)} probes"
    assert process.poll() is None
    assert "Traceback" not in log_path.read_text()
