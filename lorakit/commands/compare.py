"""``lorakit compare``: full fine-tuning, LoRA, QLoRA and prompt tuning trained on one task, side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Command
from .options import option

if TYPE_CHECKING:
    from ..training.options import TrainConfig


@dataclass(kw_only=True)
class StudyOptions:
    """The task, model, data and budget shared by the runs of ``compare`` and ``sweep``."""

    config: str | None = option(None, "a YAML file of `lorakit train` options for the task, model and data")
    task: str | None = option(None, "the training task, as for `lorakit train --task` (default: builtin)")
    model: str | None = option(None, "'default', 'minilm' or a model folder (default: default)")
    data: str | None = option(None, "training file")
    eval_data: str | None = option(None, "held-out file")
    steps: int | None = option(None, "optimizer steps of every run (default: as `lorakit train`: 40 on the "
                                     "built-in task)", aliases=("--budget",))
    max_eval: int | None = option(None, "held-out examples to evaluate on")

    def train_config(self) -> TrainConfig:
        from ..training.options import TrainConfig

        fields = {k: v for k, v in (("task", self.task), ("model", self.model), ("data", self.data),
                                    ("eval_data", self.eval_data), ("steps", self.steps),
                                    ("max_eval", self.max_eval)) if v is not None}
        return TrainConfig.from_yaml(self.config, **fields) if self.config else TrainConfig(**fields)


@dataclass(kw_only=True)
class CompareOptions(StudyOptions):
    output_dir: str = option("runs/compare", "where the runs and tables go")
    methods: str = option("full,lora,qlora,prompt", "which methods, comma-separated (default: all four)")


def print_study(result: dict[str, Any]) -> None:
    print(Path(result["markdown"]).read_text())
    print(f"written: {result['markdown']}, {result['json']}" + (f", {result['png']}" if result["png"] else ""))


def run(opts: CompareOptions) -> int:
    from ..workflows.compare import compare

    methods = tuple(m.strip() for m in opts.methods.split(",") if m.strip())
    print_study(compare(opts.train_config(), methods, opts.output_dir))
    return 0


COMMAND = Command("compare", "train full FT, LoRA, QLoRA and prompt tuning on one task and compare",
                  "Train each method on the same data with the same step budget (each in its own process), then "
                  "write comparison.md/.json/.png: trainable parameters, peak memory, tokens/s, held-out quality, "
                  "artifact size and forward time as trained and merged. No arguments: the built-in task on "
                  "SmolLM2.", CompareOptions, run)
