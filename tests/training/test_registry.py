"""The task registry: every task declares what it is; an unknown name lists the known ones; a task's options are a
YAML section and flags under its heading; a new task is one new class (here, one defined in this test module)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from torch import nn

from lorakit.core.config import TASK_TYPES
from lorakit.training import registry
from lorakit.training.loss import LossResult
from lorakit.training.options import TrainConfig, add_arguments, config_from_args, task_option
from lorakit.training.tasks import MicroBatch, Task, build_task


def test_every_registered_task_declares_what_it_is():
    names = registry.task_names()
    assert {"builtin", "causal_lm", "seq_cls", "seq2seq", "qa", "token_cls"} <= set(names)
    for name in names:
        task = registry.task_class(name)
        assert task.task_name == name and task.peft_task_type in TASK_TYPES
        assert task.summary.startswith(name) and task.headline_metric


def test_an_unknown_task_is_an_error_that_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"task='dpo_typo' is not allowed; choose one of causal_lm, builtin, .*seq_cls"):
        TrainConfig(task="dpo_typo", data="x.jsonl")
    with pytest.raises(ValueError, match="unknown task 'nope'; tasks: causal_lm, builtin"):
        registry.task_class("nope")


def test_a_task_section_in_yaml_sets_its_fields_and_old_flat_keys_still_load(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("task: seq_cls\ndata: train.tsv\nseq_cls:\n  text-field: text\n  labels: [neg, pos]\n")
    flat = tmp_path / "flat.yaml"
    flat.write_text("task: seq_cls\ndata: train.tsv\ntext_field: text\nlabels: [neg, pos]\n")
    config = TrainConfig.from_yaml(nested)
    assert (config.text_field, config.labels) == ("text", ["neg", "pos"])
    assert TrainConfig.from_yaml(flat) == config
    config.save_yaml(tmp_path / "saved.yaml")
    assert TrainConfig.from_yaml(tmp_path / "saved.yaml") == config
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("task: seq_cls\ndata: t.tsv\nseq_cls:\n  beta: 1\n")
    with pytest.raises(ValueError, match="section 'seq_cls' has no option 'beta'; its options: label_field"):
        TrainConfig.from_yaml(wrong)


@dataclasses.dataclass
class EchoOptions:
    pull: float = task_option(0.1, "how strongly the test task pulls")
    mode: str = task_option("sigmoid", "the test task's loss", ("sigmoid", "hinge"))


class EchoTask(Task):
    """A task defined outside the package: a plain linear model whose loss is its output."""

    task_name = "echo_test"
    peft_task_type = "CAUSAL_LM"
    summary = "echo_test (a task a test defines)"
    headline_metric = "loss"
    needs_data = False
    default_steps = 2
    reference_passes = 1
    options = EchoOptions

    def __init__(self, config, device, dtype, start) -> None:
        self.config, self.name, self.tokenizer = config, "echo", None
        self.model, self.train = nn.Linear(2, 1), list(range(4))
        self.beta = config.task_options["pull"]

    def batch(self, indices):
        return MicroBatch({"x": torch.ones(len(indices), 2)}, len(indices), len(indices))

    def loss(self, model, batch):
        out = model(batch["x"]).sum() * self.beta
        return LossResult(out, len(batch["x"]), {"echo/beta": self.beta * len(batch["x"])})

    def evaluate(self, model, label):
        return {"loss": 0.0}

    def save(self, model, out):
        return 0

    def count_parameters(self):
        return 3, 3


@pytest.fixture
def echo(monkeypatch):
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    registry.register(EchoTask)
    return EchoTask


def test_a_new_task_registers_with_its_own_options_and_is_built(echo, tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser)
    monkeypatch.setenv("COLUMNS", "1000")
    text = parser.format_help()
    section = text[text.index("--task echo_test:"):]
    assert "echo_test (a task a test defines)" in section and "--pull PULL" in section and "--mode {sigmoid,hinge}" in section
    config = config_from_args(parser.parse_args(["--task", "echo_test", "--pull", "0.5"]))
    assert config.task_options == {"pull": 0.5, "mode": "sigmoid"} and config.total_steps(100) == 2
    yaml_file = tmp_path / "echo.yaml"
    yaml_file.write_text("task: echo_test\necho_test:\n  pull: 0.25\n  mode: hinge\n")
    from_file = TrainConfig.from_yaml(yaml_file)
    assert from_file.task_options == {"pull": 0.25, "mode": "hinge"}
    assert config_from_args(parser.parse_args(["--config", str(yaml_file), "--pull", "2"])).task_options == \
        {"pull": 2.0, "mode": "hinge"}  # a typed flag wins over the file, option by option
    with pytest.raises(ValueError, match="mode='other' is not allowed; choose one of sigmoid, hinge"):
        TrainConfig(task="echo_test", task_options={"mode": "other"})
    with pytest.raises(ValueError, match="--task echo_test has no option"):
        TrainConfig(task="echo_test", task_options={"gamma": 1})
    with pytest.raises(ValueError, match="--task causal_lm takes no options of its own; got pull"):
        TrainConfig(task="causal_lm", data="x.jsonl", task_options={"pull": 1})
    task = build_task(TrainConfig(task="echo_test", task_options={"pull": 0.5}, method="full"),
                      torch.device("cpu"), "fp32")
    assert type(task) is EchoTask and task.beta == 0.5


def test_a_new_task_trains_and_its_metrics_are_logged(echo, tmp_path):
    import json

    from lorakit.training import train

    result = train(task="echo_test", method="full", output_dir=str(tmp_path / "run"), progress=False,
                   task_options={"pull": 0.5}, preflight=False, batch_size=2)
    assert result["steps"] == 2
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [s for s in steps if "loss" in s and "eval" not in s]
    assert logged and all(s["echo/beta"] == pytest.approx(0.5) for s in logged)


@dataclasses.dataclass
class SharedOptions:
    loss: str = task_option("exp", "a loss only this test task has", ("exp", "sigmoid"))


def test_an_option_tasks_share_takes_every_task_s_values_and_each_task_checks_its_own(monkeypatch):
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    registry.register(type("SharedTask", (EchoTask,), {"task_name": "shared_test", "options": SharedOptions}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--task", "shared_test", "--loss", "exp"])).task_options == \
        {"loss": "exp"}
    assert config_from_args(parser.parse_args(["--task", "dpo", "--loss", "ipo"])).task_options["loss"] == "ipo"
    with pytest.raises(ValueError, match="loss='exp' is not allowed; choose one of sigmoid, ipo, hinge, robust"):
        config_from_args(parser.parse_args(["--task", "dpo", "--loss", "exp"]))
