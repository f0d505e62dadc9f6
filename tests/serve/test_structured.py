"""Structured output: ``response_format`` JSON schemas enforced while decoding.

The proof is 100 concurrent requests over the five schemas in ``schemas/`` (nested objects, enums, arrays with
bounds, required fields, patterns, a nullable field), spread over the base and two adapters, greedy and seeded, chat
and completions, streamed and not: every answer parses and validates with ``jsonschema``. The model is the tiny
random Llama, which left to itself writes no JSON at all, so each valid document is the grammar's doing.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from lorakit.serve import build_engine

from .conftest import PROMPTS, httpx, running

jsonschema = pytest.importorskip("jsonschema", reason="the structured-output tests need jsonschema (pip install "
                                                      "-e '.[dev]')")
pytest.importorskip("llguidance", reason="structured output needs llguidance (pip install -e '.[serve]')")

SCHEMAS = {path.stem: json.loads(path.read_text())
           for path in sorted((Path(__file__).parent / "schemas").glob("*.json"))}
MODELS = ["base", "a", "b"]


def json_schema(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, root):
    """A server whose answers may be long enough for every schema's longest document."""
    engine = build_engine(tiny_llama_dir, {"a": root / "a", "b": root / "b"}, served_model_name="base",
                          max_adapters=2, max_tokens=400, max_batch_size=32)
    with running(engine) as client:
        client.engine = engine
        yield client


async def ask(http: httpx.AsyncClient, i: int) -> tuple[str, dict, str, str]:
    """Request i of the hundred: (schema name, the request body, the text answered, its finish reason)."""
    name = list(SCHEMAS)[i % len(SCHEMAS)]
    body = {"model": MODELS[i % len(MODELS)], "max_tokens": 400, "response_format": json_schema(name),
            **({"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": i})}
    chat = i % 4 < 2
    if chat:
        body["messages"] = [{"role": "user", "content": f"Give me a {name} as JSON."}]
    else:
        body["prompt"] = PROMPTS[i % len(PROMPTS)]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if i % 3 == 0:  # streamed: the pieces must add up to the document
        text, finish = "", None
        async with http.stream("POST", path, json={**body, "stream": True}) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += (choice["delta"].get("content") or "") if chat else choice["text"]
                    finish = choice["finish_reason"] or finish
        return name, body, text, finish
    response = await http.post(path, json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return name, body, choice["message"]["content"] if chat else choice["text"], choice["finish_reason"]


def test_hundred_requests_over_five_schemas_all_validate(server):
    async def hundred():
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=300,
                                     limits=httpx.Limits(max_connections=110)) as http:
            return await asyncio.gather(*(ask(http, i) for i in range(100)))

    mixed_before = server.engine.stats.mixed_forwards
    answers = asyncio.run(hundred())
    for name, body, text, finish in answers:
        assert finish == "stop", (name, body["model"], text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])  # raises, naming the field, when it does not
    assert len({name for name, *_ in answers}) == 5
    # The requests ran together: batches mixed adapters (and so, rows with different grammars).
    assert server.engine.stats.mixed_forwards > mixed_before
    assert server.engine.stats.largest_batch > 16
    assert "lorakit_grammar_mask_seconds_total" in server.get("/metrics").text
    assert server.engine.stats.grammar_seconds > 0


def test_rows_without_a_schema_beside_structured_rows_are_unchanged(server):
    """A batch that mixes free and structured rows masks only the structured ones."""
    free = [{"model": m, "prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            for m, p in zip(MODELS, PROMPTS)]
    alone = [server.post("/v1/completions", json=body).json()["choices"][0]["text"] for body in free]

    async def together():
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=300) as http:
            structured = [http.post("/v1/completions", json={**body, "response_format": json_schema("tags")})
                          for body in free]
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for body in free), *structured)

    answers = [r.json()["choices"][0]["text"] for r in asyncio.run(together())]
    assert answers[:len(free)] == alone
    for text in answers[len(free):]:
        assert text.startswith('{"topic": "')


def test_seeded_structured_answers_repeat(server):
    body = {"model": "a", "prompt": "An order:", "max_tokens": 400, "temperature": 1.0, "seed": 7,
            "response_format": json_schema("order")}
    first, second = (server.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2))
    assert first == second
    jsonschema.validate(json.loads(first), SCHEMAS["order"])


def test_json_object_is_any_object(server):
    body = {"model": "base", "messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 400,
            "temperature": 0, "response_format": {"type": "json_object"}}
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    if choice["finish_reason"] == "stop":  # an object may be longer than max_tokens; then it is cut, as OpenAI's
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["message"]["content"].startswith("{")


def test_text_format_changes_nothing(server):
    plain = {"model": "b", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
    texts = [server.post("/v1/completions", json={**plain, **extra}).json()["choices"][0]["text"]
             for extra in ({}, {"response_format": {"type": "text"}})]
    assert texts[0] == texts[1]


def test_logprobs_under_a_grammar_are_over_the_tokens_it_allows(server, base_model):
    """A structured row reports the model's distribution restricted to the tokens its grammar allows (as vLLM
    does): equal to the log-softmax of a plain forward's logits with the forbidden tokens at -inf."""
    import torch

    body = {"model": "base", "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0, "logprobs": 5,
            "response_format": json_schema("review")}
    logprobs = server.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    engine = server.engine
    grammar = engine.grammars.compile(json_schema("review"))
    ids = torch.tensor([engine.tokenizer(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        logits = base_model(input_ids=ids).logits[0, -1].float()
    allowed = engine.grammars.mask(logits[None], [engine.grammars.constraint(grammar)], engine.eos_ids)[0]
    expected = torch.log_softmax(allowed, -1)
    best = expected.topk(5)
    shown = {engine.tokenizer.decode([i]): v for i, v in zip(best.indices.tolist(), best.values.tolist())
             if v > float("-inf")}
    assert logprobs["top_logprobs"][0] == pytest.approx(shown, abs=1e-5)
    assert logprobs["token_logprobs"][0] == pytest.approx(float(expected.max()), abs=1e-5)
    assert all(token.startswith("{") for token in logprobs["top_logprobs"][0])  # forbidden tokens never listed
    assert all(math.isfinite(v) for top in logprobs["top_logprobs"] for v in top.values())


def test_n_choices_each_follow_the_schema(server):
    body = {"model": "a", "prompt": "Tags:", "max_tokens": 400, "temperature": 1.0, "seed": 3, "n": 4,
            "response_format": json_schema("tags")}
    choices = server.post("/v1/completions", json=body).json()["choices"]
    assert len(choices) == 4 and len({c["text"] for c in choices}) > 1  # one prefill, four matchers
    for choice in choices:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), SCHEMAS["tags"])


def test_a_scalar_document_ends_when_complete_even_with_ignore_eos(server):
    """A top-level integer up to 99 may end after one digit (then the end of sequence is allowed, and ends the row
    although ignore_eos is set) and must end after two: either way the row stops, it does not run to max_tokens."""
    body = {"model": "base", "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                "type": "integer", "minimum": 0, "maximum": 99}}}}
    choice = server.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and 0 <= json.loads(choice["text"]) <= 99


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, '"if", "then"'),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "/$defs/missing"),
])
def test_an_unsupported_schema_is_a_400_naming_the_feature(server, schema, named):
    for path, extra in (("/v1/completions", {"prompt": "x"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        body = {"model": "base", "max_tokens": 8, **extra,
                "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}}
        response = server.post(path, json=body)
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert "response_format" in message and named in message, message


@pytest.mark.parametrize(("response_format", "named"), [
    ({"type": "yaml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
    ("json", "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": [f"v{i}" for i in range(20000)]}}},
     "longer than 65536 bytes"),
])
def test_a_malformed_response_format_is_a_400_naming_it(server, response_format, named):
    body = {"model": "base", "prompt": "x", "max_tokens": 8, "response_format": response_format}
    response = server.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]["message"]


def test_a_4bit_base_serves_structured_output(llama64_dir):
    """Structured output on a base whose layers are NF4 (the grammar's vocabulary is the head's width, read from its
    out_features, not from a weight's shape, which a packed 4-bit layer changes)."""
    pytest.importorskip("bitsandbytes", reason="a 4-bit base needs bitsandbytes (pip install -e '.[qlora]')")
    engine = build_engine(llama64_dir, quantize="nf4", served_model_name="base", max_tokens=400)
    with running(engine) as client:
        body = {"model": "base", "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0,
                "response_format": json_schema("order")}
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["text"]), SCHEMAS["order"])
