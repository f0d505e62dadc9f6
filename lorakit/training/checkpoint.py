"""Resumable training checkpoints, written atomically.

A checkpoint is a folder ``<output_dir>/checkpoints/step-000050`` holding

- ``trainable.safetensors``: every trainable parameter by name (for LoRA: the adapter weights);
- ``optimizer.pt``: the optimizer's and the scheduler's state dicts;
- ``state.json``: the step, the data position, the metrics so far and each rank's RNG states (as lists);
- ``train_config.yaml``: the run's config, to refuse resuming a different run.

Under FSDP the weights and optimizer state are gathered from the shards first, so the files are those of a
one-process run; on resume each process cuts its own shard from them. :func:`resume` puts the last checkpoint's
states into place when the options allow it.

It is written under a temporary name and renamed into place, so a crash (even ``kill -9``) leaves either the whole
checkpoint or none of it. ``optimizer.pt`` holds only tensors and plain containers and is read with
``torch.load(weights_only=True)``: no pickled code runs on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..core.errors import FileProblem, InvalidValue, write_failure
from ..files.io import safetensors_bytes, temporary_folder
from .devices import Processes
from .fsdp import shard_like, shard_optimizer_state
from .options import TrainConfig

PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-friendly lists (Python's ``random`` and torch's CPU/CUDA generators)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], config_yaml: str, keep: int,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and keep only the ``keep`` newest.

    ``optimizer_state`` replaces ``optimizer.state_dict()`` when given: under FSDP, the state gathered from every
    process's shards (:func:`~lorakit.training.fsdp.full_optimizer_state`), so the file is a one-process run's.
    """
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = temporary_folder(root, ".tmp-")
    try:
        writing = tmp / "trainable.safetensors"
        try:
            writing.write_bytes(safetensors_bytes(trainable_state(model)))
            writing = tmp / "optimizer.pt"
            torch.save({"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                        "scheduler": scheduler.state_dict()}, writing)
            writing = tmp / "state.json"
            writing.write_text(json.dumps({"step": step, **state}))
            writing = tmp / "train_config.yaml"
            writing.write_text(config_yaml)
            for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
                writing = f
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            reason = write_failure(err)
            earlier = checkpoints(root)
            kept = f"the previous checkpoint, {earlier[-1]}, is intact" if earlier else "no earlier checkpoint exists"
            raise FileProblem(f"could not write {writing.name} of the step-{step} checkpoint in {root} ({reason}); "
                              f"{kept}") from None
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)  # the rename itself survives a power loss
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside(path: Path) -> Path:
    """Rename a checkpoint whose weights led to a NaN/inf loss to ``diverged-step-N``: kept for inspection, never
    resumed from."""
    target = path.with_name(f"diverged-{path.name}")
    if target.exists():
        shutil.rmtree(target)
    os.replace(path, target)
    return target


def has_finite_weights(path: Path) -> bool:
    """Whether every trainable tensor saved in the checkpoint is finite."""
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
    except (OSError, ValueError, SafetensorError):
        return False
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def file_digests(paths: list[str | None]) -> dict[str, str]:
    """SHA-256 of each data file a run reads (by its resolved path), so a resume can refuse changed data. A folder
    (a ``datasets`` ``save_to_disk`` folder) gets one digest over its files' names and contents."""
    digests = {}
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            continue
        sha = hashlib.sha256()
        for file in files:
            if file != path:
                sha.update(str(file.relative_to(path)).encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
        digests[str(path.resolve())] = sha.hexdigest()
    return digests


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders of a crashed write are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
                    ) -> dict[str, Any]:
    """Restore parameters, optimizer and scheduler from ``path``; returns the saved ``state.json``.

    Raises:
        ValueError: The checkpoint's parameters do not match the model's trainable ones.
    """
    # Everything is read and checked before anything is copied: a damaged file changes nothing.
    damaged = "is damaged; remove this checkpoint to resume from the one before it"
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
    except (OSError, SafetensorError) as err:
        raise InvalidValue(f"{path / 'trainable.safetensors'} {damaged} ({err})") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise InvalidValue(f"checkpoint {path} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, value in tensors.items():
        if value.shape != params[name].shape:
            raise InvalidValue(f"checkpoint {path}: {name} is {list(value.shape)}, the model's is "
                               f"{list(params[name].shape)}")
    try:
        saved = torch.load(path / "optimizer.pt", weights_only=True)
        if not isinstance(saved, dict) or not {"optimizer", "scheduler"} <= saved.keys():
            raise InvalidValue("not an optimizer and scheduler state")
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise InvalidValue(f"{path / 'optimizer.pt'} {damaged} ({str(err).splitlines()[0] if str(err) else err!r})"
                           ) from None
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "rng" not in state:
            raise InvalidValue("no step and RNG states")
    except (OSError, ValueError, RecursionError) as err:
        raise InvalidValue(f"{path / 'state.json'} {damaged} ({err})") from None
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(shard_like(value, params[name]))  # under FSDP: this process's shard of it
    optimizer.load_state_dict(shard_optimizer_state(saved["optimizer"], optimizer))
    scheduler.load_state_dict(saved["scheduler"])
    return state


RESUMABLE_CHANGES = {"resume", "progress", "low_memory", "save_every", "keep_checkpoints", "eval_every", "max_eval",
                     "report_to",  # where the metrics are also written, not what is trained
                     "preflight",  # a check before loading, not part of the run
                     "compile",  # how fast the steps run, not what they compute
                     "output_dir",  # the run folder was moved: its checkpoints came along (they are found in it)
                     "eval_batch_size"}
# May change on resume (to recover from a diverged run), at the price of bit-identity with an uninterrupted run.
RECOVERY_CHANGES = {"lr", "schedule", "warmup_steps", "max_grad_norm"}
PATH_OPTIONS = {"model", "data", "eval_data"}


@dataclass
class Start:
    """Where the loop starts: step 0, or the step of the checkpoint it resumes from."""

    step: int = 0
    before: dict[str, Any] | None = None  # the evaluation before training, kept in the checkpoint
    checkpoint: Path | None = None


def resume(config: TrainConfig, ckpt_root: Path, procs: Processes, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
           schedule: Callable[[int], float], data_digests: dict[str, str]) -> Start:
    """With ``--resume``, load the last checkpoint's model, optimizer, schedule and RNG states into place.

    Without it, refuse to start over checkpoints of an earlier run (they would be overwritten). The options must be
    the checkpoint's, except the learning rate, schedule, warmup and gradient clipping, which may change to recover
    from a diverged run (the schedule then continues from this step with the new values; said on stderr).
    ``schedule`` is the learning-rate multiplier of each step under this run's options.

    Raises:
        ValueError: No checkpoint to resume from, one from a run with other options, another process count or
            other data (the files' SHA-256 are kept in the checkpoint).
    """
    found = checkpoints(ckpt_root)
    if not config.resume:
        if found:
            raise InvalidValue(f"{ckpt_root} holds checkpoints of an earlier run; continue it with --resume, or remove "
                               f"them or choose another --output-dir (nothing was changed)")
        return Start()
    if not found:
        raise InvalidValue(f"--resume: no checkpoint in {ckpt_root} (checkpoints are written with --save-every N)")
    last = found[-1]
    try:
        saved = yaml.safe_load((last / "train_config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise InvalidValue(f"{last / 'train_config.yaml'} is damaged; remove this checkpoint to resume from the one "
                           f"before it ({str(err).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise InvalidValue(f"{last / 'train_config.yaml'} is damaged (not a mapping of options); remove this "
                           f"checkpoint to resume from the one before it")
    changes = _config_changes(saved, config)
    refused = [change for key, change in changes.items() if key not in RECOVERY_CHANGES]
    if refused:
        raise InvalidValue(f"--resume: {last} belongs to a run with other options ({'; '.join(refused)})")
    state = load_checkpoint(last, model, optimizer, scheduler)
    if len(state["rng"]) != procs.world:
        raise InvalidValue(f"--resume: {last} was written by {len(state['rng'])} process(es), this run has "
                           f"{procs.world}; the data order and RNG states would differ. Resume with the same count")
    for path, digest in data_digests.items():
        if state.get("data", {}).get(path, digest) != digest:
            raise InvalidValue(f"--resume: {path} changed since {last} was written; resuming would train on other "
                               f"data than the checkpoint's run. Restore the file, or start a new run")
    if changes:  # only recovery options changed: the schedule restarts from the new values at this step
        if procs.main:
            print(f"lorakit: resuming with {'; '.join(changes.values())}: the run is no longer bit-identical to "
                  f"an uninterrupted one", file=sys.stderr, flush=True)
        scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
        scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = config.lr
            group["lr"] = config.lr * schedule(scheduler.last_epoch)
    set_rng_state(state["rng"][procs.rank])
    return Start(state["step"], state["before"], last)


def _config_changes(saved: dict[str, Any], config: TrainConfig) -> dict[str, str]:
    """Options that differ from a checkpoint's, as "name: old → new" by name; paths compare resolved."""
    now = config.to_dict()

    def same(key: str, a: Any, b: Any) -> bool:
        if key in PATH_OPTIONS and isinstance(a, str) and isinstance(b, str):
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    return {k: f"{k}: {saved.get(k)!r} → {now[k]!r}" for k in now
            if k not in RESUMABLE_CHANGES and not same(k, saved.get(k), now[k])}
