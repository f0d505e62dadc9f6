"""The training loop of ``lorakit train``: ``train(config)`` returns the metrics and where the result was saved.

The loop reads top to bottom: build the run (:func:`_setup`: model, data, loss, optimizer, the checkpoint to resume
from), evaluate, then for each optimizer step gather ``grad_accum`` micro-batches and take the step (:func:`_step`:
forward/backward under bf16 autocast when asked, clip, step the optimizer and the schedule), count it in the meter,
log, maybe evaluate, maybe checkpoint; at the end (:func:`_finish`) evaluate again, save and summarize. The tasks
differ only in their model, batches, loss and evaluation (see :mod:`lorakit.training.tasks`); one process, DDP and
FSDP differ only behind :mod:`lorakit.training.parallel`.

Exactness rules the bookkeeping:

- The loss of a step is the sum of its token losses divided by the number of target tokens in the *whole* step
  (all micro-batches, all processes), so gradient accumulation and DistributedDataParallel give the same update
  as one big batch.
- The data order of epoch e is a permutation seeded by ``seed + e``, and micro-batch k of the run is a fixed slice
  of it, so the data position is just the step; with the optimizer, scheduler and RNG states in the checkpoint, a
  resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..core.errors import Interrupted, InvalidValue
from ..core.process_memory import allocator_in_use, map_large_allocations, peak_rss_mib, reset_peak_rss
from ..files.io import make_folder
from ..files.model_card import write_model_card
from ..models.compiling import compile_blocks, use_compile
from ..models.devices import Precision, autocast, model_shapes, resolve_device
from .checkpoint import (
    PREFIX,
    Start,
    checkpoints,
    file_digests,
    has_finite_weights,
    resume,
    rng_state,
    save_checkpoint,
    set_aside,
)
from .devices import Processes, run_precision, start_processes
from .fsdp import check_fsdp, full_bytes, local_bytes
from .interrupt import StopRequest
from .loraplus import loraplus_param_groups
from .metrics_log import MetricsLog, plot_loss, summary_writer_class
from .options import TrainConfig
from .parallel import OneProcess, parallel_for
from .preflight import preflight
from .saved_adapter import with_init_adapter
from .tasks import MicroBatch, Task, build_task
from .utilization import Meter, meter_for, run_peak


class TrainingError(InvalidValue):
    """Training stopped (a NaN/inf loss, say); the message says where the last good checkpoint is."""


# --------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, data order
# --------------------------------------------------------------------------------------------------------------


def make_optimizer(params: list[nn.Parameter] | list[dict[str, Any]], lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    """AdamW over ``params`` (tensors, or parameter groups whose own ``lr``/``weight_decay`` win), with the fused
    kernel where PyTorch has one for these parameters.

    The fused kernel does the whole update in one pass per tensor, several times faster than the default (foreach)
    one on CPU (see bench/README.md), which matters for full fine-tuning.
    """
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier of step ``s``: linear warmup, then linear/cosine decay to 0 or constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def micro_batch_indices(k: int, n: int, per_process: int, procs: Processes, seed: int) -> list[int]:
    """The example indices of micro-batch ``k`` of the run for this process.

    Epoch e shuffles the ``n`` examples with a generator seeded by ``seed + e`` and cuts them into global batches
    of ``per_process × world`` examples (the rest of the epoch is dropped); process r takes the r-th slice.
    """
    global_batch = per_process * procs.world
    per_epoch = n // global_batch
    epoch, j = divmod(k, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    start = j * global_batch + procs.rank * per_process
    return order[start:start + per_process].tolist()


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the loop works with, built by :func:`_setup`: the task, how it runs on the processes, the optimizer and
    schedule, where it starts and what it writes."""

    config: TrainConfig
    task: Task
    device: torch.device
    procs: Processes
    par: OneProcess  # single process, DDP or FSDP (see lorakit.training.parallel)
    precision: Precision
    objective: nn.Module  # the model and its loss, as the steps call them (wrapped or sharded)
    params: list[nn.Parameter]  # the trainable ones, clipped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total: int  # optimizer steps in the run
    start: Start
    meter: Meter
    log: MetricsLog
    out: Path
    config_yaml: str  # what every checkpoint records
    data_digests: dict[str, str]
    param_bytes: list[int]  # per process
    t_start: float

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


def train(config: TrainConfig | dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Train as ``config`` says (defaults: the built-in task on the embedded SmolLM2-135M-Instruct).

    Args:
        config: A :class:`TrainConfig`, a dict of its fields, or None for the defaults.
        **overrides: Fields to change on top of ``config``.

    Returns:
        The metrics: evaluation ``before`` and ``after``, trainable/all parameters, steps, tokens, tokens/s,
        seconds, and ``output_dir`` / ``adapter_bytes`` of the saved adapter (or full model).

    With ``low_memory`` on CPU this sets glibc's allocator to map large allocations separately, for the whole
    process (see :mod:`lorakit.core.process_memory`).

    Raises:
        ValueError: A bad option or dataset (the message names it); :class:`TrainingError` when the loss turns
            NaN/inf (the last good checkpoint stays intact).
    """
    config = with_init_adapter(_as_config(config, overrides))
    run = _setup(config)
    model, procs, total = run.task.model, run.procs, run.total
    before = run.start.before  # a resumed run evaluated before its first step
    if before is None:
        before = _evaluate(run, "before")
        run.log.write({"step": 0, "eval": before})
    procs.barrier()

    if use_compile(config.compile, model, run.device, total - run.start.step, procs.world):  # lorakit.models.compiling
        compile_blocks(model, training=True)  # each decoder block in place; the first step pays the compilation
    bar = _progress(config.progress and procs.main, total, run.start.step)
    model.train()
    run.meter.start()
    with StopRequest() as stop:
        _train_steps(run, bar, before, stop)
    if bar is not None:
        bar.close()
    return _finish(run, before, run.meter.summary())


def _train_steps(run: Run, bar: Any, before: dict[str, Any], stop: StopRequest) -> None:
    """The optimizer steps from the start (or the resumed step) to the last, with their logging, evaluations and
    checkpoints; after a Ctrl-C, a checkpoint of the step just taken and :class:`Interrupted`."""
    config, procs, total = run.config, run.procs, run.total
    for step in range(run.start.step, total):
        t_step = time.perf_counter()
        micro = [run.task.batch(micro_batch_indices(step * config.grad_accum + i, len(run.task.train),
                                                    config.batch_size, procs, config.seed))
                 for i in range(config.grad_accum)]
        loss, norm, task_metrics = _step(run, micro, step)
        measured = run.meter.step(micro, loss, t_step)
        run.log.write({"step": step + 1, "loss": loss, "lr": run.scheduler.get_last_lr()[0], "grad_norm": norm,
                       "tokens": measured.tokens, "step_s": round(measured.seconds, 4), **task_metrics,
                       **({"mfu": float(f"{measured.mfu:.4g}")} if measured.mfu is not None else {})})
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{run.meter.tokens / run.meter.elapsed:.0f}")
            bar.update(1)
        done = step + 1
        if step == run.start.step + 1 and procs.main and total - done > 0:
            # From the second step: the first one also pays one-time costs (allocations, kernel choices).
            _estimate(time.perf_counter() - t_step, total - done, run.meter.elapsed, bar)
        if config.eval_every and done % config.eval_every == 0 and done < total:
            metrics = _evaluate(run, f"step {done}")
            if procs.main:
                run.log.write({"step": done, "eval": metrics})
            procs.barrier()
        saved = bool(config.save_every) and done % config.save_every == 0 and done < total
        if saved:
            _checkpoint(run, done, loss, before)
        if done < total and stop.asked(procs):
            if not saved:
                _checkpoint(run, done, loss, before)
            if bar is not None:
                bar.close()
            run.log.close()
            raise Interrupted(f"stopped after step {done} of {total} (Ctrl-C); the checkpoint "
                              f"{run.ckpt_root / f'{PREFIX}{done:06d}'} holds it: the same command with --resume goes "
                              f"on from there")


def _setup(config: TrainConfig) -> Run:
    """Everything before the first step: the processes, checks that need no weights, the precision, the task
    (model, data, loss) on the processes, the optimizer and schedule, and the checkpoint to resume from."""
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    if config.low_memory and device.type == "cpu":
        map_large_allocations()
    procs = start_processes(device)
    check_fsdp(config, procs.world, device)
    if config.report_to == "tensorboard" and procs.main:
        summary_writer_class()  # TensorBoard missing: said now, not after the model has loaded
    preflight(config, device, procs)  # before loading anything: a run that cannot fit stops here, in seconds
    precision = run_precision(config.precision, device, model_shapes(config.model, config.trust_remote_code,
                                                                     config.batch_size * config.max_length), procs)
    peak = run_peak(config, precision.name, device, procs)  # for MFU; measured once per machine, before loading
    out = Path(config.output_dir)
    if procs.main:
        make_folder(out, "output folder (--output-dir)")  # a file in its way is said in words

    par = parallel_for(config, procs, precision.name)
    with par.initializing(config.seed):
        task = build_task(config, device, precision.name)
    model = task.model
    objective = par.objective(task)  # before the optimizer: under FSDP it steps the shards
    meter = meter_for(config, model, peak, procs, task.reference_passes)
    reset_peak_rss()  # the reported peak is that of evaluating and training, not of loading (or sharding) the model
    param_bytes = procs.all_gather(local_bytes(model))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = params if config.loraplus_lr_ratio is None else loraplus_param_groups(  # LoRA+: B learns faster
        model, config.lr, config.loraplus_lr_ratio, loraplus_weight_decay=config.weight_decay)
    optimizer = make_optimizer(groups, config.lr, config.weight_decay)
    per_epoch = len(task.train) // (config.batch_size * procs.world)
    if per_epoch == 0:
        raise InvalidValue(f"the training data has {len(task.train)} examples, fewer than one global batch "
                           f"({config.batch_size} × {procs.world} processes); lower --batch-size")
    total = config.total_steps(per_epoch)
    schedule = lr_lambda(config.schedule, config.warmup_steps, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data_digests = file_digests([config.data, config.eval_data])  # read once; every checkpoint records them

    start = resume(config, out / "checkpoints", procs, model, optimizer, scheduler, schedule, data_digests)
    log = MetricsLog(out / "metrics.jsonl", enabled=procs.main, report_to=config.report_to)
    log.start(start.step if start.checkpoint else None)
    return Run(config, task, device, procs, par, precision, objective, params, optimizer, scheduler, total, start,
               meter, log, out, yaml.safe_dump(config.to_dict(), sort_keys=False), data_digests, param_bytes,
               t_start)


def _step(run: Run, micro: list[MicroBatch], step: int) -> tuple[float, float, dict[str, float]]:
    """One optimizer step on ``micro`` (this process's micro-batches): forward and backward of each (under bf16
    autocast when asked), then clipping, the optimizer and the schedule. Returns the step's loss, gradient norm
    and the task's metrics, each the same on every process.

    Raises:
        ValueError: The step has no target tokens.
        TrainingError: The loss or gradient norm is NaN/inf (before the optimizer step).
    """
    config, procs = run.config, run.procs
    targets = procs.all_sum(float(sum(m.targets for m in micro)))
    if targets == 0:
        raise InvalidValue(f"step {step + 1} has no target tokens (every response was cut by --max-length "
                           f"{config.max_length}?); raise --max-length")
    compute = autocast(run.precision.name, run.device)
    loss_sum, metric_sums = 0.0, {}
    for i, mb in enumerate(micro):
        with run.par.micro_batch(run.objective, last=i == len(micro) - 1):
            with compute:
                result = run.objective({k: v.to(run.device) for k, v in mb.tensors.items()})
            (result.sum * (procs.world / targets)).backward()  # DDP and FSDP average over processes; undo that
        loss_sum += result.sum.item()
        for name, value in result.metrics.items():
            metric_sums[name] = metric_sums.get(name, 0.0) + float(value)
    loss = procs.all_sum(loss_sum) / targets  # the same value on every process, so all of them stop together
    task_metrics = run.task.step_metrics({name: procs.all_sum(value) for name, value in sorted(metric_sums.items())},
                                         targets)
    if not math.isfinite(loss):
        _stop_on_nan(loss, step + 1, run.ckpt_root, config)
    norm = run.par.clip(run.params, config.max_grad_norm)  # the same on every process (FSDP: over all shards)
    if not torch.isfinite(norm):
        _stop_on_nan(norm.item(), step + 1, run.ckpt_root, config, what="gradient norm")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, norm.item(), task_metrics


@torch.compiler.set_stance("force_eager")  # --compile is for the training steps: compiled decoding does not pay
def _evaluate(run: Run, label: str) -> dict[str, Any]:
    """The held-out metrics on rank 0 ({} elsewhere), computed as the steps are (bf16 autocast or fp32: a bf16
    base feeds fp32 heads)."""
    with autocast(run.precision.name, run.device):
        return run.par.evaluate(run.objective, run.task, label)


def _checkpoint(run: Run, done: int, loss: float, before: dict[str, Any]) -> None:
    """Write the checkpoint of step ``done``: what was trained, the optimizer, schedule and every process's RNG
    states, so that a resumed run goes on bit-identical. Under FSDP every process takes part in gathering the
    trainable weights and optimizer state; rank 0 writes them as a one-process run would."""
    states = run.procs.all_gather(rng_state())
    with run.par.gathered(run.objective, trainable_only=True):
        optimizer_state = run.par.optimizer_state(run.optimizer)
        if run.procs.main:
            save_checkpoint(run.ckpt_root, done, run.task.model, run.optimizer, run.scheduler,
                            {"micro_batches": done * run.config.grad_accum, "before": before, "rng": states,
                             "loss": loss, "data": run.data_digests},
                            run.config_yaml, run.config.keep_checkpoints, optimizer_state=optimizer_state)
    run.procs.barrier()


def _finish(run: Run, before: dict[str, Any], speed: dict[str, Any]) -> dict[str, Any]:
    """Evaluate after training, save what was trained and write the summary, model card and loss curve (rank 0);
    returns the summary (``{}`` on the other processes)."""
    config, task, procs, out = run.config, run.task, run.procs, run.out
    result: dict[str, Any] = {}
    peak_rss = procs.all_gather(peak_rss_mib())  # before saving: under FSDP that gathers the whole model
    after = _evaluate(run, "after")
    with run.par.gathered(run.objective):  # under FSDP: the whole weights, on rank 0, for the saved files
        saved_bytes = task.save(task.model, out) if procs.main else 0
    if procs.main:
        run.log.write({"step": run.total, "eval": after})
        run.log.close()
        task.config.save_yaml(out / "train_config.yaml")  # with what the task resolved (a classifier's labels)
        png = plot_loss(run.log.records, out / "loss_curve.png", f"{config.method} on {task.name}")
        result = summarize(config, task, precision=run.precision.name, device=run.device, procs=procs,
                           steps=run.total, resumed_from=run.start.checkpoint, speed=speed, before=before,
                           after=after, saved_bytes=saved_bytes, loss_curve=png,
                           total_s=time.perf_counter() - run.t_start)
        result.update(precision_reason=run.precision.reason, fsdp=config.fsdp, param_bytes=full_bytes(task.model),
                      param_bytes_per_process=run.param_bytes, peak_rss_mib_per_process=peak_rss,
                      peak_gpu_mib=(torch.cuda.max_memory_allocated(run.device) / 2**20
                                    if run.device.type == "cuda" else None))
        (out / "summary.json").write_text(json.dumps(result, indent=2))
        write_model_card(out, training={"config": task.config.to_dict(), "summary": result})  # now with the metrics
    procs.barrier()
    return result


def _as_config(config: TrainConfig | dict[str, Any] | None, overrides: dict[str, Any]) -> TrainConfig:
    if config is None:
        config = TrainConfig(**overrides)
    elif isinstance(config, dict):
        config = TrainConfig(**{**config, **overrides})
    elif overrides:
        config = TrainConfig(**{**config.to_dict(), **overrides})
    return config.resolved()


def summarize(config: TrainConfig, task: Task, *, precision: str, device: torch.device, procs: Processes,
              steps: int, resumed_from: Path | None, speed: dict[str, Any], before: dict[str, Any],
              after: dict[str, Any], saved_bytes: int, loss_curve: Path | None, total_s: float) -> dict[str, Any]:
    """The run's summary, as ``train`` returns it and writes it to ``summary.json``; ``speed`` is the meter's
    (:meth:`lorakit.training.utilization.Meter.summary`: losses, tokens, seconds, FLOPs, MFU)."""
    trainable, all_params = task.count_parameters()
    speed = dict(speed)
    mfu = {key: speed.pop(key) for key in ("mfu", "model_flops", "step_seconds", "matmul_peak_flops_per_s",
                                          "model_flops_per_s")}
    return {
        "task": task.name, "headline_metric": task.headline_metric, "method": config.method, "quantize": config.quantize, "precision": precision,
        "device": str(device),
        "processes": procs.world, "trainable_params": trainable, "all_params": all_params,
        "steps": steps, "resumed_from": str(resumed_from) if resumed_from else None,
        **speed,  # first_loss, last_loss, tokens, train_seconds, tokens_per_s
        "before": before, "after": after, "output_dir": str(Path(config.output_dir)), "adapter_bytes": saved_bytes,
        "loss_curve": str(loss_curve) if loss_curve else None, "total_seconds": total_s,
        "peak_rss_mib": peak_rss_mib(), "allocator": allocator_in_use(), **mfu,
    }


def _stop_on_nan(value: float, step: int, ckpt_root: Path, config: TrainConfig, what: str = "loss") -> None:
    """Stop with a message that says how to recover: the newest checkpoint whose weights gave a finite loss is
    named, the newer ones (whose weights led here) are set aside, and the command to resume at a lower rate."""
    diverged = []
    found = checkpoints(ckpt_root)
    # The checkpoint of the previous step holds the weights this NaN came from; any that is not finite is bad too.
    while found and (int(found[-1].name.split("-")[-1]) >= step - 1 or not has_finite_weights(found[-1])):
        diverged.append(set_aside(found.pop()))
    aside = f" {len(diverged)} checkpoint(s) whose weights led here were renamed {diverged[0].parent}/diverged-*." \
        if diverged else ""
    if not found:
        raise TrainingError(f"the {what} is {value} at step {step}; training stopped before the optimizer step.{aside} "
                            f"No good checkpoint is left (use --save-every N to have some). Try a lower --lr (e.g. "
                            f"{config.lr / 10:g}), --max-grad-norm 1.0 or --precision fp32")
    good = found[-1]
    raise TrainingError(
        f"the {what} is {value} at step {step}; training stopped before the optimizer step.{aside} The last good "
        f"checkpoint, {good}, is intact. Resume from it with a lower learning rate (from this directory):\n"
        f"  lorakit train --config {good / 'train_config.yaml'} --resume --lr {config.lr / 10:g}\n"
        f"(or try --max-grad-norm 1.0 or --precision fp32)")


def _estimate(step_s: float, steps_left: int, elapsed_s: float, bar: Any) -> None:
    """Say how long training will take: the steps so far plus the rest at the second step's pace."""
    seconds = elapsed_s + step_s * steps_left
    when = f"about {seconds / 60:.0f} min" if seconds >= 90 else f"about {seconds:.0f} s"
    message = f"lorakit: a step takes {step_s:.1f} s; training will take {when} in all (plus evaluation)"
    if bar is not None:
        bar.write(message, file=sys.stderr)  # above the bar, not through it
    else:
        print(message, file=sys.stderr, flush=True)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
