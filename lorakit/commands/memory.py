"""``lorakit memory``: the peak memory of a training step, by part, from a model's config alone."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..core.config import LoraConfig, parse_targets
from .base import Command
from .options import MODEL_HELP, PRESETS_HELP, JsonOption, LoraShape, TrustOption, option

# The choices of models.calc, written here so that `lorakit --help` does not import torch (a test checks they agree)
METHODS = ("full", "lora", "qlora", "prompt")
DTYPES = ("fp32", "bf16")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(kw_only=True)
class MemoryOptions(LoraShape, JsonOption, TrustOption):
    model: str = option("default", PRESETS_HELP + MODEL_HELP)
    method: str = option("all", "one method, or all four side by side", choices=("all", *METHODS))
    batch_size: int = option(4, "sequences per step", aliases=("--batch",))
    max_length: int = option(512, "tokens per sequence", aliases=("--seq",))
    dtype: str = option("bf16", "dtype of the frozen base and the activations", choices=DTYPES)
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass")
    optimizer: str = option("adamw", "the optimizer whose states are counted", choices=OPTIMIZERS)
    target_modules: str | None = option(None, "LoRA targets, as for `lorakit params` (default: all-linear)",
                                        aliases=("--target",))
    num_virtual_tokens: int = option(20, "prompt tuning's tokens")
    runtime_mib: float | None = option(None, "memory of the process before the model (default: measured for "
                                             "Python + PyTorch + transformers on CPU)")


def run(opts: MemoryOptions) -> int:
    from ..models.calc import RUNTIME_BYTES, estimate_memory, meta_model

    model = meta_model(opts.model, opts.trust_remote_code)
    lora = LoraConfig(r=opts.r, target_modules=parse_targets(opts.target_modules) or "all-linear")
    runtime = RUNTIME_BYTES if opts.runtime_mib is None else int(opts.runtime_mib * 2**20)
    methods = METHODS if opts.method == "all" else (opts.method,)
    estimates = [estimate_memory(model, m, opts.batch_size, opts.max_length, dtype=opts.dtype,
                                 grad_checkpointing=opts.grad_checkpointing, optimizer=opts.optimizer, lora=lora,
                                 num_virtual_tokens=opts.num_virtual_tokens, runtime=runtime)
                 for m in methods]
    print(json.dumps([e.as_dict() for e in estimates], indent=2) if opts.json
          else format_memory(opts.model, estimates))
    return 0


def format_memory(model: str, estimates: list) -> str:
    """The side-by-side table of ``lorakit memory``."""
    first = estimates[0]
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"  # noqa: E731
    parts = [("weights", "weights"), ("gradients", "gradients"), ("optimizer states", "optimizer_states"),
             ("activations", "activations"), ("LM-head logits", "logits"), ("runtime", "runtime")]
    width = 14
    lines = [f"peak training memory of {model}: batch {first.batch} x {first.seq} tokens, {first.dtype}, "
             f"{first.optimizer}{', gradient checkpointing' if first.grad_checkpointing else ''}", "",
             f"{'':<18}" + "".join(f"{e.method:>{width}}" for e in estimates)]
    lines.append(f"{'trainable params':<18}" + "".join(f"{e.trainable:>{width},d}" for e in estimates))
    for label, key in parts:
        lines.append(f"{label:<18}" + "".join(f"{gib(getattr(e, key)):>{width}}" for e in estimates))
    lines.append(f"{'total':<18}" + "".join(f"{gib(e.total):>{width}}" for e in estimates))
    adapters = sorted({e.adapter for e in estimates if e.adapter})
    if adapters:
        lines.append(f"\nlora and qlora: an adapter of {', '.join(adapters)}")
    lines.append("\nruntime: Python and the libraries (measured for a CPU process; on a GPU, the CUDA context "
                 "plays this part; --runtime-mib sets it)")
    return "\n".join(lines)


COMMAND = Command("memory", "estimate the peak memory of a training step, by part (no weights)",
                  "Estimate the peak memory of one training step of full fine-tuning, LoRA, QLoRA and prompt "
                  "tuning, from the model's config alone: weights, gradients, optimizer states, activations, LM-head "
                  "logits.", MemoryOptions, run)
