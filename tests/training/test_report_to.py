"""--report-to tensorboard: the event files in OUTPUT_DIR/runs hold exactly the scalars of metrics.jsonl, each at its
step (also after a resume, which rewinds both); only the main process writes; an unknown reporter or a missing
TensorBoard is a clear error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lorakit.cli import main
from lorakit.training.loop import train
from lorakit.training.metrics_log import MetricsLog, summary_writer_class
from lorakit.training.options import TrainConfig

FAST = {"max_eval": 4, "max_new_tokens": 4, "progress": False, "warmup_steps": 1, "lr": 1e-2, "precision": "fp32"}


def _expected(metrics_jsonl) -> dict[tuple[str, int], np.float32]:
    """(tag, step) → value for every number in metrics.jsonl, as TensorBoard stores it (float32)."""
    out = {}
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        step = record["step"]
        values = {f"eval/{k}": v for k, v in record["eval"].items()} if "eval" in record else \
            {f"train/{k}": v for k, v in record.items() if k != "step"}
        for tag, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert (tag, step) not in out, (tag, step)
                out[tag, step] = np.float32(value)
    return out


def _events(folder) -> dict[tuple[str, int], np.float32]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            assert (tag, event.step) not in out, f"{tag} logged twice at step {event.step}"
            out[tag, event.step] = np.float32(event.value)
    return out


def test_event_files_hold_every_scalar_of_metrics_jsonl(tiny_llama_dir, tmp_path):
    train(model=tiny_llama_dir, steps=4, eval_every=2, save_every=2, report_to="tensorboard",
          output_dir=str(tmp_path), **FAST)
    expected = _expected(tmp_path / "metrics.jsonl")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens", "train/step_s", "eval/exact_match",
            "eval/loss", "eval/perplexity"} <= {tag for tag, _ in expected}
    assert sorted(s for t, s in expected if t == "eval/loss") == [0, 2, 4]  # before, at step 2, after
    assert sorted(s for t, s in expected if t == "train/loss") == [1, 2, 3, 4]
    assert _events(tmp_path / "runs") == expected

    # A resumed run reruns steps 3 and 4: metrics.jsonl drops their first records, and so do the event files.
    first = {k: v for k, v in expected.items() if k[1] <= 2}
    train(model=tiny_llama_dir, steps=4, eval_every=2, save_every=2, report_to="tensorboard", resume=True,
          output_dir=str(tmp_path), **{**FAST, "lr": 5e-3})  # another rate: the rerun steps log other values
    again = _expected(tmp_path / "metrics.jsonl")
    assert {k: v for k, v in again.items() if k[1] <= 2} == first
    assert again[("train/lr", 3)] != expected[("train/lr", 3)]
    assert _events(tmp_path / "runs") == again
    assert len(list((tmp_path / "runs").glob("events.out.tfevents.*"))) == 1


def test_without_report_to_nothing_is_written_for_tensorboard(tiny_llama_dir, tmp_path):
    train(model=tiny_llama_dir, steps=1, output_dir=str(tmp_path), **FAST)
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "runs").exists()


def test_under_torchrun_one_event_file_holds_the_run(tiny_llama_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), "-m", "lorakit", "train", "--model", tiny_llama_dir,
                          "--steps", "2", "--batch-size", "2", "--max-eval", "2", "--max-new-tokens", "2",
                          "--no-progress", "--precision", "fp32", "--report-to", "tensorboard", "--output-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert len(list((tmp_path / "runs").glob("events.out.tfevents.*"))) == 1
    assert _events(tmp_path / "runs") == _expected(tmp_path / "metrics.jsonl")


def test_only_the_main_process_writes_events(tmp_path):
    other = MetricsLog(tmp_path / "metrics.jsonl", enabled=False, report_to="tensorboard")
    other.start(None)
    other.write({"step": 1, "loss": 1.0})
    other.close()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_an_unknown_reporter_is_refused_by_name(capsys):
    with pytest.raises(ValueError, match=r"report_to='wandb' is not allowed; choose one of none, tensorboard"):
        train(report_to="wandb")
    with pytest.raises(ValueError, match=r"report_to='wandb' is not allowed"):
        TrainConfig(report_to="wandb")
    with pytest.raises(SystemExit):
        main(["train", "--report-to", "wandb"])
    err = capsys.readouterr().err
    assert "argument --report-to: invalid choice: 'wandb' (choose from" in err and "tensorboard" in err


def test_missing_tensorboard_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` then raises ImportError
    with pytest.raises(ImportError, match=r"--report-to tensorboard needs TensorBoard .*pip install "
                                          r"'lorakit\[tensorboard\]'"):
        summary_writer_class()
    # train() says it before loading anything; the CLI prints it as one line, after the line naming the run
    assert main(["train", "--report-to", "tensorboard", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("lorakit train: lora on default")
    assert lines[1].startswith("lorakit train: error: --report-to tensorboard needs TensorBoard")
    assert "pip install 'lorakit[tensorboard]'" in err and not (tmp_path / "run").exists()
