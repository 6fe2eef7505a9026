"""Keeping bytes this host writes once, and will not read again, out of its page cache.

A pulled blob and the files extracted into a layer's image are written once, read at most
once more (the blob by the extraction that follows it), and then left to a guest. Left in
the page cache they make the kernel take a new page for every page written; recycled, the
same few pages serve the whole transfer. On a VM whose hypervisor hands out memory on
first touch and takes back what the guest frees (virtio-balloon free page reporting, this
machine kind) a new page costs many times its copy: 600 MiB written in 1 MiB writes took
3.7-5.8 s left in the cache, 0.48-0.54 s with the written part dropped every 32 MiB
(``POSIX_FADV_DONTNEED`` after ``fdatasync``), three rounds each, a 5 s pause before each.
On any host it leaves the cache to what is read again.

``POSIX_FADV_DONTNEED`` drops the clean pages of a range and starts writing the dirty ones
back (dropped by the next call, once clean); it never loses data and only ever costs a
later reader a read from the disk. Errors are ignored: this is advice.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from typing import Final

#: how many bytes a stream moves on between two drops of what lies behind it
DROP_EVERY: Final = 16 << 20


def drop(fd: int, start: int = 0, length: int = 0) -> None:
    """Advise the kernel to drop ``fd``'s cached pages of ``length`` bytes from ``start``
    (0: to the end of the file); dirty pages are written back instead, dropped next time."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


class DropBehind:
    """A file written or read front to back: each :data:`DROP_EVERY` bytes, the pages
    behind the position are dropped (:func:`drop`); what the last drop only sent to the
    disk is dropped by the next one, once written."""

    def __init__(self, fd: int, start: int = 0, every: int = DROP_EVERY) -> None:
        self._fd, self._done, self._every = fd, start, every

    def at(self, pos: int) -> None:
        """The stream is at byte ``pos``."""
        if pos - self._done >= self._every:
            drop(self._fd, 0, pos)
            self._done = pos


_OPEN_TO_DROP: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Recycler:
    """Files a thread writes through the page cache (the small files extracted into a
    layer's image) dropped from it once they reached the disk: the writer says each one
    (:meth:`wrote`), the thread that syncs the file system takes the list before a sync
    (:meth:`take`) and drops those files after it (:meth:`drop`) — clean by then. Paths are
    absolute and name regular files the writer made in a tree it made, no part of the way a
    symlink; the last part is opened ``O_NOFOLLOW`` all the same."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[bytes] = []

    def wrote(self, path: bytes) -> None:
        with self._lock:
            self._pending.append(path)

    def take(self) -> list[bytes]:
        """The files said since the last take."""
        with self._lock:
            batch, self._pending = self._pending, []
        return batch

    @staticmethod
    def drop(paths: Iterable[bytes]) -> None:
        """Drop the cached pages of ``paths`` (synced since they were written)."""
        for path in paths:
            try:
                fd = os.open(path, _OPEN_TO_DROP)
            except OSError:
                continue
            try:
                drop(fd)
            finally:
                os.close(fd)
