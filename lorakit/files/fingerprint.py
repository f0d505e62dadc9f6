"""Base-model fingerprints: what identifies the base an adapter was trained on.

Saved adapters carry one in their safetensors metadata (see :mod:`lorakit.files.io`); loading compares it with the
model's own, so an adapter is not silently put on another checkpoint, and an adapter whose initialization changed
its base (PiSSA) is told apart from a plain base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..core.layers import LoraLayer, is_4bit
from ..core.quant import dense_weight, weight_shape

_SAMPLE = 4  # sampled values per targeted weight in the fingerprint



def fingerprint(model: nn.Module, targets: Sequence[str]) -> dict[str, Any]:
    """What identifies the base an adapter was trained on: architecture, targeted weight shapes, and a digest
    of the targeted weights (per weight: its L2 norm and a few fixed sampled values).

    The digest is compared at bf16 precision, not bit for bit, so the fp32 and bf16 copies of one base agree,
    and so does a base that went through merge/unmerge, while another checkpoint does not. 4-bit layers are
    digested from their dequantized weights and marked ``quantized``: those comparisons allow for 4-bit rounding.
    """
    shapes, digest, quantized = {}, {}, False
    for name in sorted(targets):
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoraLayer) else module
        if is_4bit(base):
            quantized = True
            shapes[name] = weight_shape(base)
            if base.weight.device.type == "meta":
                continue
            weight = dense_weight(base)
        else:
            weight = base.weight.detach()
            shapes[name] = list(weight.shape)
            if weight.device.type == "meta":
                continue
        flat = weight.reshape(-1).float()
        picks = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE]
        digest[name] = [float(f"{v:.5g}") for v in [flat.norm().item(), *picks.tolist()]]
    found = {"architecture": type(model).__name__, "shapes": shapes, "digest": digest}
    return (found | {"quantized": True}) if quantized else found


def compare_fingerprints(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    diffs = []
    if saved.get("architecture") != current["architecture"]:
        diffs.append(f"architecture {saved.get('architecture')!r} vs this model's {current['architecture']!r}")
    for name, shape in saved.get("shapes", {}).items():
        if current["shapes"].get(name) != shape:
            diffs.append(f"{name}: weight shape {shape} vs {current['shapes'].get(name)}")
    if diffs:
        return diffs
    pairs = [(name, values, current["digest"][name]) for name, values in saved.get("digest", {}).items()
             if len(current["digest"].get(name, ())) == len(values)]
    quantized = saved.get("quantized") or current.get("quantized")
    differ = _differ_quantized(pairs) if quantized else _differ(pairs, current["shapes"])
    if differ:
        diffs.append(f"same shapes, but the base weights differ ({differ}): another checkpoint")
    return diffs


def _differ(pairs: list[tuple[str, list[float], list[float]]], shapes: dict[str, list[int]]) -> str | None:
    """The first weight whose norm or sampled values differ by more than bf16-level rounding, if any (as
    "first at <name>")."""
    for name, saved, now in pairs:
        rms = saved[0] / math.sqrt(max(1, math.prod(shapes[name])))
        if any(abs(a - b) > 1e-2 * abs(a) + 1e-2 * rms for a, b in zip(saved, now)):
            return f"first at {name}"
    return None


def _differ_quantized(pairs: list[tuple[str, list[float], list[float]]]) -> str | None:
    """What differs by more than 4-bit rounding explains (a weight's name, or the sampled values), if anything.

    4-bit rounding moves single values by up to several times the weights' RMS, so values are not compared
    one by one: each norm must agree within 10% (rounding errors average out over a whole weight: ~0.5% on real
    layers, ~5% on tiny ones), and the
    sampled values of all weights together within 50% relative L2 error (NF4's is ~10% on real layers, up to
    ~30% on tiny ones; an unrelated checkpoint's is ~140%).
    """
    for name, saved, now in pairs:
        if abs(saved[0] - now[0]) > 0.1 * abs(saved[0]):
            return f"first at {name}"
    squared_error = sum((x - y) ** 2 for _, (_, *a), (_, *b) in pairs for x, y in zip(a, b))
    squared_norm = sum(x * x for _, (_, *a), _ in pairs for x in a)
    if pairs and squared_error > 0.5 ** 2 * squared_norm:
        return "the sampled values of all targeted weights"
    return None
