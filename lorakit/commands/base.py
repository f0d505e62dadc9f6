"""What a command is: its name, its help, its options dataclass and the function that runs it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """One ``lorakit`` subcommand.

    Attributes:
        name: What the user types (``lorakit NAME``).
        help: One line for ``lorakit --help``.
        description: The paragraph of ``lorakit NAME --help``.
        options: The dataclass of its options (see :mod:`lorakit.commands.options`), or None when ``arguments``
            adds them (``train`` and ``eval`` take TrainConfig's).
        run: Runs the command with the parsed options (the dataclass, or the argparse namespace when ``options`` is
            None); returns the exit code.
        usage: A usage line, when argparse's would be too long.
        arguments: Adds arguments beyond ``options`` to the command's parser.
    """

    name: str
    help: str
    description: str
    options: type | None
    run: Callable[[Any], int]
    usage: str | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
