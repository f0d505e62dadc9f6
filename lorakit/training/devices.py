"""Where a run computes: the device, the precision, and this process's place in a ``torchrun`` job."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class Processes:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run (nccl needs CUDA tensors)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, the only CPUs where bf16 GEMMs beat fp32 by a wide margin.

    With AVX512-BF16 alone, bf16 GEMMs run at about the fp32 speed (measured: 72 vs 61 GFLOPS on 2 cores) while
    the rank-r products of LoRA fall off the fast kernels, and on AVX2 they are 5-8× slower than fp32.
    """
    return torch.backends.cpu.get_cpu_capability() == "AMX" or _cpuinfo_has("amx_bf16")


def _cpuinfo_has(flag: str) -> bool:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA with bf16 support and on AMX CPUs, fp32 elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_amx() else "fp32"


def start_processes(device: torch.device) -> Processes:
    """Join the ``torchrun`` process group (gloo on CPU, nccl on CUDA), if this is a torchrun job."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Rank 0 evaluates and saves while the others wait at a barrier: give that time (generation can be slow).
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return Processes(dist.get_rank(), dist.get_world_size(), device)
