"""Causal language modelling (``causal_lm``, PEFT's ``CAUSAL_LM``): next-token prediction on chat or text
examples from a file, the loss on the answers only; and the built-in order-to-JSON task (``builtin``), the same task
with a generated data source and exact match of generated answers as its metric."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.errors import InvalidValue
from ..builtin_task import builtin_orders
from ..data import (
    Example,
    eval_source,
    load_causal_lm,
    pack_batch,
    pad_batch,
    tokenize_chat,
    train_source,
)
from ..loss import LossResult, causal_lm_loss
from ..metrics import exact_match, lm_loss
from ..options import TrainConfig
from ..registry import register
from .base import MicroBatch, Task
from .loading import (
    Start,
    limit,
    load_model,
    prepare_model,
    progress_bar,
    say,
    split_held_out,
)


@register
class CausalLMTask(Task):
    """Next-token prediction on chat or text examples from a file, the loss on the answers only; held-out loss and
    perplexity as the metrics."""

    task_name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    summary = "causal_lm (Alpaca/chat/text JSON(L) or .txt)"
    headline_metric = "loss"
    vocabulary_head = True

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, start: Start) -> None:
        self.config, self.device = config, device
        model, self.tokenizer = load_model(config, dtype)
        tokenizer = self.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eval_records: list[dict] | None = None  # prompts and answers to generate for, when exact match is kept
        self.train, eval_examples, self.name = self.examples(start)
        self.model = prepare_model(config, model, "CAUSAL_LM", start).to(device)
        held_out = list(limit(eval_examples, config))
        self.eval_batches = [pad_batch(held_out[i:i + config.eval_batch_size], self.pad)
                             for i in range(0, len(held_out), config.eval_batch_size)]

    def examples(self, start: Start) -> tuple[list[Example], list[Example], str]:
        """The data source: training and held-out examples, and what they are called in the summary."""
        config, tokenizer = self.config, self.tokenizer
        if start.evaluate_only and config.eval_data:
            return [], load_causal_lm(eval_source(config), tokenizer, config.max_length), Path(config.eval_data).name
        examples = load_causal_lm(train_source(config), tokenizer, config.max_length)
        if config.eval_data:
            return examples, load_causal_lm(eval_source(config), tokenizer, config.max_length), Path(config.data).name
        return *split_held_out(examples, config), Path(config.data).name

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        examples: list[Example] = [self.train[i] for i in indices]
        # A prompt goes in front of each example, so prompt tuning pads instead of packing.
        packed = self.config.packing and self.config.method != "prompt"
        tensors = pack_batch(examples, self.config.max_length, self.pad) if packed else pad_batch(examples, self.pad)
        n_targets = sum(e.n_targets for e in examples)
        return MicroBatch(tensors, n_targets, sum(len(e) for e in examples), [len(e) for e in examples],
                          head_rows=n_targets)  # the useful logits: where there is a target

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        return LossResult(*causal_lm_loss(model, batch))

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.eval_batches]
        with progress_bar(self.config.progress, sum(len(b["input_ids"]) for b in batches), f"loss ({label})") as bar:
            metrics = lm_loss(lambda b: self.loss(model, b), model, batches, progress=bar)
        if self.eval_records is not None:
            records = limit(self.eval_records, self.config)
            say(f"evaluating exact match on {len(records)} held-out examples ({label})")
            with progress_bar(self.config.progress, len(records), f"exact match ({label})") as bar:
                metrics.update(exact_match(model, self.tokenizer, records, self.config.max_new_tokens,
                                           self.config.eval_batch_size, progress=bar))
        return metrics


@register
class BuiltinTask(CausalLMTask):
    """The built-in order-to-JSON task: causal LM on generated chat examples (:mod:`lorakit.training.builtin_task`),
    with exact match of greedily generated answers as the headline metric."""

    task_name = "builtin"
    summary = "builtin (the built-in order-to-JSON task, generated)"
    headline_metric = "exact_match"
    needs_data = False
    default_steps = 40  # it passes 90% exact match after ~30

    def examples(self, start: Start) -> tuple[list[Example], list[Example], str]:
        config, tokenizer = self.config, self.tokenizer
        train_records, self.eval_records = builtin_orders()
        train = [tokenize_chat(tokenizer, r["messages"], config.max_length) for r in train_records]
        held_out = [tokenize_chat(tokenizer, r["messages"], config.max_length) for r in self.eval_records]
        if any(e.n_targets == 0 for e in train):
            raise InvalidValue(f"max_length={config.max_length} cuts off the answers of the built-in task; use "
                               f"at least {max(len(e) for e in train)}")
        return train, held_out, "the built-in order-to-JSON task"
