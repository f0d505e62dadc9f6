"""Evaluation metrics: exact match of greedy answers (with a model whose answers are known), loss and perplexity,
accuracy and macro-F1 on hand-made logits; each in eval mode without gradients, the training mode restored."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorakit.training.loss import LossResult
from lorakit.training.metrics import classification, exact_match, generate_texts, lm_loss


class Echo(nn.Module):
    """A "model" whose greedy answer to a chat is the user's message in upper case, followed by EOS and padding.

    It checks what generate receives: prompts left-padded, with the attention mask marking the real tokens."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, do_sample, max_new_tokens, pad_token_id, eos_token_id):
        assert not self.training and not torch.is_grad_enabled() and do_sample is False
        self.calls.append({"rows": input_ids.shape[0], "max_new_tokens": max_new_tokens})
        answers = []
        for ids, mask in zip(input_ids, attention_mask):
            n = int(mask.sum())
            assert mask[-n:].all() and not mask[:-n].any() and (ids[:-n] == pad_token_id).all()  # left padding
            prompt = self.tokenizer.decode(ids[-n:])
            user = prompt.split("user\n")[-1].split("<|im_end|>")[0]
            answers.append(self.tokenizer.encode(user.upper(), add_special_tokens=False) + [eos_token_id])
        width = max(len(a) for a in answers)
        new = torch.tensor([a + [pad_token_id] * (width - len(a)) for a in answers])
        return torch.cat([input_ids, new], dim=1)


def _record(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_exact_match_compares_greedy_answers_with_the_references(smollm2_tokenizer):
    model = Echo(smollm2_tokenizer).train()
    records = [_record("a much longer question than the others", "A MUCH LONGER QUESTION THAN THE OTHERS"),
               _record("yes", "YES "),  # the reference is stripped
               _record("no", "nope"), _record("ok then", "OK THEN")]
    result = exact_match(model, smollm2_tokenizer, records, max_new_tokens=12, batch_size=3)
    assert result["exact_match"] == 0.75 and result["n"] == 4
    assert [c["rows"] for c in model.calls] == [3, 1] and model.calls[0]["max_new_tokens"] == 12
    assert result["samples"][2] == {"prompt": "no", "reference": "nope", "prediction": "NO"}  # in the given order
    assert model.training  # restored


def test_generate_texts_returns_the_answers_in_the_order_of_the_chats(smollm2_tokenizer):
    chats = [[{"role": "user", "content": text}] for text in ("three words here", "one", "two words")]
    texts = generate_texts(Echo(smollm2_tokenizer), smollm2_tokenizer, chats, batch_size=2)
    assert texts == ["THREE WORDS HERE", "ONE", "TWO WORDS"]


def test_lm_loss_is_the_mean_over_tokens_and_its_exponential():
    model = nn.Linear(2, 2).train()
    batches = [{"sum": torch.tensor(6.0), "n": torch.tensor(3)}, {"sum": torch.tensor(2.0), "n": torch.tensor(1)}]

    def loss_fn(batch):
        assert not model.training and not torch.is_grad_enabled()
        return LossResult(batch["sum"], batch["n"])

    result = lm_loss(loss_fn, model, batches)
    assert result == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2.0)), "tokens": 4}
    assert model.training
    assert lm_loss(lambda b: LossResult(torch.tensor(1e4), torch.tensor(1)), model, [{}])["perplexity"] == \
        math.exp(50.0)


class Fixed(nn.Module):
    """A classifier whose logits are given by hand, one row per example (looked up by input_ids[:, 0])."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None):
        assert not self.training and not torch.is_grad_enabled()
        return SimpleNamespace(logits=self.logits[input_ids[:, 0]])


def test_classification_accuracy_and_macro_f1_on_hand_made_logits():
    # predictions 0, 0, 1, 2, 2, 1 against labels 0, 1, 1, 2, 0, 1
    logits = torch.tensor([[5.0, 0, 0], [2, 1, 0], [0, 3, 1], [0, 0, 1], [0, 1, 4], [-1, 2, 1]])
    model = Fixed(logits).train()
    batches = [{"input_ids": torch.tensor([[0], [1], [2]]), "labels": torch.tensor([0, 1, 1])},
               {"input_ids": torch.tensor([[3], [4], [5]]), "labels": torch.tensor([2, 0, 1])}]
    result = classification(model, batches, n_labels=3)
    f1 = [2 * 1 / (2 * 1 + 1 + 1), 2 * 2 / (2 * 2 + 0 + 1), 2 * 1 / (2 * 1 + 1 + 0)]  # per class: 2tp/(2tp+fp+fn)
    assert result["accuracy"] == pytest.approx(4 / 6) and result["n"] == 6
    assert result["f1"] == pytest.approx(sum(f1) / 3)
    assert result["confusion"] == [[1, 0, 1], [1, 2, 0], [0, 0, 1]]  # [true][predicted], counted by hand
    assert model.training
    never = classification(Fixed(logits), batches, n_labels=4)  # a class never predicted nor present: F1 0
    assert never["f1"] == pytest.approx(sum(f1) / 4)
