"""Token classification (``--task token_cls``, PEFT's ``TOKEN_CLS``): one tag per word (named entities, parts of
speech), words split into subword tokens, the loss and the predictions on each word's first token.

Data is JSONL (or a JSON array) of ``{"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O",
"B-LOC"]}``: the words of a sentence and one tag each (strings or integers). A word's tag goes on its first subword
token; its other subwords and the special tokens get :data:`~lorakit.training.data.IGNORE`, as transformers'
token-classification examples align them, so each word counts once in the loss and in the metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import InvalidValue
from ..data import (
    IGNORE,
    DataError,
    DataSource,
    locate,
    pad_encodings,
    read_records,
)
from ..labels import HEADS, adapter_classes, save_labels
from ..loss import LossResult
from ..metrics import run_eval, tagging_scores
from ..options import TrainConfig
from ..registry import register
from .base import MicroBatch, Task
from .loading import (
    AUTO_CLASSES,
    Start,
    data_name,
    limit,
    load_model,
    prepare_model,
    progress_bar,
    read_split,
    sources,
)

TOKENS_FIELD, TAGS_FIELD = "tokens", "tags"


@dataclass(frozen=True)
class Sentence:
    """One tokenized sentence: the model's inputs and a label per token (IGNORE except on first subwords)."""

    encoding: dict[str, list[int]]  # input_ids, attention_mask (and token_type_ids where the model has them)
    labels: list[int]

    @property
    def n_words(self) -> int:
        """Words that kept their first token within ``max_length``: those trained and evaluated on."""
        return sum(y != IGNORE for y in self.labels)


def read_tagged(path: str | Path | DataSource) -> list[tuple[int, list[str], list[str]]]:
    """``(line, words, tags)`` of a JSONL/JSON file of ``{"tokens": [...], "tags": [...]}`` records (integer tags
    are read as their decimal strings).

    Raises:
        DataError: A missing field, a field that is not a list of strings, or tags whose count differs from the
            words' (naming the file and line).
    """
    rows = []
    for lineno, record in read_records(path):
        where = locate(path, lineno)
        for field in (TOKENS_FIELD, TAGS_FIELD):
            if field not in record:
                raise DataError(f"{where}: missing field {field!r} (fields: {', '.join(record)}); a token_cls record "
                                f"is {{\"tokens\": [words], \"tags\": [one tag per word]}}")
        words, tags = record[TOKENS_FIELD], record[TAGS_FIELD]
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise DataError(f"{where}: {TOKENS_FIELD!r} must be a non-empty list of non-empty strings, got {words!r}")
        if not isinstance(tags, list) or not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in tags):
            raise DataError(f"{where}: {TAGS_FIELD!r} must be a list of strings or integers, got {tags!r}")
        if len(tags) != len(words):
            raise DataError(f"{where}: {len(tags)} tags for {len(words)} tokens; every token needs exactly one tag")
        rows.append((lineno, words, [str(t) for t in tags]))
    return rows


def tag_ids(rows: Sequence[tuple[int, list[str], list[str]]], path: str | Path | DataSource, labels: Sequence[str]
            ) -> list[list[int]]:
    """Each row's tags as class indices; an unknown tag names its line and the tags allowed."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for lineno, _, tags in rows:
        unknown = [t for t in tags if t not in index]
        if unknown:
            raise DataError(f"{locate(path, lineno)}: unknown tag {unknown[0]!r}; the tags are {', '.join(labels)}")
        out.append([index[t] for t in tags])
    return out


def encode_sentences(tokenizer: Any, words: Sequence[list[str]], tags: Sequence[list[int]], max_length: int
                     ) -> list[Sentence]:
    """Tokenize pre-split words (cut at ``max_length`` tokens) and put each word's tag on its first subword.

    Raises:
        ValueError: The tokenizer is not a fast one (the word of each token is needed).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidValue("token classification needs a fast (Rust) tokenizer to map tokens to words; this model's "
                           f"tokenizer is {type(tokenizer).__name__}")
    enc = tokenizer(list(words), is_split_into_words=True, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    sentences = []
    for row, row_tags in enumerate(tags):
        labels, previous = [], None
        for word in enc.word_ids(row):
            labels.append(IGNORE if word is None or word == previous else row_tags[word])
            previous = word
        sentences.append(Sentence({k: enc[k][row] for k in keys}, labels))
    return sentences


def collate_sentences(sentences: Sequence[Sentence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded sentences with their ``labels`` (padding is IGNORE)."""
    batch = pad_encodings([s.encoding for s in sentences], pad_id)
    labels = torch.full(batch["input_ids"].shape, IGNORE, dtype=torch.long)  # (B, L)
    for row, s in enumerate(sentences):
        labels[row, :len(s.labels)] = torch.tensor(s.labels)
    batch["labels"] = labels
    return batch


def token_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-token class scores ``(B, L, n_labels)``."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the labelled tokens (each word's first) and their count."""
    labels = batch["labels"]  # (B, L)
    selected = labels != IGNORE
    logits = token_logits(model, batch)  # (B, L, n_labels)
    return F.cross_entropy(logits[selected].float(), labels[selected], reduction="sum"), selected.sum()


def word_tags(logits: torch.Tensor, batch: dict[str, torch.Tensor], labels: Sequence[str]
              ) -> tuple[list[list[str]], list[list[str]]]:
    """(predicted, gold) tag names of every word of a batch, read at each word's first token."""
    predicted, gold = [], []
    best = logits.argmax(-1)  # (B, L)
    for row in range(len(best)):
        keep = batch["labels"][row] != IGNORE
        predicted.append([labels[i] for i in best[row][keep].tolist()])
        gold.append([labels[i] for i in batch["labels"][row][keep].tolist()])
    return predicted, gold


@register
class TokenClassificationTask(Task):
    """Token classification (``token_cls``, PEFT's ``TOKEN_CLS``): a tag per word, the classification head trained
    in full next to the adapter; token accuracy and, for IOB2/IOBES tags, seqeval's entity F1."""

    task_name = "token_cls"
    peft_task_type = "TOKEN_CLS"
    summary = "token_cls (tokens + tags JSONL)"
    headline_metric = "accuracy"
    labelled = True

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, start: Start) -> None:
        self.device = device
        train_rows, eval_rows = read_split(config, start, read_tagged)
        # The tags: a saved adapter's (its head was trained on them), else --labels, else the data's sorted tags.
        saved = adapter_classes(start.adapter) if start.adapter else None
        self.labels = saved or config.labels or sorted({t for _, _, tags in train_rows or eval_rows for t in tags})
        if len(self.labels) < 2:
            raise InvalidValue(f"{config.data}: only one tag ({self.labels[0]!r}); a tagger needs at least two")
        self.config = dataclasses.replace(config, labels=self.labels)  # saved as train_config.yaml
        train_from, eval_from = sources(config, start)
        train_y = tag_ids(train_rows, train_from or eval_from, self.labels)
        eval_rows = list(limit(eval_rows, config))
        eval_y = tag_ids(eval_rows, eval_from, self.labels)
        model, self.tokenizer = load_model(config, dtype, auto=AUTO_CLASSES["TOKEN_CLS"], supplied=HEADS,
                                      num_labels=len(self.labels))
        model.config.id2label = dict(enumerate(self.labels))
        model.config.label2id = {name: i for i, name in enumerate(self.labels)}
        self.pad = self.tokenizer.pad_token_id or 0
        self.train = encode_sentences(self.tokenizer, [w for _, w, _ in train_rows], train_y, config.max_length) \
            if train_rows else []
        held_out = encode_sentences(self.tokenizer, [w for _, w, _ in eval_rows], eval_y, config.max_length)
        self.model = prepare_model(config, model, "TOKEN_CLS", start).to(device)
        self.name = data_name(config, start)
        size = config.eval_batch_size
        self.eval_batches = [collate_sentences(held_out[i:i + size], self.pad) for i in range(0, len(held_out), size)]

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        sentences = [self.train[i] for i in indices]
        tensors = collate_sentences(sentences, self.pad)
        mask = tensors["attention_mask"]
        return MicroBatch(tensors, sum(s.n_words for s in sentences), int(mask.sum()), mask.sum(1).tolist())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        return LossResult(*token_loss(model, batch))

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        def tags(b: dict[str, torch.Tensor]) -> tuple[list[list[str]], list[list[str]], float, int]:
            logits = token_logits(model, b)  # (B, L, n_labels)
            keep = b["labels"] != IGNORE
            loss = F.cross_entropy(logits[keep].float(), b["labels"][keep], reduction="sum").item()
            return *word_tags(logits.cpu(), {"labels": b["labels"].cpu()}, self.labels), loss, int(keep.sum())

        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.eval_batches]
        n = sum(len(b["input_ids"]) for b in batches)
        with progress_bar(self.config.progress, n, f"accuracy ({label})") as bar:
            results = run_eval(model, batches, tags, progress=bar)
        predicted = [p for pred, _, _, _ in results for p in pred]
        gold = [g for _, ref, _, _ in results for g in ref]
        words = sum(count for _, _, _, count in results)
        return {"loss": sum(loss for _, _, loss, _ in results) / max(words, 1), **tagging_scores(predicted, gold),
                "labels": list(self.labels)}

    def save(self, model: nn.Module, out: Path) -> int:
        """The adapter (or model) and ``labels.json``: which tag each output of the head stands for."""
        saved = super().save(model, out)
        save_labels(out, self.labels)
        return saved
