"""Where a run computes: resolve_device for each choice; precision ``auto`` decided by measured timings of the
model's products (injected here, not timed), cached per machine; and a run without torchrun being process 0 of 1."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.models.devices import (
    cpu_identity,
    decide_precision,
    gemm_shapes,
    machine_key,
    matmul_peak,
    pick,
    resolve_device,
    resolve_precision,
    time_gemms,
)
from lorakit.training.devices import Processes, start_processes

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


def _timings(fp32_ms: float, bf16_ms: float, calls: list):
    """A stand-in for time_gemms: fixed seconds per dtype, and a record of what was measured."""
    def measure(shapes, dtype, device):
        calls.append((tuple(shapes), dtype, device.type))
        return (fp32_ms if dtype == torch.float32 else bf16_ms) / 1e3
    return measure


@pytest.mark.parametrize(("fp32_ms", "bf16_ms", "expected"), [
    (10.0, 2.0, "bf16"),  # AVX-512 BF16 / AMX: bf16 products ~5× faster
    (10.0, 9.0, "bf16"),  # exactly at the margin: 10% faster is enough
    (10.0, 9.5, "fp32"),  # about the same speed: fp32 is exact, keep it
    (10.0, 60.0, "fp32"),  # AVX2: bf16 several times slower
])
def test_auto_precision_picks_the_faster_measured_dtype(tmp_path, fp32_ms, bf16_ms, expected):
    calls: list = []
    shapes = [(64, 32, 32), (64, 32, 128)]
    choice = decide_precision("auto", CPU, shapes, cache=tmp_path / "precision.json",
                              measure=_timings(fp32_ms, bf16_ms, calls))
    assert choice.name == expected
    assert (choice.fp32_ms, choice.bf16_ms) == pytest.approx((fp32_ms, bf16_ms))
    assert f"{fp32_ms:.2f} ms in fp32 and {bf16_ms:.2f} ms in bf16" in choice.reason and "measured now" in choice.reason
    assert calls == [(tuple(shapes), torch.float32, "cpu"), (tuple(shapes), torch.bfloat16, "cpu")] * 2  # interleaved
    assert pick(fp32_ms / 1e3, bf16_ms / 1e3) == expected


def test_auto_precision_is_measured_once_per_machine_and_shapes(tmp_path):
    cache, calls = tmp_path / "lorakit" / "precision.json", []
    first = decide_precision("auto", CPU, [(8, 16, 16)], cache=cache, measure=_timings(4.0, 1.0, calls))
    assert first.name == "bf16" and len(calls) == 4 and cache.is_file()

    def must_not_run(*args):
        raise AssertionError("measured again although the cache holds this machine's timings")

    again = decide_precision("auto", CPU, [(8, 16, 16)], cache=cache, measure=must_not_run)
    assert again.name == "bf16" and (again.fp32_ms, again.bf16_ms) == (first.fp32_ms, first.bf16_ms)
    assert f"measured earlier on this machine ({cache})" in again.reason
    saved = json.loads(cache.read_text())
    assert list(saved) == [machine_key(CPU, [(8, 16, 16)])]
    assert torch.__version__ in next(iter(saved)) and "threads" in next(iter(saved))
    # Other shapes (another model) are another measurement; a damaged cache is measured again, not an error.
    decide_precision("auto", CPU, [(8, 16, 64)], cache=cache, measure=_timings(1.0, 4.0, calls))
    assert len(calls) == 8 and len(json.loads(cache.read_text())) == 2
    cache.write_text("{not json")
    assert decide_precision("auto", CPU, [(8, 16, 16)], cache=cache, measure=_timings(1.0, 4.0, calls)).name == "fp32"


def test_an_explicit_precision_measures_nothing(tmp_path):
    def must_not_run(*args):
        raise AssertionError("measured")

    choice = decide_precision("bf16", CPU, cache=tmp_path / "c.json", measure=must_not_run)
    assert (choice.name, choice.reason) == ("bf16", "--precision bf16")


def test_auto_precision_on_cuda_without_bf16_is_fp32(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    choice = decide_precision("auto", torch.device("cuda"), cache=tmp_path / "c.json")
    assert (choice.name, choice.reason) == ("fp32", "Tesla T4 has no bf16 support")


def test_the_measured_shapes_are_the_models_layers():
    smollm2 = {"hidden_size": 576, "intermediate_size": 1536}
    assert gemm_shapes(smollm2, tokens=4096) == [(256, 576, 576), (256, 576, 1536), (256, 1536, 576)]
    assert gemm_shapes({"n_embd": 32}, tokens=10) == [(10, 32, 32), (10, 32, 128), (10, 128, 32)]  # GPT-2: 4×
    assert gemm_shapes({"vocab_size": 10}, tokens=10) == []  # no width: the default shapes are used
    # The matmul peak (MFU) measures up to 1024 rows and the output head too.
    assert gemm_shapes({**smollm2, "vocab_size": 49152}, tokens=4096, max_rows=1024, head=True) == [
        (1024, 576, 576), (1024, 576, 1536), (1024, 1536, 576), (1024, 576, 49152)]


def test_time_gemms_measures_a_round_in_the_given_dtype():
    seconds = time_gemms([(16, 32, 32)], torch.bfloat16, CPU)
    assert 0 < seconds < 1


def test_without_torchrun_a_run_is_process_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    procs = start_processes(CPU)
    assert (procs.rank, procs.world, procs.main) == (0, 1, True)
    assert procs.all_sum(2.5) == 2.5  # nothing to add across processes
    procs.barrier()  # returns at once
    assert not Processes(rank=1, world=2).main


def test_matmul_peak_is_the_best_product_measured_once_per_machine(tmp_path):
    cache, calls = tmp_path / "peak.json", []
    shapes = [(64, 32, 32), (64, 32, 128)]

    def measure(products, dtype, device):
        calls.append((tuple(products), dtype))
        m, k, n = products[0]
        return 2 * m * k * n / (1e9 if n == 32 else 3e9)  # the wide product runs at 3 GFLOP/s, the other at 1

    assert matmul_peak(shapes, "bf16", CPU, cache=cache, measure=measure) == pytest.approx(3e9)
    # One by one, and each as the backward pass runs it too (inner and outer sizes swapped).
    assert [c[0] for c in calls] == [((64, 32, 32),), ((64, 32, 128),), ((64, 32, 32),), ((64, 128, 32),)]
    assert {c[1] for c in calls} == {torch.bfloat16}

    def must_not_run(*args):
        raise AssertionError("measured again although the cache holds this machine's peak")

    assert matmul_peak(shapes, "bf16", CPU, cache=cache, measure=must_not_run) == pytest.approx(3e9)
    matmul_peak(shapes, "fp32", CPU, cache=cache, measure=measure)  # another precision: measured
    assert len(calls) == 8 and len(json.loads(cache.read_text())) == 2
    assert matmul_peak([], "fp32", CPU, cache=cache, measure=must_not_run) is None
    with pytest.raises(ValueError, match="precision must be fp32 or bf16, got 'fp16'"):
        matmul_peak(shapes, "fp16", CPU, cache=cache, measure=measure)


def test_matmul_peak_measures_real_products(tmp_path):
    peak = matmul_peak([(64, 64, 64)], "fp32", CPU, cache=tmp_path / "peak.json")
    assert peak is not None and 1e6 < peak < 1e15  # FLOP/s: a real figure, whatever the CPU


ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse sse2 avx fma avx2 bmi2

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: something else entirely
"""
ZEN4 = ZEN3.replace("model\t\t: 1\n", "model\t\t: 17\n").replace("avx2 bmi2", "avx2 bmi2 avx512f avx512_bf16")


def test_cpus_that_share_a_name_do_not_share_measurements():
    """Clouds call a Zen 3 (bf16 5-8x slower than fp32) and a Zen 4 (bf16 faster) both "AMD EPYC": their
    precision and peak measurements must not be one cache entry."""
    assert cpu_identity(ZEN3) == "AMD EPYC (AuthenticAMD family 25 model 1 stepping 1; avx2 fma)"
    assert cpu_identity(ZEN4) == "AMD EPYC (AuthenticAMD family 25 model 17 stepping 1; avx2 fma avx512f avx512_bf16)"
    assert cpu_identity(ZEN3.replace("model\t\t: 1\n", "model\t\t: 17\n")) != cpu_identity(ZEN4)  # flags alone
    assert torch.backends.cpu.get_cpu_capability() in cpu_identity("")  # no /proc/cpuinfo: what torch detects
    graviton2 = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd atomics\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    graviton3 = graviton2.replace("0xd0c", "0xd40").replace("atomics", "atomics bf16 i8mm sve")
    assert cpu_identity(graviton2).endswith("(implementer 0x41 part 0xd0c; asimd)")
    assert cpu_identity(graviton3).endswith("(implementer 0x41 part 0xd40; asimd bf16 i8mm sve)")
    assert cpu_identity() in machine_key(CPU, [(8, 16, 16)])
