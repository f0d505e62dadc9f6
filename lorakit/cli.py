"""The ``lorakit`` entry point; the commands live in :mod:`lorakit.commands`."""

from __future__ import annotations

import sys

from .commands import build_parser, main

__all__ = ["build_parser", "console_main", "main"]


def console_main() -> int:
    """The ``lorakit`` command. ``lorakit train`` first restarts itself with tcmalloc or jemalloc preloaded where
    the system has one (faster steps, resident memory near what the tensors need; ``LORAKIT_ALLOCATOR=system``
    keeps the C library's malloc): see :func:`lorakit.core.process_memory.exec_with_allocator`."""
    argv = sys.argv[1:]
    if argv[:1] == ["train"]:
        from .core.process_memory import exec_with_allocator

        exec_with_allocator(argv)
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
