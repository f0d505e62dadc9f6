"""The errors a user's mistake raises, told apart from lorakit's own bugs.

A :class:`UserError` is a mistake in what the user gave — an option, a file, a path, a model folder — or a missing
optional dependency. Its message names the value and what is allowed, and the command line prints it as one line
(``lorakit train: error: ...``). Any other exception is a bug (lorakit's or a library's) and shows its traceback;
``LORAKIT_DEBUG=1`` shows the traceback of user errors too.

Each subclass is also the built-in type code has always caught (``except ValueError`` still catches an
:class:`InvalidValue`), so the Python API raises what it always raised.
"""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """A mistake in what the user gave, or something their machine lacks; the message says what to change."""


class InvalidValue(UserError, ValueError):
    """A value that is not allowed: an option, a setting in a file, a row of data."""


class InvalidType(UserError, TypeError):
    """A value of the wrong type, e.g. a model lorakit cannot wrap."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class MissingDependency(UserError, ImportError):
    """An optional package is not installed; the message says which extra to install."""


class FileProblem(UserError, OSError):
    """A file could not be read or written: the disk is full, a permission is missing."""


class Interrupted(UserError):
    """The user stopped a long job (Ctrl-C) and it stopped cleanly; the message says what was kept."""


# What the operating system says about a user's path: the user's environment, not a bug.
USER_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
                         errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.ENAMETOOLONG})


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's to fix: a :class:`UserError`, or an OS error about a path they named (no such
    file, permission denied, not a folder, disk full) — those carry the path in ``filename``."""
    if isinstance(err, UserError):
        return True
    return isinstance(err, OSError) and err.filename is not None and err.errno in USER_ERRNOS


def write_failure(err: BaseException) -> str:
    """Why a write failed, in words: a full disk (space, quota or this process's file-size limit) is said as such;
    otherwise the system's text, without the path (the caller names it)."""
    if isinstance(err, OSError):
        if err.errno == errno.ENOSPC:
            return "the disk is full: no space left on the device"
        if err.errno == errno.EDQUOT:
            return "the disk is full for this user: the quota is used up"
        if err.errno == errno.EFBIG:
            return "the disk is full for this process: the file reached its size limit (ulimit -f)"
        return err.strerror or str(err)
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    code = re.search(r"\(os error (\d+)\)", text)  # safetensors' (Rust's) words for a system error
    if code:
        number = int(code.group(1))
        return write_failure(OSError(number, os.strerror(number)))
    if "unexpected pos" in text:  # torch.save's words for a write that came up short
        return "the disk is full: the write came up short"
    return text
