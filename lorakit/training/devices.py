"""This process's place in a ``torchrun`` job, and the run's precision agreed by all its processes."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..models.devices import Precision, Shape, decide_precision


@dataclass
class Processes:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run (nccl: CUDA)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (any picklable object), by rank."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def run_precision(name: str, device: torch.device, shapes: list[Shape] | None, procs: Processes) -> Precision:
    """:func:`decide_precision` for a run of one or more processes: with ``auto``, rank 0 measures (all measuring
    at once on one machine would disturb each other's timings) and every process takes its choice (processes that
    chose differently would train different models)."""
    if name != "auto" or procs.world == 1:
        return decide_precision(name, device, shapes)
    box = [decide_precision(name, device, shapes) if procs.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def start_processes(device: torch.device) -> Processes:
    """Join the ``torchrun`` process group (gloo on CPU, nccl on CUDA), if this is a torchrun job."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Rank 0 evaluates and saves while the others wait at a barrier: give that time (generation can be slow).
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return Processes(dist.get_rank(), dist.get_world_size(), device)
