"""How the training loop runs on one process, or on the processes of a ``torchrun`` job (DDP or FSDP2).

The loop is the same in every case; what differs sits behind the methods of :class:`OneProcess`, which the other
two override, chosen once by :func:`parallel_for`:

- :class:`OneProcess`: the model as it is.
- :class:`DataParallel` (several processes, no ``--fsdp``): every process holds the whole model, wrapped in
  ``DistributedDataParallel``, which all-reduces the gradients after the last micro-batch of a step.
- :class:`FullySharded` (``--fsdp``): each process holds a shard of every parameter (:mod:`lorakit.training.fsdp`);
  the weights are gathered whenever the whole of them is needed (a forward pass, saving).

Sums, barriers and gathers across processes are :class:`~lorakit.training.devices.Processes`', which this holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from ..core.process_memory import return_freed_memory
from .devices import Processes
from .fsdp import full_optimizer_state, gathered, grad_norm, shard
from .options import TrainConfig
from .tasks import Task


class Objective(nn.Module):
    """The model and its loss as one module, so DistributedDataParallel (or FSDP's root) sees the whole forward
    pass."""

    def __init__(self, model: nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor] | None = None,
                within: Callable[[nn.Module], Any] | None = None) -> Any:
        """The loss of ``batch``; or ``within(model)``: under FSDP the weights outside the decoder layers (embeddings,
        head) are gathered in the root's forward, so evaluation and anything else that runs the model go through it.
        """
        if within is not None:
            return within(self.model)
        return self.loss_fn(self.model, batch)


class OneProcess:
    """One process (also the base of the others): the model trains and evaluates as it is.

    Attributes:
        procs: This process's place in the job: its sums, barriers and gathers.
    """

    def __init__(self, procs: Processes) -> None:
        self.procs = procs

    @contextmanager
    def initializing(self, seed: int) -> Iterator[None]:
        """The block that builds the model: each process draws from its own stream (``seed + rank``)."""
        torch.manual_seed(seed + self.procs.rank)
        yield

    def objective(self, task: Task) -> nn.Module:
        """The task's model and loss as the module the steps call; before the optimizer is made (it steps what
        this returns the parameters of)."""
        return Objective(task.model, task.loss)

    def micro_batch(self, objective: nn.Module, last: bool) -> AbstractContextManager:
        """The block of one micro-batch's forward and backward; ``last`` ends the step (gradients are synced then)."""
        return nullcontext()

    def clip(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The total gradient norm of ``params``, clipping the gradients to ``max_norm`` if > 0."""
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))

    def evaluate(self, objective: nn.Module, task: Task, label: str) -> dict[str, Any]:
        """The task's held-out metrics on rank 0, ``{}`` on the other processes (which do not evaluate)."""
        return task.evaluate(task.model, label) if self.procs.main else {}

    def gathered(self, objective: nn.Module, trainable_only: bool = False) -> AbstractContextManager:
        """The block in which rank 0's model holds whole weights (all of them, or the trainable ones) to save."""
        return nullcontext(objective)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The optimizer state to save when ``optimizer.state_dict()`` is not it; None when it is."""
        return None


class DataParallel(OneProcess):
    """Processes that each hold the whole model: ``DistributedDataParallel`` averages their gradients.

    DDP broadcasts rank 0's initial weights when it wraps the model, so every process starts from the same
    adapter; each draws from its own stream (dropout) as in :class:`OneProcess`.
    """

    def objective(self, task: Task) -> nn.Module:
        device = self.procs.device
        return nn.parallel.DistributedDataParallel(Objective(task.model, task.loss),
                                                   device_ids=[device.index] if device.type == "cuda" else None)

    def micro_batch(self, objective: nn.Module, last: bool) -> AbstractContextManager:
        # The gradients are all-reduced once, in the backward pass of the step's last micro-batch.
        return nullcontext() if last else objective.no_sync()


class FullySharded(OneProcess):
    """Processes that each hold a shard of every parameter (FSDP2); see :mod:`lorakit.training.fsdp`.

    ``precision`` is the run's: on CUDA with bf16, FSDP's mixed-precision policy gathers the weights in bf16.
    """

    def __init__(self, procs: Processes, precision: str) -> None:
        super().__init__(procs)
        self.precision = precision

    @contextmanager
    def initializing(self, seed: int) -> Iterator[None]:
        # FSDP does not broadcast rank 0's initial weights (each process keeps its shard of its own), so every
        # process initializes from the same seed, and takes its own stream (dropout) afterwards.
        torch.manual_seed(seed)
        yield
        if self.procs.rank:
            torch.manual_seed(seed + self.procs.rank)

    def objective(self, task: Task) -> nn.Module:
        objective = Objective(task.model, task.loss)
        shard(objective, self.procs.device, self.precision)
        return_freed_memory()  # the whole weights each process loaded are freed now; give the memory back
        if not self.procs.main:  # every process evaluates under FSDP; one progress bar is enough
            task.config = dataclasses.replace(task.config, progress=False)
        return objective

    def micro_batch(self, objective: nn.Module, last: bool) -> AbstractContextManager:
        # Gradients are reduce-scattered after the last micro-batch only, as DDP's no_sync does.
        objective.set_requires_gradient_sync(last)
        return nullcontext()

    def clip(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        return grad_norm(params, max_norm)  # the norm over every process's shards

    def evaluate(self, objective: nn.Module, task: Task, label: str) -> dict[str, Any]:
        # Every process runs the evaluation (each layer's weights are gathered from all of them), inside the
        # root's forward, where the weights outside the layers are gathered.
        with torch.no_grad():
            metrics = objective(within=lambda model: task.evaluate(model, label))
        return metrics if self.procs.main else {}

    def gathered(self, objective: nn.Module, trainable_only: bool = False) -> AbstractContextManager:
        # Every process takes part in the gathers; rank 0 gets the whole weights, in place of its shards.
        return gathered(objective, keep=self.procs.main, trainable_only=trainable_only)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        return full_optimizer_state(optimizer)  # a collective: every process calls it


def parallel_for(config: TrainConfig, procs: Processes, precision: str) -> OneProcess:
    """How this run uses its processes: sharded with ``--fsdp``, DDP with several, else one process."""
    if config.fsdp:
        return FullySharded(procs, precision)
    if procs.world > 1:
        return DataParallel(procs)
    return OneProcess(procs)
