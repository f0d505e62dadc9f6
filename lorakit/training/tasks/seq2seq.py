"""Encoder-decoder training (``--task seq2seq``, PEFT's ``SEQ_2_SEQ_LM``): input/target pairs, their batches, the loss
on the target and greedy generation, for T5/BART-style models.

The encoder reads the input; the decoder is fed the target shifted right by one (its start token first) and
predicts each target token, so the loss is on the target and nothing else. Padding of the targets is
:data:`~lorakit.training.data.IGNORE` and takes no loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    read_records,
)
from ..loss import LossResult
from ..metrics import lm_loss, run_eval
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
)

INPUT_FIELD, TARGET_FIELD = "input", "target"


@dataclass(frozen=True)
class Pair:
    """One tokenized input/target pair, and its reference: the target as the tokenizer reads it back (cut at
    ``max_length``, lower-cased by an uncased tokenizer), which generated text is compared with."""

    input_ids: list[int]
    labels: list[int]
    target: str
    prompt: str  # the input text, for samples

    def __len__(self) -> int:
        return len(self.input_ids) + len(self.labels)


def read_pairs(path: str | Path | DataSource) -> list[tuple[int, str, str]]:
    """``(line, input, target)`` of a JSONL file (or a JSON array) of ``{"input": ..., "target": ...}`` records.

    Raises:
        DataError: A missing field, a field that is not a string, or an empty one (naming the file and line).
    """
    rows = []
    for lineno, record in read_records(path):
        for field in (INPUT_FIELD, TARGET_FIELD):
            if field not in record:
                raise DataError(f"{locate(path, lineno)}: missing field {field!r} (fields: {', '.join(record)}); a "
                                f"seq2seq record is {{\"input\": ..., \"target\": ...}}")
            if not isinstance(record[field], str) or not record[field].strip():
                raise DataError(f"{locate(path, lineno)}: {field!r} must be a non-empty string, got {record[field]!r}")
        rows.append((lineno, record[INPUT_FIELD], record[TARGET_FIELD]))
    return rows


def encode_pairs(tokenizer: Any, rows: Sequence[tuple[int, str, str]], max_length: int) -> list[Pair]:
    """Token ids of inputs and targets (each cut at ``max_length``), with the tokenizer's special tokens: T5's and
    BART's tokenizers end both with EOS, which the decoder learns to stop on."""
    if not rows:
        return []
    inputs = tokenizer([i for _, i, _ in rows], truncation=True, max_length=max_length)["input_ids"]
    targets = tokenizer(text_target=[t for _, _, t in rows], truncation=True, max_length=max_length)["input_ids"]
    return [Pair(i, t, tokenizer.decode(t, skip_special_tokens=True).strip(), text)
            for i, t, (_, text, _) in zip(inputs, targets, rows)]


def pad_pairs(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs with their attention mask, and right-padded labels (padding is IGNORE)."""
    width_in = max(len(p.input_ids) for p in pairs)
    width_out = max(len(p.labels) for p in pairs)
    ids = torch.full((len(pairs), width_in), pad_id, dtype=torch.long)  # (B, S)
    mask = torch.zeros((len(pairs), width_in), dtype=torch.long)  # (B, S)
    labels = torch.full((len(pairs), width_out), IGNORE, dtype=torch.long)  # (B, T)
    for row, p in enumerate(pairs):
        ids[row, :len(p.input_ids)] = torch.tensor(p.input_ids)
        mask[row, :len(p.input_ids)] = 1
        labels[row, :len(p.labels)] = torch.tensor(p.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def seq2seq_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the target tokens and their count.

    The decoder's inputs are the labels shifted right, as the model itself makes them from ``labels`` (IGNORE
    becomes the pad token there); the loss is summed here, not averaged, so accumulation stays exact.
    """
    labels = batch["labels"]  # (B, T)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)  # (B, T)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=decoder_input_ids, use_cache=False).logits  # (B, T, V)
    selected = labels != IGNORE
    return F.cross_entropy(logits[selected].float(), labels[selected], reduction="sum"), selected.sum()


def generate_targets(model: nn.Module, tokenizer: Any, batches: Sequence[dict[str, torch.Tensor]],
                     max_new_tokens: int, progress: Callable[[int], Any] | None = None) -> list[str]:
    """Greedy decoder outputs for the inputs of ``batches`` (from :func:`pad_pairs`), decoded without special
    tokens."""

    def one(batch: dict[str, torch.Tensor]) -> list[str]:
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                             num_beams=1, max_new_tokens=max_new_tokens)  # (B, ≤ 1 + max_new_tokens)
        return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]

    return [text for texts in run_eval(model, batches, one, progress) for text in texts]


def exact_match_of(predictions: Sequence[str], pairs: Sequence[Pair]) -> dict[str, Any]:
    """Exact match of generated targets with the references and a few samples."""
    hits = [p == pair.target for p, pair in zip(predictions, pairs)]
    samples = [{"prompt": pair.prompt, "reference": pair.target, "prediction": p}
               for p, pair in list(zip(predictions, pairs))[:3]]
    return {"exact_match": sum(hits) / max(len(hits), 1), "n": len(hits), "samples": samples}


@register
class Seq2SeqTask(Task):
    """Encoder-decoder generation (``seq2seq``, PEFT's ``SEQ_2_SEQ_LM``): input/target pairs, the loss on the
    target; held-out loss, perplexity and exact match of greedy generations."""

    task_name = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"
    summary = "seq2seq (input + target JSONL, encoder-decoder models)"
    headline_metric = "exact_match"

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, start: Start) -> None:
        self.config, self.device = config, device
        model, self.tokenizer = load_model(config, dtype, auto=AUTO_CLASSES["SEQ_2_SEQ_LM"])
        if self.tokenizer.pad_token_id is None:
            raise InvalidValue(f"model {config.model!r}: its tokenizer has no pad token to pad inputs and targets with")
        self.pad = self.tokenizer.pad_token_id
        train_rows, eval_rows = read_split(config, start, read_pairs)
        self.train = encode_pairs(self.tokenizer, train_rows, config.max_length)
        self.eval_pairs = encode_pairs(self.tokenizer, list(limit(eval_rows, config)), config.max_length)
        self.model = prepare_model(config, model, "SEQ_2_SEQ_LM", start).to(device)
        self.name = data_name(config, start)
        size = config.eval_batch_size
        self.eval_batches = [pad_pairs(self.eval_pairs[i:i + size], self.pad)
                             for i in range(0, len(self.eval_pairs), size)]

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        pairs = [self.train[i] for i in indices]
        tensors = pad_pairs(pairs, self.pad)
        return MicroBatch(tensors, int((tensors["labels"] != IGNORE).sum()), sum(len(p) for p in pairs))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        return LossResult(*seq2seq_loss(model, batch))

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.eval_batches]
        with progress_bar(self.config.progress, len(self.eval_pairs), f"loss ({label})") as bar:
            metrics = lm_loss(lambda b: self.loss(model, b), model, batches, progress=bar)
        with progress_bar(self.config.progress, len(self.eval_pairs), f"exact match ({label})") as bar:
            predictions = generate_targets(model, self.tokenizer, batches, self.config.max_new_tokens, bar)
        return {**metrics, **exact_match_of(predictions, self.eval_pairs)}
