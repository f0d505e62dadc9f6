"""Evaluation: exact match of greedy generations, loss/perplexity for language models, accuracy/F1 for classifiers.

All of it runs under ``torch.no_grad()`` in eval mode and restores the model's training mode afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .data import prompt_ids


@contextmanager
def _evaluating(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def generate_texts(model: torch.nn.Module, tokenizer: Any, chats: Sequence[Sequence[dict[str, str]]],
                   max_new_tokens: int = 64, batch_size: int = 16, progress: Callable | None = None) -> list[str]:
    """Greedy completions of chat prompts (the assistant's next turn), batched with left padding."""
    prompts = [prompt_ids(tokenizer, chat) for chat in chats]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Batches of similar length waste less on padding; the order of the answers is restored at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: dict[int, str] = {}
    with _evaluating(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            device = next(model.parameters()).device
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for row, i in enumerate(idx):
                outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
            if progress is not None:
                progress(len(idx))
    return [outputs[i] for i in range(len(prompts))]


def exact_match(model: torch.nn.Module, tokenizer: Any, records: Sequence[dict], max_new_tokens: int = 64,
                batch_size: int = 16, progress: Callable | None = None) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on chat records whose last message is the reference answer.

    Returns:
        ``exact_match`` (fraction), ``n`` and a few ``samples`` (prompt, reference, prediction).
    """
    chats = [r["messages"][:-1] for r in records]
    references = [r["messages"][-1]["content"].strip() for r in records]
    predictions = generate_texts(model, tokenizer, chats, max_new_tokens, batch_size, progress)
    hits = [p == ref for p, ref in zip(predictions, references)]
    samples = [{"prompt": c[-1]["content"], "reference": ref, "prediction": p}
               for c, ref, p in list(zip(chats, references, predictions))[:3]]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": samples}


def lm_loss(loss_fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]], model: torch.nn.Module,
            batches: Sequence[dict[str, torch.Tensor]], progress: Callable[[int], Any] | None = None
            ) -> dict[str, float]:
    """Mean token loss and perplexity over ``batches``; ``loss_fn(batch)`` returns ``(loss sum, token count)``.
    ``progress(n)`` is told each batch's examples."""
    total, count = 0.0, 0
    with _evaluating(model):
        for batch in batches:
            loss_sum, n = loss_fn(batch)
            total += loss_sum.item()
            count += int(n)
            if progress is not None:
                progress(len(batch["input_ids"]))
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


def classification(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], n_labels: int,
                   progress: Callable[[int], Any] | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 of a sequence classifier over ``batches`` (each with ``labels``). ``progress(n)`` is
    told each batch's examples."""
    predictions, labels = [], []
    with _evaluating(model):
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            predictions.append(model(**inputs).logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
            if progress is not None:
                progress(len(batch["labels"]))
    pred, gold = torch.cat(predictions), torch.cat(labels)
    f1s = []
    for c in range(n_labels):
        tp = ((pred == c) & (gold == c)).sum().item()
        fp = ((pred == c) & (gold != c)).sum().item()
        fn = ((pred != c) & (gold == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": (pred == gold).float().mean().item(), "f1": sum(f1s) / n_labels, "n": len(gold)}

