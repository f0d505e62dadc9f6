"""The training loop on tiny models: what a run writes; exactness of accumulation, packing, DDP and gradient
checkpointing; the schedule and data order; NaN stops; refusing to mix runs; the task types end to end."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_cli
from safetensors.torch import load_file

import lorakit.training.tasks
from lorakit.training.data import load_causal_lm, read_table
from lorakit.training.devices import Processes
from lorakit.training.loop import TrainingError, lr_lambda, micro_batch_indices, train
from lorakit.training.options import TrainConfig
from lorakit.training.tasks import build_task

# fp32 on every CPU: precision 'auto' picks bf16 on AMX CPUs, and these tests compare runs to 1e-6.
FAST = {"max_eval": 4, "max_new_tokens": 4, "progress": False, "warmup_steps": 1, "lr": 1e-2, "precision": "fp32"}
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_builtin_task_on_tiny_model_writes_everything(tiny_llama_dir, tmp_path):
    result = train(model=tiny_llama_dir, steps=6, output_dir=str(tmp_path), **FAST)
    assert result["steps"] == 6 and result["tokens"] > 0 and result["tokens_per_s"] > 0
    assert result["last_loss"] < result["first_loss"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_config.yaml", "metrics.jsonl",
                 "loss_curve.png", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = TrainConfig.from_yaml(tmp_path / "train_config.yaml")
    assert saved.model == tiny_llama_dir and saved.steps == 6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"exact_match", "loss", "perplexity"} <= set(records[0]["eval"])
    assert 0 <= result["after"]["exact_match"] <= 1
    assert result["adapter_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size


def test_a_run_reports_its_model_flops_utilization(tiny_llama_dir, tmp_path, monkeypatch):
    from lorakit.models.calc import flop_counter

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the matmul peak is measured for this run
    result = train(model=tiny_llama_dir, steps=3, output_dir=str(tmp_path / "run"), **FAST)
    peak = result["matmul_peak_flops_per_s"]
    assert peak > 0 and (tmp_path / "cache" / "lorakit" / "matmul_peak.json").is_file()
    assert 0 < result["mfu"] < 1
    assert result["mfu"] == pytest.approx(result["model_flops_per_s"] / peak)
    assert result["model_flops_per_s"] == pytest.approx(result["model_flops"] / result["step_seconds"])
    # The run's FLOPs are the counter's for the steps' examples: the built-in task's rows, logits on the targets.
    task = build_task(TrainConfig(model=tiny_llama_dir, **FAST), torch.device("cpu"), "fp32")
    counter = flop_counter(task.model)
    expected = 0
    for step in range(3):
        mb = task.batch(micro_batch_indices(step, len(task.train), 8, Processes(), 0))
        expected += counter.step(mb.lengths, mb.head_rows).total
    assert result["model_flops"] == expected
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(0 < r["mfu"] < 1 for r in steps)


def test_gradient_accumulation_equals_the_big_batch(tiny_llama_dir, tmp_path):
    train(model=tiny_llama_dir, steps=3, batch_size=8, output_dir=str(tmp_path / "big"), **FAST)
    train(model=tiny_llama_dir, steps=3, batch_size=4, grad_accum=2, output_dir=str(tmp_path / "acc"), **FAST)
    assert _max_diff(_adapter(tmp_path / "big"), _adapter(tmp_path / "acc")) <= 1e-6


def test_packing_and_padding_train_the_same_adapter(tiny_llama_dir, tmp_path):
    train(model=tiny_llama_dir, steps=3, packing=True, output_dir=str(tmp_path / "packed"), **FAST)
    train(model=tiny_llama_dir, steps=3, packing=False, output_dir=str(tmp_path / "padded"), **FAST)
    assert _max_diff(_adapter(tmp_path / "packed"), _adapter(tmp_path / "padded")) <= 1e-5


def test_two_process_ddp_equals_one_process_with_twice_the_batch(tiny_llama_dir, tmp_path):
    common = ["--model", tiny_llama_dir, "--steps", "3", "--max-eval", "2", "--max-new-tokens", "2",
              "--no-progress", "--lr", "2e-3", "--warmup-steps", "1", "--precision", "fp32"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lorakit", "train",
                          *common, "--batch-size", "2", "--output-dir", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    assert "2 processes" in ddp.stdout
    single = train_cli(*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one"))
    assert single.wait(timeout=300) == 0, single.stdout.read()[-2000:]
    assert _max_diff(_adapter(tmp_path / "ddp"), _adapter(tmp_path / "one")) <= 1e-6


def test_micro_batches_of_the_processes_are_the_slices_of_one_global_batch():
    one = [micro_batch_indices(k, 10, 4, Processes(), seed=3) for k in range(4)]
    two = [[micro_batch_indices(k, 10, 2, Processes(rank, 2), seed=3) for rank in (0, 1)] for k in range(4)]
    assert [a + b for a, b in two] == one  # process r takes the r-th slice of the same global batch
    assert len(set(one[0] + one[1])) == 8  # an epoch has 10 // 4 = 2 batches, without repeats
    assert one[2:] != one[:2]  # the next epoch is shuffled anew (seed + 1)
    assert one == [micro_batch_indices(k, 10, 4, Processes(), seed=3) for k in range(4)]  # and is reproducible


def test_nan_loss_stops_names_the_last_good_checkpoint_and_the_command_to_recover(tiny_llama_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    real, calls = lorakit.training.tasks.causal_lm.causal_lm_loss, []

    def loss_turning_nan_at_step_5(model, batch):
        loss, count = real(model, batch)
        if torch.is_grad_enabled():  # training, not evaluation
            calls.append(1)
            if len(calls) >= 5:
                return loss * float("nan"), count
        return loss, count

    monkeypatch.setattr(lorakit.training.tasks.causal_lm, "causal_lm_loss", loss_turning_nan_at_step_5)
    with pytest.raises(TrainingError) as raised:
        train(model=tiny_llama_dir, steps=40, save_every=2, output_dir=str(tmp_path), **FAST)
    message = str(raised.value)
    ckpt = tmp_path / "checkpoints"
    # The weights of step 4 gave the NaN loss of step 5: set aside; step 2 is the good one, named with a command.
    assert "the loss is nan at step 5" in message and f"{ckpt / 'step-000002'}, is intact" in message
    command = f"lorakit train --config {ckpt / 'step-000002' / 'train_config.yaml'} --resume --lr 0.001"
    assert command in message
    assert sorted(p.name for p in ckpt.iterdir()) == ["diverged-step-000004", "step-000002"]  # nothing half-written
    assert not (tmp_path / "adapter_model.safetensors").exists()
    # The printed command works: resuming at a lower rate is allowed, with a warning, and finishes the run.
    monkeypatch.setattr(lorakit.training.tasks.causal_lm, "causal_lm_loss", real)
    result = train(TrainConfig.from_yaml(ckpt / "step-000002" / "train_config.yaml", resume=True, lr=1e-3))
    assert result["resumed_from"].endswith("step-000002") and result["steps"] == 40
    assert "lr: 0.01 → 0.001" in capsys.readouterr().err
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if "lr" in json.loads(line)]
    assert max(lrs[2:]) <= 1e-3  # the steps after the checkpoint ran at the new rate


def test_resume_refuses_changed_data_and_accepts_the_same_folder_by_another_path(tiny_llama_dir, tmp_path,
                                                                                  monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i} {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    options = dict(model=tiny_llama_dir, task="causal_lm", data=str(data), steps=4, save_every=2, **FAST)
    train(output_dir=str(out), **options)
    monkeypatch.chdir(tmp_path)  # the same folder, now as a relative path: resumable
    assert train(output_dir="run", resume=True, **options)["resumed_from"].endswith("step-000002")
    data.write_text(data.read_text().replace("say 3", "say three"))
    with pytest.raises(ValueError, match=r"data.jsonl changed since .*step-000002 was written"):
        train(output_dir=str(out), resume=True, **options)
    with pytest.raises(ValueError, match=r"other options \(r: 8 → 4\)"):
        train(output_dir=str(out), resume=True, **{**options, "r": 4})


def test_resume_refuses_another_run(tiny_llama_dir, tmp_path):
    train(model=tiny_llama_dir, steps=4, save_every=2, output_dir=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match=r"other options \(r: 8 → 4\)"):
        train(model=tiny_llama_dir, steps=4, r=4, resume=True, output_dir=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match="no checkpoint in"):
        train(model=tiny_llama_dir, steps=4, resume=True, output_dir=str(tmp_path / "empty"), **FAST)
    # A new run in the same folder would mix its checkpoints with the old run's: refused, nothing removed.
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run; continue it with --resume"):
        train(model=tiny_llama_dir, steps=4, save_every=2, output_dir=str(tmp_path), **FAST)
    assert (tmp_path / "checkpoints" / "step-000002").is_dir()


def test_schedule_shapes():
    linear = lr_lambda("linear", 2, 10)
    assert [round(linear(s), 3) for s in (0, 1, 2, 6, 10)] == [0.333, 0.667, 1.0, 0.5, 0.0]
    cosine = lr_lambda("cosine", 0, 10)
    assert cosine(0) == 1.0 and abs(cosine(5) - 0.5) < 1e-9 and cosine(10) == 0.0
    assert lr_lambda("constant", 0, 10)(9) == 1.0


def test_causal_lm_from_alpaca_file_and_full_fine_tuning(tiny_llama_dir, tmp_path):
    data = tmp_path / "train.json"
    records = [{"instruction": f"Say {w}", "input": "", "output": w} for w in ["yes", "no", "maybe", "sure"] * 10]
    data.write_text(json.dumps(records, indent=1))
    lora = train(model=tiny_llama_dir, task="causal_lm", data=str(data), epochs=2, batch_size=4,
                 output_dir=str(tmp_path / "lora"), **FAST)
    assert lora["steps"] == 2 * (38 // 4)  # 5% held out (2 records), the rest in batches of 4, twice
    assert {"loss", "perplexity"} <= set(lora["after"]) and lora["after"]["loss"] < lora["before"]["loss"]
    full = train(model=tiny_llama_dir, task="causal_lm", data=str(data), steps=3, method="full",
                 output_dir=str(tmp_path / "full"), **FAST)
    assert full["trainable_params"] == full["all_params"]
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_sequence_classification_from_tsv(tiny_bert_dir, tmp_path):
    data = tmp_path / "train.tsv"
    rows = [("a fine film", "pos"), ("a dull film", "neg")] * 20
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    result = train(model=tiny_bert_dir, task="seq_cls", data=str(data), steps=30, batch_size=4,
                   target_modules="query,value", output_dir=str(tmp_path), **{**FAST, "lr": 5e-2})
    assert {"accuracy", "f1"} <= set(result["after"]) and result["after"]["accuracy"] == 1.0
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS"
    assert any(".classifier." in key for key in _adapter(tmp_path))  # the trained head is saved with the adapter
    # which class each output of the head stands for travels with it
    assert json.loads((tmp_path / "labels.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    assert TrainConfig.from_yaml(tmp_path / "train_config.yaml").labels == ["neg", "pos"]
    bad = tmp_path / "dev.tsv"
    bad.write_text("sentence\tlabel\nok film\tmeh\n")
    with pytest.raises(ValueError, match=r"dev.tsv:2: label 'meh' is not one of the classes \(neg, pos\)"):
        train(model=tiny_bert_dir, task="seq_cls", data=str(data), eval_data=str(bad), steps=1,
              output_dir=str(tmp_path / "bad"), **FAST)


def test_gradient_checkpointing_trains_the_same_adapter(tiny_llama_dir, tmp_path):
    run = build_task(TrainConfig(model=tiny_llama_dir, grad_checkpointing=True), torch.device("cpu"), "fp32")
    base = run.model.model  # really on, so the comparison below means something (transformers 5 renamed it)
    assert base.is_activation_checkpointing if hasattr(type(base), "is_activation_checkpointing") \
        else base.is_gradient_checkpointing
    train(model=tiny_llama_dir, steps=2, output_dir=str(tmp_path / "plain"), **FAST)
    train(model=tiny_llama_dir, steps=2, grad_checkpointing=True, output_dir=str(tmp_path / "ckpt"), **FAST)
    assert _max_diff(_adapter(tmp_path / "plain"), _adapter(tmp_path / "ckpt")) <= 1e-6


def test_bf16_autocast_trains_fp32_adapters_on_any_cpu(tiny_llama_dir, tmp_path):
    result = train(model=tiny_llama_dir, steps=4, output_dir=str(tmp_path), **{**FAST, "precision": "bf16"})
    assert result["precision"] == "bf16" and result["last_loss"] < result["first_loss"]
    assert all(t.dtype == torch.float32 for t in _adapter(tmp_path).values())


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the real datasets are not at {SHARED}")
def test_real_datasets_parse_and_train(smollm2_tokenizer, tiny_bert_dir, tmp_path):
    alpaca = load_causal_lm(SHARED / "instruct" / "alpaca_gpt4_en_demo_999.json", smollm2_tokenizer, 512)
    assert len(alpaca) == 999 and all(e.n_targets > 0 for e in alpaca)
    rows = read_table(SHARED / "sst2" / "train.tsv")
    assert len(rows) == 67349 and {label for _, _, label in rows} == {"0", "1"}
    result = train(model=tiny_bert_dir, task="seq_cls", data=str(SHARED / "sst2" / "dev.tsv"), steps=3,
                   batch_size=8, target_modules="query,value", output_dir=str(tmp_path), **FAST)
    assert result["after"]["n"] == 4 and result["tokens"] > 0


def test_a_run_says_how_long_it_will_take_and_shows_evaluation_progress(tiny_llama_dir, tmp_path, capsys):
    train(model=tiny_llama_dir, steps=3, output_dir=str(tmp_path), **{**FAST, "progress": True})
    err = capsys.readouterr().err
    assert re.search(r"lorakit: a step takes \d+\.\d s; training will take about \d+ s in all", err)
    for bar in ("loss (before)", "exact match (before)", "loss (after)", "exact match (after)"):
        assert re.search(re.escape(bar) + r": +\d+%\|.*\| \d/4 ", err), bar  # examples done of 4, time left
    assert "lorakit train:" not in err  # the library's messages say lorakit:, whichever command runs them
