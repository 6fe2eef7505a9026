"""``base update --run``: the admin's command in the new generation's tree, contained so that
nothing of it outlives the unionimg that started it.

unionimg runs (see :func:`argv`)::

    setpriv --pdeathsig KILL -- unshare --mount --propagation private --pid --fork
        --kill-child -- python -I -S -c BOOT inside TREE COMMAND PID START

1. ``setpriv`` (util-linux) asks the kernel to SIGKILL it when unionimg, its parent, dies
   (``PR_SET_PDEATHSIG``; kept across the exec of ``unshare``), and ``unshare --kill-child``
   passes that death on to the process it forks.
2. That process, **inside** (this module), is PID 1 of a new PID namespace in a private mount
   namespace. It first checks that unionimg (PID, started at START) still lives: had it died
   before ``setpriv`` set the death signal, nothing would kill the namespace later. It mounts
   a fresh ``/proc`` (of the new PID namespace), ``/sys``, the host's ``/dev`` and, read-only,
   its ``/etc/resolv.conf`` in TREE, starts ``chroot TREE /bin/sh -c COMMAND`` and, when that
   shell exits, exits with its status: the kernel then kills whatever the command left
   running (a daemon a package started) and ``unshare`` returns the status.

When unionimg dies (even by SIGKILL), setpriv/unshare die, then PID 1 of the namespace, and
the kernel kills every process left in it; the mounts exist only in the namespace, so they
vanish with it and are never seen by the host at all. The staging directory holding TREE is
swept by the next unionimg command (:meth:`Store.sweep_tmp`).

A failure of the sandbox itself (a mount) exits :data:`SETUP_FAILED` with a last stderr line
starting with :data:`PREFIX`; any other status is the command's own (128 + N: signal N).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from unionimg.errors import UnionimgError
from unionimg.runner import run, which

PREFIX = "unionimg-sandbox: "
SETUP_FAILED = 125  # as chroot(1) and env(1): the command could not be started
CHROOT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
}
#: The package's parent directory: the sandbox's Python runs with -S (no site, no editable
#: finder: it starts in a third of the time) and finds unionimg there.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # the directory holding unionimg/
#: Where the one third-party package the inside imports (msgspec: the records are Structs)
#: lies — this Python's site-packages, searched after the standard library, without ``site``
_DEPENDENCY_DIR = str(Path(msgspec.__file__).resolve().parents[1])


def proc_start(pid: int, proc: str = "/proc") -> str | None:
    """Field 22 of ``/proc/PID/stat`` (start time): tells a process from a later one that
    got the same PID."""
    try:
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def contained(module: str, args: Sequence[str], *, isolate: Sequence[str] = ()) -> list[str]:
    """How unionimg (this process) starts ``module``'s ``main(args)`` as PID 1 of a new PID
    namespace in a private mount namespace, killed with unionimg (``isolate``: more
    ``unshare`` namespaces, e.g. ``--net``). ``args`` should end with :func:`parent_args`
    for the inside to check that unionimg still lives (:func:`parent_gone`)."""
    boot = (
        f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); "
        f"sys.path.append({_DEPENDENCY_DIR!r}); "
        f"from {module} import main; sys.exit(main(sys.argv[1:]))"
    )
    return [
        which("setpriv"),
        "--pdeathsig",
        "KILL",
        "--",
        which("unshare"),
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        *isolate,
        "--",
        sys.executable,
        "-I",  # isolated: no PYTHON* variables, no user site, no current directory on the path
        "-S",
        "-c",
        boot,
        *args,
    ]


def parent_args() -> list[str]:
    """This process's PID and start time, for :func:`parent_gone` inside."""
    me = os.getpid()
    return [str(me), proc_start(me) or "0"]


def parent_gone(parent: int, parent_start: str) -> bool:
    """Whether unionimg (``parent``, started at ``parent_start``) exited before the inside
    started: had it died before ``setpriv`` set the death signal, nothing would kill the
    namespace later. Asked while ``/proc`` is still the host's."""
    return proc_start(parent) != parent_start


def argv(tree: Path, command: str) -> list[str]:
    """How unionimg (this process) starts ``command`` in ``tree``."""
    return contained("unionimg.layers.sandbox", ["inside", str(tree), command, *parent_args()])


def fail(message: str) -> int:
    """Inside: the sandbox itself failed (a mount, a check): one line starting with
    :data:`PREFIX` on stderr, status :data:`SETUP_FAILED`."""
    print(f"{PREFIX}{message}", file=sys.stderr, flush=True)
    return SETUP_FAILED


def started(parent: str, parent_start: str, what: str) -> str | None:
    """Inside, first thing: why the inside must not go on (not PID 1 of a new PID namespace,
    a malformed parent PID, unionimg gone before ``what`` started), or None."""
    if not parent.isdigit():
        return f"parent PID {parent!r} is no number"
    if os.getpid() != 1:
        return "not the first process of a new PID namespace"
    if parent_gone(int(parent), parent_start):
        return f"unionimg (pid {parent}) exited before {what} started"
    return None


def why_failed(stderr: str, returncode: int) -> str:
    """Host side: the last line a contained module printed on stderr (without
    :data:`PREFIX`), or its exit status."""
    tail = [ln for ln in stderr.splitlines() if ln.strip()]
    return tail[-1].removeprefix(PREFIX) if tail else f"exit status {returncode}"


def _mounts(root: Path) -> None:
    """The chroot's /proc, /sys, /dev and resolver; in this private namespace only."""
    if (root / "proc").is_dir():
        run(["mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc", str(root / "proc")])
    if (root / "sys").is_dir():
        run(["mount", "-t", "sysfs", "-o", "nosuid,nodev,noexec", "sysfs", str(root / "sys")])
    if (root / "dev").is_dir():
        run(["mount", "--rbind", "/dev", str(root / "dev")])
    resolv = root / "etc" / "resolv.conf"
    if resolv.is_file() and not resolv.is_symlink() and Path("/etc/resolv.conf").exists():
        run(["mount", "--bind", "-o", "ro", "/etc/resolv.conf", str(resolv)])


def inside(tree: str, command: str, parent: str, parent_start: str) -> int:
    """PID 1 of the namespace: mount, start the command, reap orphans until the command's
    shell has exited, then exit with its status (the kernel then kills what is left).

    The shell is started with ``posix_spawn`` and awaited with ``waitpid`` rather than
    through :func:`runner.run`: this init must not capture the output (the shell writes
    straight into unionimg's pipes, so a background process holding them cannot delay the
    end) and must reap any orphan reparented to it. The shell is not PID 1 itself, so
    signals work in it as anywhere (PID 1 ignores signals it has no handler for)."""
    # /proc is still the host's here (the chroot gets its own): is unionimg still there?
    problem = started(parent, parent_start, "the command")
    if problem is not None:
        return fail(problem)
    root = Path(tree)
    try:
        _mounts(root)
        chroot = which("chroot")
    except UnionimgError as exc:
        return fail(exc.message)
    env = {**os.environ, **CHROOT_ENV}
    shell = os.posix_spawn(chroot, [chroot, str(root), "/bin/sh", "-c", command], env)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == shell:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code  # killed by a signal: as a shell says


def main(args: list[str]) -> int:
    if len(args) == 5 and args[0] == "inside":
        return inside(args[1], args[2], args[3], args[4])
    return fail("usage: (unionimg runs it) inside TREE COMMAND PARENT-PID PARENT-START")
