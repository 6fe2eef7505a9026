"""Errors a user can cause: one clear line (what, which object, what to do) and an exit code.

Anything else is a bug and shows its traceback only with ``--debug``.

The exit codes of every ``unionimg`` command are :data:`EXIT_CODES` at the end of this module:
the one table. ``unionimg --help`` prints it and README.md copies it (``tests/test_cli_help.py``
checks both against it); the CLI exits with these names, never a number of its own.
"""

from __future__ import annotations

from typing import Final

EXIT_OK = 0
EXIT_CONFLICTS = 1
# boot/switch --wait whose --timeout ran out while the guest runs on: 1, as it always was
# (it shares the number with reconcile's conflicts; no command can mean both)
EXIT_STILL_RUNNING = 1
EXIT_RECONCILE_FAILED = 10
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141


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


class StoreFull(UnionimgError):
    """Not enough free space: "store full: X free on FS, about Y needed"; nothing changed."""

    exit_code = 7


class GuestDataRefused(UnionimgError):
    """Guest-written data is unsafe or damaged (a planted symlink, a failed e2fsck, ...)."""

    exit_code = 8


class GuestFailed(UnionimgError):
    """The guest did not reach its init on the union root, or crashed; cause quoted."""

    exit_code = 9


EXIT_CODES: Final[tuple[tuple[int, str], ...]] = (
    (EXIT_OK, "success"),
    (
        EXIT_CONFLICTS,
        "reconcile: conflicts pending (also from earlier runs), nothing failed; "
        "boot/switch --wait: the guest still runs when --timeout ran out",
    ),
    (
        UsageError.exit_code,
        "usage error: a name, size, MAC, path or option the user gave is not acceptable",
    ),
    (NotFound.exit_code, "not found: the object named does not exist in the store"),
    (
        Conflict.exit_code,
        "conflict: the object exists or is in a state that forbids it (mounted, running, busy)",
    ),
    (ToolFailed.exit_code, "an external program failed (its last line of stderr is quoted)"),
    (
        MissingCapability.exit_code,
        "this host lacks something needed (root, a program, a kernel feature)",
    ),
    (
        StoreFull.exit_code,
        "store full: not enough free space for the operation; nothing was changed",
    ),
    (
        GuestDataRefused.exit_code,
        "guest data refused: the VM's U image or something in it is unsafe or damaged",
    ),
    (
        GuestFailed.exit_code,
        "the guest failed: kernel panic, crash, missing disk, init exited (cause quoted)",
    ),
    (EXIT_RECONCILE_FAILED, "reconcile: at least one instance failed (the others were reconciled)"),
    (
        EXIT_INTERNAL,
        "internal error (a bug, or a damaged store file the message names): rerun with "
        "--debug for the traceback",
    ),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_PIPE_CLOSED, "standard output closed by its reader"),
)
"""Every exit code of ``unionimg`` and what it means, in order."""
