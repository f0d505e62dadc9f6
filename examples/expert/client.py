"""A client for `lorakit serve`, with nothing but the standard library: OpenAI's chat API over HTTP.

    python examples/expert/client.py --url http://127.0.0.1:8000 --model orders "Two large teas for Friday, Sam"

The `model` field picks the adapter; with --stream the answer is printed as it arrives (server-sent events).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as err:  # the server says what was wrong: show it
        raise RuntimeError(f"{err.code}: {json.loads(err.read())['error']['message']}") from None


def models(url: str) -> list[str]:
    """The names the server answers to: the base and every adapter."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=60) as response:
        return [m["id"] for m in json.load(response)["data"]]


def chat(url: str, model: str, messages: list[dict[str, str]], max_tokens: int = 64, **sampling: Any) -> str:
    """The assistant's answer (greedy unless ``temperature`` is given)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **sampling}
    with _post(f"{url}/v1/chat/completions", body) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def stream_chat(url: str, model: str, messages: list[dict[str, str]], max_tokens: int = 64,
                **sampling: Any) -> Iterator[str]:
    """The answer piece by piece, as the server sends it."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            **sampling}
    with _post(f"{url}/v1/chat/completions", body) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("message", nargs="?", help="the user message (needed with --model)")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="an adapter's name, or the base's (default: list them)")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="print the answer as it arrives")
    args = parser.parse_args()
    if args.model is None:
        print("models:", ", ".join(models(args.url)))
        return 0
    if args.message is None:
        parser.error("give the user message to send to --model")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.message}]
    if args.stream:
        for piece in stream_chat(args.url, args.model, messages, args.max_tokens):
            print(piece, end="", flush=True)
        print()
    else:
        print(chat(args.url, args.model, messages, args.max_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
