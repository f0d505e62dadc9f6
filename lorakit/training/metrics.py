"""Evaluation: exact match of greedy generations, loss/perplexity for language models, accuracy/F1 for classifiers,
SQuAD's exact match/F1 for extractive QA, token accuracy and seqeval's entity F1 for token classification.

All of it runs under ``torch.no_grad()`` in eval mode and restores the model's training mode afterwards.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..core.errors import InvalidValue
from ..models.chat import prompt_ids
from .loss import LossResult


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
                batch_size: int = 16, progress: Callable | None = None, keep_predictions: bool = False
                ) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on chat records whose last message is the reference answer.

    Returns:
        ``exact_match`` (fraction), ``n`` and a few ``samples`` (prompt, reference, prediction); with
        ``keep_predictions`` also every greedy answer, in order (``predictions``).
    """
    chats = [r["messages"][:-1] for r in records]
    references = [r["messages"][-1]["content"].strip() for r in records]
    predictions = generate_texts(model, tokenizer, chats, max_new_tokens, batch_size, progress)
    hits = [p == ref for p, ref in zip(predictions, references)]
    samples = [{"prompt": c[-1]["content"], "reference": ref, "prediction": p}
               for c, ref, p in list(zip(chats, references, predictions))[:3]]
    found = {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": samples}
    return {**found, "predictions": predictions} if keep_predictions else found


def lm_loss(loss_fn: Callable[[dict[str, torch.Tensor]], LossResult], model: torch.nn.Module,
            batches: Sequence[dict[str, torch.Tensor]], progress: Callable[[int], Any] | None = None
            ) -> dict[str, float]:
    """Mean token loss and perplexity over ``batches``; ``loss_fn(batch)`` returns the loss sum and token
    count as a :class:`~lorakit.training.loss.LossResult`.
    ``progress(n)`` is told each batch's examples."""
    total, count = 0.0, 0
    with _evaluating(model):
        for batch in batches:
            result = loss_fn(batch)
            total += result.sum.item()
            count += int(result.count)
            if progress is not None:
                progress(len(batch["input_ids"]))
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


def classification(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], n_labels: int,
                   progress: Callable[[int], Any] | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 and the confusion matrix of a sequence classifier over ``batches`` (each with
    ``labels``). ``progress(n)`` is told each batch's examples.

    Returns:
        ``accuracy``, ``f1``, ``n`` and ``confusion``: ``confusion[i][j]`` examples of class ``i`` predicted as ``j``.
    """
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
    confusion = torch.zeros(n_labels, n_labels, dtype=torch.long)
    confusion.index_put_((gold, pred), torch.ones_like(gold), accumulate=True)
    return {"accuracy": (pred == gold).float().mean().item(), "f1": sum(f1s) / n_labels, "n": len(gold),
            "confusion": confusion.tolist()}



def run_eval(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]],
             fn: Callable[[dict[str, torch.Tensor]], Any], progress: Callable[[int], Any] | None = None) -> list[Any]:
    """``fn(batch)`` for every batch, in eval mode without gradients (the training mode is restored after), for
    evaluations that need more than a loss: the span scores of extractive QA, the tags of token classification,
    generated targets. ``progress(n)`` is told each batch's examples."""
    results = []
    with _evaluating(model):
        for batch in batches:
            results.append(fn(batch))
            if progress is not None:
                progress(len(batch["input_ids"]))
    return results


# -- extractive QA: SQuAD's exact match and F1 --------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # an unanswerable question: right only when both are empty
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 of predicted answers as SQuAD 2.0's official script computes them, as fractions.

    Each question scores its best match over its reference answers (after :func:`normalize_answer`); a question
    with no reference answer (unanswerable) counts the empty answer as its only reference, so predicting "" is right
    there and any text is wrong.

    Returns:
        ``exact_match`` and ``f1`` over all questions, ``n``, and where there are both kinds the same two split by
        ``has_answer_*`` / ``no_answer_*`` (with their counts).
    """
    if len(predictions) != len(references):
        raise InvalidValue(f"{len(predictions)} predictions for {len(references)} questions; one each is needed")
    em, f1 = [], []
    for prediction, golds in zip(predictions, references):
        golds = [g for g in golds if normalize_answer(g)] or [""]
        em.append(max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds))
        f1.append(max(_f1(prediction, g) for g in golds))
    n = len(em)
    scores: dict[str, float] = {"exact_match": sum(em) / max(n, 1), "f1": sum(f1) / max(n, 1), "n": n}
    answerable = [any(normalize_answer(g) for g in golds) for golds in references]
    if any(answerable) and not all(answerable):
        for key, keep in (("has_answer", True), ("no_answer", False)):
            rows = [i for i, a in enumerate(answerable) if a == keep]
            scores[f"{key}_exact_match"] = sum(em[i] for i in rows) / len(rows)
            scores[f"{key}_f1"] = sum(f1[i] for i in rows) / len(rows)
            scores[f"{key}_n"] = len(rows)
    return scores


# -- token classification: token accuracy and seqeval's entity F1 --------------------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
    """``B-PER`` → (``B``, ``PER``); ``O`` → (``O``, ``_``), as seqeval reads IOB2/IOBES tags."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The ``(type, first, last)`` entity spans of one sentence's IOB2/IOBES tags, read as seqeval's default
    (conlleval) mode does: an ``I-X`` after ``O`` or after another type starts an entity."""
    found, prev_tag, prev_type, begin = [], "O", "", 0
    for i, tag_text in enumerate([*tags, "O"]):
        tag, type_ = _split_tag(tag_text)
        if _chunk_ends(prev_tag, tag, prev_type, type_):
            found.append((prev_type, begin, i - 1))
        if _chunk_starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return found


def tagging_scores(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Token accuracy over words and, for IOB2/IOBES tags (``B-``/``I-``/``E-``/``S-`` prefixes), entity-level
    micro precision, recall and F1 as seqeval computes them by default: an entity counts when its type and both
    ends match.

    Args:
        predictions: Each sentence's predicted tags, one per word.
        references: Each sentence's gold tags, the same lengths.
    """
    if [len(p) for p in predictions] != [len(r) for r in references]:
        raise InvalidValue("every sentence needs one predicted tag per gold tag")
    words = sum(len(r) for r in references)
    right = sum(p == r for pred, ref in zip(predictions, references) for p, r in zip(pred, ref))
    scores: dict[str, float] = {"accuracy": right / max(words, 1), "words": words, "n": len(references)}
    if any(len(t) > 2 and t[1] == "-" and t[0] in "BIES" for ref in references for t in ref):
        gold = {(i, *e) for i, ref in enumerate(references) for e in entities(ref)}
        pred = {(i, *e) for i, p in enumerate(predictions) for e in entities(p)}
        hits = len(gold & pred)
        precision, recall = hits / len(pred) if pred else 0.0, hits / len(gold) if gold else 0.0
        scores.update(entity_precision=precision, entity_recall=recall,
                      entity_f1=2 * precision * recall / (precision + recall) if hits else 0.0)
    return scores
