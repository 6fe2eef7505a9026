"""The one way unionimg runs a program: an argument list, never a shell.

Every external program (mke2fs, mount, losetup, blkid, hg via hglib aside) goes through
:func:`run`, which raises :class:`ToolFailed` with the program's own last line of stderr,
or through :func:`stream` when the user watches its output as it comes (``base update --run``).
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

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


def stream(
    args: Sequence[str],
    sink: Callable[[int, bytes], None],
    *,
    env: Mapping[str, str] | None = None,
    stdin: int | None = None,
) -> Result:
    """Run ``args`` with its stdout and stderr on two pipes, handing each chunk to
    ``sink(1 or 2, data)`` as it comes (so a long command's output is seen while it runs),
    until both pipes are closed and the program has exited; stdin is inherited (or the
    file descriptor ``stdin``: a migration's stream, see :mod:`unionimg.migrate`). The
    result's ``stdout``/``stderr`` hold the last 4 KiB of each (for an error message).
    Interrupted (Ctrl-C, an exception in ``sink``), the program is killed and awaited."""
    argv = [which(args[0]), *[str(a) for a in args[1:]]]
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    log.debug("stream: %s", " ".join(argv))
    proc = subprocess.Popen(
        argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env
    )
    assert proc.stdout is not None and proc.stderr is not None  # both are pipes
    tails = {1: bytearray(), 2: bytearray()}
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, 1)
        sel.register(proc.stderr, selectors.EVENT_READ, 2)
        try:
            while sel.get_map():
                for key, _events in sel.select():
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        sel.unregister(key.fileobj)
                        continue
                    tail = tails[key.data]
                    tail += data
                    del tail[:-_TAIL]
                    sink(key.data, data)
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
            proc.stderr.close()
    return Result(
        tuple(argv),
        code,
        tails[1].decode(errors="surrogateescape"),
        tails[2].decode(errors="surrogateescape"),
    )


_TAIL = 4096


def spawn(
    args: Sequence[str], *, out: int | IO[bytes], env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a long-running program (a server) detached in its own session: stdin /dev/null,
    stdout and stderr into ``out``; ``env`` is its whole environment (None: this one's).
    The caller waits for it (``unionimg.poll``) and stops it."""
    argv = [which(args[0]), *[str(a) for a in args[1:]]]
    log.debug("spawn: %s", " ".join(argv))
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=None if env is None else dict(env),
        start_new_session=True,
        close_fds=True,
    )
