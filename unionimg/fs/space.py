"""Free space and full disks: checks before writing, one clear message when a write fails
for want of space, and :class:`WriteWatch`, which makes writes durable and reports every
write-back error (the store's filesystem and the U images inside it).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from unionimg.errors import StoreFull, ToolFailed
from unionimg.names import human_size

# Added to every estimate of the space an operation needs: ext4 metadata and journal blocks,
# Mercurial's own files, and the estimate's own error.
SPACE_MARGIN = 8 << 20


def mount_point(path: str | os.PathLike[str]) -> str:
    """The mount point of the filesystem holding ``path`` (the nearest existing ancestor's)."""
    p = _existing(path)
    dev = os.stat(p).st_dev
    while p != p.parent and os.stat(p.parent).st_dev == dev:
        p = p.parent
    return str(p)


def free_space(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still allocate on ``path``'s filesystem (df's Avail)."""
    st = os.statvfs(_existing(path))
    return st.f_bavail * st.f_frsize


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _human(n: int) -> str:
    return human_size(max(n, 0))


def full_message(
    path: str | os.PathLike[str], needed: int, what: str, *, hint: str | None = None
) -> str:
    """``store full: X free on FS, about Y needed to WHAT; HINT``."""
    mp = mount_point(path)
    return (
        f"store full: {_human(free_space(path))} free on {mp}, about {_human(needed)} needed "
        f"to {what}; {hint or f'free space on {mp} and retry'}"
    )


def require_space(
    path: str | os.PathLike[str],
    needed: int,
    what: str,
    *,
    margin: int = SPACE_MARGIN,
    inodes: int = 64,
    hint: str | None = None,
) -> None:
    """Raise :class:`StoreFull` unless ``path``'s filesystem has ``needed`` + ``margin``
    bytes (and ``inodes`` inodes) free. ``what`` completes "about Y needed to ..."."""
    want = max(needed, 0) + margin
    target = _existing(path)
    st = os.statvfs(target)
    if st.f_bavail * st.f_frsize < want:
        raise StoreFull(full_message(target, want, what, hint=hint))
    if st.f_files and st.f_favail < inodes:
        mp = mount_point(target)
        raise StoreFull(
            f"store full: {st.f_favail} free inodes on {mp}, about {inodes} needed to {what}; "
            f"{hint or f'free inodes on {mp} (remove files) and retry'}"
        )


def is_full_error(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT: the filesystem (or a quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def write_failure(
    exc: OSError, path: str | os.PathLike[str], what: str, *, store_path: Path | None = None
) -> StoreFull | None:
    """The :class:`StoreFull` a failed write stands for, or None if the disk is not full.

    ENOSPC/EDQUOT is one (``path``: where it was written); so is EIO from a U image while
    the store's filesystem (``store_path``) is (nearly) full: the loop device could not
    allocate the sparse image's blocks, the U's journal aborted, and its writes since the
    last sync are lost. The message says so: nobody needs the kernel log to understand it.
    """
    if is_full_error(exc):
        where = path
        why = exc.strerror or str(exc)
    elif (
        exc.errno in (errno.EIO, errno.EROFS)
        and store_path is not None
        and free_space(store_path) < SPACE_MARGIN
    ):
        where = store_path
        why = (
            "the U image could not grow, so its writes failed with an I/O error and were "
            "not recorded"
        )
    else:
        return None
    mp = mount_point(where)
    return StoreFull(
        f"store full: {_human(free_space(where))} free on {mp}; {what} failed ({why}); "
        f"free space on {mp} and retry"
    )


def sync_store(watch: WriteWatch, what: str) -> None:
    """Make what was written into the store durable before it is published (``watch``
    opened on the store before the writes: Mercurial, for one, never fsyncs)."""
    try:
        watch.sync()
    except OSError as exc:
        full = write_failure(exc, watch.path, what)
        if full is not None:
            raise full from exc
        raise ToolFailed(
            f"writing the store failed while trying to {what} ({exc.strerror or exc}); "
            f"nothing was published; check the disk holding {mount_point(watch.path)}"
        ) from exc


def _syncfs(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs failed: {os.strerror(err)}")


class WriteWatch:
    """Opened on a filesystem BEFORE writing to it; :meth:`sync` then flushes it and reports
    every write-back error since (the kernel samples the filesystem's error counter when the
    file is opened: ``syncfs`` on a descriptor opened later misses errors the flusher hit in
    between, and ``umount`` reports none at all)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.durable = False  # see instance.durable
        self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def sync(self) -> None:
        """syncfs; OSError (EIO after a journal abort, ENOSPC) if any write was lost."""
        if self._fd is None:
            raise ValueError("WriteWatch is closed")
        try:
            _syncfs(self._fd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriteWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
