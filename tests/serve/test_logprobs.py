"""Log-probabilities in OpenAI's shapes: ``logprobs: N`` on completions, ``logprobs`` / ``top_logprobs`` on chat,
whole and streamed, each equal to the log-softmax of a plain forward of the same model and adapter over the prompt
and the tokens generated so far (to 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import PROMPTS, complete


def _plain_logprobs(reference, tokenizer, prompt_ids: list[int], answer_ids: list[int], adapter: str | None
                    ) -> torch.Tensor:
    """``(len(answer), vocab)`` the log-softmax before each answer token, from one forward of prompt + answer."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                logits = reference(input_ids=ids).logits[0]
        else:
            reference.set_adapter(adapter)
            logits = reference(input_ids=ids).logits[0]
    start = len(prompt_ids) - 1
    return torch.log_softmax(logits[start:start + len(answer_ids)].float(), dim=-1)


@pytest.mark.parametrize("model, adapter", [("base", None), ("a", "a")])
def test_completion_logprobs_equal_a_plain_forward(client, reference, smollm2_tokenizer, model, adapter):
    body = complete(client, model, PROMPTS[1], max_tokens=6, logprobs=3, ignore_eos=True)
    logprobs = body["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(logprobs["tokens"]) == body["choices"][0]["text"]
    assert logprobs["text_offset"] == [sum(map(len, logprobs["tokens"][:i])) for i in range(6)]
    prompt_ids = smollm2_tokenizer(PROMPTS[1])["input_ids"]
    answer_ids = _greedy_ids(reference, smollm2_tokenizer, prompt_ids, adapter, 6)
    plain = _plain_logprobs(reference, smollm2_tokenizer, prompt_ids, answer_ids, adapter)
    for step, (token, value, top) in enumerate(zip(answer_ids, logprobs["token_logprobs"], logprobs["top_logprobs"])):
        assert value == pytest.approx(float(plain[step, token]), abs=1e-5)
        best = plain[step].topk(3)
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-5)
        assert list(top) == [smollm2_tokenizer.decode([i]) for i in best.indices.tolist()]
        assert value == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the chosen token is the best


def _greedy_ids(reference, tokenizer, prompt_ids: list[int], adapter: str | None, n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                out = reference.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        else:
            reference.set_adapter(adapter)
            out = reference.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def test_logprobs_zero_gives_the_chosen_tokens_only_and_none_when_not_asked(client):
    body = complete(client, "a", PROMPTS[0], max_tokens=4, logprobs=0, ignore_eos=True)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == 4 and logprobs["top_logprobs"] == [{}] * 4
    assert all(v <= 0 for v in logprobs["token_logprobs"])
    assert complete(client, "a", PROMPTS[0], max_tokens=4)["choices"][0]["logprobs"] is None


def test_streamed_logprobs_add_up_to_the_whole_answer(client):
    fields = {"model": "b", "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0, "logprobs": 2,
              "ignore_eos": True}
    whole = client.post("/v1/completions", json=fields).json()["choices"][0]["logprobs"]
    with client.stream("POST", "/v1/completions", json={**fields, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    pieces = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"] is not None]
    joined = {key: [item for p in pieces for item in p[key]] for key in whole}
    assert joined["tokens"] == whole["tokens"] and joined["text_offset"] == whole["text_offset"]
    assert joined["token_logprobs"] == pytest.approx(whole["token_logprobs"], abs=1e-6)


def test_chat_logprobs_in_openai_shape(client, reference, smollm2_tokenizer):
    from lorakit.models.chat import prompt_ids

    messages = [{"role": "user", "content": "Say hi"}]
    response = client.post("/v1/chat/completions", json={"model": "a", "messages": messages, "max_tokens": 5,
                                                         "temperature": 0, "logprobs": True, "top_logprobs": 2,
                                                         "ignore_eos": True})
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert item["bytes"] == list(item["token"].encode()) and len(item["top_logprobs"]) == 2
        assert set(item["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    ids = prompt_ids(smollm2_tokenizer, messages)
    answer = _greedy_ids(reference, smollm2_tokenizer, ids, "a", 5)
    plain = _plain_logprobs(reference, smollm2_tokenizer, ids, answer, "a")
    assert [c["logprob"] for c in content] == pytest.approx([float(plain[i, t]) for i, t in enumerate(answer)],
                                                            abs=1e-5)
    streamed = []
    with client.stream("POST", "/v1/chat/completions", json={"model": "a", "messages": messages, "max_tokens": 5,
                                                             "temperature": 0, "logprobs": True, "stream": True,
                                                             "ignore_eos": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                streamed += lp["content"] if lp else []
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    assert all(c["top_logprobs"] == [] for c in streamed)  # logprobs without top_logprobs: the chosen only


@pytest.mark.parametrize("path, fields, message", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
])
def test_bad_logprobs_fields_get_400_naming_them(client, path, fields, message):
    base = {"model": "a", "max_tokens": 2}
    base.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    response = client.post(path, json={**base, **fields})
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
