"""``/etc/ld.so.cache`` made again for the staged result (issue 12, item 5).

The dynamic loader's cache is generated (``ldconfig``) from the libraries of the whole tree:
neither side's copy is right for the union of B1 and the VM's layer when both installed
libraries. The shipped policy takes B1's (``take-base``: a binary file both sides changed is
never a conflict); then, only when the VM has shared libraries of its own (a ``*.so*`` file or
link in its layer, or its own ``/etc/ld.so.conf*``) and the result holds B1's cache, the cache
is regenerated on the staged union (:func:`needed`, :func:`regenerate`). Otherwise B1's cache
is right as it is (the VM added no library), and nothing is run: the file-only case stays fast.

``ldconfig -r ROOT`` chroots into ROOT and parses the ELF headers of every library there as
root: the guest's files are hostile input. So it runs contained (``docs/security.md``):

* :func:`~unionimg.layers.sandbox.contained`: ``setpriv --pdeathsig KILL -- unshare --mount
  --pid --net --ipc --uts --fork --kill-child``: private mounts that vanish with the
  namespace, no network, killed with unionimg, a time limit.
* Its first process (:func:`main`) mounts a tmpfs and on it the union: overlayfs with
  ``upper.new`` and B1 as two **read-only lower layers** and an upper layer on that tmpfs,
  ``nosuid,nodev,noexec``. Whatever ldconfig writes (the cache, its ``aux-cache``, anything
  a guest's symlink redirects it to) lands on the tmpfs, never in ``upper.new`` or B1.
* ldconfig is the host's (statically linked: nothing is loaded from the tree after its
  chroot) and runs as ``setpriv --no-new-privs --bounding-set -all,+sys_chroot --inh-caps
  -all -- ldconfig -i -X -r UNION``: no capability but the chroot it needs (root's own
  files only: a library the guest made unreadable to root without CAP_DAC_* is skipped), no
  new privileges, the guest's ``aux-cache`` ignored (``-i``), no link created (``-X``).
* Only the written ``/etc/ld.so.cache`` of the tmpfs upper layer is taken: opened with no
  symlink followed, a regular file of at most :data:`MAX_BYTES` that starts with the
  cache's magic. The host side writes it into ``upper.new`` through :mod:`unionimg.fs.fsops`
  (root-owned, mode 0644). Anything else fails the VM's reconcile, which then stays whole.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from unionimg.entries import FILE, SYMLINK, Change, Entry
from unionimg.errors import ToolFailed, UnionimgError
from unionimg.fs import fsops
from unionimg.layers import sandbox
from unionimg.runner import run, which
from unionimg.store.layout import Store

__all__ = ["CACHE", "MAX_BYTES", "TIMEOUT", "main", "needed", "regenerate", "valid_cache"]

CACHE = "/etc/ld.so.cache"
MAX_BYTES = 64 << 20  # a real cache is well below 1 MiB
TIMEOUT = 120.0  # seconds for the whole sandboxed run
MAGICS = (b"glibc-ld.so.cache1.1", b"ld.so-1.7.0")  # new format; old format (+ new inside)
_ISOLATE = ("--net", "--ipc", "--uts")
_LIBRARY = re.compile(r"/(?:lib|ld-)[^/]*\.so(?:\.[0-9][^/]*)?$")  # what ldconfig looks at


def own_libraries(entries: Iterable[Entry]) -> bool:
    """Whether the VM's layer holds a shared library (file or link ``lib*.so``, ``lib*.so.N``)
    or its own loader configuration (``/etc/ld.so.conf``, ``/etc/ld.so.conf.d/*``)."""
    for e in entries:
        if e.kind not in (FILE, SYMLINK):
            continue
        if e.path == "/etc/ld.so.conf" or e.path.startswith("/etc/ld.so.conf.d/"):
            return True
        if _LIBRARY.search(e.path):
            return True
    return False


def needed(entries: Sequence[Entry], delta: Mapping[str, Change], taken: str | None) -> bool:
    """Regenerate the cache of the staged result? Only when B1 changed it, the result holds
    B1's (``taken``: the plan's action on it, ``drop`` or ``write``; or the VM never had a
    copy) and the VM has libraries of its own (:func:`own_libraries`). Pure."""
    if CACHE not in delta:
        return False
    b1s = taken in ("drop", "write") or all(e.path != CACHE for e in entries)
    return b1s and own_libraries(entries)


def valid_cache(data: bytes) -> bool:
    return 0 < len(data) <= MAX_BYTES and data.startswith(MAGICS)


# -- inside the sandbox ----------------------------------------------------------------------
def _read_written(upper: Path) -> bytes:
    """``etc/ld.so.cache`` of the tmpfs upper layer: no symlink followed, a regular file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    dfd = os.open(upper / "etc", flags | os.O_DIRECTORY)
    try:
        fd = os.open("ld.so.cache", flags, dir_fd=dfd)
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            raise OSError(f"ldconfig wrote no regular file of at most {MAX_BYTES} bytes")
        return fh.read(MAX_BYTES + 1)


def inside(b1_root: str, upper_new: str, scratch: str, out: str) -> int:
    from unionimg.fs.mounts import mount_overlay  # the one way to mount an overlay

    work = Path(scratch)
    run(["mount", "-t", "tmpfs", "-o", "mode=0700,nosuid,nodev", "unionimg-ldcache", scratch])
    for name in ("upper", "work", "union"):
        (work / name).mkdir(mode=0o700)
    mount_overlay(
        [Path(upper_new), Path(b1_root)],
        work / "upper",
        work / "work",
        work / "union",
        driver="overlay",
        guest=True,
    )
    argv = [
        which("setpriv"),
        "--no-new-privs",
        "--bounding-set",
        "-all,+sys_chroot",
        "--inh-caps",
        "-all",
        "--",
        which("ldconfig"),
        "-i",
        "-X",
        "-r",
        str(work / "union"),
    ]
    res = run(argv, check=False, timeout=TIMEOUT / 2, env={"LC_ALL": "C"}, what="ldconfig")
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        return sandbox.fail(f"ldconfig -r failed: {lines[-1] if lines else res.returncode}")
    data = _read_written(work / "upper")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return 0


def main(args: list[str]) -> int:
    """PID 1 of the namespaces: ``B1-ROOT UPPER-NEW SCRATCH OUT PARENT-PID PARENT-START``."""
    if len(args) != 6:
        return sandbox.fail(
            "usage: (unionimg runs it) B1 UPPER-NEW SCRATCH OUT PARENT-PID PARENT-START"
        )
    problem = sandbox.started(args[4], args[5], "ldconfig")
    if problem is not None:
        return sandbox.fail(problem)
    try:
        return inside(*args[:4])
    except (OSError, UnionimgError) as exc:
        return sandbox.fail(getattr(exc, "message", None) or str(exc))


# -- the host side ---------------------------------------------------------------------------
def regenerate(store: Store, b1_root: Path, upper_new: Path) -> bool:
    """Make ``/etc/ld.so.cache`` of the union of ``b1_root`` and ``upper_new`` (staged) in
    the sandbox and write it into ``upper_new``; False when it equals B1's (nothing
    written). :class:`ToolFailed` when ldconfig fails or writes no valid cache."""
    with store.staging("ldcache") as tmp:
        scratch = tmp / "mnt"
        scratch.mkdir()
        out = tmp / "ld.so.cache"
        argv = sandbox.contained(
            "unionimg.reconcile.ldcache",
            [str(b1_root), str(upper_new), str(scratch), str(out), *sandbox.parent_args()],
            isolate=_ISOLATE,
        )
        res = run(argv, check=False, timeout=TIMEOUT, what="regenerating /etc/ld.so.cache")
        if res.returncode != 0:
            raise ToolFailed(
                f"/etc/ld.so.cache could not be regenerated for the staged result: "
                f"{sandbox.why_failed(res.stderr, res.returncode)}"
            )
        data = out.read_bytes()
    if not valid_cache(data):
        raise ToolFailed("/etc/ld.so.cache regenerated for the staged result is no valid cache")
    try:
        if fsops.read_file(b1_root, CACHE) == data:
            return False
    except OSError:
        pass
    entry = Entry(CACHE, FILE, mode=0o644, uid=0, gid=0, size=len(data))
    fsops.write_entry(upper_new, CACHE, entry, data)
    return True
