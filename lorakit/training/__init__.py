"""``lorakit train``: the training loop and everything it is made of.

- :mod:`~lorakit.training.options`: :class:`TrainConfig`, every option with its default and help;
- :mod:`~lorakit.training.data`: reading datasets, chat templates, masking, packing;
- :mod:`~lorakit.training.builtin_task`: the built-in order-to-JSON task;
- :mod:`~lorakit.training.tasks`: one class per task type (model, batches, loss, evaluation, saving);
- :mod:`~lorakit.training.loss`, :mod:`~lorakit.training.metrics`: the losses and the evaluation metrics;
- :mod:`~lorakit.training.devices`: device, precision and the processes of a ``torchrun`` job;
- :mod:`~lorakit.training.fsdp`: sharding the model across those processes (FSDP2, ``--fsdp``);
- :mod:`~lorakit.training.checkpoint`, :mod:`~lorakit.training.metrics_log`: what a run writes as it goes;
- :mod:`~lorakit.training.loop`: :func:`train`, the loop itself.
"""

from .loop import TrainingError, train
from .options import TrainConfig

__all__ = ["TrainConfig", "TrainingError", "train"]
