"""Model FLOPs utilization (MFU) of a training run: how close its speed is to the machine's own limit.

MFU = the step's useful FLOPs (counted from the architecture by :func:`lorakit.models.calc.flop_counter`) per second,
over the matrix-product speed the machine reaches on the model's own products in the run's precision
(:func:`lorakit.models.devices.matmul_peak`, measured once per machine and cached). 100% would mean every
useful product ran as fast as the best one does alone and nothing else took any time. It is this machine's limit
for this model, not a datasheet's peak, so it is not comparable with MFU figures against a chip's rated FLOP/s.

The loop's :class:`Meter` keeps the run's figures: tokens, useful FLOPs (a forward and backward pass per example,
plus a forward pass per reference pass, such as DPO's), time in steps, MFU and the first and last loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..models.calc import FlopCounter, flop_counter
from ..models.devices import PEAK_ROWS, matmul_peak, model_shapes
from .devices import Processes
from .options import TrainConfig
from .registry import task_class
from .tasks import MicroBatch


@dataclass
class StepMeasure:
    """One step as the meter saw it: its tokens (all processes), seconds and MFU (None when not counted)."""

    tokens: int
    seconds: float
    mfu: float | None


class Meter:
    """The run's tokens, useful FLOPs, time in steps, MFU and first/last loss; the loop calls :meth:`step` once per
    step and asks for :meth:`summary` at the end.

    Args:
        counter: The model's FLOP counter, or None when its FLOPs are not counted (then neither is MFU).
        peak: One process's matmul peak in FLOP/s, or None where it could not be measured.
        procs: The run's processes: tokens and FLOPs are summed over them, and the peak is one process's times
            their number (each measured with its own threads).
        reference_passes: Forward-only passes per example beside the trained one (a DPO reference pass: 1).
    """

    def __init__(self, counter: FlopCounter | None, peak: float | None, procs: Processes,
                 reference_passes: int = 0) -> None:
        self.counter = counter
        self.peak = peak
        self.procs = procs
        self.reference_passes = reference_passes
        self.tokens = 0
        self.flops: float | None = 0.0  # None from the first step whose FLOPs are not counted
        self.step_seconds = 0.0  # time in steps only: evaluation and checkpoints left out
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.started = time.perf_counter()

    def start(self) -> None:
        """The training time starts now (after the evaluation before training)."""
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`start`, evaluations and checkpoints included."""
        return time.perf_counter() - self.started

    def step_flops(self, micro: list[MicroBatch]) -> int | None:
        """Useful FLOPs of this process's micro-batches, or None when they are not counted: a forward and backward
        pass, plus a forward pass per reference pass."""
        if self.counter is None or any(mb.lengths is None for mb in micro):
            return None
        flops = 0
        for mb in micro:
            passes = self.counter.step(mb.lengths, mb.head_rows)
            flops += passes.total + self.reference_passes * passes.forward
        return flops

    def mfu(self, flops: float | None, seconds: float) -> float | None:
        """The share of the run's peak that ``flops`` (summed over processes) in ``seconds`` reached."""
        if flops is None or self.peak is None or seconds <= 0:
            return None
        return flops / seconds / (self.peak * self.procs.world)

    def step(self, micro: list[MicroBatch], loss: float, started: float) -> StepMeasure:
        """Count a step that began at ``started`` (``time.perf_counter()``) on ``micro`` with ``loss``. A collective
        when there are several processes: every one calls it."""
        tokens = int(self.procs.all_sum(float(sum(mb.tokens for mb in micro))))
        local = self.step_flops(micro)
        flops = None if local is None else self.procs.all_sum(float(local))
        seconds = time.perf_counter() - started
        self.tokens += tokens
        self.flops = None if flops is None or self.flops is None else self.flops + flops
        self.step_seconds += seconds
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        return StepMeasure(tokens, seconds, self.mfu(flops, seconds))

    def summary(self) -> dict[str, Any]:
        """The run's figures as the summary reports them; the training time ends now."""
        train_s = self.elapsed
        flops, seconds = self.flops, self.step_seconds
        return {"first_loss": self.first_loss, "last_loss": self.last_loss, "tokens": self.tokens,
                "train_seconds": train_s, "tokens_per_s": self.tokens / train_s if train_s else 0.0,
                "mfu": self.mfu(flops, seconds), "model_flops": flops, "step_seconds": seconds,
                "matmul_peak_flops_per_s": self.peak,
                "model_flops_per_s": flops / seconds if flops and seconds else None}


def run_peak(config: TrainConfig, precision: str, device: torch.device, procs: Processes) -> float | None:
    """The machine's matmul peak for this run's model and precision, before anything is loaded (a measurement
    needs memory for its products). Rank 0 measures: processes measuring at once would disturb each other; every
    process takes its figure. None where it cannot be measured (no config to read shapes from, no memory)."""
    if config.method == "prompt":
        return None
    shapes = model_shapes(config.model, config.trust_remote_code, config.batch_size * config.max_length,
                          max_rows=PEAK_ROWS, head=task_class(config.task).vocabulary_head)
    if procs.world == 1:
        return matmul_peak(shapes, precision, device)
    box = [matmul_peak(shapes, precision, device) if procs.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def meter_for(config: TrainConfig, model: nn.Module, peak: float | None, procs: Processes,
              reference_passes: int = 0) -> Meter:
    """The meter of a run on ``model`` with the run's ``peak``. FLOPs (and MFU) are not counted for prompt tuning
    (its virtual tokens) and what :func:`lorakit.models.calc.flop_counter` refuses (encoder-decoders, models
    without a transformer config)."""
    counter = None
    if config.method != "prompt" and peak is not None:
        try:
            counter = flop_counter(model)
        except ValueError:
            counter = None
    return Meter(counter, peak, procs, reference_passes)
