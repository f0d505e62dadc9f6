"""The official ``openai`` Python client against the server, as an application calls it: chat and completions,
streaming with usage, log-probabilities, ``n``, structured output, an unknown adapter, a bad request, and the errors
it raises."""

from __future__ import annotations

from typing import Literal

import pytest

from .conftest import PROMPTS, complete

openai = pytest.importorskip("openai", reason="the client tests need openai (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def api(client) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", max_retries=0)


def test_models_and_chat(api, client):
    assert {"base", "a", "b"} <= {m.id for m in api.models.list().data}
    reply = api.chat.completions.create(model="a", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6,
                                        temperature=0)
    raw = client.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "Say hi"}],
                                                    "max_tokens": 6, "temperature": 0}).json()
    assert reply.choices[0].message.content == raw["choices"][0]["message"]["content"]
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 6


def test_completions_with_logprobs_and_n(api, client):
    reply = api.completions.create(model="b", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=2, n=2,
                                   extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1] and reply.choices[0].text == reply.choices[1].text
    assert reply.choices[0].text == complete(client, "b", PROMPTS[1], max_tokens=5, ignore_eos=True)["choices"][0][
        "text"]
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 5 and all(len(t) == 2 for t in logprobs.top_logprobs)
    assert reply.usage.prompt_tokens == len(client.engine.tokenizer(PROMPTS[1])["input_ids"])


def test_streaming_with_usage_and_chat_logprobs(api):
    stream = api.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hello"}],
                                         max_tokens=5, temperature=0, stream=True, logprobs=True, top_logprobs=1,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, tokens, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                tokens += [t.token for t in choice.logprobs.content]
    assert usage.completion_tokens == 5 and len(tokens) == 5 and "".join(tokens) == text


def test_an_unknown_adapter_and_a_bad_request_raise_the_clients_errors(api):
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="nope", prompt="Hi", max_tokens=2)
    assert "nope" in missing.value.message and missing.value.body["code"] == 404
    assert set(missing.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model="a", prompt="Hi", max_tokens=2, temperature=5)
    assert "temperature" in bad.value.message
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        api.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)


def test_structured_output_parses_into_the_applications_class(api):
    """``chat.completions.parse`` with a pydantic class: the client sends its strict JSON schema as
    ``response_format`` and parses the answer back into the class."""
    import pydantic

    class Order(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=12)
        size: Literal["small", "medium", "large"]
        quantity: int = pydantic.Field(ge=1, le=9)
        extras: list[Literal["milk", "sugar", "ice"]] = pydantic.Field(max_length=2)

    reply = api.chat.completions.parse(model="a", messages=[{"role": "user", "content": "An order, please"}],
                                       response_format=Order, max_tokens=60, temperature=0)
    order = reply.choices[0].message.parsed
    assert isinstance(order, Order) and reply.choices[0].finish_reason == "stop"
    assert order == Order.model_validate_json(reply.choices[0].message.content)
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        api.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                                        "type": "array", "uniqueItems": True}}})
