"""Command options as typed dataclasses, turned into argparse flags by one function (as ``train``'s are).

A command's options are a ``kw_only`` dataclass whose fields are made with :func:`option`: the flag is the field's
name with ``-`` for ``_`` (``max_length`` → ``--max-length``), the help text and choices come from the field, and
``aliases`` are old spellings that still parse but are not shown in ``--help`` (kept for one release). Groups of
options shared by several commands are dataclasses too (:class:`ModelOptions`, :class:`LoraShape`, ...), mixed
into a command's options by inheritance, so one concept has one spelling everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: typing.Sequence[Any] | None = None,
           aliases: typing.Sequence[str] = (), positional: bool = False, metavar: str | None = None,
           repeat: bool = False, comma_list: bool = False) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: The value when the option is not given (no default: required).
        help: What it does; ``(default: X)`` is added unless the text mentions a default.
        choices: The values allowed.
        aliases: Old flag spellings, accepted and hidden from ``--help``.
        positional: An argument, not a flag (``nargs="?"`` when it has a default).
        metavar: The placeholder in ``--help``.
        repeat: The flag may be given several times; the values are collected in a list.
        comma_list: The value is split on commas into a list.
    """
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases), "positional": positional,
            "metavar": metavar, "repeat": repeat, "comma_list": comma_list}
    if repeat:
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


def _kind(annotation: Any) -> Any:
    """``int | None`` → ``int``; ``list[str]`` → ``list``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    annotation = args[0] if args and typing.get_origin(annotation) is not list else annotation
    return typing.get_origin(annotation) or annotation


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if f.default is not dataclasses.MISSING and f.default is not None and "default" not in text \
            and not isinstance(f.default, bool):
        text += f" (default: {f.default})"
    return text.replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, options: type) -> None:
    """One argument per field of the dataclass ``options`` (see :func:`option`), hidden aliases included."""
    hints = typing.get_type_hints(options)
    for f in dataclasses.fields(options):
        if "help" not in f.metadata:
            continue
        kind, meta = _kind(hints[f.name]), f.metadata
        kwargs: dict[str, Any] = {"help": _help(f)}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta["positional"]:
            if f.default is not dataclasses.MISSING:
                kwargs.update(nargs="?", default=f.default)
            parser.add_argument(f.name, type=kind, **kwargs)
            continue
        if kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction if f.default else "store_true", default=f.default)
        elif meta["repeat"]:
            kwargs.update(action="append", default=[])
        else:
            convert = (lambda s: [v.strip() for v in s.split(",") if v.strip()]) if meta["comma_list"] else kind
            kwargs.update(type=convert, choices=meta["choices"])
            if f.default is not dataclasses.MISSING:
                kwargs["default"] = f.default
            elif not meta["aliases"]:
                kwargs["required"] = True
            # required with an old spelling too: argparse would insist on the new one; parse_options checks it
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, **kwargs)
        if meta["aliases"]:  # old spellings: parsed into the same field, not shown
            hidden = {k: v for k, v in kwargs.items() if k not in ("help", "default", "required")}
            parser.add_argument(*meta["aliases"], dest=f.name, help=argparse.SUPPRESS, default=argparse.SUPPRESS,
                                **hidden)


def parse_options(options: type, args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The dataclass ``options`` filled from what argparse parsed; a required option not given stops with
    ``parser``'s usage line, as argparse does."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(options) if hasattr(args, f.name)}
    missing = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(options)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and values.get(f.name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return options(**values)


# -- groups shared by several commands -------------------------------------------------------------------------

MODEL_HELP = ("'default' (SmolLM2-135M-Instruct, embedded), 'minilm' (the embedded all-MiniLM-L6-v2 encoder), a "
              "Hugging Face model folder or a config.json")
PRESETS_HELP = "a preset (llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, mistral-7b, gpt2, bert-base), "


@dataclass(kw_only=True)
class TrustOption:
    trust_remote_code: bool = option(False, "run Python code that ships in the model folder (auto_map in its "
                                            "config.json); refused without this option")


@dataclass(kw_only=True)
class JsonOption:
    json: bool = option(False, "print JSON instead of a table")


@dataclass(kw_only=True)
class LoraShape:
    """The adapter's shape, spelled as ``lorakit train`` and LoraConfig spell it."""

    r: int = option(8, "LoRA rank", aliases=("--rank",))
    target_modules: str | None = option(None, "comma-separated module names (q_proj,v_proj), 'all-linear', or a "
                                              "regex full-matched against module names", aliases=("--target",))
