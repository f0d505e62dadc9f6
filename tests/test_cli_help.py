"""Each command's --help lists only the options it takes: `lorakit eval` the model, data and evaluation options of
TrainConfig but no optimizer, schedule or LoRA shape; `lorakit train` all of them, in sections; and no command's help
mentions an option it would refuse."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from lorakit.cli import build_parser, main
from lorakit.training.options import EVAL, GROUPS, TRAIN, TrainConfig, _opt, command_options, option_groups

TRAINING_ONLY = ("--lr", "--steps", "--epochs", "--warmup-steps", "--schedule", "--weight-decay", "--max-grad-norm",
                 "--batch-size", "--grad-accum", "--loraplus-lr-ratio", "--r", "--lora-alpha", "--lora-dropout",
                 "--target-modules", "--method", "--num-virtual-tokens", "--init-adapter", "--packing",
                 "--grad-checkpointing", "--low-memory", "--fsdp", "--seed", "--eval-every", "--save-every",
                 "--keep-checkpoints", "--resume", "--output-dir", "--report-to")
EVALUATION = ("--model", "--task", "--data", "--eval-data", "--eval-fraction", "--max-eval", "--text-field",
              "--label-field", "--labels", "--label-map", "--max-length", "--max-new-tokens", "--eval-batch-size",
              "--precision", "--device", "--quantize", "--double-quant", "--trust-remote-code", "--progress")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _help(command: str, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside option names
    return _commands()[command].format_help()


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def test_eval_help_has_the_evaluation_options_and_none_of_training(monkeypatch):
    flags = _flags(_help("eval", monkeypatch))
    assert not flags & set(TRAINING_ONLY), sorted(flags & set(TRAINING_ONLY))
    assert set(EVALUATION) <= flags
    marked = {"--" + name.replace("_", "-") for name in command_options("eval")}
    assert flags == marked | {"--help", "--config", "--json", "--no-double-quant", "--no-trust-remote-code",
                              "--no-progress"}


def test_eval_refuses_a_training_option_with_its_own_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "some/adapter", "--lr", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lorakit eval ADAPTER")
    assert "lorakit eval: error: unrecognized arguments: --lr 1 (--lr: option(s) of `lorakit train`" in err
    with pytest.raises(SystemExit):
        main(["eval", "some/adapter", "--warmup-steps=3"])
    assert "unrecognized arguments: --warmup-steps=3 (--warmup-steps: option(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--no-such-option"])
    err = capsys.readouterr().err
    assert "lorakit train: error: unrecognized arguments: --no-such-option" in err and "option(s) of" not in err


def test_train_help_has_every_option_in_its_section(monkeypatch):
    text = _help("train", monkeypatch)
    every = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig) if f.name != "task_options"}
    assert every <= _flags(text)
    assert command_options("train") == [f.name for f in dataclasses.fields(TrainConfig) if f.name != "task_options"]
    # the sections in GROUPS' order, each option under its own
    starts = [text.index(f"\n{title}:\n") for title in GROUPS]
    assert starts == sorted(starts)
    groups = option_groups()
    for name in ("model", "task", "r", "lr", "precision", "max_new_tokens", "report_to"):
        section = groups[name]
        end = min([s for s in starts if s > text.index(f"\n{section}:\n")] + [len(text)])
        assert f"--{name.replace('_', '-')} " in text[text.index(f"\n{section}:\n"):end], (name, section)
    assert (groups["lr"], groups["r"], groups["report_to"]) == ("optimization", "method and LoRA",
                                                                "output, checkpoints and logging")


# Flags of other programs that a help text quotes in an example command line.
OTHER_PROGRAMS = {"export": {"--lora"}}  # llama-cli -m base.gguf --lora FILE


@pytest.mark.parametrize("command", sorted(_commands()))
def test_no_help_mentions_an_option_its_command_refuses(command, monkeypatch):
    parser = _commands()[command]
    mentioned = _flags(_help(command, monkeypatch)) - OTHER_PROGRAMS.get(command, set())
    refused = sorted(flag for flag in mentioned if flag not in parser._option_string_actions)
    assert not refused, f"lorakit {command} --help mentions {refused}, which it does not take"


def test_eval_options_are_those_marked_for_it():
    marked = {"--" + n.replace("_", "-") for n in command_options("eval")}
    assert set(EVALUATION) <= marked and not marked & set(TRAINING_ONLY)
    eval_parser = _commands()["eval"]
    args = eval_parser.parse_args(["ad", "--eval-data", "x.csv", "--max-eval", "3", "--no-progress"])
    assert (args.eval_data, args.max_eval, args.progress) == ("x.csv", 3, False)
    assert not hasattr(args, "lr")  # options not typed stay out, so the adapter's train_config.yaml keeps its own


def test_opt_keeps_its_positional_signature_and_defaults_to_train_only():
    plain = _opt(3, "a number")
    with_choices = _opt("a", "a letter", ("a", "b"))
    assert plain.default == 3 and plain.metadata["help"] == "a number" and plain.metadata["commands"] == TRAIN
    assert with_choices.metadata["choices"] == ("a", "b") and with_choices.metadata["group"] is None
    assert _opt(0, "x", commands=EVAL).metadata["commands"] == ("train", "eval")
    with pytest.raises(ValueError, match="group='optimisation' is not one of"):
        _opt(0, "x", group="optimisation")
    assert set(option_groups().values()) == {*GROUPS, "--task seq_cls"}  # a task's own fields under its heading
