"""Where a run computes: resolve_device and resolve_precision for each choice (bf16 on CUDA with bf16 and on AMX
CPUs, fp32 on other CPUs), and a run without torchrun being process 0 of 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.training import devices
from lorakit.training.devices import Processes, cpu_has_amx, resolve_device, resolve_precision, start_processes

CPU = torch.device("cpu")


def test_resolve_device_choices(monkeypatch):
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(ValueError, match="device='cuda' but no CUDA device is available; use --device cpu or auto"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process on this machine takes the second GPU
    assert resolve_device("auto") == torch.device("cuda", 1)


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_an_explicit_precision_is_kept_on_every_device(name):
    assert resolve_precision(name, CPU) == name
    assert resolve_precision(name, torch.device("cuda")) == name


@pytest.mark.parametrize(("amx", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_is_bf16_only_with_amx(monkeypatch, amx, expected):
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: amx)
    assert resolve_precision("auto", CPU) == expected


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cuda_follows_bf16_support(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_amx_is_read_from_this_cpu():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    # AMX CPUs (Sapphire Rapids and later) list amx_bf16; AVX2-only and AVX-512 CPUs do not.
    assert cpu_has_amx() == (" amx_bf16" in flags or torch.backends.cpu.get_cpu_capability() == "AMX")


def test_without_torchrun_a_run_is_process_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    procs = start_processes(CPU)
    assert (procs.rank, procs.world, procs.main) == (0, 1, True)
    assert procs.all_sum(2.5) == 2.5  # nothing to add across processes
    procs.barrier()  # returns at once
    assert not Processes(rank=1, world=2).main
