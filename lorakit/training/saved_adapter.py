"""What a saved adapter says about how it was made (its base, its task, its training options, its classes), for
evaluating it, predicting with it and training it further (``--init-adapter``).

``lorakit train`` writes ``train_config.yaml`` (and, for a classifier, ``labels.json``) next to the adapter; an
adapter saved from Python or by PEFT has only ``adapter_config.json``, whose ``base_model_name_or_path`` and
``task_type`` are then what there is to go on.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from ..core.errors import InvalidValue, MissingFile
from ..files.io import CONFIG_NAME, read_adapter_config
from ..models.embedded_models import HUB_NAME, minilm_dir
from .labels import adapter_classes
from .options import TrainConfig
from .registry import peft_task_type, task_class, task_for_peft_type


def saved_config(folder: str | Path) -> dict[str, Any]:
    """The ``train_config.yaml`` that ``lorakit train`` wrote next to an adapter ({} when there is none)."""
    saved = Path(folder) / "train_config.yaml"
    if not saved.is_file():
        return {}
    return TrainConfig.from_yaml(saved).to_dict()  # checked: a damaged file is an error that names it


def base_spec_for(adapter: str | Path, model: str | None = None) -> str:
    """Which base an adapter belongs on: ``model`` if given, else the ``model`` of its ``train_config.yaml``, else
    its ``base_model_name_or_path`` when that is an embedded model (SmolLM2's hub name, MiniLM's folder) or a local
    folder.

    Raises:
        ValueError: No base is named anywhere, or the one named is not here.
    """
    if model is not None:
        return model
    trained = saved_config(adapter)
    if trained.get("model"):
        return trained["model"]
    named = read_adapter_config(Path(adapter)).get("base_model_name_or_path")
    if named == HUB_NAME:
        return "default"
    if named and _is_minilm(named):
        return "minilm"
    if named and Path(named).exists():
        return named
    if named:
        raise InvalidValue(f"{adapter} was trained on {named!r}, which is neither an embedded model nor a folder here; "
                           f"pass the base model folder (--model DIR)")
    raise InvalidValue(f"{adapter} does not say which base it was trained on; pass the base model (--model DIR)")


def _is_minilm(named: str) -> bool:
    try:
        return Path(named).resolve() == minilm_dir().resolve()
    except FileNotFoundError:  # the MiniLM wheel is not installed
        return False


def task_of(adapter: str | Path) -> str:
    """The ``lorakit train --task`` an adapter was trained for: its ``train_config.yaml``'s, else the one of the
    ``task_type`` in its ``adapter_config.json`` (``causal_lm`` when it records none)."""
    trained = saved_config(adapter)
    if trained.get("task"):
        return trained["task"]
    task_type = read_adapter_config(Path(adapter)).get("task_type")
    return task_for_peft_type(task_type, "causal_lm")


def eval_config(adapter: str | Path, config_file: str | Path | None = None, **options: Any) -> TrainConfig:
    """The options to evaluate (or predict with) a saved adapter, with ``options`` on top: ``config_file`` if given,
    else the adapter's ``train_config.yaml``, else what its ``adapter_config.json`` says (base, task type, classes).

    New data (``eval_data`` in ``options``) is evaluated whole unless ``max_eval`` says otherwise; without new data
    the run's own held-out examples are, as many as the run evaluated.

    Raises:
        ValueError: The adapter has no training config and ``options`` name no ``eval_data`` to evaluate on.
    """
    if options.get("eval_data"):
        options.setdefault("max_eval", 0)
    saved = Path(adapter) / "train_config.yaml"
    if config_file is None and saved.is_file():
        config_file = saved
    if config_file is not None:
        return TrainConfig.from_yaml(config_file, **options)
    if not options.get("eval_data"):
        raise InvalidValue(f"{adapter} has no train_config.yaml to say what it was trained on; pass the data to "
                           f"evaluate on (--eval-data FILE)")
    found: dict[str, Any] = {"model": base_spec_for(adapter, options.pop("model", None)), "task": task_of(adapter)}
    if task_class(found["task"]).labelled and not options.get("labels"):
        found["labels"] = adapter_classes(adapter)
    # ``data`` is the training file, which such an adapter does not name; evaluation reads only ``eval_data``
    return TrainConfig(**{**found, "data": options["eval_data"], **options})


def with_init_adapter(config: TrainConfig) -> TrainConfig:
    """The run's config when it starts from a saved adapter (``init_adapter``): that adapter's rank, alpha, targets
    and classes, and its base when ``model`` is left at the default. Unchanged without ``init_adapter``.

    Raises:
        FileNotFoundError: The folder holds no adapter.
        ValueError: Not a LoRA adapter; trained for another task; ``labels`` that are not its classes.
    """
    if config.init_adapter is None:
        return config
    folder = Path(config.init_adapter)
    if not (folder / CONFIG_NAME).is_file():
        raise MissingFile(f"--init-adapter {str(folder)!r}: no {CONFIG_NAME} there (not an adapter folder)")
    settings = read_adapter_config(folder)
    kind = settings.get("peft_type", "LORA")
    if kind != "LORA":
        raise InvalidValue(f"--init-adapter {folder} holds a {kind} adapter; only LoRA adapters can be trained further")
    task_type = settings.get("task_type")
    if task_for_peft_type(task_type, "") and task_type != peft_task_type(config.task):
        raise InvalidValue(f"--init-adapter {folder} was trained for {task_type}; it cannot continue as "
                           f"--task {config.task}")
    changes: dict[str, Any] = {}
    if config.model == "default":  # the default, not a choice: take the adapter's base
        try:
            base = base_spec_for(folder)
        except ValueError:
            base = "default"  # nothing recorded: the default it is (the shapes are checked when it loads)
        if base != "default":
            changes["model"] = base
            print(f"lorakit: --init-adapter {folder} was trained on {base}; using that base", file=sys.stderr)
    targets = settings.get("target_modules")
    changes.update(r=int(settings.get("r", config.r)), lora_alpha=float(settings.get("lora_alpha", config.lora_alpha)),
                   target_modules=",".join(targets) if isinstance(targets, list) else targets)
    if task_class(config.task).labelled:
        classes = adapter_classes(folder)
        if config.labels and classes and list(config.labels) != classes:
            raise InvalidValue(f"--labels {','.join(config.labels)} differ from the classes of --init-adapter {folder} "
                               f"({','.join(classes)}); map the data's labels onto them with --label-map")
        changes["labels"] = classes or config.labels
    return dataclasses.replace(config, **changes)
