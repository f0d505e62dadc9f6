"""The memory preflight of ``lorakit train``: a run that cannot fit stops in seconds, before loading anything, with
the estimate by part, the available memory and the changes that fit; the estimate is ``lorakit memory``'s."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time

import pytest
import torch

from lorakit.cli import main
from lorakit.models.calc import RUNTIME_BYTES
from lorakit.models.devices import Precision, decide_precision, model_shapes
from lorakit.training import loop
from lorakit.training import preflight as pf
from lorakit.training.devices import Processes
from lorakit.training.options import TrainConfig

GiB = 2**30
CPU = torch.device("cpu")

# meta-llama/Llama-2-7b-hf's config.json (public), stored in float16.
LLAMA_2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}


@pytest.fixture
def llama7b(tmp_path, monkeypatch) -> str:
    """A folder holding only Llama-2-7B's config.json (no weights, no tokenizer); precision auto not measured."""
    folder = tmp_path / "llama-2-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_2_7B))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no cached precision measurement
    return str(folder)


def fake_memory(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(pf, "available_memory", lambda device: pf.Available(int(gib * GiB), "faked"))


def suggestion_lines(message: str) -> dict[str, float]:
    """``--flags  12.34 GiB  why`` lines of a refusal, as {flags: GiB}."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^ {4}(--\S.*?) +([\d.]+) GiB  ", message, re.M)}


def memory_cli(capsys, model: str, method: str, *args: str) -> dict:
    """``lorakit memory --json`` for one method."""
    capsys.readouterr()
    assert main(["memory", "--model", model, "--method", method, "--json", *args]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    return row


def test_llama_7b_full_fine_tuning_is_refused_in_seconds_with_what_fits(llama7b, tmp_path, monkeypatch, capsys):
    fake_memory(monkeypatch, 24)
    t0 = time.perf_counter()
    code = main(["train", "--model", llama7b, "--method", "full", "--device", "cpu", "--output-dir",
                 str(tmp_path / "run")])
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2 and took < 10, (code, took, err)  # seconds, not minutes: nothing was loaded
    assert "lorakit train: error: this run needs about 122.61 GiB" in err  # 25.10 + 25.10 + 50.21 + ... (bf16)
    assert "24.00 GiB available (faked" in err
    assert "weights 25.10 GiB + gradients 25.10 GiB + optimizer states 50.21 GiB + activations 21.82 GiB" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    # LoRA on the 2-byte base with checkpointing fits, or QLoRA in smaller micro-batches (with checkpointing it would
    # only add to LoRA's change); LoRA's figure is `lorakit memory`'s for the same settings
    suggested = suggestion_lines(err)
    assert list(suggested) == ["--method lora --grad-checkpointing",
                               "--method lora --quantize nf4 --batch-size 4 --grad-accum 2"], err
    assert all(gib < 0.85 * 24 for gib in suggested.values())
    same = memory_cli(capsys, llama7b, "lora", "--batch", "8", "--seq", "512", "--dtype", "bf16",
                      "--grad-checkpointing")
    assert suggested["--method lora --grad-checkpointing"] == round(same["total"] / GiB, 2) < 0.85 * 24


def test_with_less_memory_qlora_is_suggested_and_with_more_checkpointing_alone(llama7b, monkeypatch, capsys):
    config = TrainConfig(model=llama7b, method="full")
    fake_memory(monkeypatch, 14)  # LoRA's 2-byte base (12.6 GiB) no longer fits
    with pytest.raises(pf.MemoryPreflightError) as caught:
        pf.preflight(config, CPU)
    suggested = suggestion_lines(str(caught.value))
    assert list(suggested) == ["--method lora --quantize nf4 --grad-checkpointing"], str(caught.value)
    same = memory_cli(capsys, llama7b, "qlora", "--batch", "8", "--seq", "512", "--grad-checkpointing")
    assert suggested["--method lora --quantize nf4 --grad-checkpointing"] == round(same["total"] / GiB, 2) < 14

    fake_memory(monkeypatch, 125)  # full fine-tuning fits with checkpointing, micro-batches of 2 or shorter rows
    with pytest.raises(pf.MemoryPreflightError) as caught:
        pf.preflight(config, CPU)
    suggested = suggestion_lines(str(caught.value))
    assert list(suggested) == ["--grad-checkpointing", "--batch-size 2 --grad-accum 4", "--method lora",
                               "--max-length 128"], \
        str(caught.value)
    for s in caught.value.check.suggestions:  # each really fits, by an estimate made afresh
        estimate = pf.estimate_run(dataclasses.replace(config, **s.changes), dtypes=caught.value.check.dtypes)
        assert estimate.total == s.peak <= pf.SUGGEST_MARGIN * 125 * GiB
        assert suggested[s.flags] == round(s.peak / GiB, 2)


def test_when_nothing_fits_it_says_so_with_the_smallest(llama7b, monkeypatch):
    fake_memory(monkeypatch, 4)
    with pytest.raises(pf.MemoryPreflightError) as caught:
        pf.preflight(TrainConfig(model=llama7b, method="full"), CPU)
    message = str(caught.value)
    assert not suggestion_lines(message) and "no change of batch size" in message
    smallest = re.search(r"the smallest, (.*), needs ([\d.]+) GiB", message)
    assert smallest and "--quantize nf4" in smallest[1] and float(smallest[2]) > 0.85 * 4, message


def test_no_preflight_skips_it_and_the_run_goes_on_to_loading(llama7b, tmp_path, monkeypatch, capsys):
    fake_memory(monkeypatch, 24)

    class Loading(Exception):
        pass

    def build_task(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(loop, "build_task", build_task)
    args = ["train", "--model", llama7b, "--method", "full", "--device", "cpu", "--precision", "fp32",
            "--output-dir", str(tmp_path / "run")]
    assert main(args) == 2  # refused before loading
    assert "this run needs" in capsys.readouterr().err
    with pytest.raises(Loading):
        main([*args, "--no-preflight"])
    monkeypatch.setattr(pf, "available_memory", lambda device: pytest.fail("the preflight ran"))
    assert pf.preflight(TrainConfig(model=llama7b, preflight=False), CPU) is None


def test_the_fit_boundary(tiny_llama_dir, monkeypatch, capsys):
    config = TrainConfig(model=tiny_llama_dir, precision="fp32")
    peak = pf.estimate_run(config).total
    fake_memory(monkeypatch, math.ceil(peak / pf.FIT_MARGIN) / GiB)
    check = pf.preflight(config, CPU)
    assert check.peak == peak and check.fits
    line = capsys.readouterr().err
    assert line.startswith("lorakit: memory preflight: about ") and "available (faked)" in line
    fake_memory(monkeypatch, (math.ceil(peak / pf.FIT_MARGIN) - 2) / GiB)
    with pytest.raises(pf.MemoryPreflightError, match="more than 95% of the"):
        pf.preflight(config, CPU)


def test_the_processes_of_one_machine_share_its_memory(tiny_llama_dir, monkeypatch, capsys):
    config = TrainConfig(model=tiny_llama_dir, precision="fp32")
    peak = pf.estimate_run(config).total
    fake_memory(monkeypatch, 1.5 * peak / GiB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(pf.MemoryPreflightError, match="1/2 of"):
        pf.preflight(config, CPU, Processes(rank=1, world=2))
    fake_memory(monkeypatch, 2.5 * peak / GiB)
    capsys.readouterr()
    assert pf.preflight(config, CPU, Processes(rank=1, world=2)).fits
    assert capsys.readouterr().err == ""  # only the main process prints


def test_auto_precision_uses_the_cached_measurement_and_measures_only_when_it_decides(tiny_llama_dir, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = TrainConfig(model=tiny_llama_dir, precision="auto")
    bf16 = pf.estimate_run(dataclasses.replace(config, precision="bf16")).total
    fp32 = pf.estimate_run(dataclasses.replace(config, precision="fp32")).total
    assert bf16 < fp32
    measured = []

    def measure(name, device, shapes):
        measured.append(name)
        return Precision(chosen[0], "faked")

    monkeypatch.setattr(pf, "decide_precision", measure)
    between = (bf16 + fp32) / 2 / pf.FIT_MARGIN / GiB
    for chosen, fits in ((["bf16"], True), (["fp32"], False)):
        fake_memory(monkeypatch, between)
        if fits:
            assert pf.preflight(config, CPU).dtypes.activations == "bf16"
        else:
            with pytest.raises(pf.MemoryPreflightError, match="measured now: fp32"):
                pf.preflight(config, CPU)
    assert measured == ["auto", "auto"]
    fake_memory(monkeypatch, 1.01 * fp32 / pf.FIT_MARGIN / GiB)  # fits either way: nothing measured
    assert pf.preflight(config, CPU).dtypes.activations == "fp32" and len(measured) == 2

    # A measurement cached on this machine decides without measuring
    shapes = model_shapes(tiny_llama_dir, False, config.batch_size * config.max_length)
    decide_precision("auto", CPU, shapes, measure=lambda s, dtype, d: 1.0 if dtype == torch.float32 else 0.5)
    fake_memory(monkeypatch, between)
    check = pf.preflight(config, CPU)
    assert check.dtypes.activations == "bf16" and "measured earlier" in check.dtypes.why and len(measured) == 2


def test_default_runs_are_not_refused(capsys):
    for method in ("lora", "full", "prompt"):
        check = pf.preflight(TrainConfig(method=method), CPU)  # the real available memory
        assert check is not None and check.fits
    assert capsys.readouterr().err.count("lorakit: memory preflight: about") == 3


@pytest.mark.parametrize("settings, method, args", [
    (dict(r=4, target_modules="q_proj,v_proj", batch_size=2, max_length=64, precision="bf16", grad_checkpointing=True),
     "lora", ["--r", "4", "--target", "q_proj,v_proj", "--batch", "2", "--seq", "64", "--dtype", "bf16",
              "--grad-checkpointing"]),
    (dict(method="full", batch_size=3, max_length=100, precision="fp32"),
     "full", ["--batch", "3", "--seq", "100", "--dtype", "fp32"]),
    (dict(quantize="nf4", batch_size=1, max_length=512, precision="bf16"),
     "qlora", ["--batch", "1", "--seq", "512", "--dtype", "bf16"]),
    (dict(method="prompt", num_virtual_tokens=10, batch_size=4, max_length=32, precision="fp32"),
     "prompt", ["--num-virtual-tokens", "10", "--batch", "4", "--seq", "32", "--dtype", "fp32"]),
])
def test_the_estimate_of_a_run_is_lorakit_memorys(llama64_dir, capsys, settings, method, args):
    estimate = pf.estimate_run(TrainConfig(model=llama64_dir, **settings))
    assert estimate.as_dict() == memory_cli(capsys, llama64_dir, method, *args)
    assert estimate.runtime == RUNTIME_BYTES


@pytest.mark.parametrize("stored, precision, activations, base", [
    ("bfloat16", "fp32", "fp32", "fp32"),  # fp32 asked: the base is widened
    ("bfloat16", "auto", "fp32", "bf16"),  # auto chose fp32: a bf16 checkpoint's base stays bf16
    ("float16", "auto", "fp32", "fp32"),  # float16 is widened
    ("float32", "bf16", "bf16", "bf16"),  # bf16 autocast holds the base in bf16
    (None, "fp32", "fp32", "fp32"),
])
def test_the_frozen_base_keeps_a_bf16_checkpoints_dtype(stored, precision, activations, base):
    resolved = "fp32" if precision == "auto" else precision
    dtypes = pf.run_dtypes(TrainConfig(precision=precision), resolved, stored)
    assert (dtypes.activations, dtypes.base) == (activations, base)


def _safetensors_header_only(path, tensors: dict) -> None:
    """A safetensors file of zeros holding ``tensors`` ({name: (2-byte dtype, shape)})."""
    entries, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = 2 * math.prod(shape)
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(offset))


def test_a_bf16_checkpoint_halves_the_lora_base(llama7b, tmp_path):
    folder = tmp_path / "bf16"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA_2_7B, "torch_dtype": "bfloat16"}))
    _safetensors_header_only(folder / "model.safetensors", {})
    fp16 = pf.estimate_run(TrainConfig(model=llama7b))  # auto taken as fp32: float16 is widened
    bf16 = pf.estimate_run(TrainConfig(model=str(folder)))
    assert fp16.weights - bf16.weights == 2 * 6_738_415_616  # every frozen weight: 4 bytes against 2


def test_fsdp_shards_weights_gradients_and_states_but_loads_whole():
    e = pf.MemoryEstimate(method="full", batch=1, seq=8, dtype="bf16", optimizer="adamw", grad_checkpointing=False,
                          trainable=1, weights=400, gradients=400, optimizer_states=800, activations=50, logits=10,
                          runtime=100)
    assert pf.peak_bytes(e) == e.total == 1760
    assert pf.peak_bytes(e, shards=4) == 100 + 100 + 200 + 50 + 10 + 100
    assert pf.peak_bytes(e, shards=16) == 400 + 100  # loading the whole model first is the peak


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_host_memory_is_the_lower_of_memavailable_and_the_cgroups_room(tmp_path):
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    write(proc / "meminfo", "MemTotal:       32000000 kB\nMemAvailable:   20971520 kB\n")  # 20 GiB
    write(proc / "self" / "status", "Name:\tpython\nVmRSS:\t  307200 kB\n")  # 300 MiB
    write(proc / "self" / "cgroup", "0::/job\n")
    assert pf.host_available(proc, cgroup).bytes == 20 * GiB + 300 * 2**20  # no cgroup files: MemAvailable
    write(cgroup / "job" / "memory.max", "max\n")
    assert pf.host_available(proc, cgroup).bytes == 20 * GiB + 300 * 2**20
    write(cgroup / "job" / "memory.max", f"{16 * GiB}\n")
    write(cgroup / "job" / "memory.current", f"{6 * GiB}\n")
    write(cgroup / "job" / "memory.stat", f"anon {3 * GiB}\ninactive_file {2 * GiB}\n")
    got = pf.host_available(proc, cgroup)  # 16 - (6 - 2) = 12 GiB, below MemAvailable
    assert got.bytes == 12 * GiB + 300 * 2**20 and "cgroup" in got.source
    # cgroup v1, its folder mounted at the controller's root (as inside a container)
    write(proc / "self" / "cgroup", "4:memory:/docker/abc\n0::/\n")
    write(cgroup / "memory" / "memory.limit_in_bytes", f"{8 * GiB}\n")
    write(cgroup / "memory" / "memory.usage_in_bytes", f"{3 * GiB}\n")
    write(cgroup / "memory" / "memory.stat", f"cache {2 * GiB}\ntotal_inactive_file {1 * GiB}\n")
    assert pf.host_available(proc, cgroup).bytes == 6 * GiB + 300 * 2**20
    write(cgroup / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    assert pf.host_available(proc, cgroup).bytes == 20 * GiB + 300 * 2**20
    (proc / "meminfo").unlink()
    assert pf.host_available(proc, cgroup) is None


def test_unknown_memory_or_shape_skips_with_one_line(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pf, "available_memory", lambda device: None)
    assert pf.preflight(TrainConfig(model=tiny_llama_dir), CPU) is None
    assert capsys.readouterr().err == ("lorakit: memory preflight skipped: the available memory is unknown on this "
                                       "system\n")
    fake_memory(monkeypatch, 1)
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert pf.preflight(TrainConfig(model=str(folder)), CPU) is None
    assert capsys.readouterr().err.startswith("lorakit: memory preflight skipped: no estimate for ")


def test_this_machine_reports_some_memory():
    got = pf.available_memory(CPU)
    assert got is not None and got.bytes > 256 * 2**20 and "this process holds" in got.source


def test_the_stored_dtype_is_the_one_the_loader_keeps(tmp_path):
    """The estimate counts the frozen base in the dtype the loader keeps it in (lorakit.models.streaming.checkpoint_dtype):
    only safetensors checkpoints stream and keep bf16, read from config.json or else from the tensors' headers."""
    from lorakit.models.streaming import checkpoint_dtype

    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text(json.dumps({**LLAMA_2_7B, "torch_dtype": "bfloat16"}))
    (bin_only / "pytorch_model.bin").write_bytes(b"")  # loaded whole by transformers, in the run's precision
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    (unnamed / "config.json").write_text(json.dumps({k: v for k, v in LLAMA_2_7B.items() if k != "torch_dtype"}))
    _safetensors_header_only(unnamed / "model.safetensors", {"model.norm.weight": ("BF16", [4096])})
    for folder, expected in ((bin_only, None), (unnamed, "bfloat16")):
        assert pf.stored_dtype(TrainConfig(model=str(folder))) == expected
        loaded = checkpoint_dtype(folder)
        assert (None if loaded is None else str(loaded).removeprefix("torch.")) == expected
