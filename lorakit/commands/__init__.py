"""The ``lorakit`` command: one module per subcommand, each a function that parses its options and calls one
library function (so anything a command does, a Python user can do with the same function).

Options are typed dataclasses (:mod:`lorakit.commands.options`); ``train`` and ``eval`` take TrainConfig's fields.
Library modules are imported inside each command's ``run``, so ``lorakit --help`` and a mistyped option answer at
once instead of after importing torch's and transformers' stacks.

Errors: a :class:`~lorakit.core.errors.UserError` (a mistake in what the user gave) or an OS error about a path
they named is printed as one line, ``lorakit COMMAND: error: ...``, exit status 2; anything else is a bug and shows
its traceback. ``LORAKIT_DEBUG=1`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..core.errors import Interrupted, is_user_error
from . import (
    compare,
    demo,
    eval,
    export,
    generate,
    inspect,
    memory,
    params,
    predict,
    resize,
    serve,
    sweep,
    targets,
    train,
)
from .base import Command
from .options import add_options, parse_options

COMMANDS: tuple[Command, ...] = tuple(m.COMMAND for m in (demo, params, memory, inspect, resize, compare, sweep,
                                                          targets, train, eval, predict, generate, export, serve))
DEBUG_VARIABLE = "LORAKIT_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``lorakit`` and of each of its commands."""
    parser = argparse.ArgumentParser(prog="lorakit", description="Exact, fast LoRA fine-tuning for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        kwargs = {"usage": command.usage} if command.usage else {}
        p = sub.add_parser(command.name, help=command.help, description=command.description, **kwargs)
        if command.options is not None:
            add_options(p, command.options)
        if command.arguments is not None:
            command.arguments(p)
        p.set_defaults(command_spec=command)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _refuse_unknown(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> None:
    """Stop with the command's own usage line (not the top-level one) for options it does not take; a training
    option given to another command is named as such."""
    from ..training.options import command_options

    sub = _subparser(parser, command)
    training = {"--" + name.replace("_", "-") for name in command_options("train")}
    given = [arg.split("=", 1)[0] for arg in extra if arg.startswith("--")]
    misplaced = [flag for flag in given if command != "train" and flag in training]
    hint = (f" ({', '.join(misplaced)}: option(s) of `lorakit train`; `lorakit {command} --help` lists what "
            f"{command} takes)" if misplaced else "")
    sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv: list[str] | None = None) -> int:
    """Run ``lorakit ARGV``; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _refuse_unknown(parser, args.command, extra)
    command: Command = args.command_spec
    options = parse_options(command.options, args, _subparser(parser, args.command)) if command.options else args
    try:
        return command.run(options)
    except Interrupted as err:  # Ctrl-C, handled: what was kept, and the shell's exit status for SIGINT
        print(f"lorakit {args.command}: {err}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0") or not is_user_error(err):
            raise  # a bug, or asked for: the traceback says where
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
