"""The commands: options from typed dataclasses with one spelling per concept (old spellings parse, hidden), and
errors told apart — a user's mistake is one line and exit status 2, a bug shows its traceback, and
``LORAKIT_DEBUG=1`` shows every traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest

from lorakit.commands import COMMANDS, build_parser, main
from lorakit.commands import memory as memory_command
from lorakit.commands.options import add_options, option, parse_options
from lorakit.core.errors import InvalidValue, MissingFile, UserError, is_user_error

# the one spelling of each concept, and the old spellings that must still parse (hidden from --help)
ALIASES = {("params", "--alpha"): "--lora-alpha", ("params", "--target"): "--target-modules",
           ("memory", "--batch"): "--batch-size", ("memory", "--seq"): "--max-length",
           ("memory", "--target"): "--target-modules", ("targets", "--target"): "--target-modules",
           ("targets", "--exclude"): "--exclude-modules", ("targets", "--rank"): "--r",
           ("resize", "--rank"): "--r", ("compare", "--budget"): "--steps", ("sweep", "--budget"): "--steps",
           ("serve", "--base"): "--model"}
OLD_SPELLINGS = {"--rank", "--alpha", "--target", "--batch", "--seq", "--base", "--budget", "--exclude"}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", parser.format_help()))


@pytest.mark.parametrize(("command", "old"), list(ALIASES), ids=[f"{c} {o}" for c, o in ALIASES])
def test_an_old_spelling_parses_into_the_new_option_and_is_not_shown(command, old, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    sub = _subparsers()[command]
    new = ALIASES[command, old]
    positional = ["x"] if command in ("resize",) else []
    required = ["--output", "out"] if command == "resize" else []
    dest = new.removeprefix("--").replace("-", "_")
    value = "7"
    parsed_old = sub.parse_args([*positional, *required, old, value])
    parsed_new = sub.parse_args([*positional, *required, new, value])
    assert getattr(parsed_old, dest) == getattr(parsed_new, dest)
    assert old not in _flags(sub) and new in _flags(sub)


def test_no_command_shows_an_old_spelling(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    for name, sub in _subparsers().items():
        assert not _flags(sub) & OLD_SPELLINGS, f"lorakit {name} --help shows {_flags(sub) & OLD_SPELLINGS}"


def test_every_command_has_a_module_and_help():
    names = [c.name for c in COMMANDS]
    assert len(names) == len(set(names)) == 14
    assert all(c.help and c.description for c in COMMANDS)


def test_memory_choices_are_the_calculators():
    from lorakit.models import calc

    assert memory_command.METHODS == tuple(calc.METHODS)
    assert memory_command.DTYPES == tuple(calc.DTYPES) and memory_command.OPTIMIZERS == tuple(calc.OPTIMIZERS)


def test_options_come_from_the_dataclass_with_defaults_and_required_fields():
    @dataclasses.dataclass(kw_only=True)
    class Example:
        name: str = option(help="a positional", positional=True)
        count: int = option(3, "how many", aliases=("--n",))
        items: list[str] | None = option(None, "a list", comma_list=True)
        flag: bool = option(False, "a switch")
        on: bool = option(True, "on unless --no-on")
        need: float = option(help="required")

    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    got = parse_options(Example, parser.parse_args(["a", "--n", "5", "--items", "x, y", "--flag", "--no-on",
                                                    "--need", "0.5"]), parser)
    assert got == Example(name="a", count=5, items=["x", "y"], flag=True, on=False, need=0.5)
    assert parse_options(Example, parser.parse_args(["b", "--need", "1"]), parser) == Example(name="b", need=1.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["c"])  # --need is required
    assert "(default: 3)" in parser.format_help()


def test_a_required_option_given_by_its_old_spelling_is_enough_and_missing_is_refused(capsys):
    sub = _subparsers()["resize"]
    from lorakit.commands.resize import ResizeOptions

    assert parse_options(ResizeOptions, sub.parse_args(["a", "--rank", "2", "--output", "o"]), sub).r == 2
    with pytest.raises(SystemExit):
        parse_options(ResizeOptions, sub.parse_args(["a", "--output", "o"]), sub)
    assert "the following arguments are required: --r" in capsys.readouterr().err


def test_a_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["inspect", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorakit inspect: error: ") and err.count("\n") == 1
    assert "Traceback" not in err and str(tmp_path / "missing") in err


def test_a_bug_shows_its_traceback(monkeypatch, tmp_path):
    import lorakit.models.svd as svd

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")  # a plain ValueError: not a user error

    monkeypatch.setattr(svd, "inspect_adapter", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["inspect", str(tmp_path)])
    monkeypatch.setattr(svd, "inspect_adapter", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        main(["inspect", str(tmp_path)])


def test_lorakit_debug_shows_the_traceback_of_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_DEBUG", "1")
    with pytest.raises(UserError):
        main(["inspect", str(tmp_path / "missing")])


def test_what_counts_as_the_users_error(tmp_path):
    assert is_user_error(InvalidValue("x")) and isinstance(InvalidValue("x"), ValueError)
    assert is_user_error(MissingFile("x")) and isinstance(MissingFile("x"), FileNotFoundError)
    with pytest.raises(OSError) as raised:
        open(tmp_path / "no" / "such")  # noqa: SIM115 - an OS error about a user's path
    assert is_user_error(raised.value)
    assert not is_user_error(ValueError("x")) and not is_user_error(OSError("no path"))
    assert not is_user_error(KeyError("x"))


def test_sweep_ranks_that_are_not_numbers_are_a_user_error(capsys):
    assert main(["sweep", "--ranks", "4,eight"]) == 2
    assert "--ranks must be comma-separated integers" in capsys.readouterr().err


def test_params_json_with_the_new_and_old_spellings_agree(capsys):
    main(["params", "--r", "4", "--lora-alpha", "8", "--target-modules", "q_proj", "--json"])
    new = json.loads(capsys.readouterr().out)
    main(["params", "--rank", "4", "--alpha", "8", "--target", "q_proj", "--json"])
    assert json.loads(capsys.readouterr().out) == new
