"""The training loop on tiny models: exactness of accumulation, DDP and resume; files; errors."""

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
import yaml
from safetensors.torch import load_file

from lorakit.training.loop import TrainingError, lr_lambda, train
from lorakit.training.options import TrainConfig

FAST = {"max_eval": 4, "max_new_tokens": 4, "progress": False, "warmup_steps": 1, "lr": 1e-2}


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _cli(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorakit", "train", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


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


def test_gradient_accumulation_equals_the_big_batch(tiny_llama_dir, tmp_path):
    train(model=tiny_llama_dir, steps=3, batch_size=8, output_dir=str(tmp_path / "big"), **FAST)
    train(model=tiny_llama_dir, steps=3, batch_size=4, grad_accum=2, output_dir=str(tmp_path / "acc"), **FAST)
    assert _max_diff(_adapter(tmp_path / "big"), _adapter(tmp_path / "acc")) <= 1e-6


def test_packing_and_padding_train_the_same_adapter(tiny_llama_dir, tmp_path):
    train(model=tiny_llama_dir, steps=3, packing=True, output_dir=str(tmp_path / "packed"), **FAST)
    train(model=tiny_llama_dir, steps=3, packing=False, output_dir=str(tmp_path / "padded"), **FAST)
    assert _max_diff(_adapter(tmp_path / "packed"), _adapter(tmp_path / "padded")) <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process_with_twice_the_batch(tiny_llama_dir, tmp_path):
    common = ["--model", tiny_llama_dir, "--steps", "3", "--max-eval", "2", "--max-new-tokens", "2",
              "--no-progress", "--lr", "2e-3", "--warmup-steps", "1"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lorakit", "train",
                          *common, "--batch-size", "2", "--output-dir", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    assert "2 processes" in ddp.stdout
    single = _cli(*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one"))
    assert single.wait(timeout=300) == 0, single.stdout.read()[-2000:]
    assert _max_diff(_adapter(tmp_path / "ddp"), _adapter(tmp_path / "one")) <= 1e-6


def test_kill_minus_9_then_resume_is_bit_identical(tiny_llama_dir, tmp_path):
    common = ["--model", tiny_llama_dir, "--steps", "120", "--save-every", "10", "--lora-dropout", "0.1",
              "--max-eval", "2", "--max-new-tokens", "2", "--no-progress", "--lr", "1e-2"]
    reference = _cli(*common, "--output-dir", str(tmp_path / "reference"))
    assert reference.wait(timeout=600) == 0, reference.stdout.read()[-2000:]

    out = tmp_path / "killed"
    victim = _cli(*common, "--output-dir", str(out), start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if len(list((out / "checkpoints").glob("step-*"))) and any(
                int(p.name[5:]) >= 30 for p in (out / "checkpoints").glob("step-*")):
            break
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it could be killed"

    resumed = _cli(*common, "--output-dir", str(out), "--resume")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] and int(Path(summary["resumed_from"]).name[5:]) >= 30
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "reference" / "adapter_model.safetensors").read_bytes()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 121))  # steps logged after the checkpoint were dropped and run again


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    import lorakit.training.tasks as setup

    real, calls = setup.causal_lm_loss, []

    def loss_turning_nan_at_step_5(model, batch):
        loss, count = real(model, batch)
        if torch.is_grad_enabled():  # training, not evaluation
            calls.append(1)
            if len(calls) >= 5:
                return loss * float("nan"), count
        return loss, count

    monkeypatch.setattr(setup, "causal_lm_loss", loss_turning_nan_at_step_5)
    with pytest.raises(TrainingError, match=r"the loss is nan at step 5; .*step-000004, is intact"):
        train(model=tiny_llama_dir, steps=40, save_every=2, output_dir=str(tmp_path), **FAST)
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000002", "step-000004"]  # no half-written folder
    assert json.loads((ckpt / "step-000004" / "state.json").read_text())["step"] == 4
    assert not (tmp_path / "adapter_model.safetensors").exists()
    # The checkpoint is usable: resuming without the fault finishes the run.
    monkeypatch.setattr(setup, "causal_lm_loss", real)
    result = train(model=tiny_llama_dir, steps=40, save_every=2, resume=True, output_dir=str(tmp_path), **FAST)
    assert result["resumed_from"].endswith("step-000004") and result["steps"] == 40


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


def test_yaml_config_with_cli_overrides(tiny_llama_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": tiny_llama_dir, "steps": 2, "r": 4, "max-eval": 2,
                                      "max_new_tokens": 2, "output_dir": str(tmp_path / "out")}) + "lr: 2e-4\n")
    proc = _cli("--config", str(config), "--r", "2", "--no-progress")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-2000:]
    saved = yaml.safe_load((tmp_path / "out" / "train_config.yaml").read_text())
    assert saved["r"] == 2 and saved["steps"] == 2 and saved["max_eval"] == 2  # the command line wins
    assert saved["lr"] == 2e-4  # YAML reads 2e-4 as a string; the config makes it a float
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2
    assert "trained:" in output and "held-out:" in output and "saved:" in output

    config.write_text("model: x\nlearning_rate: 3\n")
    proc = _cli("--config", str(config))
    assert proc.wait(timeout=120) == 2
    assert "unknown option(s) learning_rate" in proc.stdout.read()
    config.write_text("steps: 2.5\n")
    proc = _cli("--config", str(config))
    assert proc.wait(timeout=120) == 2
    assert "run.yaml: steps=2.5 is not a valid int" in proc.stdout.read()


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="schedule='step' is not allowed; choose one of linear, cosine, constant"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="--task causal_lm needs --data"):
        TrainConfig(task="causal_lm")


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
    bad = tmp_path / "dev.tsv"
    bad.write_text("sentence\tlabel\nok film\tmeh\n")
    with pytest.raises(ValueError, match=r"dev.tsv:2: unknown label 'meh'; the labels are neg, pos"):
        train(model=tiny_bert_dir, task="seq_cls", data=str(data), eval_data=str(bad), steps=1,
              output_dir=str(tmp_path / "bad"), **FAST)


def test_eval_and_generate_commands_use_the_saved_adapter(tiny_llama_dir, tmp_path):
    result = train(model=tiny_llama_dir, steps=2, output_dir=str(tmp_path), **FAST)
    from lorakit.cli import main
    from lorakit.inference import evaluate_adapter, generate

    again = evaluate_adapter(tmp_path, TrainConfig.from_yaml(tmp_path / "train_config.yaml"))
    assert again["loss"] == pytest.approx(result["after"]["loss"], rel=1e-5)
    assert again["exact_match"] == result["after"]["exact_match"]
    proc = subprocess.run([sys.executable, "-m", "lorakit", "eval", str(tmp_path), "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["loss"] == pytest.approx(again["loss"], rel=1e-5)
    text = generate("Order for Ada: 2 x scone (small), monday.", adapter=tmp_path, max_new_tokens=3)
    assert isinstance(text, str)
    assert main(["generate", "hi", "--adapter", str(tmp_path / "missing")]) == 2


def test_gradient_checkpointing_trains_the_same_adapter(tiny_llama_dir, tmp_path):
    from lorakit.training.tasks import build_task

    run = build_task(TrainConfig(model=tiny_llama_dir, grad_checkpointing=True), torch.device("cpu"), "fp32")
    assert run.model.model.is_gradient_checkpointing  # really on, so the comparison below means something
    train(model=tiny_llama_dir, steps=2, output_dir=str(tmp_path / "plain"), **FAST)
    train(model=tiny_llama_dir, steps=2, grad_checkpointing=True, output_dir=str(tmp_path / "ckpt"), **FAST)
    assert _max_diff(_adapter(tmp_path / "plain"), _adapter(tmp_path / "ckpt")) <= 1e-6


def test_every_train_option_has_help():
    from lorakit.cli import build_parser

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    options = [a for a in train_parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) == len(TrainConfig.__dataclass_fields__) + 1  # + --config
    for action in options:
        assert action.help and len(action.help) > 15, action.option_strings


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the real datasets are not at {SHARED}")
def test_real_datasets_parse_and_train(smollm2_tokenizer, tiny_bert_dir, tmp_path):
    from lorakit.training.data import load_causal_lm, read_table

    alpaca = load_causal_lm(SHARED / "instruct" / "alpaca_gpt4_en_demo_999.json", smollm2_tokenizer, 512)
    assert len(alpaca) == 999 and all(e.n_targets > 0 for e in alpaca)
    rows = read_table(SHARED / "sst2" / "train.tsv")
    assert len(rows) == 67349 and {label for _, _, label in rows} == {"0", "1"}
    result = train(model=tiny_bert_dir, task="seq_cls", data=str(SHARED / "sst2" / "dev.tsv"), steps=3,
                   batch_size=8, target_modules="query,value", output_dir=str(tmp_path), **FAST)
    assert result["after"]["n"] == 4 and result["tokens"] > 0
