"""FSDP2 under torchrun (2 gloo processes on CPU): the sharded run trains the adapter a one-process run with the
same global batch trains, each process holds about half the weights, a resumed run ends byte-identical to an
uninterrupted one, the saved adapter is an ordinary PEFT-format one, and what FSDP cannot do is refused before
loading. Also the helpers on their own: which modules become shards, and gathering a model back whole."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, train_cli
from safetensors.torch import load_file

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.training.fsdp import check_fsdp, full_bytes, local_bytes, sharding_units
from lorakit.training.loop import train
from lorakit.training.options import TrainConfig

COMMON = ["--steps", "3", "--max-eval", "2", "--max-new-tokens", "2", "--no-progress", "--lr", "2e-3",
          "--warmup-steps", "1", "--precision", "fp32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, nproc: int = 2, **popen) -> subprocess.Popen:
    """``torchrun --nproc_per_node N -m lorakit train ARGS`` (gloo on CPU), stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                             "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lorakit",
                             "train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def _finish(run: subprocess.Popen, timeout: int = 300) -> str:
    output = run.communicate(timeout=timeout)[0]
    assert run.returncode == 0, output[-3000:]
    return output


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_two_fsdp_processes_equal_one_process_with_the_global_batch_and_hold_half_the_weights(tiny_llama_dir,
                                                                                              tmp_path, peft):
    _finish(_torchrun("--model", tiny_llama_dir, *COMMON, "--batch-size", "2", "--fsdp", "--grad-accum", "2",
                      "--output-dir", str(tmp_path / "fsdp")))
    single = train_cli("--model", tiny_llama_dir, *COMMON, "--batch-size", "4", "--grad-accum", "2",
                       "--output-dir", str(tmp_path / "one"))
    assert single.wait(timeout=300) == 0, single.stdout.read()[-2000:]
    sharded, one = _adapter(tmp_path / "fsdp"), _adapter(tmp_path / "one")
    assert sharded.keys() == one.keys()
    assert max((sharded[k] - one[k]).abs().max().item() for k in one) <= 1e-6
    assert all(t.dtype == torch.float32 for t in sharded.values())

    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["fsdp"] is True and summary["processes"] == 2 and summary["precision_reason"] == "--precision fp32"
    per_process, whole = summary["param_bytes_per_process"], summary["param_bytes"]
    assert len(per_process) == 2 and all(b <= 0.6 * whole for b in per_process), (per_process, whole)
    assert sum(per_process) >= whole  # the shards cover the model (FSDP pads uneven ones)

    # An ordinary PEFT-format adapter, read by one process: PEFT gives the same logits as lorakit.
    import transformers  # a dev dependency: a missing one is an error, not a skip
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ours = LoraModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                     str(tmp_path / "fsdp"))
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "fsdp"))
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_fsdp_full_fine_tuning_equals_one_process(tiny_llama_dir, tmp_path):
    args = ["--model", tiny_llama_dir, *COMMON[2:], "--steps", "2", "--method", "full"]
    _finish(_torchrun(*args, "--batch-size", "2", "--fsdp", "--output-dir", str(tmp_path / "fsdp")))
    single = train_cli(*args, "--batch-size", "4", "--output-dir", str(tmp_path / "one"))
    assert single.wait(timeout=300) == 0, single.stdout.read()[-2000:]
    sharded, one = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("fsdp", "one"))
    assert sharded.keys() == one.keys() and len(one) > 10  # every weight, gathered whole by rank 0
    assert max((sharded[k] - one[k]).abs().max().item() for k in one) <= 1e-6


def test_fsdp_resume_is_byte_identical_to_an_uninterrupted_fsdp_run(tiny_llama_dir, tmp_path):
    common = ["--model", tiny_llama_dir, *COMMON[2:], "--steps", "6", "--save-every", "2", "--batch-size", "2",
              "--lora-dropout", "0.1", "--fsdp"]
    _finish(_torchrun(*common, "--output-dir", str(tmp_path / "whole")))
    cut = tmp_path / "cut"
    _finish(_torchrun(*common, "--output-dir", str(cut)))
    for later in ("adapter_model.safetensors", "summary.json"):  # as if it had died after the step-4 checkpoint
        (cut / later).unlink()
    ckpt = cut / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000002", "step-000004"]
    # The checkpoint holds whole tensors gathered from the shards, as a one-process run writes them.
    weights = load_file(str(ckpt / "step-000004" / "trainable.safetensors"))
    optimizer = torch.load(ckpt / "step-000004" / "optimizer.pt", weights_only=True)["optimizer"]
    whole = sorted(tuple(t.shape) for t in _adapter(tmp_path / "whole").values())
    assert sorted(tuple(t.shape) for t in weights.values()) == whole
    assert sorted(tuple(s["exp_avg"].shape) for s in optimizer["state"].values()) == whole
    output = _finish(_torchrun(*common, "--resume", "--output-dir", str(cut)))
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-000004"), output[-2000:]
    assert (cut / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()


def test_a_process_that_dies_stops_the_others_naming_its_rank_and_the_checkpoint_stays_intact(tiny_llama_dir,
                                                                                               tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = ["--model", tiny_llama_dir, *COMMON[2:], "--steps", "60", "--save-every", "2", "--batch-size", "2",
            "--fsdp", "--output-dir", str(out)]
    run = _torchrun(*args, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None and not list(ckpt.glob("step-*")):
        time.sleep(0.05)
    assert run.poll() is None, run.communicate()[0][-3000:]
    ranks = {}  # torchrun's workers by their RANK
    for pid in subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True,
                              check=False).stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks[next(int(e[5:]) for e in env if e.startswith(b"RANK="))] = int(pid)
    os.kill(ranks[1], signal.SIGKILL)
    output = run.communicate(timeout=240)[0]
    assert run.returncode != 0 and not (out / "adapter_model.safetensors").exists()
    assert "rank      : 1 (local_rank: 1)" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    # What is left is whole checkpoints only (a write cut short stays a hidden .tmp- folder), and the newest resumes.
    left = [p for p in ckpt.iterdir() if not p.name.startswith(".tmp-")]
    assert left and all(sorted(f.name for f in p.iterdir()) == ["optimizer.pt", "state.json", "train_config.yaml",
                                                                "trainable.safetensors"] for p in left)
    newest = max(int(p.name[5:]) for p in left)
    _finish(_torchrun(*args, "--resume"))
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith(f"step-{newest:06d}")


@pytest.mark.parametrize(("options", "world", "message"), [
    ({"fsdp": True}, 1, (r"--fsdp shards the model across the processes of a torchrun job, and this run has one "
                         r"process; start it with `torchrun --nproc_per_node N")),
    ({"fsdp": True, "quantize": "nf4"}, 2, (r"--fsdp with --quantize nf4: FSDP2 cannot shard bitsandbytes' packed "
                                            r"4-bit weights .* \(DDP: drop --fsdp\)")),
], ids=["one process", "4-bit base"])
def test_what_fsdp_cannot_do_is_refused_before_loading(options, world, message):
    with pytest.raises(ValueError, match=message):
        check_fsdp(TrainConfig(**options), world, torch.device("cpu"))
    check_fsdp(TrainConfig(), world, torch.device("cpu"))  # without --fsdp: nothing to check


def test_fsdp_with_one_process_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # A model path that does not exist: the refusal must come first, before anything is read.
    with pytest.raises(ValueError, match="this run has one process"):
        train(model=str(tmp_path / "no-such-model"), fsdp=True, output_dir=str(tmp_path / "out"), progress=False)


def test_fsdp_with_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--fsdp with 2 processes on this machine but 1 CUDA device\(s\)"):
        check_fsdp(TrainConfig(fsdp=True), 2, torch.device("cuda", 0))


def test_the_decoder_layers_are_the_shards_under_any_wrapper():
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    units = sharding_units(torch.nn.ModuleDict({"objective": model}))
    assert units == list(model.model.model.layers)  # LlamaDecoderLayer, found inside the LoraModel
    with pytest.raises(ValueError, match="Sequential names no layers to shard"):
        sharding_units(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_without_sharding_every_parameter_is_local_and_a_tied_weight_counts_once():
    model = tiny_llama(tie=True)
    unique = {id(p): p for p in model.parameters()}.values()
    assert local_bytes(model) == full_bytes(model) == sum(p.numel() * 4 for p in unique)
