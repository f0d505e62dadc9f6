"""The running batch (lorakit/serve/batch.py): left padding, rows joining and leaving without changing any row's
logits, and how a row turns tokens into events."""

from __future__ import annotations

import torch

from lorakit.serve import Event, Request, SamplingParams
from lorakit.serve.batch import Batch, Row, left_padded
from lorakit.serve.kv_cache import new_cache
from lorakit.serve.sampling import TextStream

from .conftest import last_logits

CPU = torch.device("cpu")


def ignore(event: Event) -> None:
    pass


def row(prompt: list[int], tokenizer=None, **sampling) -> Row:
    return Row(Request(prompt, None, SamplingParams(**sampling), ignore), TextStream(tokenizer, []),
               torch.Generator(), position=len(prompt))


def alone(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """The next-token logits ``(vocab,)`` of ``tokens`` run by themselves, without padding or cache."""
    return last_logits(model, torch.tensor([tokens]), new_cache(model))[0]


def join_prefilled(model: torch.nn.Module, batch: Batch, prompts: list[list[int]]) -> None:
    """Prefill ``prompts`` as the scheduler does and join their rows to ``batch``."""
    ids, mask, positions = left_padded(prompts, pad_id=0)
    cache = new_cache(model)
    last_logits(model, ids, cache, mask, positions)
    batch.join([row(p) for p in prompts], cache, mask)


def decode(model: torch.nn.Module, batch: Batch, tokens: list[int]) -> torch.Tensor:
    """One decoding step that feeds ``tokens[i]`` to row i, as the scheduler's step does."""
    for r, token in zip(batch.rows, tokens):
        r.pending = token
    ids, positions = batch.next_inputs(CPU)
    logits = last_logits(model, ids, batch.cache, batch.mask, positions)
    for r in batch.rows:
        r.position += 1
    return logits


def test_left_padded_prompts_end_in_the_last_column():
    ids, mask, positions = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]], "left padding does not shift positions"


def test_rows_that_join_and_leave_decode_as_they_would_alone(base_model):
    prompts = [[5, 17, 42, 99, 7, 3], [11, 12], [64, 8, 30, 2]]
    histories = [list(p) for p in prompts]
    batch = Batch()
    join_prefilled(base_model, batch, prompts[:1])
    join_prefilled(base_model, batch, prompts[1:])  # narrower: padded on the left to the running batch's width
    assert batch.mask.sum(1).tolist() == [6, 2, 4] and batch.mask.shape == (3, 6)
    for step in range(2):
        tokens = [20 + step, 40 + step, 60 + step]
        logits = decode(base_model, batch, tokens)
        for history, token in zip(histories, tokens):
            history.append(token)
        expected = torch.stack([alone(base_model, h) for h in histories])
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert batch.busy() == set() and batch.adapters() == [None, None, None]
    batch.keep([1, 2])  # the longest row leaves; the two columns only it used go with it
    assert batch.mask.shape == (2, 6) and bool(batch.mask[:, 0].any())
    logits = decode(base_model, batch, [41, 61])
    expected = torch.stack([alone(base_model, histories[1] + [41]), alone(base_model, histories[2] + [61])])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    batch.keep([])
    assert batch.rows == [] and batch.cache is None and batch.mask is None


def test_a_row_ends_at_max_tokens_or_end_of_sequence(smollm2_tokenizer):
    ids = smollm2_tokenizer("Hello world, how are you")["input_ids"]
    counted = row([1], smollm2_tokenizer, max_tokens=len(ids))
    events = [counted.add(token, eos_ids={0}) for token in ids]
    assert not any(e.final for e in events[:-1] if e is not None)
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == len(ids)
    assert "".join(e.text for e in events if e is not None) == "Hello world, how are you"

    eos = row([1], smollm2_tokenizer, max_tokens=8)
    assert eos.add(ids[0], eos_ids={0}) is not None and eos.pending == ids[0]
    final = eos.add(0, eos_ids={0})
    assert final.finish_reason == "stop" and final.prompt_tokens == 1 and final.completion_tokens == 2
    ignoring = row([1], smollm2_tokenizer, max_tokens=8, ignore_eos=True)
    event = ignoring.add(0, eos_ids={0})
    assert (event is None or not event.final) and ignoring.pending == 0, "ignore_eos generates on"
