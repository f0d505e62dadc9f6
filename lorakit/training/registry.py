"""The training tasks by name: each task module registers its class here (:func:`register`), and everything that
depends on the task — ``--task``'s choices and help, the PEFT task type saved with an adapter, the headline metric,
the extra forward passes the FLOP count and the preflight add, the task's own options — reads it from the class.

This module imports nothing of the trainer's, so TrainConfig can ask it about tasks while the task modules import
TrainConfig. Importing :mod:`lorakit.training` (which every import of a training module does first) imports the
task modules, so the registry is full whenever a config is validated.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import InvalidType, InvalidValue

_TASKS: dict[str, Any] = {}


def register(task: type) -> type:
    """Class decorator: make ``task`` (a :class:`lorakit.training.tasks.Task` subclass) known under its ``task_name``."""
    if not getattr(task, "task_name", None):
        raise InvalidType(f"{task.__name__} has no name to register under")
    if task.task_name in _TASKS and _TASKS[task.task_name] is not task:
        raise InvalidValue(f"two tasks are named {task.task_name!r}: {_TASKS[task.task_name].__name__} and {task.__name__}")
    _TASKS[task.task_name] = task
    return task


def task_names() -> tuple[str, ...]:
    """The registered task names, in registration order."""
    return tuple(_TASKS)


def task_class(name: str) -> Any:
    """The class registered as ``name``.

    Raises:
        ValueError: No task has that name; the message lists the known ones.
    """
    if name not in _TASKS:
        raise InvalidValue(f"unknown task {name!r}; tasks: {', '.join(_TASKS)}")
    return _TASKS[name]


def peft_task_type(name: str) -> str:
    """PEFT's task type of a task (recorded as ``task_type`` in ``adapter_config.json``)."""
    return task_class(name).peft_task_type


def task_for_peft_type(task_type: str | None, default: str) -> str:
    """The task that trains adapters of PEFT type ``task_type`` (the first registered whose data comes from
    files), else ``default``."""
    return next((n for n, t in _TASKS.items() if t.peft_task_type == task_type and t.needs_data), default)
