"""Sequence classification (``seq_cls``, PEFT's ``SEQ_CLS``): text and label rows, a classification head trained in
full next to the adapter, accuracy as the metric."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.errors import InvalidValue
from ...files.io import is_prompt_adapter
from ..data import (
    DataSource,
    read_table,
)
from ..labels import adapter_classes, check_labels, map_labels, parse_label_map, save_labels
from ..loss import LossResult, classification_loss
from ..metrics import classification
from ..options import TrainConfig
from ..registry import register
from .base import MicroBatch, Task
from .loading import (
    Start,
    give_pad_token,
    limit,
    load_model,
    prepare_model,
    progress_bar,
    sources,
    split_held_out,
)


@register
class ClassificationTask(Task):
    """Sequence classification (``seq_cls``): text and label rows, a classification head trained in full next to
    the adapter, accuracy as the metric."""

    task_name = "seq_cls"
    peft_task_type = "SEQ_CLS"
    summary = "seq_cls (text + label from CSV/TSV/JSONL)"
    headline_metric = "accuracy"
    labelled = True
    option_fields = ("text_field", "label_field", "labels", "label_map")

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, start: Start) -> None:
        self.device = device
        mapping = parse_label_map(config.label_map)

        def read(path: DataSource) -> list[tuple[int, str, str]]:
            return map_labels(read_table(path, config.text_field, config.label_field), mapping)

        train_from, eval_from = sources(config, start)
        if train_from is None:
            train_rows, eval_rows = [], read(eval_from)
        else:
            rows = read(train_from)
            train_rows, eval_rows = (rows, read(eval_from)) if config.eval_data else split_held_out(rows, config)
        # The classes: a saved adapter's (its head was trained on them), else --labels, else the data's labels
        saved = adapter_classes(start.adapter) if start.adapter and not is_prompt_adapter(start.adapter) else None
        if saved and config.labels and list(config.labels) != saved:
            raise InvalidValue(f"--labels {','.join(config.labels)} differ from the classes of the adapter "
                               f"{start.adapter} ({','.join(saved)}); map the data's labels with --label-map")
        self.labels = saved or config.labels or sorted({label for _, _, label in train_rows or eval_rows})
        if len(self.labels) < 2:
            raise InvalidValue(f"{config.data}: only one label ({self.labels[0]!r}); a classifier needs at least two")
        check_labels(train_rows, train_from or eval_from, self.labels, mapping)
        check_labels(eval_rows, eval_from, self.labels, mapping)
        self.config = dataclasses.replace(config, labels=self.labels)  # saved as train_config.yaml
        index = {name: i for i, name in enumerate(self.labels)}
        self.train = [(text, index[label]) for _, text, label in train_rows]
        held_out = list(limit([(text, index[label]) for _, text, label in eval_rows], config))
        model, self.tokenizer = load_model(config, dtype, num_labels=len(self.labels),
                                      head_supplied=start.adapter is not None)
        give_pad_token(model, self.tokenizer, config.model)
        model.config.id2label = dict(enumerate(self.labels))
        model.config.label2id = dict(index)
        self.model = prepare_model(config, model, "SEQ_CLS", start).to(device)
        self.name = Path(config.eval_data if start.evaluate_only and config.eval_data else config.data).name
        self.eval_batches = [self._encode(held_out[i:i + config.eval_batch_size])
                             for i in range(0, len(held_out), config.eval_batch_size)]

    def _encode(self, items: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([t for t, _ in items], padding=True, truncation=True, max_length=self.config.max_length,
                             return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in items])}

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        tensors = self._encode([self.train[i] for i in indices])
        mask = tensors["attention_mask"]
        return MicroBatch(tensors, len(indices), int(mask.sum()), mask.sum(1).tolist(), head_rows=len(indices))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        return LossResult(*classification_loss(model, batch))

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.eval_batches]
        with progress_bar(self.config.progress, sum(len(b["labels"]) for b in batches), f"accuracy ({label})") as bar:
            return {**classification(model, batches, len(self.labels), progress=bar), "labels": list(self.labels)}

    def save(self, model: nn.Module, out: Path) -> int:
        """The adapter (or model) and ``labels.json``: which class each output of the head stands for."""
        saved = super().save(model, out)
        save_labels(out, self.labels)
        return saved
