"""TrainConfig: every option of ``lorakit train``, its default, its help text and its validation.

One dataclass is the single source: the CLI builds its ``--options`` (with ``--help``) from the fields, a YAML
file sets any of them, and command-line options override the file. The resolved config is saved next to the
adapter as ``train_config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InvalidValue, MissingFile
from ..core.quant import SCHEMES
from .registry import task_class, task_names

METHODS = ("lora", "full", "prompt")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


REPORTERS = ("none", "tensorboard")
# The sections of `lorakit train --help`, in the order shown.
GROUPS = ("model", "data", "method and LoRA", "optimization", "memory and devices", "evaluation",
          "output, checkpoints and logging")
TRAIN = ("train",)
EVAL = ("train", "eval")  # options `lorakit eval` reads as well (see evaluate_adapter and build_task)


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, *, group: str | None = None,
         commands: tuple[str, ...] = TRAIN) -> Any:
    """A TrainConfig field with its ``--help`` text and allowed values.

    Args:
        group: The section of ``lorakit train --help`` it is listed in (one of :data:`GROUPS`); a field without one
            is listed in the section of the field above it.
        commands: The commands that take it as an option: ``lorakit train`` only, or :data:`EVAL` for the options
            evaluating a saved adapter reads too. ``lorakit eval --help`` lists only those, and refuses the others.
    """
    if group is not None and group not in GROUPS:
        raise InvalidValue(f"group={group!r} is not one of {GROUPS}")
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "commands": commands})


@dataclass
class TrainConfig:
    """The options of one training run (see ``lorakit train --help``)."""

    # What to train on
    model: str = _opt("default", "'default' (SmolLM2-135M-Instruct, embedded), 'minilm' (all-MiniLM-L6-v2 encoder, "
                                 "embedded) or a Hugging Face model folder", group="model", commands=EVAL)
    task: str = _opt("builtin", "what to train on; each task's own options are listed under its heading below",
                     task_names, group="data", commands=EVAL)
    data: str | None = _opt(None, "training file or folder: JSON(L), CSV/TSV, .txt, parquet, .arrow, or a folder "
                                  "written by datasets' save_to_disk (needed by every task but the built-in one)",
                            commands=EVAL)
    eval_data: str | None = _opt(None, "held-out file or folder, in the formats of --data (default: the last "
                                       "--eval-fraction of --data)", commands=EVAL)
    split: str | None = _opt(None, "--data is a folder saved from a DatasetDict (datasets' save_to_disk): the split "
                                   "to train on (default: train)", commands=EVAL)
    eval_split: str | None = _opt(None, "--eval-data is a folder saved from a DatasetDict: the split to evaluate on "
                                        "(default: validation, else test)", commands=EVAL)
    eval_fraction: float = _opt(0.05, "share of --data held out when there is no --eval-data", commands=EVAL)
    max_eval: int = _opt(200, "evaluate on at most this many held-out examples (0: all)", commands=EVAL)
    text_field: str = _opt("sentence", "seq_cls: the text column or field", commands=EVAL)
    label_field: str = _opt("label", "seq_cls: the label column or field", commands=EVAL)
    labels: list[str] | None = _opt(None, "seq_cls: the label names in class order (default: the classes of the "
                                          "adapter it starts from, else the sorted labels of the data)",
                                    commands=EVAL)
    label_map: list[str] | None = _opt(None, "seq_cls: FILE_LABEL=CLASS pairs that map a data file's labels onto the "
                                             "classes, e.g. neg=0,pos=1 (default: the labels must be the classes)",
                                       commands=EVAL)
    # What to train
    method: str = _opt("lora", "lora (an adapter on the frozen base), full (every parameter) or prompt (prompt "
                               "tuning: --num-virtual-tokens trainable input embeddings, the model frozen)", METHODS,
                      group="method and LoRA")
    num_virtual_tokens: int = _opt(20, "prompt tuning: virtual tokens in front of every example")
    r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: float = _opt(0.0, "dropout on the adapter's input")
    target_modules: str | None = _opt(None, "modules to wrap: comma-separated names, 'all-linear' or a regex "
                                            "(default: all-linear for language models, the architecture's PEFT "
                                            "default for the other tasks, e.g. query,value for BERT, q,v for T5)")
    trust_remote_code: bool = _opt(False, "run Python code that ships in the model folder (auto_map in its "
                                          "config.json); refused without this option", group="model", commands=EVAL)
    init_adapter: str | None = _opt(None, "start from this saved LoRA adapter (its rank, targets and head) "
                                          "instead of a new one, and train it further on --data",
                                    group="method and LoRA")
    quantize: str | None = _opt(None, "QLoRA: hold the base's linear layers in 4 bits (bitsandbytes nf4 or fp4; "
                                      "the adapter still trains in fp32)", SCHEMES, group="model", commands=EVAL)
    double_quant: bool = _opt(True, "with --quantize: quantize the per-block scales too (--no-double-quant)",
                              commands=EVAL)
    # How
    steps: int | None = _opt(None, "optimizer steps (default: the task's own, 40 for the built-in task; else "
                                   "--epochs over the data)", group="optimization")
    epochs: float = _opt(1.0, "passes over the data when --steps is not given")
    batch_size: int = _opt(8, "examples per micro-batch on each process")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float | None = _opt(None, "peak learning rate (AdamW); default: the task's own, 2e-3 for the supervised "
                                  "tasks and 5e-5 for the preference tasks (dpo, orpo, simpo, kto; 2e-4 on their "
                                  "built-in pairs)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    loraplus_lr_ratio: float | None = _opt(None, "LoRA+: B learns this many times faster than A (--lr), e.g. 16; "
                                                 "adapters on embeddings learn at 1e-6, as PEFT's "
                                                 "create_loraplus_optimizer (default: off)")
    schedule: str = _opt("linear", "learning-rate decay after warmup", SCHEDULES)
    warmup_steps: int = _opt(10, "steps of linear warmup (step s of w runs at (s+1)/(w+1) of --lr)")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)")
    max_length: int = _opt(512, "tokens per example (longer ones are cut) and per packed row", group="data",
                           commands=EVAL)
    packing: bool = _opt(True, "causal LM: pack examples into rows without padding (--no-packing to pad)")
    grad_checkpointing: bool = _opt(False, "recompute activations in the backward pass (less memory, ~30%% slower)",
                                    group="memory and devices")
    low_memory: bool = _opt(False, "CPU: give memory freed within a step back to the system at once (glibc): "
                                   "~20-25%% lower peak RSS, 1.4-1.7x longer steps (tcmalloc or jemalloc, used when "
                                   "installed, come as close at full speed: docs/performance.md)")
    preflight: bool = _opt(True, "estimate the peak memory from the model's config before loading anything and stop "
                                 "if it will not fit, with the changes that would (--no-preflight to skip)")
    precision: str = _opt("auto", "bf16 autocast or fp32; auto: whichever runs the model's matrix products faster "
                                  "here, measured once per machine (~50 ms) and cached", PRECISIONS, commands=EVAL)
    device: str = _opt("auto", "auto: CUDA when present, else CPU", DEVICES, commands=EVAL)
    compile: bool | None = _opt(None, "torch.compile each decoder block (inductor; on CPU it needs a C++ "
                                      "compiler): the first step takes 25-60 s longer, later ones 1.2-1.4x less "
                                      "time (LoRA or full fine-tuning of a 135M model on 2 CPU cores); default: on "
                                      "for single-process CPU runs of 200+ steps on a model of 100M+ parameters, "
                                      "not 4-bit; --compile / --no-compile to choose")
    fsdp: bool = _opt(False, "under torchrun: shard the model across the processes (FSDP2), each holding ~1/N of "
                             "the weights, instead of a whole copy each (DDP)")
    seed: int = _opt(0, "seed of data order, initialisation and dropout", group="optimization")
    # Evaluation, checkpoints, output
    eval_every: int = _opt(0, "evaluate every N steps as well as before and after training (0: only then)",
                           group="evaluation")
    max_new_tokens: int = _opt(48, "exact-match evaluation: tokens to generate per answer", commands=EVAL)
    eval_batch_size: int = _opt(50, "examples per evaluation batch", commands=EVAL)
    save_every: int = _opt(0, "write a resumable checkpoint every N steps (0: none)",
                           group="output, checkpoints and logging")
    keep_checkpoints: int = _opt(2, "checkpoints to keep (the newest)")
    resume: bool = _opt(False, "continue from the newest checkpoint in --output-dir")
    output_dir: str = _opt("runs/train", "where the adapter, config, metrics log and loss curve go")
    report_to: str = _opt("none", "also write the metrics log's scalars as TensorBoard event files in "
                                  "OUTPUT_DIR/runs (needs pip install 'lorakit[tensorboard]')", REPORTERS)
    progress: bool = _opt(True, "show a progress bar (--no-progress to hide it)", commands=EVAL)
    # The chosen task's own options (its ``options`` dataclass), by name: flags under the task's heading, or a YAML
    # section named after the task.
    task_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "the task's own options",
                                                                         "commands": ()})

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        for f in dataclasses.fields(self):
            choices = _choices(f)
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise InvalidValue(f"{f.name}={value!r} is not allowed; choose one of {', '.join(choices)}")
        if self.lr is None:
            self.lr = task_class(self.task).default_lr_for(self)
        positive = ("r", "num_virtual_tokens", "batch_size", "grad_accum", "max_length", "max_new_tokens",
                    "eval_batch_size", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidValue(f"{name}={getattr(self, name)!r} must be at least 1")
        for name in ("lr", "epochs"):
            if not getattr(self, name) > 0:
                raise InvalidValue(f"{name}={getattr(self, name)!r} must be positive")
        for name in ("weight_decay", "max_grad_norm", "warmup_steps", "eval_every", "save_every", "max_eval"):
            if getattr(self, name) < 0:
                raise InvalidValue(f"{name}={getattr(self, name)!r} must be 0 or more")
        if self.steps is not None and self.steps < 1:
            raise InvalidValue(f"steps={self.steps!r} must be at least 1")
        if not 0 <= self.lora_dropout < 1:
            raise InvalidValue(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if not 0 < self.eval_fraction < 1:
            raise InvalidValue(f"eval_fraction={self.eval_fraction!r} must be between 0 and 1")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise InvalidValue(f"loraplus_lr_ratio={self.loraplus_lr_ratio!r} must be positive (B's learning rate "
                               f"over A's, e.g. 16)")
        if self.loraplus_lr_ratio is not None and self.method != "lora":
            raise InvalidValue(f"--loraplus-lr-ratio sets the learning rates of LoRA's A and B, so it needs --method "
                               f"lora (got --method {self.method})")
        if self.quantize and self.method != "lora":
            raise InvalidValue(f"--quantize {self.quantize} holds the base in 4 bits under a LoRA adapter, so it needs "
                               f"--method lora (got --method {self.method})")
        task = task_class(self.task)
        if self.method == "prompt" and task.peft_task_type != "CAUSAL_LM":
            raise InvalidValue(f"--method prompt is for causal language models (task builtin or causal_lm), not "
                               f"{self.task}")
        if self.init_adapter is not None and self.method != "lora":
            raise InvalidValue(f"--init-adapter continues a LoRA adapter, so it needs --method lora "
                               f"(got --method {self.method})")
        if not task.needs_data and self.data is not None:
            raise InvalidValue(f"--data is for the tasks that read a file; --task {self.task} generates its own data")
        if task.needs_data and self.data is None and not task.data_optional:
            raise InvalidValue(f"--task {self.task} needs --data (a training file)")
        self.task_options = _task_options(task, self.task_options)
        if self.eval_split is not None and self.eval_data is None:
            raise InvalidValue(f"--eval-split {self.eval_split} picks a split of --eval-data, which is not given (to "
                               f"evaluate on another split of the --data folder, pass that folder as --eval-data too)")

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: ``steps``, else ``epochs`` over ``batches_per_epoch`` micro-batches."""
        if self.steps is not None:
            return self.steps
        default = task_class(self.task).default_steps_for(self)
        if default is not None:
            return default
        return max(1, int(self.epochs * batches_per_epoch) // self.grad_accum)

    def resolved(self) -> TrainConfig:
        """The same config with file paths made absolute, so the saved config works from any directory."""
        paths = {name: str(Path(value).resolve()) for name in ("data", "eval_data", "model", "init_adapter")
                 if (value := getattr(self, name)) is not None and value not in ("default", "minilm")
                 and Path(value).exists()}
        return dataclasses.replace(self, **paths)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """A config from a YAML file (any subset of the fields), with ``overrides`` on top."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise MissingFile(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise InvalidValue(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f":{where.line + 1}" if where is not None else ""
            raise InvalidValue(f"{path}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
        if not isinstance(values, dict):
            raise InvalidValue(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
        values = _task_sections({str(k).replace("-", "_"): v for k, v in values.items()}, path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidValue(f"{path}: unknown option(s) {', '.join(unknown)}; see `lorakit train --help`")
        if "task_options" in overrides and isinstance(values.get("task_options"), dict):  # typed flags win per option
            overrides = {**overrides, "task_options": {**values["task_options"], **overrides["task_options"]}}
        try:
            return cls(**{**values, **overrides})
        except (ValueError, TypeError) as err:
            raise InvalidValue(f"{path}: {err}") from None

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def task_option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field of a task's ``options`` dataclass: a ``lorakit train`` flag under the task's heading."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    """A field's allowed values; a callable is asked (``task``: the registered tasks)."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def _task_options(task: type, given: Any) -> dict[str, Any]:
    """``given`` checked against ``task``'s options dataclass, with its defaults filled in."""
    if not isinstance(given, dict):
        raise InvalidValue(f"task_options must be a mapping of option: value, got {type(given).__name__}")
    if task.options is None:
        if given:
            raise InvalidValue(f"--task {task.task_name} takes no options of its own; got {', '.join(given)}")
        return {}
    names = {f.name for f in dataclasses.fields(task.options)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise InvalidValue(f"--task {task.task_name} has no option(s) {', '.join(unknown)}; its options: "
                           f"{', '.join(sorted(names))}")
    hints = typing.get_type_hints(task.options)
    values = {k: _coerce(k, v, hints[k]) for k, v in given.items()}
    options = task.options(**values)
    for f in dataclasses.fields(options):
        choices = f.metadata.get("choices")
        if choices and getattr(options, f.name) not in choices:
            raise InvalidValue(f"{f.name}={getattr(options, f.name)!r} is not allowed; choose one of "
                               f"{', '.join(choices)}")
    return dataclasses.asdict(options)


def _task_sections(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """A YAML file's sections named after a task (``seq_cls: {text_field: text}``) as TrainConfig's fields: the
    task's ``option_fields`` at the top level, its own ``options`` in ``task_options``."""
    out = {k: v for k, v in values.items() if k not in task_names() or not isinstance(v, dict)}
    for name in task_names():
        section = values.get(name)
        if not isinstance(section, dict):
            continue
        task = task_class(name)
        own = {f.name for f in dataclasses.fields(task.options)} if task.options else set()
        for key, value in section.items():
            key = str(key).replace("-", "_")
            if key in task.option_fields:
                out[key] = value
            elif key in own:
                if out.get("task", "builtin") != name:
                    raise InvalidValue(f"{path}: section {name!r} sets {key}, an option of --task {name}, but the "
                                       f"file trains --task {out.get('task', 'builtin')}")
                out.setdefault("task_options", {})[key] = value
            else:
                raise InvalidValue(f"{path}: section {name!r} has no option {key!r}; its options: "
                                   f"{', '.join(sorted({*task.option_fields, *own})) or 'none'}")
    return out


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the field's type (YAML reads ``2e-4`` as a string); a clear error when it cannot be."""
    optional = type(None) in typing.get_args(annotation)
    kind = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise InvalidValue(f"{name} must be set (got nothing)")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
    elif kind is dict:
        if isinstance(value, dict):
            return dict(value)
    elif kind is str:
        if isinstance(value, (list, tuple)):  # target_modules: [q_proj, v_proj]
            return ",".join(str(v) for v in value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise InvalidValue(f"{name}={value!r} is not a valid {kind.__name__}")


def _base_type(annotation: Any) -> Any:
    """``int | None`` → ``int``; ``list[str] | None`` → ``list``; ``dict[str, Any]`` → ``dict``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


TASK_OPTION = "task_option__"  # the argparse dest prefix of a task's own options


def task_heading(name: str) -> str:
    """The ``--help`` section of a task's options."""
    return f"--task {name}"


def option_groups() -> dict[str, str]:
    """The ``--help`` section of each TrainConfig field, by name (a field without one joins the one above it; a
    field a task declares in ``option_fields`` is listed under that task's heading)."""
    owner = {field: name for name in task_names() for field in task_class(name).option_fields}
    groups, current = {}, GROUPS[0]
    for f in dataclasses.fields(TrainConfig):
        current = f.metadata.get("group") or current
        groups[f.name] = task_heading(owner[f.name]) if f.name in owner else current
    return groups


def command_options(command: str) -> list[str]:
    """The TrainConfig fields ``lorakit <command>`` takes as options, in field order."""
    return [f.name for f in dataclasses.fields(TrainConfig) if command in f.metadata.get("commands", TRAIN)]


def _task_option_fields() -> dict[str, tuple[list[str], dataclasses.Field, Any]]:
    """Each option name some task's ``options`` declares: the tasks that take it, its field and type."""
    found: dict[str, tuple[list[str], dataclasses.Field, Any]] = {}
    for name in task_names():
        options = task_class(name).options
        if options is None:
            continue
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            found.setdefault(f.name, ([], f, hints[f.name]))[0].append(name)
    return found


def add_arguments(parser: argparse.ArgumentParser, command: str = "train") -> None:
    """One ``--option`` per TrainConfig field that ``command`` uses (see :func:`command_options`), with its help
    text, in the sections of :data:`GROUPS` and one section per task; for ``train`` also each task's own options.
    Options not given stay out of the namespace, so that a YAML file's values are only overridden by what the user
    typed."""
    hints = typing.get_type_hints(TrainConfig)
    names = command_options(command)
    if not names:
        raise InvalidValue(f"no TrainConfig option is marked for command {command!r}")
    groups = option_groups()
    own = _task_option_fields() if command == "train" else {}
    titles = [*GROUPS, *(task_heading(n) for n in task_names())]
    summaries = {task_heading(n): task_class(n).summary for n in task_names()}
    sections = {title: parser.add_argument_group(title, summaries.get(title)) for title in titles
                if any(groups[name] == title for name in names)
                or any(title == task_heading(tasks[0]) for tasks, _, _ in own.values())}
    for f in dataclasses.fields(TrainConfig):
        if f.name in names:
            help_text = f.metadata["help"]
            if f.name == "task":
                help_text += ": " + "; ".join(task_class(n).summary for n in task_names())
            _add_flag(sections[groups[f.name]], f, hints[f.name], f.name, help_text)
    for option, (tasks, f, annotation) in own.items():
        help_text = f.metadata["help"] + (f" (tasks {', '.join(tasks)})" if len(tasks) > 1 else "")
        choices = _shared_choices(option, tasks)  # each task checks its own (TrainConfig); the flag takes them all
        _add_flag(sections[task_heading(tasks[0])], f, annotation, TASK_OPTION + option, help_text, choices)


def _shared_choices(option: str, tasks: list[str]) -> tuple[str, ...] | None:
    """The values some task allows for an option several tasks take (None: any value)."""
    every: list[str] = []
    for name in tasks:
        f = next(f for f in dataclasses.fields(task_class(name).options) if f.name == option)
        choices = f.metadata.get("choices")
        if choices is None:
            return None
        every += [c for c in choices if c not in every]
    return tuple(every)


def _add_flag(section: Any, f: dataclasses.Field, annotation: Any, dest: str, help_text: str,
              choices: tuple[str, ...] | None = None) -> None:
    """One flag for field ``f``; ``choices`` (default: the field's) are the values the flag accepts."""
    flag = "--" + f.name.replace("_", "-")
    kind = _base_type(annotation)
    if "default" not in help_text:
        help_text += f" (default: {f.default})"
    if kind is bool:
        section.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                             help=help_text)
    elif kind is list:
        section.add_argument(flag, dest=dest, type=lambda s: [v.strip() for v in s.split(",")],
                             default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text + ", comma-separated")
    else:
        choices = choices or _choices(f)
        section.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS, choices=choices,
                             metavar=None if choices else f.name.upper(), help=help_text)


def typed_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig options typed on the command line (those not typed are absent from ``args``); a task's own
    options are gathered in ``task_options``."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    typed = {k: v for k, v in vars(args).items() if k in known}
    own = {k.removeprefix(TASK_OPTION): v for k, v in vars(args).items() if k.startswith(TASK_OPTION)}
    if own:
        typed["task_options"] = own
    return typed


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of ``--config FILE`` (if given) with the typed options on top."""
    overrides = typed_options(args)
    if getattr(args, "config", None):
        return TrainConfig.from_yaml(args.config, **overrides)
    return TrainConfig(**overrides)
