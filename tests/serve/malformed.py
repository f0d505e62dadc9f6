"""Damaged requests for the server, generated systematically: every field of completions and chat completions with
each wrong JSON type and with values outside its range, broken JSON and UTF-8, wrong content types, bodies over the
size limit, unknown routes and wrong methods, bad adapter loads. Each comes with the status the server must answer.

Plain data and the standard library only: tests/serve/test_robustness.py sends them one by one, and
bench/serve_abuse.py (which loads this file by its path) fires them at a loaded server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

# A JSON value of each type, to put where another type belongs.
WRONG = {"null": None, "number": 1, "float": 0.5, "bool": True, "string": "1", "list": [], "object": {}}

# Each sampling field: the JSON types it takes and whether null means its default (OpenAI's nullable fields).
FIELDS: dict[str, tuple[set[str], bool]] = {
    "max_tokens": ({"number"}, True),
    "temperature": ({"number", "float"}, True),
    "top_p": ({"number", "float"}, True),
    "n": ({"number"}, True),
    "seed": ({"number"}, True),
    "stop": ({"string", "list"}, True),
    "stream": ({"bool"}, True),
    "stream_options": ({"object"}, True),
    "ignore_eos": ({"bool"}, False),
}


@dataclass
class Case:
    """One request and the status it must get. ``chunked``: send the body in pieces, without Content-Length."""

    name: str
    path: str
    body: bytes | None
    status: int
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    chunked: bool = False


def dump(value: Any) -> bytes:
    return json.dumps(value).encode()


def cases(model: str, max_tokens: int, limit: int, context: int = 1024) -> list[Case]:
    """The damaged requests for a server that serves ``model``, with ``--max-tokens max_tokens``, a body limit of
    ``limit`` bytes and a context of ``context`` tokens. Each gets a 4xx; none changes the server's state."""
    completion = {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    chat = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "temperature": 0}
    out: list[Case] = []

    def add(name: str, path: str, body: dict | bytes, status: int = 400, **kw: Any) -> None:
        out.append(Case(name, path, body if isinstance(body, bytes) else dump(body), status, **kw))

    # -- each field with each JSON type it does not take ---------------------------------------------------
    for path, base in ((COMPLETIONS, completion), (CHAT, chat)):
        tag = "chat" if path == CHAT else "cmpl"
        for name, (types, nullable) in FIELDS.items():
            for kind, value in WRONG.items():
                if kind in types or (kind == "null" and nullable) or (kind == "number" and "float" in types):
                    continue
                add(f"{tag}-{name}-{kind}", path, {**base, name: value})
        for kind, value in WRONG.items():
            if kind != "string":
                add(f"{tag}-model-{kind}", path, {**base, "model": value})
        add(f"{tag}-model-missing", path, {k: v for k, v in base.items() if k != "model"})
    for kind, value in WRONG.items():
        if kind not in ("string", "list"):
            add(f"cmpl-prompt-{kind}", COMPLETIONS, {**completion, "prompt": value})
        if kind != "list":
            add(f"chat-messages-{kind}", CHAT, {**chat, "messages": value})
    add("cmpl-prompt-missing", COMPLETIONS, {k: v for k, v in completion.items() if k != "prompt"})
    add("chat-messages-missing", CHAT, {k: v for k, v in chat.items() if k != "messages"})
    for kind in ("bool", "string", "float"):
        add(f"chat-max_completion_tokens-{kind}", CHAT, {**chat, "max_completion_tokens": WRONG[kind]})

    # -- values outside their ranges ---------------------------------------------------------------------------
    for path, base in ((COMPLETIONS, completion), (CHAT, chat)):
        tag = "chat" if path == CHAT else "cmpl"
        for name, values in {"max_tokens": [0, -1, max_tokens + 1, 10**9, 10**30],
                             "temperature": [-1, -1e-9, 2.5, 1e9, 1e308],
                             "top_p": [0, -0.5, 1.0001, 2],
                             "n": [0, -1, 17, 10**9],
                             "stop": [["a", "b", "c", "d", "e"], [""], "", ["x" * 300], ["a"] * 1000]}.items():
            for value in values:
                add(f"{tag}-{name}={str(value)[:12]}", path, {**base, name: value})
        # NaN and infinities are no JSON, but Python's json module writes and reads them
        for name in ("temperature", "top_p", "max_tokens", "seed"):
            for literal in ("NaN", "Infinity", "-Infinity", "1e400"):
                add(f"{tag}-{name}={literal}", path, dump(base)[:-1] + f', "{name}": {literal}}}'.encode())
        add(f"{tag}-seed-5000-digits", path, dump(base)[:-1] + b', "seed": ' + b"9" * 5000 + b"}")
        for value, status in (("", 404), ("nope", 404), ("x" * (limit // 2), 404), (f"{model}/../{model}", 404)):
            add(f"{tag}-model={value[:8]!r}", path, {**base, "model": value}, status)
        add(f"{tag}-stream-max_tokens=0", path, {**base, "stream": True, "max_tokens": 0})
        add(f"{tag}-stream-options-wrong", path, {**base, "stream": True, "stream_options": {"include_usage": 1}})
    add("chat-max_completion_tokens=0", CHAT, {**chat, "max_completion_tokens": 0})
    # log-probabilities: completions' logprobs is a count, chat's a boolean with top_logprobs the count
    for kind in ("bool", "string", "float", "list", "object"):
        add(f"cmpl-logprobs-{kind}", COMPLETIONS, {**completion, "logprobs": WRONG[kind]})
        add(f"chat-top_logprobs-{kind}", CHAT, {**chat, "logprobs": True, "top_logprobs": WRONG[kind]})
    for kind in ("number", "string", "float", "list", "object"):
        add(f"chat-logprobs-{kind}", CHAT, {**chat, "logprobs": WRONG[kind]})
    for value in (-1, 21, 10**9):
        add(f"cmpl-logprobs={value}", COMPLETIONS, {**completion, "logprobs": value})
        add(f"chat-top_logprobs={value}", CHAT, {**chat, "logprobs": True, "top_logprobs": value})
    add("chat-top_logprobs-without-logprobs", CHAT, {**chat, "top_logprobs": 2})
    add("chat-max_completion_tokens-huge", CHAT, {**chat, "max_completion_tokens": 10**9})

    # -- prompts and messages ----------------------------------------------------------------------------------
    prompts = {
        "empty": "", "empty-list": [], "list-of-empty": [""], "list-of-numbers": [1, 2], "token-ids": [[1, 2]],
        "many-numbers": [7] * (limit // 4), "list-with-null": ["a", None], "too-many": ["hi"] * 129,
        "past-context": "word " * (context + 10), "one-past-context": ["hi", "word " * (context + 10)],
    }
    for name, prompt in prompts.items():
        add(f"cmpl-prompt-{name}", COMPLETIONS, {**completion, "prompt": prompt})
    add("cmpl-prompt-fills-context", COMPLETIONS, {**completion, "prompt": "word " * (context - 4), "max_tokens": 8})
    user = {"role": "user", "content": "hi"}
    conversations = {
        "empty": [], "of-numbers": [5], "of-strings": ["hi"],
        "role-unknown": [{**user, "role": "robot"}], "role-missing": [{"content": "hi"}],
        "role-number": [{**user, "role": 1}], "content-missing": [{"role": "user"}],
        "content-null": [{**user, "content": None}], "content-number": [{**user, "content": 5}],
        "content-image": [{**user, "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        "part-without-text": [{**user, "content": [{"type": "text"}]}],
        "past-context": [{**user, "content": "word " * (context + 10)}],
    }
    for name, messages in conversations.items():
        add(f"chat-messages-{name}", CHAT, {**chat, "messages": messages})

    # -- bodies that are not JSON, not UTF-8, not an object, or too large ------------------------------------
    whole = dump(completion)
    for path in (COMPLETIONS, CHAT):
        tag = "chat" if path == CHAT else "cmpl"
        bodies = {
            "empty": b"", "truncated": whole[:-1], "half": whole[:len(whole) // 2], "brace": b"{", "null": b"null",
            "list": b"[]", "number": b"5", "string": b'"hi"', "single-quotes": b"{'model': 'a'}",
            "trailing-comma": whole[:-1] + b",}", "trailing-garbage": whole + b"x",
            "nested-deep": whole[:-1] + b', "x": ' + b"[" * (limit // 8) + b"]" * (limit // 8) + b"}",
            "utf8-invalid": b'{"model": "\xff\xfe", "prompt": "hi"}',
            "utf8-overlong": b'{"model": "a", "prompt": "\xc0\xaf"}',
            "utf8-cut": whole[:-3] + b'\xe2\x82"}',
            "lone-surrogate": b'{"model": "a", "prompt": "\\ud800", '
                              b'"messages": [{"role": "user", "content": "\\udfff"}]}',
            "nul-bytes": b"\x00" * 64,
        }
        for name, raw in bodies.items():
            add(f"{tag}-body-{name}", path, raw)
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             "application/xml"):
            add(f"{tag}-content-type-{content_type.split(';')[0]}", path, whole, 415,
                headers={"content-type": content_type})
        padded = dump({**completion, "prompt": "a" * (limit + 1)})
        add(f"{tag}-over-limit", path, padded, 413)
        add(f"{tag}-over-limit-chunked", path, padded, 413, chunked=True)

    # -- routes, methods and adapter loads ---------------------------------------------------------------------
    for method, path, status in (("GET", COMPLETIONS, 405), ("PUT", CHAT, 405), ("DELETE", "/v1/models", 405),
                                 ("POST", "/health", 405), ("GET", "/v1/nope", 404), ("POST", "/v1/completion", 404),
                                 ("GET", "/" + "x" * 5000, 404), ("PATCH", "/v1/load_lora_adapter", 405)):
        out.append(Case(f"{method}-{path[:20]}", path, None, status, method=method))
    loads = {
        "name-null": {"lora_name": None, "lora_path": "a"}, "name-number": {"lora_name": 5, "lora_path": "a"},
        "path-list": {"lora_name": "x", "lora_path": []}, "missing": {},
        "name-empty": {"lora_name": "", "lora_path": "a"}, "name-dots": {"lora_name": "..", "lora_path": "a"},
        "name-long": {"lora_name": "x" * (limit // 4), "lora_path": "a"},
        "path-long": {"lora_name": "x", "lora_path": "x" * (limit // 4)},
        "path-nul": {"lora_name": "x", "lora_path": "a\u0000"},
    }
    for name, body in loads.items():
        add(f"load-{name}", "/v1/load_lora_adapter", body)
    add("unload-name-list", "/v1/unload_lora_adapter", {"lora_name": ["a"]})
    add("unload-body-truncated", "/v1/unload_lora_adapter", b'{"lora_name": ')
    return out
