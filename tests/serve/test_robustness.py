"""The server against hostile and careless clients (lorakit/serve/api.py, routes.py, protocol.py, schema.py), over
real HTTP: every damaged request of :mod:`.malformed` gets its 4xx in OpenAI's error shape and leaves the server as
it was; large bodies are refused before they are read; nothing CPU-heavy runs on the event loop."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import pytest
import torch

from lorakit.serve import build_engine

from .conftest import PROMPTS, complete, httpx, running
from .malformed import Case, cases

LIMIT = 64 * 1024  # this server's --max-request-bytes (the default is 1 MiB)
MAX_TOKENS = 64
CASES = cases("a", MAX_TOKENS, LIMIT)


@pytest.fixture(scope="module")
def server(tiny_llama_dir, root) -> Any:
    """A server like test_api's (base "base", adapters a and b, runtime loads under root) with a 64 KiB body limit."""
    # Hundreds of requests, each followed by a short generation: the tiny model gains nothing from intra-op
    # threads, and on a busy 2-core machine their waiting makes each step ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = build_engine(tiny_llama_dir, {"a": root / "a", "b": root / "b"}, served_model_name="base",
                          adapter_root=root, max_adapters=2, max_tokens=MAX_TOKENS, max_request_bytes=LIMIT)
    try:
        with running(engine) as client:
            client.engine = engine
            yield client
    finally:
        torch.set_num_threads(threads)


def state(client: httpx.Client, models: tuple[str, ...] = ("a",)) -> tuple[dict, list[str]]:
    """What a client can see of the server: the models listed, and greedy answers of ``models``."""
    texts = [complete(client, model, PROMPTS[1], max_tokens=4)["choices"][0]["text"] for model in models]
    return client.get("/v1/models").json(), texts


@pytest.fixture(scope="module")
def before(server) -> tuple[dict, list[str]]:
    return state(server)


@pytest.fixture(scope="module")
def before_all(server) -> tuple[dict, list[str]]:
    return state(server, ("base", "a", "b"))


def send(client: httpx.Client, case: Case) -> httpx.Response:
    content: Any = case.body
    if case.chunked:  # an iterator: httpx sends it with Transfer-Encoding: chunked, no Content-Length
        content = iter([case.body[i:i + 8192] for i in range(0, len(case.body), 8192)])
    return client.request(case.method, case.path, content=content, headers=case.headers)


def assert_openai_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], "the error must say what is wrong"
    assert isinstance(body["error"]["type"], str) and body["error"]["code"] == status
    assert len(body["error"]["message"]) < 2000, "an error must not echo a large value back"


def test_the_cases_are_many_and_distinct(before_all):
    assert len(CASES) >= 200 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_damaged_request_gets_4xx_in_openai_shape_and_changes_nothing(server, before, case):
    assert_openai_error(send(server, case), case.status)
    assert state(server) == before


def test_null_takes_the_default_as_openai_does(server):
    # OpenAI's reference marks these nullable, and its client sends null for an argument given as None.
    plain = complete(server, "a", PROMPTS[0], max_tokens=5)
    nulls = complete(server, "a", PROMPTS[0], max_tokens=5, top_p=None, n=None, seed=None, stop=None, stream=None,
                     stream_options=None)
    assert nulls["choices"] == plain["choices"]
    assert complete(server, "a", PROMPTS[0], max_tokens=None, ignore_eos=True)["usage"]["completion_tokens"] == 16
    assert complete(server, "a", PROMPTS[0], max_tokens=5, temperature=None, seed=3)["choices"] == \
        complete(server, "a", PROMPTS[0], max_tokens=5, temperature=1, seed=3)["choices"]


def test_a_body_just_within_the_limit_is_read(server):
    head = b'{"model": "a", "max_tokens": 2, "prompt": "'
    body = head + b"a" * (LIMIT - len(head) - 2) + b'"}'
    assert len(body) == LIMIT
    # Read and tokenized: "a" * 65,000 is past the context, which only the tokenizer can tell
    response = server.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)
    assert "context" in response.json()["error"]["message"]


def test_health_answers_while_large_bodies_are_refused(server):
    big = b'{"model": "a", "prompt": "' + b"a" * 10_000_000 + b'"}'
    statuses: list[int] = []

    def flood() -> None:
        with httpx.Client(base_url=server.base_url, timeout=60) as other:
            for i in range(6):  # by Content-Length, and counted while read (chunked)
                content = big if i % 2 else iter([big[j:j + 65536] for j in range(0, len(big), 65536)])
                statuses.append(other.post("/v1/completions", content=content,
                                           headers={"content-type": "application/json"}).status_code)

    thread = threading.Thread(target=flood)
    thread.start()
    latencies = []
    deadline = time.monotonic() + 60
    while (thread.is_alive() or not latencies) and time.monotonic() < deadline:
        start = time.perf_counter()
        assert server.get("/health").status_code == 200
        latencies.append(time.perf_counter() - start)
    thread.join(timeout=60)
    assert statuses == [413] * 6
    assert max(latencies) < 0.5, f"/health took {max(latencies):.3f} s while large bodies were refused"


@pytest.mark.parametrize("declared", [2 * LIMIT, 10**12])
def test_a_body_declared_too_large_is_refused_before_it_is_sent(server, declared):
    # Only the headers go out: the answer comes without one byte of the body read.
    host, port = server.base_url.host, server.base_url.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {declared}\r\n\r\n".encode())
        answer = b""
        while b"}}" not in answer:
            piece = sock.recv(65536)
            assert piece, f"the server closed without an answer: {answer!r}"
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert json.loads(body)["error"]["code"] == 413 and str(declared).encode() in body
    # A body too large to drain closes the connection; a smaller one is drained so the client can read the 413.
    assert (b"connection: close" in head.lower()) == (declared > 64 * 2**20)


class Recorder:
    """The engine's tokenizer, noting for each encoding and chat rendering whether it ran on an event loop's
    thread."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.on_loop: list[bool] = []

    def _note(self) -> None:
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._note()
        return self.tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self._note()
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_tokenization_and_chat_templates_run_off_the_event_loop(server, before):
    engine = server.engine
    recorder = Recorder(engine.tokenizer)
    engine.tokenizer = recorder
    try:
        complete(server, "a", PROMPTS[0], max_tokens=2)
        complete(server, "a", [PROMPTS[0], PROMPTS[2]], max_tokens=2)
        chat = {"model": "b", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2}
        assert server.post("/v1/chat/completions", json=chat).status_code == 200
        with server.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as response:
            assert [line for line in response.iter_lines() if line][-1] == "data: [DONE]"
        assert server.post("/v1/completions", json={"model": "a", "prompt": "word " * 2000}).status_code == 400
    finally:
        engine.tokenizer = recorder.tokenizer
    assert len(recorder.on_loop) >= 7 and not any(recorder.on_loop), recorder.on_loop
    assert state(server) == before


def test_adapter_holding_nan_gets_400_naming_it_once(server, root, before):
    response = server.post("/v1/load_lora_adapter", json={"lora_name": "poisoned", "lora_path": "nan"})
    assert_openai_error(response, 400)
    message = response.json()["error"]["message"]
    assert "NaN or infinite" in message
    assert message.count("poisoned") == 1 and message.count(str((root / "nan").resolve())) == 1, message
    assert "poisoned" not in server.engine.adapters and state(server) == before


def test_after_every_case_every_model_answers_as_before(server, before_all):
    assert state(server, ("base", "a", "b")) == before_all
