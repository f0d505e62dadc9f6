"""Rank advice: how much of its rank a trained adapter uses, and a smaller adapter cut from it.

Each wrapped module's update is ΔW = scaling·B·A, of rank at most r. :func:`inspect_adapter` gives its singular
values and the smallest rank that keeps 90% / 99% of its energy (the sum of σ²), per module and over all modules;
:func:`resize_adapter` writes an adapter of a smaller rank by truncated SVD, the best approximation of each update
at that rank (Eckart–Young), and measures the logit error it introduces when given the base model.

The SVD of B·A never forms the (out × in) matrix: with B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), B·A =
Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, so the singular values are those of an r × r matrix.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import InvalidValue
from ..core.quant import default_probe, logits
from ..files.io import PREFIX, json_targets, read_adapter, read_adapter_config, write_adapter_files
from .model import LoraModel

# PEFT's keys: ``<module>.lora_A.weight`` (``<module>.lora_embedding_A`` for embeddings), and the same for B.
_A = re.compile(r"^(.*)\.lora_(?:embedding_)?A(?:\.weight)?$")
_B = re.compile(r"^(.*)\.lora_(?:embedding_)?B(?:\.weight)?$")


@dataclass
class ModuleSpectrum:
    """The singular values of one module's update and the ranks that keep 90% and 99% of its energy."""

    name: str
    r: int
    singular_values: list[float]
    rank_90: int
    rank_99: int


def _factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Module name → (key of A, key of B), for every LoRA pair in an adapter's tensors."""
    keys_a = {m.group(1): k for k in tensors if (m := _A.match(k))}
    keys_b = {m.group(1): k for k in tensors if (m := _B.match(k))}
    return {name: (keys_a[name], keys_b[name]) for name in sorted(keys_a, key=_natural) if name in keys_b}


def _natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key that puts layers in model order: ``layers.2`` before ``layers.10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _svd(a: torch.Tensor, b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out × r), σ (r,), V (in × r) of scaling·B·A, in fp64. A may carry a conv kernel (flattened)."""
    a2 = a.reshape(a.shape[0], -1).double()  # (r, in·kh·kw)
    b2 = b.reshape(b.shape[0], -1).double()  # (out, r)
    q_b, r_b = torch.linalg.qr(b2)  # (out, r), (r, r)
    q_a, r_a = torch.linalg.qr(a2.T)  # (in, r), (r, r)
    # (r, r), or smaller when a layer is narrower than r
    u, s, vh = torch.linalg.svd(scaling * r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, q_a @ vh.T


def _rank_for(energy: torch.Tensor, share: float) -> int:
    """Smallest k whose top-k energies (sorted descending) sum to ``share`` of the total (0 for a zero update)."""
    total = energy.sum()
    if total <= 0:
        return 0
    return int((torch.cumsum(energy, 0) < share * total * (1 - 1e-12)).sum().item()) + 1


def _scaling(config: Any, name: str) -> float:
    r, alpha = config.rank_for(name), config.alpha_for(name)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def inspect_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """Singular values of every module's update in the adapter at ``path``, and rank advice.

    Returns:
        ``modules``: a :class:`ModuleSpectrum` per module; ``r``: the adapter's rank; ``overall``: for k = 1..r
        the share of all modules' update energy kept by their top-k directions (``kept``), and the smallest k
        keeping 90% and 99% of it (``rank_90``, ``rank_99``).
    """
    config, tensors, _ = read_adapter(path)
    if config.use_dora:
        raise InvalidValue("DoRA adapters also rescale the base weight's rows; their rank advice is not B·A's alone")
    modules, energies = [], []
    for name, (key_a, key_b) in _factors(tensors).items():
        _, s, _ = _svd(tensors[key_a], tensors[key_b], _scaling(config, name))
        energy = s**2
        energies.append(energy)
        modules.append(ModuleSpectrum(name, tensors[key_a].shape[0], [float(v) for v in s],
                                      _rank_for(energy, 0.9), _rank_for(energy, 0.99)))
    if not modules:
        raise InvalidValue(f"{path} holds no LoRA A/B pairs")
    r = max(m.r for m in modules)
    total = sum(float(e.sum()) for e in energies)
    if total == 0:  # an untrained adapter (B = 0): no update to keep
        return {"r": r, "modules": modules, "overall": {"kept": [1.0] * r, "rank_90": 0, "rank_99": 0}}
    kept = [sum(float(e[:k].sum()) for e in energies) / total for k in range(1, r + 1)]
    overall = {"kept": kept,
               "rank_90": next((k for k, v in enumerate(kept, 1) if v >= 0.9 - 1e-12), r),
               "rank_99": next((k for k, v in enumerate(kept, 1) if v >= 0.99 - 1e-12), r)}
    return {"r": r, "modules": modules, "overall": overall}


def resize_adapter(path: str | os.PathLike, rank: int, output: str | os.PathLike, model: nn.Module | None = None,
                   probe: Any = None) -> dict[str, Any]:
    """Write the adapter at ``path`` cut to ``rank`` by truncated SVD into ``output`` (PEFT's format).

    Each module keeps its top ``min(rank, r)`` singular directions; the new factors are B' = U·√σ and
    A' = √σ·Vᵀ with ``lora_alpha = rank`` (scaling 1), so ΔW' is the best rank-``rank`` approximation of ΔW.
    Trained heads and biases are copied as they are, and so is the base fingerprint.

    Args:
        model: The base model; when given, both adapters run on it and the report has the logit error.
        probe: Inputs for that comparison (default: two rows of fixed token ids for Hugging Face models).

    Returns:
        ``rank``, ``energy_kept`` (share of the update energy over all modules), ``output``, and with ``model``:
        ``max_abs_logit_diff``, ``mean_abs_logit_diff``, ``max_abs_logit``.
    """
    if not isinstance(rank, int) or rank < 1:
        raise InvalidValue(f"rank must be a positive integer, got {rank!r}")
    if Path(output).resolve() == Path(path).resolve():
        raise InvalidValue(f"the output folder {str(output)!r} is the adapter itself; write the resized adapter "
                           f"elsewhere")
    config, tensors, metadata = read_adapter(path)
    if config.use_dora:
        raise InvalidValue("lorakit cannot resize DoRA adapters (their magnitude vector depends on the full update)")
    out_tensors = dict(tensors)
    rank_pattern: dict[str, int] = {}
    kept = total = 0.0
    for name, (key_a, key_b) in _factors(tensors).items():
        a, b = tensors[key_a], tensors[key_b]
        u, s, v = _svd(a, b, _scaling(config, name))
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        new_b = (u[:, :k] * root).reshape(b.shape[0], k, *b.shape[2:])  # (out, k[, 1, 1])
        new_a = (root[:, None] * v[:, :k].T).reshape(k, *a.shape[1:])  # (k, in[, kh, kw])
        out_tensors[key_a], out_tensors[key_b] = new_a.to(a.dtype).contiguous(), new_b.to(b.dtype).contiguous()
        kept, total = kept + float((s[:k] ** 2).sum()), total + float((s**2).sum())
        if k != rank:
            rank_pattern[re.escape(name)] = k
    settings = config.to_dict()
    settings.update(r=rank, lora_alpha=rank, use_rslora=False, target_modules=json_targets(config.target_modules),
                    rank_pattern=rank_pattern, alpha_pattern=dict(rank_pattern))
    settings["base_model_name_or_path"] = read_adapter_config(Path(path)).get("base_model_name_or_path")
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    trained = Path(path) / "train_config.yaml"  # says which base (a 4-bit one for QLoRA) the adapter belongs on
    if trained.is_file():
        shutil.copyfile(trained, folder / "train_config.yaml")
    write_adapter_files(folder, settings, {PREFIX + k: v for k, v in out_tensors.items()}, metadata)
    report: dict[str, Any] = {"rank": rank, "energy_kept": kept / total if total else 1.0, "output": str(folder)}
    if model is not None:
        report.update(_logit_error(model, path, folder, probe))
    return report


def _logit_error(model: nn.Module, before: str | os.PathLike, after: Path, probe: Any) -> dict[str, float]:
    lora = LoraModel.from_pretrained(model, before, adapter_name="before")
    lora.load_adapter(after, adapter_name="after")
    probe = probe if probe is not None else default_probe(model, lora.device)
    if probe is None:
        raise InvalidValue("pass probe= inputs to compare logits on this model (it has no vocabulary to sample)")
    lora.set_adapter("before")
    reference = logits(lora, probe)
    lora.set_adapter("after")
    diff = (logits(lora, probe) - reference).abs()
    lora.unload()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "max_abs_logit": reference.abs().max().item()}
