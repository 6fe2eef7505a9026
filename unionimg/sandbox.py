"""``base update --run``: the admin's command in the new generation's tree, contained so that
nothing of it outlives the unionimg that started it.

unionimg runs ``python -I -m unionimg.sandbox guard PID TREE COMMAND``:

1. **guard** (a child of unionimg, PID): asks the kernel to SIGKILL it when its parent dies
   (``PR_SET_PDEATHSIG``; it then checks that PID is still its parent, closing the race with a
   parent that died first), and becomes ``unshare --mount --propagation private --pid --fork
   --kill-child`` (util-linux). The death signal survives the exec; ``--kill-child`` passes it
   on to the next process.
2. **inside** (PID 1 of a new PID namespace, in a private mount namespace): mounts a fresh
   ``/proc`` (of the new PID namespace), ``/sys``, the host's ``/dev`` and, read-only, its
   ``/etc/resolv.conf`` in TREE, then runs ``chroot TREE /bin/sh -c COMMAND`` and exits with
   its status.

When unionimg dies (even by SIGKILL), the guard dies, then PID 1 of the namespace, and the
kernel kills every process left in it (also daemons the command started); the mounts exist
only in the namespace, so they vanish with it and are never seen by the host at all. The
staging directory holding TREE is swept by the next unionimg command (:meth:`Store.sweep_tmp`).

A failure of the sandbox itself (a mount) exits :data:`SETUP_FAILED` with a last stderr line
starting with :data:`PREFIX`; any other status is the command's own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

from .errors import UnionimgError
from .runner import run, which

PREFIX = "unionimg-sandbox: "
SETUP_FAILED = 125  # as chroot(1) and env(1): the command could not be started
PR_SET_PDEATHSIG = 1
CHROOT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
}


def argv(tree: Path, command: str) -> list[str]:
    """How unionimg starts the sandbox for ``command`` in ``tree``."""
    return [
        sys.executable,
        "-I",  # isolated: no PYTHON* variables, no user site, no current directory on the path
        "-m",
        "unionimg.sandbox",
        "guard",
        str(os.getpid()),
        str(tree),
        command,
    ]


def _fail(message: str) -> int:
    print(f"{PREFIX}{message}", file=sys.stderr, flush=True)
    return SETUP_FAILED


def guard(parent: int, tree: str, command: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return _fail(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent:
        return _fail("unionimg exited before the command started")
    try:
        unshare = which("unshare")
    except UnionimgError as exc:
        return _fail(exc.message)
    inside = [sys.executable, "-I", "-m", "unionimg.sandbox", "inside", tree, command]
    os.execv(
        unshare,
        [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "--",
            *inside,
        ],
    )
    return SETUP_FAILED  # not reached: execv replaces this process or raises


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


def inside(tree: str, command: str) -> int:
    if os.getpid() != 1:
        return _fail("not the first process of a new PID namespace")
    root = Path(tree)
    try:
        _mounts(root)
    except UnionimgError as exc:
        return _fail(exc.message)
    res = run(["chroot", str(root), "/bin/sh", "-c", command], check=False, env=CHROOT_ENV)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    code = res.returncode
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def main(args: list[str]) -> int:
    if len(args) == 4 and args[0] == "guard" and args[1].isdigit():
        return guard(int(args[1]), args[2], args[3])
    if len(args) == 3 and args[0] == "inside":
        return inside(args[1], args[2])
    return _fail("usage: python -m unionimg.sandbox guard PID TREE COMMAND (unionimg runs it)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
