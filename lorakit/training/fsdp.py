"""Sharding the model over the processes of a ``torchrun`` job with FSDP2 (``torch.distributed.fsdp.fully_shard``).

With ``--fsdp`` each decoder layer, then the root module, is a ``fully_shard`` unit: every parameter (the frozen
base, the LoRA adapters, a full fine-tuning's weights) is split along its first dimension across the processes,
so each holds about 1/N of the model; a unit's full weights exist only while it runs (all-gathered before its
forward and backward, freed after), and its gradients are reduce-scattered back to the shards. The optimizer steps
each process's shards.

What leaves the sharded world is gathered: :func:`gathered` puts the full weights in place for as long as the adapter
(or model) is saved, and :func:`full_optimizer_state` gives the optimizer's state with full tensors, so a checkpoint
is written by rank 0 exactly as a one-process run writes it. :func:`shard_like` cuts such full tensors back into
this process's shards when a checkpoint is resumed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..core.errors import InvalidValue
from ..models.compiling import repeated_blocks
from .options import TrainConfig


def check_fsdp(config: TrainConfig, world: int, device: torch.device) -> None:
    """Refuse, before any weight is loaded, what ``--fsdp`` cannot do.

    FSDP2 pads uneven shards, so no parameter's size has to divide by the process count; what must hold is that
    there are several processes, that on CUDA each has a device of its own, and that the base is not 4-bit (FSDP2
    shards plain floating-point tensors; bitsandbytes' packed ``Params4bit`` carry their quantization state beside
    the data, which a shard would cut in two).

    Raises:
        ValueError: The combination, named, with what to do instead.
    """
    if not config.fsdp:
        return
    if world < 2:
        raise InvalidValue("--fsdp shards the model across the processes of a torchrun job, and this run has one "
                           "process; start it with `torchrun --nproc_per_node N -m lorakit train --fsdp ...` "
                           "(N ≥ 2), or drop --fsdp")
    if config.quantize:
        raise InvalidValue(f"--fsdp with --quantize {config.quantize}: FSDP2 cannot shard bitsandbytes' packed "
                           f"4-bit weights (their quantization state lives beside the data). Train QLoRA with one "
                           f"process per device (DDP: drop --fsdp), or shard a bf16 base (drop --quantize)")
    if device.type == "cuda":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local_world > torch.cuda.device_count():
            raise InvalidValue(f"--fsdp with {local_world} processes on this machine but {torch.cuda.device_count()} "
                               f"CUDA device(s): each process needs its own; use --nproc_per_node "
                               f"{torch.cuda.device_count()}")


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become ``fully_shard`` units below the root: a Hugging Face model's repeated blocks.

    They are the modules whose class the model names in ``_no_split_modules`` (its decoder or encoder layers: the
    same list transformers and accelerate shard by), found under any wrapper (a :class:`~lorakit.LoraModel`, the
    trainer's objective).

    Raises:
        ValueError: The model names no such blocks, or none of them is in the model.
    """
    units = repeated_blocks(model)  # a block nested in another (an embedding block) shards with its parent
    if not units:
        raise InvalidValue(f"--fsdp shards a model layer by layer, and {type(model).__name__} names no layers to shard "
                           f"(a Hugging Face model lists them in _no_split_modules); train it without --fsdp")
    return units


def shard(root: nn.Module, device: torch.device, precision: str) -> list[nn.Module]:
    """``fully_shard`` every block of :func:`sharding_units`, then ``root``; returns the blocks.

    On CUDA with bf16, FSDP's own mixed-precision policy all-gathers the weights in bf16 for compute and
    reduce-scatters gradients in fp32, while the shards (the optimizer's master weights) keep their dtype. On CPU the
    trainer's autocast does that job, as without FSDP.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    units = sharding_units(root)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" and precision == "bf16" else MixedPrecisionPolicy())
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(root, mp_policy=policy)
    return units


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds: its shards under FSDP, every parameter otherwise."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            local = p.to_local() if isinstance(p, DTensor) else p
            total += local.numel() * local.element_size()
    return total


def full_bytes(model: nn.Module) -> int:
    """Bytes of all the model's parameters, unsharded (a tied weight counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t``, gathered from every process if it is a shard (a collective: every process calls it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextmanager
def gathered(model: nn.Module, keep: bool, trainable_only: bool = False) -> Iterator[nn.Module]:
    """Every sharded parameter (or only the trainable ones) gathered whole, in its own dtype, on the CPU, and put
    in place of its shards. ``model`` is the FSDP root, so that every unit is found; without FSDP nothing changes.

    A collective: every process enters it. Processes with ``keep=False`` take part in the gathers only, their
    model unchanged; with ``keep=True`` the model inside the block is an ordinary model whose weights can be saved.
    No forward pass may run inside the block. The shards are put back on leaving it.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            # A unit left unsharded (the root, after an evaluation) would put its shards back on the first
            # state_dict() call (FSDP's hook), over the gathered weights: shard it now, so that hook does nothing.
            module.reshard()
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    full: dict[int, nn.Parameter] = {}  # by the shard's id: a tied weight is gathered once, shared again
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if not isinstance(p, DTensor) or (trainable_only and not p.requires_grad):
                    continue
                if not keep:
                    if id(p) not in full:
                        p.full_tensor()  # this process's part in the gather; the whole tensor is dropped at once
                        full[id(p)] = p
                    continue
                if id(p) not in full:
                    # Offloaded: on a GPU that cannot hold the whole model, its gathered copy goes to host memory.
                    full[id(p)] = nn.Parameter(p.full_tensor().cpu(), requires_grad=p.requires_grad)
                swapped.append((module, name, p))
                module._parameters[name] = full[id(p)]
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole, on the CPU: the state dict a
    one-process run has. A collective: every process calls it."""
    state = optimizer.state_dict()
    state["state"] = {index: {k: full_tensor(v).cpu() if isinstance(v, DTensor) else v for k, v in values.items()}
                      for index, values in state["state"].items()}
    return state


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) cut as ``like`` is: this process's shard if ``like`` is sharded, else itself.

    Every process holds the whole ``value`` (read from the checkpoint), so each cuts its own shard without
    communicating.
    """
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A state dict of :func:`full_optimizer_state` with each parameter's state cut like the parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = dict(state)
    out["state"] = {}
    for index, values in state["state"].items():
        param = params[int(index)]
        out["state"][index] = {k: shard_like(v, param) if torch.is_tensor(v) and v.shape == param.shape else v
                               for k, v in values.items()}
    return out


def grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total gradient norm of ``params`` (over all shards), clipping the gradients to ``max_norm`` if > 0.

    The same as ``torch.nn.utils.clip_grad_norm_`` without FSDP; with it, the norm of the local shards is summed
    across processes first, so every process clips by the same factor.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
