"""Errors a user can cause: one clear line (what, which object, what to do) and an exit code.

Anything else is a bug and shows its traceback only with ``--debug``.

The exit codes of every ``unionimg`` command (the one table; README and ``--help`` cite it):

====  =====================================================================================
code  meaning
====  =====================================================================================
0     success
1     reconcile: conflicts pending (also from earlier runs); nothing failed
2     usage error: a name, size, MAC, path or option the user gave is not acceptable
3     not found: the object named does not exist in the store
4     conflict: the object exists or is in a state that forbids it (mounted, running, busy)
5     an external program failed (its last line of stderr is quoted)
6     this host lacks something needed (root, a program, a kernel feature)
7     store full: not enough free space for the operation; nothing was changed
8     guest data refused: the VM's U image or something in it is unsafe or damaged
9     the guest failed: kernel panic, crash, missing disk, init exited (cause quoted)
10    reconcile: at least one instance failed (the others were reconciled)
70    internal error (a bug): rerun with ``--debug`` for the traceback
130   interrupted (Ctrl-C)
141   standard output closed by its reader
====  =====================================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFLICTS = 1
EXIT_RECONCILE_FAILED = 10
EXIT_INTERNAL = 70


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
