"""The chunked linear cross-entropy, the causal-LM loss on padded and packed batches, and the classification loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama

from lorakit.training.data import IGNORE, Example, pack_batch, pad_batch
from lorakit.training.loss import causal_lm_loss, classification_loss, linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_linear_cross_entropy_matches_full_logits(chunk, weight_grad):
    torch.manual_seed(0)
    hidden = (0.5 * torch.randn(20, 16)).requires_grad_()
    weight = torch.randn(50, 16, requires_grad=weight_grad)
    targets = torch.randint(0, 50, (20,))
    ours = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    ref = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    (g_ours,) = torch.autograd.grad(3.0 * ours, hidden, retain_graph=True)
    (g_ref,) = torch.autograd.grad(3.0 * ref, hidden, retain_graph=True)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)
    if weight_grad:
        torch.testing.assert_close(torch.autograd.grad(ours, weight)[0], torch.autograd.grad(ref, weight)[0],
                                   rtol=1e-4, atol=1e-5)


def _examples(lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3:]  # a "prompt" third without loss
        out.append(Example(ids, labels[1:] + [IGNORE]))
    return out


def test_causal_lm_loss_equals_transformers_loss():
    model = tiny_llama()
    examples = _examples([9, 9, 9])
    batch = pad_batch(examples, pad_id=0)
    loss_sum, count = causal_lm_loss(model, batch)
    labels = batch["input_ids"].clone()  # HF shifts labels inside; rebuild the unshifted form
    labels[:, 1:] = batch["targets"][:, :-1]
    labels[:, 0] = IGNORE
    ref = model(input_ids=batch["input_ids"], labels=labels).loss
    torch.testing.assert_close(loss_sum / count, ref, rtol=1e-6, atol=1e-6)


def test_packing_gives_the_padded_loss_and_gradients():
    model = tiny_llama()
    examples = _examples([5, 11, 3, 8, 13])
    padded = pad_batch(examples, pad_id=0)
    packed = pack_batch(examples, max_length=24, pad_id=0)
    assert packed["input_ids"].shape[0] < len(examples)  # some rows really hold several examples
    params = [p for p in model.parameters()]
    results = []
    for batch in (padded, packed):
        loss_sum, count = causal_lm_loss(model, batch)
        loss = loss_sum / count
        results.append((loss, torch.autograd.grad(loss, params)))
    (loss_pad, grads_pad), (loss_pack, grads_pack) = results
    assert abs(loss_pad.item() - loss_pack.item()) <= 1e-5
    for a, b in zip(grads_pad, grads_pack):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packing_without_position_ids_would_leak_attention():
    """The check above has teeth: with plain positions the examples see each other and the loss changes."""
    model = tiny_llama()
    examples = _examples([5, 11, 3, 8, 13])
    packed = pack_batch(examples, max_length=24, pad_id=0)
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    a = causal_lm_loss(model, packed)[0]
    b = causal_lm_loss(model, leaky)[0]
    assert abs(a.item() - b.item()) > 1e-3


def test_evaluation_path_equals_the_training_path():
    torch.manual_seed(0)
    hidden, weight = torch.randn(30, 16, requires_grad=True), torch.randn(50, 16)
    targets = torch.randint(0, 50, (30,))
    with torch.no_grad():
        evaluated = linear_cross_entropy(hidden, weight, targets, chunk=7)
    torch.testing.assert_close(evaluated, linear_cross_entropy(hidden, weight, targets, chunk=7).detach())


def test_full_logits_path_keeps_packed_examples_apart():
    """GPT-2 is not on the plain-head list, so its loss goes through the full logits; packing must hold there too."""
    model = tiny_gpt2()
    examples = _examples([5, 11, 3, 8, 13])
    padded = causal_lm_loss(model, pad_batch(examples, pad_id=0))
    packed = causal_lm_loss(model, pack_batch(examples, max_length=24, pad_id=0))
    assert padded[1] == packed[1]
    assert abs(padded[0].item() - packed[0].item()) <= 1e-4 * padded[0].item()


def test_classification_loss_is_the_summed_cross_entropy_over_examples():
    model = tiny_bert_cls(num_labels=3)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 128, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.tensor([0, 2, 1, 2])}
    loss_sum, count = classification_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss_sum, F.cross_entropy(logits, batch["labels"], reduction="sum"))
    assert int(count) == 4
