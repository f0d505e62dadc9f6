"""TrainConfig: validation that names the bad value and what is allowed, type coercion, YAML files (round trip,
errors, command-line overrides), resolved paths, the step count, and a --help line for every option."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest
import yaml
from conftest import train_cli

from lorakit.cli import build_parser
from lorakit.training.options import TrainConfig, add_arguments, config_from_args


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="schedule='step' is not allowed; choose one of linear, cosine, constant"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="--task causal_lm needs --data"):
        TrainConfig(task="causal_lm")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": 0}, "steps=0 must be at least 1"),
    ({"lr": 0}, "lr=0.0 must be positive"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 must be 0 or more"),
    ({"lora_dropout": 1.0}, "lora_dropout=1.0 must be in [0, 1)"),
    ({"eval_fraction": 1.0}, "eval_fraction=1.0 must be between 0 and 1"),
    ({"precision": "fp16"}, "precision='fp16' is not allowed; choose one of auto, bf16, fp32"),
    ({"steps": 2.5}, "steps=2.5 is not a valid int"),
    ({"progress": "yes"}, "progress='yes' is not a valid bool"),
    ({"r": None}, "r must be set (got nothing)"),
    ({"data": "x.jsonl"}, "--data is for the tasks that read a file; --task builtin generates its own data"),
    ({"method": "full", "quantize": "nf4"}, "--quantize nf4 holds the base in 4 bits under a LoRA adapter"),
])
def test_each_bad_value_is_named_with_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**kwargs)
    assert message in str(err.value)


def test_values_are_coerced_to_the_field_types():
    config = TrainConfig(lr="2e-4", steps=3.0, labels="neg, pos", target_modules=["q_proj", "v_proj"], r=4.0)
    assert config.lr == 2e-4 and isinstance(config.lr, float)  # YAML reads 2e-4 as a string
    assert config.steps == 3 and isinstance(config.steps, int) and config.r == 4
    assert config.labels == ["neg", "pos"] and config.target_modules == "q_proj,v_proj"


def test_yaml_round_trip_keeps_every_field(tmp_path):
    config = TrainConfig(task="seq_cls", data="train.tsv", labels=["neg", "pos"], r=4, lora_alpha=8.0, lr=3e-4,
                         packing=False, steps=7, target_modules="query,value", quantize="nf4")
    config.save_yaml(tmp_path / "run.yaml")
    again = TrainConfig.from_yaml(tmp_path / "run.yaml")
    assert again == config
    assert set(yaml.safe_load((tmp_path / "run.yaml").read_text())) == {f.name for f in dataclasses.fields(config)}


def test_yaml_files_accept_dashes_and_overrides_and_refuse_what_is_not_an_option(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max-eval: 3\nr: 16\n")
    config = TrainConfig.from_yaml(path, r=2)
    assert config.max_eval == 3 and config.r == 2  # the overrides win
    path.write_text("model: x\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown option\(s\) learning_rate; see `lorakit train --help`"):
        TrainConfig.from_yaml(path)
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="run.yaml: expected a mapping of option: value, got list"):
        TrainConfig.from_yaml(path)
    path.write_text("batch_size: 0\n")
    with pytest.raises(ValueError, match="run.yaml: batch_size=0 must be at least 1"):
        TrainConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_resolved_makes_existing_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("{}\n")
    config = TrainConfig(task="causal_lm", data="train.jsonl", eval_data="missing.jsonl").resolved()
    assert config.data == str(tmp_path / "train.jsonl") and os.path.isabs(config.data)
    assert config.eval_data == "missing.jsonl" and config.model == "default"  # only paths that exist


def test_total_steps_follow_steps_epochs_and_accumulation():
    assert TrainConfig(steps=5).total_steps(100) == 5
    assert TrainConfig().total_steps(100) == 40  # the built-in task's own
    assert TrainConfig(task="causal_lm", data="d.jsonl", epochs=2, grad_accum=4).total_steps(10) == 5
    assert TrainConfig(task="causal_lm", data="d.jsonl", epochs=0.1).total_steps(3) == 1  # at least one


def test_command_line_options_override_the_config_file(tmp_path):
    (tmp_path / "run.yaml").write_text("r: 16\nsteps: 9\npacking: true\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--r", "2", "--no-packing", "--labels", "a,b"])
    config = config_from_args(args)
    assert (config.r, config.steps, config.packing, config.labels) == (2, 9, False, ["a", "b"])
    assert config_from_args(parser.parse_args([])) == TrainConfig()  # options not typed keep their defaults


def test_every_train_option_has_help():
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    options = [a for a in train_parser._actions if a.option_strings and a.dest != "help"]
    # every field but task_options, + --config, + each task's own options (one flag per name, tasks share it)
    from lorakit.training.options import _task_option_fields

    own = _task_option_fields()
    assert {"beta", "loss", "precompute_ref", "simpo_gamma", "desirable_weight"} <= set(own)
    assert len(options) == len(TrainConfig.__dataclass_fields__) - 1 + 1 + len(own)
    for action in options:
        assert action.help and len(action.help) > 15, action.option_strings
    shown = train_parser.format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert name == "task_options" or "--" + name.replace("_", "-") in shown, name


def test_yaml_config_with_cli_overrides(tiny_llama_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": tiny_llama_dir, "steps": 2, "r": 4, "max-eval": 2,
                                      "max_new_tokens": 2, "output_dir": str(tmp_path / "out")}) + "lr: 2e-4\n")
    proc = train_cli("--config", str(config), "--r", "2", "--no-progress")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-2000:]
    saved = yaml.safe_load((tmp_path / "out" / "train_config.yaml").read_text())
    assert saved["r"] == 2 and saved["steps"] == 2 and saved["max_eval"] == 2  # the command line wins
    assert saved["lr"] == 2e-4  # YAML reads 2e-4 as a string; the config makes it a float
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2
    assert "trained:" in output and "held-out:" in output and "saved:" in output

    config.write_text("model: x\nlearning_rate: 3\n")
    proc = train_cli("--config", str(config))
    assert proc.wait(timeout=120) == 2
    assert "unknown option(s) learning_rate" in proc.stdout.read()
    config.write_text("steps: 2.5\n")
    proc = train_cli("--config", str(config))
    assert proc.wait(timeout=120) == 2
    assert "run.yaml: steps=2.5 is not a valid int" in proc.stdout.read()
