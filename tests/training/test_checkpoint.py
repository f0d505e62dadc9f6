"""Resumable checkpoints: what a checkpoint holds and restores, how many are kept, that a crash mid-write leaves
none half-written, and that a run killed with SIGKILL, or stopped with Ctrl-C, resumes to the bit-identical
adapter."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import train_cli

from lorakit.training.checkpoint import (
    checkpoints,
    file_digests,
    has_finite_weights,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_aside,
    set_rng_state,
)


def _run(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """A small model with a frozen part, its optimizer and schedule, after two steps (so Adam has state)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(2):
        model(torch.randn(3, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_a_checkpoint_restores_parameters_optimizer_and_schedule(tmp_path):
    model, optimizer, scheduler = _run()
    state = {"data": 6, "rng": [rng_state()]}  # as the loop saves it: one RNG state per process
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, state, "r: 8\n", keep=2)
    assert path == tmp_path / "step-000002"
    assert sorted(p.name for p in path.iterdir()) == ["optimizer.pt", "state.json", "train_config.yaml",
                                                      "trainable.safetensors"]
    assert (path / "train_config.yaml").read_text() == "r: 8\n"
    other, other_optimizer, other_scheduler = _run(seed=1)
    restored = load_checkpoint(path, other, other_optimizer, other_scheduler)
    assert restored == {"step": 2, **json.loads(json.dumps(state))}  # the state as saved, through JSON
    assert torch.equal(other[1].weight, model[1].weight) and torch.equal(other[1].bias, model[1].bias)
    assert not torch.equal(other[0].weight, model[0].weight)  # frozen: not saved, not restored
    adam, restored_adam = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    assert all(torch.equal(adam[i]["exp_avg"], restored_adam[i]["exp_avg"]) for i in adam)
    assert other_scheduler.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"] == 2


def test_only_the_newest_are_kept_and_unfinished_writes_are_ignored_then_removed(tmp_path):
    model, optimizer, scheduler = _run()
    (tmp_path / ".tmp-crashed").mkdir(parents=True)  # what a process killed while writing leaves
    (tmp_path / "step-notanumber").mkdir()
    for step in (9, 10, 11):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, "", keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000010", "step-000011"]  # by number, oldest first
    assert not (tmp_path / ".tmp-crashed").exists()
    assert checkpoints(tmp_path / "nothing") == []


def test_a_checkpoint_of_another_model_is_refused_and_changes_nothing(tmp_path):
    model, optimizer, scheduler = _run()
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"rng": [rng_state()]}, "", keep=1)
    model[0].requires_grad_(True)  # now another set of trainable parameters
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit this model: missing \['0.bias', '0.weight'\], "
                                         r"unexpected \[\]"):
        load_checkpoint(path, model, optimizer, scheduler)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_diverged_checkpoint_is_recognized_and_set_aside(tmp_path):
    model, optimizer, scheduler = _run()
    good = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, "", keep=5)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    bad = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {}, "", keep=5)
    assert has_finite_weights(good) and not has_finite_weights(bad)
    assert not has_finite_weights(tmp_path / "step-000099")  # none there
    moved = set_aside(bad)
    assert moved == tmp_path / "diverged-step-000002" and moved.is_dir() and not bad.exists()
    assert checkpoints(tmp_path) == [good]  # never resumed from


def test_file_digests_change_with_the_content_and_skip_what_does_not_exist(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    first = file_digests([str(data), None, str(tmp_path / "missing.jsonl")])
    assert list(first) == [str(data.resolve())] and len(first[str(data.resolve())]) == 64
    assert file_digests([str(data)]) == first
    data.write_text('{"text": "b"}\n')
    assert file_digests([str(data)]) != first


def test_a_folder_has_one_digest_over_its_files_and_their_names(tmp_path):
    folder = tmp_path / "dataset"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "data-00000-of-00001.arrow").write_bytes(b"rows")
    (folder / "dataset_dict.json").write_text('{"splits": ["train"]}')
    first = file_digests([str(folder)])
    assert list(first) == [str(folder.resolve())] and file_digests([str(folder)]) == first
    (folder / "train" / "data-00000-of-00001.arrow").write_bytes(b"rowz")
    changed = file_digests([str(folder)])
    (folder / "train" / "data-00000-of-00001.arrow").write_bytes(b"rows")
    (folder / "train" / "data-00000-of-00001.arrow").rename(folder / "train" / "renamed.arrow")
    renamed = file_digests([str(folder)])
    assert len({first[str(folder.resolve())], changed[str(folder.resolve())], renamed[str(folder.resolve())]}) == 3


def test_rng_states_survive_json_and_restore_the_same_random_numbers():
    state = json.loads(json.dumps(rng_state()))  # a checkpoint stores them in state.json
    expected = (random.random(), torch.rand(3))
    random.random(), torch.rand(3)
    set_rng_state(state)
    again = (random.random(), torch.rand(3))
    assert again[0] == expected[0] and torch.equal(again[1], expected[1])


COMMON = ["--steps", "60", "--save-every", "10", "--lora-dropout", "0.1", "--max-eval", "2", "--max-new-tokens", "2",
          "--no-progress", "--lr", "1e-2", "--precision", "fp32"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, tmp_path_factory) -> bytes:
    """The adapter of the 60-step run that the interrupted runs must reach."""
    out = tmp_path_factory.mktemp("uninterrupted")
    reference = train_cli("--model", tiny_llama_dir, *COMMON, "--output-dir", str(out))
    assert reference.wait(timeout=600) == 0, reference.stdout.read()[-2000:]
    return (out / "adapter_model.safetensors").read_bytes()


def _steps_logged(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and "loss" in json.loads(line)]


def _resume_and_compare(tiny_llama_dir: str, out: Path, uninterrupted: bytes) -> dict:
    resumed = train_cli("--model", tiny_llama_dir, *COMMON, "--output-dir", str(out), "--resume")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-2000:]
    assert (out / "adapter_model.safetensors").read_bytes() == uninterrupted
    assert _steps_logged(out) == list(range(1, 61))  # steps logged after the checkpoint were dropped and run again
    return json.loads((out / "summary.json").read_text())


def test_kill_minus_9_then_resume_is_bit_identical(tiny_llama_dir, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    victim = train_cli("--model", tiny_llama_dir, *COMMON, "--output-dir", str(out), start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if any(int(p.name[5:]) >= 30 for p in (out / "checkpoints").glob("step-*")):
            break
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it could be killed"

    summary = _resume_and_compare(tiny_llama_dir, out, uninterrupted)
    assert summary["resumed_from"] and int(Path(summary["resumed_from"]).name[5:]) >= 30


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_that_resumes_bit_identical(tiny_llama_dir, tmp_path,
                                                                                   uninterrupted):
    out = tmp_path / "interrupted"
    victim = train_cli("--model", tiny_llama_dir, *COMMON, "--output-dir", str(out))
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None and len(_steps_logged(out)) < 15:
        time.sleep(0.02)
    victim.send_signal(signal.SIGINT)
    output = victim.communicate(timeout=300)[0]
    assert victim.returncode == 130, output[-2000:]
    assert "Traceback" not in output
    stopped = int(re.search(r"stopped after step (\d+) of 60 \(Ctrl-C\)", output).group(1))
    assert 15 <= stopped < 60 and "--resume" in output
    assert (out / "checkpoints" / f"step-{stopped:06d}").is_dir()  # the step it stopped after, not an older one
    assert not (out / "adapter_model.safetensors").exists()

    summary = _resume_and_compare(tiny_llama_dir, out, uninterrupted)
    assert summary["resumed_from"].endswith(f"step-{stopped:06d}")


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = _run()
    state = {"rng": [rng_state()], "before": {}}
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler, state, "r: 4\n", keep=3)

    def disk_full(*args, **kwargs):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1024 vs 512")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"could not write optimizer.pt of the step-4 checkpoint .*"
                                      r"the previous checkpoint, .*step-000002, is intact"):
        save_checkpoint(tmp_path, 4, model, optimizer, scheduler, state, "r: 4\n", keep=3)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]  # nothing half-written left behind
