"""Errors a user can cause: one clear line (what, which object, what to do) and an exit code.

Anything else is a bug and shows its traceback only with ``--debug``.
"""

from __future__ import annotations


class UnionimgError(Exception):
    """Base class of every error the CLI reports as one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(UnionimgError):
    """Bad input: a name, a size, a MAC, a path the user gave."""

    exit_code = 2


class NotFound(UnionimgError):
    """The object named does not exist in the store."""

    exit_code = 3


class Conflict(UnionimgError):
    """The object exists or is in a state that forbids the operation (mounted, in use)."""

    exit_code = 4


class ToolFailed(UnionimgError):
    """An external program failed; the message carries its last line of stderr."""

    exit_code = 5


class MissingCapability(UnionimgError):
    """This host lacks something needed (root, a program, a kernel feature)."""

    exit_code = 6
