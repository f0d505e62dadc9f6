"""Model FLOPs utilization (MFU) of a training run: how close its speed is to the machine's own limit.

MFU = the step's useful FLOPs (counted from the architecture by :func:`lorakit.models.calc.flop_counter`) per second,
over the matrix-product speed the machine reaches on the model's own products in the run's precision
(:func:`lorakit.models.devices.matmul_peak`, measured once per machine and cached). 100% would mean every
useful product ran as fast as the best one does alone and nothing else took any time. It is this machine's limit
for this model, not a datasheet's peak, so it is not comparable with MFU figures against a chip's rated FLOP/s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..models.calc import FlopCounter, flop_counter
from ..models.devices import PEAK_ROWS, matmul_peak, model_shapes
from .devices import Processes
from .options import TrainConfig
from .tasks import MicroBatch

LM_TASKS = ("builtin", "causal_lm")  # the tasks whose output head is the vocabulary's


@dataclass
class Utilization:
    """What a run needs to report MFU; either part is None where it cannot be counted."""

    counter: FlopCounter | None
    peak: float | None  # FLOP/s of one process
    world: int = 1

    def flops(self, micro: list[MicroBatch]) -> int | None:
        """Useful FLOPs of this process's micro-batches, or None when they are not counted."""
        if self.counter is None or any(mb.lengths is None for mb in micro):
            return None
        return sum(self.counter.step(mb.lengths, mb.head_rows).total for mb in micro)

    def mfu(self, flops: float | None, seconds: float) -> float | None:
        """The share of the peak that ``flops`` (summed over processes) in ``seconds`` reached. With several
        processes the peak is one process's times their number (each measured with its own threads)."""
        if flops is None or self.peak is None or seconds <= 0:
            return None
        return flops / seconds / (self.peak * self.world)


def run_peak(config: TrainConfig, precision: str, device: torch.device, procs: Processes) -> float | None:
    """The machine's matmul peak for this run's model and precision, before anything is loaded (a measurement
    needs memory for its products). Rank 0 measures: processes measuring at once would disturb each other; every
    process takes its figure. None where it cannot be measured (no config to read shapes from, no memory)."""
    if config.method == "prompt":
        return None
    shapes = model_shapes(config.model, config.trust_remote_code, config.batch_size * config.max_length,
                          max_rows=PEAK_ROWS, head=config.task in LM_TASKS)
    if procs.world == 1:
        return matmul_peak(shapes, precision, device)
    box = [matmul_peak(shapes, precision, device) if procs.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def utilization(config: TrainConfig, model: nn.Module, peak: float | None, procs: Processes) -> Utilization:
    """The FLOP counter of ``model`` with the run's ``peak``. Not counted: prompt tuning (its virtual tokens) and
    what :func:`lorakit.models.calc.flop_counter` refuses (encoder-decoders, models without a transformer config)."""
    counter = None
    if config.method != "prompt" and peak is not None:
        try:
            counter = flop_counter(model)
        except ValueError:
            counter = None
    return Utilization(counter, peak, procs.world)
