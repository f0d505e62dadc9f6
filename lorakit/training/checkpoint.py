"""Resumable training checkpoints, written atomically.

A checkpoint is a folder ``<output_dir>/checkpoints/step-000050`` holding

- ``trainable.safetensors``: every trainable parameter by name (for LoRA: the adapter weights);
- ``optimizer.pt``: the optimizer's and the scheduler's state dicts;
- ``state.json``: the step, the data position, the metrics so far and each rank's RNG states (as lists);
- ``train_config.yaml``: the run's config, to refuse resuming a different run.

It is written under a temporary name and renamed into place, so a crash (even ``kill -9``) leaves either the whole
checkpoint or none of it. ``optimizer.pt`` holds only tensors and plain containers and is read with
``torch.load(weights_only=True)``: no pickled code runs on resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..io import safetensors_bytes

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
                    scheduler: Any, state: dict[str, Any], config_yaml: str, keep: int) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and keep only the ``keep`` newest."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        (tmp / "trainable.safetensors").write_bytes(safetensors_bytes(trainable_state(model)))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
        (tmp / "train_config.yaml").write_text(config_yaml)
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
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
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"checkpoint {path} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return json.loads((path / "state.json").read_text())
