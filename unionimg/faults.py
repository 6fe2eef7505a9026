"""Named fault points for the crash-safety and full-disk tests.

``checkpoint("base-update:committed")`` kills the process with SIGKILL when the
environment variable ``UNIONIMG_CRASH_AT`` names that point; tests iterate over
:data:`POINTS` to kill a command at every step in turn. When ``UNIONIMG_FILL_AT`` names the
point, the file ``UNIONIMG_FILL_FILE`` is grown until its filesystem is full: the space runs
out in the middle of an operation, after its own free-space check passed. Nothing happens
otherwise.
"""

from __future__ import annotations

import errno
import os
import signal

POINTS: dict[str, tuple[str, ...]] = {
    "base-create": ("staged", "image-made", "committed", "published"),
    "base-update": ("staged", "image-made", "committed", "published"),
    "instance-create": ("staged", "image-made", "published"),
    "snapshot": ("layer-made", "committed", "saved", "swapped"),
    "layer-import": ("image-mounted",),
    "reconcile": (
        "pre-committed",
        "staged",
        "swap-journaled",
        "swapped",
        "generation",
        "committed",
    ),
}


def checkpoint(name: str) -> None:
    if os.environ.get("UNIONIMG_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("UNIONIMG_FILL_AT") == name:
        fill(os.environ["UNIONIMG_FILL_FILE"])


def fill(path: str) -> None:
    """Grow ``path`` until its filesystem has no free block left (a test's filler file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        st = os.statvfs(path)
        size = os.fstat(fd).st_size
        chunk = st.f_bavail * st.f_frsize
        while chunk >= 4096:  # large extents first, then what is left
            try:
                os.posix_fallocate(fd, size, chunk)
                size += chunk
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                chunk //= 2
        block = b"\0" * 4096
        while True:  # the last blocks, and whatever fallocate could not place
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                break
        os.fsync(fd)
    finally:
        os.close(fd)
