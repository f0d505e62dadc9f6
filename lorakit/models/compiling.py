"""``--compile``: torch.compile on a model's repeated blocks (regional compilation).

A decoder is N copies of one block. Compiling each block in place (``nn.Module.compile``) instead of the whole
model gives one graph that every block reuses (parameters are graph inputs, not constants), so the compile time is
that of one block, not of N, and the parts around the blocks (embeddings, attention-mask construction, the chunked
loss, ``generate``'s sampling loop) stay eager, where they are cheap and where dynamic Python would break a graph.

Shapes are compiled dynamic from the start: training batches are padded to the longest row of each batch and the
KV cache grows by one column per generated token, so a static graph would be recompiled for every new length.

What it buys is measured by ``bench/compile.py``: on 2 CPU cores, LoRA and full fine-tuning steps of SmolLM2-135M
take 1.2-1.4x less time (inductor fuses the norms, activations, rotary embeddings and bf16 casts around the
matrix products), QLoRA's 1.04-1.08x, and generation gets slower (0.90-1.02x), against 25-60 s of C++ compilation
on the first step. Hence the default (:func:`use_compile`): long training runs of large-enough models, never
generation.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from torch import nn

from ..core.errors import InvalidValue
from ..core.layers import is_4bit

__all__ = ["AUTO_MIN_PARAMETERS", "AUTO_MIN_STEPS", "compile_blocks", "repeated_blocks", "use_compile"]

# Where ``--compile``'s default (auto) turns it on: where bench/compile.py measured it to pay back its compile time.
AUTO_MIN_PARAMETERS = 100_000_000  # SmolLM2-135M: steps 1.2-1.4x faster; smaller models were not measured
AUTO_MIN_STEPS = 200  # ~25-60 s of compilation, paid back after ~20-90 steps (0.7-1.5 s saved per step)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """A Hugging Face model's repeated blocks: the modules whose class the model names in ``_no_split_modules``
    (its decoder or encoder layers), found under any wrapper (a :class:`~lorakit.LoraModel`, the trainer's
    objective). A block nested in another listed one is left to its parent."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    inner = {id(child) for block in blocks for child in block.modules() if child is not block}
    return [b for b in blocks if id(b) not in inner]


def compile_blocks(model: nn.Module, training: bool = False) -> int:
    """Compile each repeated block of ``model`` in place with inductor (dynamic shapes); returns how many.

    The first pass through the blocks pays the compilation (the forward graph, and when training the backward
    one); later passes run the compiled code. A change the graph depends on (training vs. evaluation, a merged
    adapter, another set of active adapters) compiles once more on the next pass.

    Args:
        training: Make the embeddings' output require grad while grad is on (as transformers'
            ``enable_input_require_grads``). With a frozen embedding (LoRA, QLoRA) the first block's input would
            otherwise not require grad and the others' would, and the two kinds of input are two graphs to compile:
            this halves the compile time, for a little extra backward work in the first block.

    Raises:
        ValueError: The model names no repeated blocks (it is not a Hugging Face transformer).
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise InvalidValue(f"--compile compiles a model's repeated blocks, and {type(model).__name__} names none (a "
                           f"Hugging Face model lists them in _no_split_modules); run it without --compile")
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if training and callable(get_embeddings) and get_embeddings() is not None:
        get_embeddings().register_forward_hook(_require_grad)
    for block in blocks:
        block.compile(backend="inductor", dynamic=True)
    return len(blocks)


def _require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


def use_compile(choice: bool | None, model: nn.Module, device: torch.device, steps: int, processes: int = 1) -> bool:
    """Whether a training run compiles its blocks: ``choice`` when given (``--compile`` / ``--no-compile``), else
    (auto) where it was measured to pay off: one process on CPU with a C++ compiler, a model of at least
    :data:`AUTO_MIN_PARAMETERS` parameters not held in 4 bits (QLoRA's steps gained < 10%), and at least
    :data:`AUTO_MIN_STEPS` steps to run.

    Raises:
        ValueError: ``--compile`` on CPU without a C++ compiler (inductor builds its kernels with one).
    """
    compiler = _cpp_compiler() if device.type == "cpu" else "not needed"
    if choice is not None:
        if choice and compiler is None:
            raise InvalidValue("--compile on CPU builds C++ kernels, and no C++ compiler was found (g++, clang++ or "
                               "$CXX); install one (e.g. apt-get install g++) or drop --compile")
        return choice
    if device.type != "cpu" or compiler is None or processes > 1 or steps < AUTO_MIN_STEPS:
        return False
    if any(is_4bit(m) for m in model.modules()):
        return False
    return sum(p.numel() for p in model.parameters()) >= AUTO_MIN_PARAMETERS


def _cpp_compiler() -> str | None:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    return next((path for name in names if (path := shutil.which(name))), None)
