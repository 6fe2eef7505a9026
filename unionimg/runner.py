"""The one way unionimg runs a program: an argument list, never a shell.

Every external program (mke2fs, mount, losetup, blkid, hg via hglib aside) goes through
:func:`run`, which raises :class:`ToolFailed` with the program's own last line of stderr.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from unionimg.errors import MissingCapability, ToolFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def which(program: str) -> str:
    """Absolute path of ``program`` (also looking in the sbin directories) or a clear error."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    found = shutil.which(program, path=path)
    if found is None:
        raise MissingCapability(
            f"program '{program}' not found; install it (make setup installs every dependency)"
        )
    return found


def run(
    args: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    what: str | None = None,
) -> Result:
    """Run ``args`` (first element resolved on PATH and sbin) and capture its output.

    ``what`` names the action for the error message ("making the BASE image").
    """
    argv = [which(args[0]), *[str(a) for a in args[1:]]]
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            errors="surrogateescape",
            env=full_env,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolFailed(f"{args[0]} timed out after {timeout} s ({what or 'running it'})") from exc
    result = Result(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise ToolFailed(describe_failure(result, what))
    return result


def describe_failure(result: Result, what: str | None) -> str:
    lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit status {result.returncode}"
    prog = os.path.basename(result.args[0])
    return f"{prog} failed{f' while {what}' if what else ''}: {last}"
