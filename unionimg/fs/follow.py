"""A file read while another thread writes it: a pulled blob extracted as it arrives.

The thread that fetches a blob tells a :class:`Growing` where the bytes go and how far they
have been written (:meth:`~Growing.begin`, :meth:`~Growing.wrote`), then that the file is
complete and verified (:meth:`~Growing.finish`) or that it never will be
(:meth:`~Growing.fail`). Any number of readers (:meth:`~Growing.reader`) read it from the
start meanwhile, each with its own descriptor, waiting for bytes not yet written; a reader
never sees a byte past what the writer said it wrote. The writer starting over below what
a reader has read (a registry that answered a resumed GET with the whole blob) makes that
reader raise :class:`Restarted`: what it read may not be what the file will hold, so its
consumer starts again from the complete file. The end of the file is only reached once the
writer finished: a reader's EOF means the whole, verified file.

No thread of its own, no polling: a :class:`threading.Condition` wakes the readers.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

from unionimg.fs.pagecache import DropBehind, drop


class Restarted(Exception):
    """The writer started the file over below what this reader had read."""


class Abandoned(Exception):
    """The writer gave up: the file will never be complete (its error is the one to tell)."""


class Growing:
    """One file as it is written (``size`` bytes when complete)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cond = threading.Condition()
        self._path: Path | None = None
        self._end = 0  # bytes written so far
        self._restarts: list[int] = []  # the offsets the writer started over at
        self._done: Path | None = None
        self._error: str | None = None
        self._news = 0  # counts what the writer said

    # the writer's side
    def begin(self, path: Path, offset: int) -> None:
        """The bytes go to ``path`` from ``offset`` on (what lies before it is there)."""
        with self._cond:
            if offset < self._end:
                self._restarts.append(offset)
            self._path, self._end = path, offset
            self._news += 1
            self._cond.notify_all()

    def wrote(self, end: int) -> None:
        """Bytes up to ``end`` are written (flushed to the file)."""
        with self._cond:
            self._end = end
            self._news += 1
            self._cond.notify_all()

    def finish(self, path: Path) -> None:
        """The file is complete and verified, now at ``path`` (the same inode: a rename)."""
        with self._cond:
            self._done, self._path, self._end = path, path, self.size
            self._news += 1
            self._cond.notify_all()

    def fail(self, why: str) -> None:
        """The file will not be complete; readers waiting raise :class:`Abandoned`."""
        with self._cond:
            if self._done is None and self._error is None:
                self._error = why
            self._news += 1
            self._cond.notify_all()

    # the readers' side
    @property
    def finished(self) -> bool:
        with self._cond:
            return self._done is not None

    def wait(self) -> Path:
        """The complete file, once finished; :class:`Abandoned` if it never will be."""
        with self._cond:
            self._cond.wait_for(lambda: self._done is not None or self._error is not None)
            if self._done is None:
                raise Abandoned(self._error or "abandoned")
            return self._done

    def reader(self) -> GrowingReader:
        return GrowingReader(self)

    def _await(self, pos: int, seen: int) -> tuple[Path, int, int, int]:
        """Wait until bytes past ``pos`` are written or the file is complete; (the path,
        the end readable, the restarts count, the news count). Raises Restarted / Abandoned."""
        with self._cond:
            while True:
                if any(at < pos for at in self._restarts[seen:]):
                    raise Restarted(f"the file was started over below byte {pos}")
                if self._error is not None and self._done is None:
                    raise Abandoned(self._error)
                if self._path is not None and (self._end > pos or self._done is not None):
                    return self._path, self._end, len(self._restarts), self._news
                self._cond.wait()

    def _await_news(self, news: int) -> None:
        """Wait until the writer says anything after its ``news``-th word (the file a
        reader was told of is gone: renamed at the finish, or removed to start over)."""
        with self._cond:
            self._cond.wait_for(lambda: self._news != news)


class GrowingReader:
    """Reads a :class:`Growing` file from its start: ``read(n)`` blocks until bytes are
    written, returns ``b""`` only at the end of the complete file."""

    def __init__(self, growing: Growing) -> None:
        self._g = growing
        self._fd: int | None = None
        self._behind: DropBehind | None = None
        self._pos = 0
        self._seen = 0  # the writer's restarts accounted for

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while data := self.read(1 << 20):
                parts.append(data)
            return b"".join(parts)
        if n == 0:
            return b""
        while True:
            path, end, self._seen, news = self._g._await(self._pos, self._seen)
            if self._pos >= end:
                return b""  # complete: the end
            if self._fd is not None:
                break
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                self._behind = DropBehind(self._fd)  # read once: no page of it kept
                break
            except FileNotFoundError:  # renamed or removed since: ask again when told
                self._g._await_news(news)
        data = os.pread(self._fd, min(n, end - self._pos), self._pos)
        if not data:  # the writer said it wrote bytes the file does not hold
            raise Restarted(f"the file ends at byte {self._pos}, before {end}")
        self._pos += len(data)
        if self._behind is not None:
            self._behind.at(self._pos)
        return data

    def close(self) -> None:
        if self._fd is not None:
            drop(self._fd)  # what is left of it: read once
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> GrowingReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
