"""``n`` choices per prompt: one prefill per prompt shared by its choices, OpenAI's choice order and usage, greedy
choices equal, and with a ``seed`` sampled choices that differ from each other yet are the same on every run and in
every batch."""

from __future__ import annotations

import json
import threading

import pytest

from .conftest import PROMPTS, complete


def _metric(client, name: str) -> float:
    line = next(line for line in client.get("/metrics").text.splitlines() if line.startswith(f"lorakit_{name} "))
    return float(line.split()[1])


def test_n_choices_share_one_prefill_and_count_the_prompt_once(client):
    prompt_ids = len(client.engine.tokenizer(PROMPTS[1])["input_ids"])
    before = _metric(client, "prompt_tokens_total")
    body = complete(client, "a", [PROMPTS[1], PROMPTS[2]], max_tokens=5, n=3, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    texts = [c["text"] for c in body["choices"]]
    assert len(set(texts[:3])) == 1 and len(set(texts[3:])) == 1  # greedy: the same answer n times
    assert texts[0] == complete(client, "a", PROMPTS[1], max_tokens=5, ignore_eos=True)["choices"][0]["text"]
    prompt_2 = len(client.engine.tokenizer(PROMPTS[2])["input_ids"])
    assert body["usage"]["prompt_tokens"] == prompt_ids + prompt_2 and body["usage"]["completion_tokens"] == 30
    computed = _metric(client, "prompt_tokens_total") - before - prompt_ids  # minus the single request after
    assert computed <= 2 * max(prompt_ids, prompt_2)  # two prefills (with left padding), not six


def test_seeded_choices_differ_and_repeat_alone_or_batched(client):
    fields = {"model": "b", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 4,
              "ignore_eos": True}
    first = [c["text"] for c in client.post("/v1/completions", json=fields).json()["choices"]]
    assert len(set(first)) > 1, first
    results: list[list[str]] = []

    def again() -> None:
        results.append([c["text"] for c in client.post("/v1/completions", json=fields).json()["choices"]])

    threads = [threading.Thread(target=again) for _ in range(3)]  # batched with each other this time
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [first] * 3
    single = client.post("/v1/completions", json={**fields, "n": 1, "seed": 8}).json()["choices"][0]["text"]
    assert single == first[1]  # choice j samples with seed + j


def test_chat_n_streams_every_choice(client):
    fields = {"model": "a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2,
              "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    texts: dict[int, str] = {}
    roles, usage = set(), None
    with client.stream("POST", "/v1/chat/completions", json=fields) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if "role" in choice["delta"]:
                    roles.add(choice["index"])
                texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert roles == {0, 1} and len(texts) == 2 and texts[0] == texts[1] and usage["completion_tokens"] == 8


@pytest.mark.parametrize("fields", [{"n": 17}, {"n": 0}, {"n": 2, "prompt": ["hi"] * 65}])
def test_too_many_choices_get_400(client, fields):
    response = client.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2, **fields})
    assert response.status_code == 400, response.text
