"""What every training task is: the :class:`Task` base class (the loop's four questions: ``batch``, ``loss``,
``evaluate``, ``save``), what a micro-batch carries, where a model starts, and :func:`build_task`, which builds the
task the config names from the registry (:mod:`lorakit.training.registry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.fast_paths import set_low_precision_updates
from ...core.inject import find_targets
from ...files.io import WEIGHTS_NAME
from ...models.devices import low_precision_updates_fast
from ...models.embedded_models import model_source
from ...models.model import LoraModel
from ...models.prompt_tuning import PromptTuningModel
from ...models.streaming import checkpoint_dtype
from ..data import (
    existing_file,
)
from ..loss import LossResult
from ..options import TrainConfig
from ..registry import peft_task_type, task_class
from .loading import Start, lora_config_of, meta_model_of


@dataclass
class MicroBatch:
    tensors: dict[str, torch.Tensor]
    targets: int  # what the loss is averaged over: target tokens (LM) or examples (classification)
    tokens: int  # input tokens, for tokens/s
    # For the step's useful FLOPs (MFU): the tokens of each sequence, and the rows the output head runs on
    # (None: every token). No lengths: not counted (an encoder-decoder's two stacks).
    lengths: list[int] | None = None
    head_rows: int | None = None


class Task:
    """A training task: what it is (class attributes, read by the registry, the options, the FLOP count and the
    preflight) and the task-specific parts of a run (set in ``__init__``; the loop's four questions below).

    Class attributes:
        task_name: Its ``--task`` name; ``@register`` makes it known under it.
        peft_task_type: PEFT's task type, saved as ``task_type`` in ``adapter_config.json``.
        summary: Its line in ``--task``'s help.
        headline_metric: The held-out metric the summary and ``compare`` report (a key of :meth:`evaluate`'s).
        needs_data: Whether it reads ``--data`` (the built-in task generates its own).
        data_optional: Without ``--data`` it trains on built-in data (the preference tasks' built-in pairs).
        default_lr: Its learning rate when ``--lr`` is not given; see :meth:`default_lr_for`.
        default_steps: Its optimizer steps when ``--steps`` is not given (None: ``--epochs`` over the data); see
            :meth:`default_steps_for`.
        vocabulary_head: Its output head is the vocabulary's (a causal LM), for the matmul peak's shapes.
        labelled: Its head's classes are saved beside the adapter (``labels.json``) and read back with it.
        reference_passes: Forward-only passes of the model per example beside the trained one (a DPO reference
            pass: 1), counted in the run's useful FLOPs and in the preflight's estimate.
        rows_per_example: Rows each example puts through the trained forward pass (a preference pair: 2), for the
            preflight's activations.
        option_fields: The TrainConfig fields only this task reads: listed under its heading in ``--help``, and
            accepted in a YAML section named after the task.
        options: A dataclass of options of its own (fields made with :func:`lorakit.training.options.task_option`),
            or None. They are flags of ``lorakit train`` under the task's heading, a YAML section named after the
            task, and ``config.task_options`` holds their values for the chosen task.

    Attributes:
        config: The run's options, with what the task resolved (a classifier's labels): saved as
            ``train_config.yaml``.
        name: What the run trains on, for the summary (a file name, or the built-in task).
        model: The model as trained: a :class:`LoraModel`, a :class:`PromptTuningModel` or, for full fine-tuning,
            the base model itself.
        tokenizer: The model's tokenizer.
        train: The training examples; micro-batches are lists of indices into it.
    """

    task_name: str = ""
    peft_task_type: str = "CAUSAL_LM"
    summary: str = ""
    headline_metric: str = "loss"
    needs_data: bool = True
    data_optional: bool = False
    default_lr: float = 2e-3
    default_steps: int | None = None
    vocabulary_head: bool = False
    labelled: bool = False
    reference_passes: int = 0
    rows_per_example: int = 1
    option_fields: tuple[str, ...] = ()
    options: type | None = None

    config: TrainConfig
    name: str
    model: nn.Module
    tokenizer: Any
    train: Sequence[Any]

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        """The tensors of the training examples at ``indices``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        """The summed loss of ``model`` on one batch, what it is averaged over, and the task's own metrics."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        """The held-out metrics; ``label`` says when (``before``, ``after``, ``step N``) for progress messages."""
        raise NotImplementedError

    def save(self, model: nn.Module, out: Path) -> int:
        """Save what was trained into ``out`` (an adapter, or the whole model); returns the weight files' bytes."""
        model.save_pretrained(out)
        if isinstance(model, (LoraModel, PromptTuningModel)):
            return (out / WEIGHTS_NAME).stat().st_size
        self.tokenizer.save_pretrained(out)  # full fine-tuning: the whole model, safetensors
        return sum(f.stat().st_size for f in out.glob("*.safetensors"))

    def step_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """The task's metrics of a step (or an evaluation) from their sums over ``count`` units (``LossResult``'s
        count, added over the micro-batches and processes): by default each sum divided by the count."""
        return {name: value / count for name, value in sums.items()}

    @classmethod
    def default_steps_for(cls, config: TrainConfig) -> int | None:
        """Its optimizer steps when ``--steps`` is not given (None: ``--epochs`` over the data)."""
        return cls.default_steps

    @classmethod
    def default_lr_for(cls, config: TrainConfig) -> float:
        """Its learning rate when ``--lr`` is not given."""
        return cls.default_lr

    def count_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters) of the model as trained."""
        if isinstance(self.model, LoraModel):
            return self.model.get_nb_trainable_parameters()
        total = sum(p.numel() for p in self.model.parameters())
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad), total


def build_task(config: TrainConfig, device: torch.device, precision: str, adapter: str | None = None,
               evaluate_only: bool = False) -> Task:
    """Load the model and data the config names, for the task type it names.

    With ``adapter`` (a saved LoRA or prompt-tuning folder) the model carries that adapter instead of a new one;
    with ``config.init_adapter`` it carries that one, trainable. With ``evaluate_only`` only the held-out data is
    read.
    """
    # With bf16 autocast a frozen base is kept in bf16 (its weights are not cast again at every step);
    # trainable weights stay fp32 (LoRA adapters are created in fp32; full fine-tuning keeps fp32 masters).
    base_dtype = torch.bfloat16 if precision == "bf16" and config.method in ("lora", "prompt") else torch.float32
    if config.method in ("lora", "prompt") and config.precision != "fp32" and config.model != "default" \
            and checkpoint_dtype(model_source(config.model, config.trust_remote_code)) == torch.bfloat16:
        base_dtype = torch.bfloat16  # a bf16 checkpoint's frozen base stays bf16 (no fp32 copy) unless fp32 is asked
    if adapter is None and config.init_adapter is not None and not evaluate_only:
        start = Start(config.init_adapter, trainable=True)
    else:
        start = Start(adapter, evaluate_only=evaluate_only)
    check_before_loading(config, start)
    task = task_class(config.task)(config, device, base_dtype, start)
    if precision == "bf16":  # the LoRA updates under autocast: bf16 where this CPU's rank products are fast
        set_low_precision_updates(task.model, low_precision_updates_fast(device))
    return task


def check_before_loading(config: TrainConfig, start: Start = Start()) -> None:
    """What can be checked before any weight is loaded: the data files exist, and the LoRA targets match modules
    of the model (on a copy built from its config on the meta device, which costs no memory and no time).

    Raises:
        FileNotFoundError: A data file or the model does not exist.
        ValueError: A target matches no module (with the closest real names).
    """
    needed = [config.eval_data] if start.evaluate_only and config.eval_data else [config.data, config.eval_data]
    for path in needed:
        if path is not None:
            existing_file(path)
    if config.method == "lora" and start.adapter is None:
        task_type = peft_task_type(config.task)
        find_targets(meta_model_of(config, task_type), lora_config_of(config, task_type))


