"""The HTTP API (lorakit/serve/api.py, routes.py, protocol.py): OpenAI's endpoints and vLLM's adapter endpoints
over real HTTP, their answers checked against ``generate``, their streams, and their errors."""

from __future__ import annotations

import json

import pytest

from .conftest import PROMPTS, complete, greedy

# -- answers ----------------------------------------------------------------------------------------------

def test_completions_equal_generate_for_base_and_adapters(client, reference, smollm2_tokenizer):
    texts = {}
    for model, adapter in [("base", None), ("a", "a"), ("b", "b")]:
        body = complete(client, model, PROMPTS[1], max_tokens=12)
        choice = body["choices"][0]
        assert choice["text"] == greedy(reference, smollm2_tokenizer, PROMPTS[1], adapter, 12)
        assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 12
        assert body["model"] == model and body["object"] == "text_completion"
        texts[model] = choice["text"]
    assert len(set(texts.values())) == 3, "the adapters must change the answer, or this test proves nothing"


def test_chat_equals_lorakit_generate(client, root, tiny_llama_dir):
    from lorakit.workflows.inference import generate

    for model, adapter in [("base", None), ("a", root / "a"), ("b", root / "b")]:
        response = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 10,
            "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        expected = generate("Say hi", adapter=adapter, model=tiny_llama_dir, max_new_tokens=10)
        assert body["choices"][0]["message"]["content"].strip() == expected


def test_chat_streams_server_sent_events(client):
    request = {"model": "a", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Say hi"}],
               "max_tokens": 10, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len(chunks) >= 4, "the text must arrive in pieces"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    # OpenAI's last chunk: an empty delta with the finish reason; none before it has one
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_completion_stream_with_usage(client):
    request = {"model": "b", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    whole = complete(client, **request)["choices"][0]["text"]
    with client.stream("POST", "/v1/completions",
                       json={**request, "stream": True, "stream_options": {"include_usage": True}}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])


def test_models_lists_the_base_and_adapters(client, root):
    data = client.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids[0] == "base" and {"a", "b"} <= set(ids)
    assert {m["id"]: m["parent"] for m in data}["a"] == "base"


# -- adapters at runtime ----------------------------------------------------------------------------------

def test_load_use_unload_then_404(client, reference, smollm2_tokenizer):
    # Under another name than its folder's (a request naming the folder itself would load it on demand)
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "copy", "lora_path": "c"})
    assert response.status_code == 200, response.text
    assert "copy" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    # c holds a's weights, so it answers as a does
    assert complete(client, "copy", PROMPTS[0], max_tokens=8)["choices"][0]["text"] == \
        greedy(reference, smollm2_tokenizer, PROMPTS[0], "a", 8)
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "copy"}).status_code == 200
    gone = client.post("/v1/completions", json={"model": "copy", "prompt": "x", "max_tokens": 2})
    assert gone.status_code == 404 and "copy" in gone.json()["error"]["message"]
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "copy"}).status_code == 404
    assert "copy" not in [m["id"] for m in client.get("/v1/models").json()["data"]]


# -- client mistakes: 4xx, never 500, and the server goes on ----------------------------------------------

@pytest.mark.parametrize(("path", "payload", "status"), [
    ("/v1/completions", b'{"model": "a", "prompt": ', 400),  # malformed JSON
    ("/v1/completions", b'{"model": "a", "prompt": "\xff"}', 400),  # not UTF-8
    ("/v1/completions", {"prompt": "hi"}, 400),  # no model
    ("/v1/completions", {"model": "a", "prompt": 5}, 400),  # a number for a prompt
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 65}, 400),  # above --max-tokens 64
    ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "a", "prompt": "word " * 1100, "max_tokens": 4}, 400),  # past the 1024 context
    ("/v1/completions", {"model": "a", "prompt": "", "max_tokens": 4}, 400),
    ("/v1/completions", {"model": "a", "prompt": "hi", "temperature": -1}, 400),
    ("/v1/completions", {"model": "a", "prompt": "hi", "top_p": 0}, 400),
    ("/v1/completions", {"model": "a", "prompt": "hi", "n": 17}, 400),
    ("/v1/completions", {"model": "a", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/v1/completions", {"model": "a", "prompt": "hi", "seed": 2**70, "max_tokens": 2}, 200),  # any int seeds
    ("/v1/completions", {"model": "a", "prompt": "hi", "temperature": 1e-40, "max_tokens": 2}, 200),  # greedy
    ("/v1/chat/completions", {"model": "a", "messages": []}, 400),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, 403),  # outside the root
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "a/../../x"}, 403),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "corrupt"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "missing"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "bad\u0000path"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "listconfig"}, 400),  # adapter_config.json: []
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "dora"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "nan"}, 400),  # NaN and inf in its tensors
    ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "b"}, 400),  # the name is taken
    ("/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "b"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "base", "lora_path": "b"}, 400),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404),
])
def test_client_mistakes_get_4xx_and_the_server_keeps_serving(client, path, payload, status):
    if isinstance(payload, bytes):
        response = client.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=payload)
    assert response.status_code == status, response.text
    if status != 200:
        assert response.json()["error"]["message"], "the error must say what is wrong"
    assert complete(client, "a", PROMPTS[0], max_tokens=2)["choices"][0]["finish_reason"] == "length"
    assert "x" not in client.engine.adapters, "a failed load must register nothing"


def test_a_body_over_the_default_limit_gets_413(client):
    body = b'{"model": "a", "prompt": "' + b"a" * 2**20 + b'"}'  # just over 1 MiB
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and str(2**20) in response.json()["error"]["message"]
    assert complete(client, "a", PROMPTS[0], max_tokens=2)["choices"][0]["finish_reason"] == "length"


# -- health and metrics -----------------------------------------------------------------------------------

def test_health_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    complete(client, "a", PROMPTS[0], max_tokens=3)
    text = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["lorakit_requests_total"] >= 1 and values["lorakit_generation_tokens_total"] >= 3
    for gauge in ("queue_depth", "running", "generation_tokens_per_second", "adapters_resident"):
        assert f"lorakit_{gauge}" in values
