"""``--compile``: compiled blocks give the eager losses, adapter and tokens; what cannot be compiled is refused.

Tolerances: fp32 on CPU. Inductor fuses elementwise ops and reorders their sums (RMSNorm's mean, the softmax), so
results agree to rounding, not bit for bit: ~1e-7 relative per op, a few 1e-6 after three AdamW steps.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import TinyConvNet, tiny_llama, tiny_llama_64
from safetensors.torch import load_file

import lorakit.models.compiling
from lorakit import LoraConfig, get_lora_model
from lorakit.models.compiling import AUTO_MIN_STEPS, compile_blocks, repeated_blocks, use_compile
from lorakit.training.loop import train
from lorakit.training.options import TrainConfig, add_arguments

FAST = {"max_eval": 2, "max_new_tokens": 2, "progress": False, "warmup_steps": 1, "lr": 1e-2, "precision": "fp32",
        "packing": False}  # padded rows: every batch has its own length, which the dynamic graphs must take


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_compiled_training_gives_the_eager_losses_and_adapter(tiny_llama_dir, tmp_path):
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    train(model=tiny_llama_dir, steps=3, compile=False, output_dir=str(tmp_path / "eager"), **FAST)
    assert graphs["unique_graphs"] == before
    train(model=tiny_llama_dir, steps=3, compile=True, output_dir=str(tmp_path / "compiled"), **FAST)
    assert graphs["unique_graphs"] > before  # it did compile (the decoder blocks)
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == 3
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    a = load_file(str(tmp_path / "eager" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_generation_gives_the_eager_tokens():
    eager = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 2
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (3, 7))  # (3, 7), the first row left-padded by 2
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        want, got = (m.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0)
                     for m in (eager, compiled))
    assert torch.equal(got, want)


def test_a_model_without_repeated_blocks_is_refused():
    assert repeated_blocks(TinyConvNet()) == []
    with pytest.raises(ValueError, match="TinyConvNet names none"):
        compile_blocks(TinyConvNet())


def test_compile_is_an_option_of_train():
    parser = argparse.ArgumentParser()
    add_arguments(parser, "train")
    assert "--compile" in parser.format_help()
    assert parser.parse_args(["--compile"]).compile is True
    assert parser.parse_args(["--no-compile"]).compile is False
    assert TrainConfig().compile is None  # auto


class _Big(torch.nn.Module):
    """Stands for a 100M-parameter model without allocating one: only the parameter count is read."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(numel, device="meta"))


def test_auto_compiles_long_single_process_cpu_runs_of_large_models_only(monkeypatch):
    cpu = torch.device("cpu")
    big, small = _Big(135_000_000), _Big(1_000_000)
    assert use_compile(None, big, cpu, AUTO_MIN_STEPS)
    assert not use_compile(None, big, cpu, AUTO_MIN_STEPS - 1)  # too few steps to pay back the compilation
    assert not use_compile(None, small, cpu, 10 * AUTO_MIN_STEPS)
    assert not use_compile(None, big, cpu, AUTO_MIN_STEPS, processes=2)  # DDP/FSDP: not measured
    assert not use_compile(None, big, torch.device("cuda"), AUTO_MIN_STEPS)  # not measured
    assert use_compile(True, small, cpu, 1) and not use_compile(False, big, cpu, AUTO_MIN_STEPS)


def test_auto_leaves_a_4bit_base_eager(monkeypatch):
    from lorakit import quantize

    monkeypatch.setattr(lorakit.models.compiling, "AUTO_MIN_PARAMETERS", 0)  # the size rule out of the way
    cpu = torch.device("cpu")
    assert use_compile(None, tiny_llama_64(), cpu, AUTO_MIN_STEPS)
    assert not use_compile(None, quantize(tiny_llama_64(), "nf4"), cpu, AUTO_MIN_STEPS)  # QLoRA gained < 10%


def test_compile_without_a_cpp_compiler_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(ValueError, match="no C\\+\\+ compiler was found"):
        use_compile(True, _Big(10), torch.device("cpu"), 1)
    assert not use_compile(None, _Big(135_000_000), torch.device("cpu"), AUTO_MIN_STEPS)
