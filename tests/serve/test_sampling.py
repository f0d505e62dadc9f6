"""Sampling and text output (lorakit/serve/sampling.py): seeded sampling that does not depend on the batch, stop
strings, and incremental decoding."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from lorakit.serve.sampling import TextStream

from .conftest import PROMPTS, complete


def test_seeded_sampling_repeats_alone_and_in_a_batch(client):
    request = {"model": "a", "prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    alone = complete(client, **request)["choices"][0]["text"]
    with ThreadPoolExecutor(6) as pool:
        crowd = list(pool.map(lambda m: complete(client, m, PROMPTS[2], max_tokens=12, temperature=1.0, seed=1),
                              ["base", "a", "b", "a", "b"]))
        again = pool.submit(complete, client, **request)
        assert again.result()["choices"][0]["text"] == alone
    assert len(crowd) == 5
    other = complete(client, **{**request, "seed": 8})["choices"][0]["text"]
    greedy_text = complete(client, **{**request, "temperature": 0})["choices"][0]["text"]
    assert len({alone, other, greedy_text}) > 1, "sampling must depend on the seed"


def test_stop_string_cuts_the_text(client):
    full = complete(client, "b", PROMPTS[1], max_tokens=12)["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    body = complete(client, "b", PROMPTS[1], max_tokens=12, stop=[stop])
    assert body["choices"][0]["text"] == full[:full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_text_stream_holds_back_partial_stop_strings(smollm2_tokenizer):
    ids = smollm2_tokenizer("Hello world, END of story")["input_ids"]
    stream = TextStream(smollm2_tokenizer, ["END"])
    pieces = [stream.add(t) for t in ids]
    assert stream.stopped and "".join(pieces) == "Hello world, "
    plain = TextStream(smollm2_tokenizer, [])
    assert "".join(plain.add(t) for t in ids) + plain.flush() == "Hello world, END of story"
    # a stop string split across tokens, and characters split across tokens (byte-level BPE)
    text = "Grüße aus Köln 😀 and ### more"
    ids = smollm2_tokenizer(text)["input_ids"]
    split = TextStream(smollm2_tokenizer, ["###"])
    pieces = [split.add(t) for t in ids]
    assert "".join(pieces) == "Grüße aus Köln 😀 and " and "\ufffd" not in "".join(pieces)
    whole = TextStream(smollm2_tokenizer, [])
    assert "".join(whole.add(t) for t in ids) + whole.flush() == smollm2_tokenizer.decode(ids)
