"""The snapshots' chunk store: content-addressed, zstd-compressed, verified on every read.

::

    STORE/snapshots/chunks/AB/ABCDEF...   one chunk: a zstd frame of its bytes; its name is
                                          the sha256 of the bytes (not of the frame)

A chunk is written once (an existing name is never rewritten: same name, same bytes) to a
temporary name in its directory and renamed into place; the writer makes the whole set
durable with one ``syncfs`` before a manifest names it (:func:`sync`). A read decompresses
at most :data:`~unionimg.store.snapshot_records.MAX_CHUNK` bytes and checks the sha256: a
chunk that does not hash to its name is refused naming it, never used.

How files become chunks (measured on the busybox guest under QEMU TCG, 128 MiB, two memory
images of the same idle guest 5 s apart, ``bench/snapshots.py``):

- memory images are QEMU's migration stream (what libvirt saves): pages carry an 8-byte
  header each and zero pages are only headers, so the same page sits at a different offset
  in the next image. Fixed 4 KiB pages found almost nothing shared (34 MiB new of 87 MiB,
  7.7 MiB compressed); FastCDC (content-defined, :data:`MEMORY_AVG` 8 KiB average) re-finds
  the boundaries after each shift: 3.9 MiB new, 0.34 MiB compressed. Memory is cut with
  FastCDC.
- a U image is a raw ext4 image whose blocks do not move: fixed :data:`DISK_CHUNK` chunks at
  fixed offsets, holes (``SEEK_HOLE``) and all-zero chunks not stored at all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

import zstandard
from pyfastcdc import FastCDC

from unionimg.errors import NotFound, StoreFull, ToolFailed
from unionimg.fs.space import WriteWatch, full_message, is_full_error
from unionimg.store.layout import Store
from unionimg.store.records import DamagedRecord
from unionimg.store.snapshot_records import MAX_CHUNK

MEMORY_AVG = 8 << 10
DISK_CHUNK = 64 << 10
LEVEL = 3
_ZERO = bytes(DISK_CHUNK)
_DZ = zstandard.ZstdDecompressor()


def chunks_dir(store: Store) -> Path:
    return store.root / "snapshots" / "chunks"


def _spath(store: Store, digest: str) -> str:
    # plain strings: a snapshot names thousands of chunks, pathlib's cost showed
    return f"{store.root}/snapshots/chunks/{digest[:2]}/{digest}"


def path_of(store: Store, digest: str) -> Path:
    return Path(_spath(store, digest))


def has(store: Store, digest: str) -> bool:
    return os.path.isfile(_spath(store, digest))


class Writer:
    """Puts chunks into the store, remembering which it added (so a take that fails can
    take them back: :meth:`undo`) and how many compressed bytes they hold."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.added: list[Path] = []
        self.new_bytes = 0
        self.new_raw = 0
        self._z = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)

    def put(self, data: bytes | memoryview, digest: str | None = None) -> str:
        """The digest of ``data``, stored unless the store has it."""
        digest = digest or hashlib.sha256(data).hexdigest()
        if has(self.store, digest):
            return digest
        self.put_frame(digest, self._z.compress(data), len(data))
        return digest

    def put_frame(self, digest: str, frame: bytes, raw_len: int) -> None:
        """Store an already compressed chunk (checked by the caller) under ``digest``."""
        final = path_of(self.store, digest)
        if final.is_file():
            return
        tmp = final.with_name(f".{digest[:16]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if is_full_error(exc):
                raise StoreFull(
                    full_message(self.store.root, len(frame), "store a snapshot chunk")
                ) from exc
            raise ToolFailed(f"writing snapshot chunk {digest[:16]} failed: {exc}") from exc
        self.added.append(final)
        self.new_bytes += len(frame)
        self.new_raw += raw_len

    def undo(self) -> None:
        """Remove every chunk this writer added (a take or a receive that failed)."""
        for path in self.added:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.added.clear()


def sync(store: Store, what: str) -> None:
    """Make the chunks written so far durable (one syncfs of the store's filesystem)."""
    watch = WriteWatch(store.root)
    try:
        watch.sync()
    except OSError as exc:
        if is_full_error(exc):
            raise StoreFull(full_message(store.root, 0, what)) from exc
        raise ToolFailed(f"writing the store failed while trying to {what}: {exc}") from exc
    finally:
        watch.close()


def read(store: Store, digest: str, length: int, where: str) -> bytes:
    """The bytes of chunk ``digest`` (``length`` long), checked; NotFound when missing,
    DamagedRecord when it does not decompress to bytes with that digest and length."""
    path = _spath(store, digest)
    try:
        with open(path, "rb") as fh:
            frame = fh.read()
    except FileNotFoundError:
        raise NotFound(
            f"{where}: chunk {digest} is missing from {chunks_dir(store)}; copy the snapshot "
            "again from a host that has it ('snapshot push') or restore another snapshot"
        ) from None
    try:
        data = _DZ.decompress(frame, max_output_size=MAX_CHUNK)
    except zstandard.ZstdError:
        data = b""
    if len(data) != length or hashlib.sha256(data).hexdigest() != digest:
        raise DamagedRecord(
            f"{where}: chunk {digest} is corrupt (its bytes do not hash to its name): "
            f"{path}; remove it and copy the snapshot again from a host that has it, or "
            "restore another snapshot"
        )
    return data


def check_frame(frame: bytes, digest: str) -> int:
    """The length of the bytes ``frame`` decompresses to, if they hash to ``digest``; else
    ValueError (a received chunk is checked before it is stored)."""
    try:
        data = _DZ.decompress(frame, max_output_size=MAX_CHUNK)
    except zstandard.ZstdError as exc:
        raise ValueError(f"chunk {digest} is not a zstd frame ({exc})") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"chunk {digest} does not hash to its name")
    return len(data)


def frame_of(store: Store, digest: str) -> bytes:
    return path_of(store, digest).read_bytes()


def missing(store: Store, digests: Iterable[str]) -> list[str]:
    return sorted({d for d in digests if not has(store, d)})


# -- cutting files into chunks ---------------------------------------------------------------
def cut_memory(path: Path, writer: Writer) -> tuple[list[str], int]:
    """The memory image at ``path`` as FastCDC chunks, stored: ``HEX:LEN`` refs and size."""
    refs: list[str] = []
    size = 0
    if path.stat().st_size == 0:
        return refs, 0
    cdc = FastCDC(MEMORY_AVG, min_size=MEMORY_AVG // 4, max_size=MEMORY_AVG * 8)
    for chunk in cdc.cut_file(str(path)):
        refs.append(f"{writer.put(chunk.data)}:{chunk.length}")
        size += chunk.length
    return refs, size


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (start, end) ranges of ``fd`` that hold data (SEEK_DATA/SEEK_HOLE), aligned out
    to :data:`DISK_CHUNK`."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        start -= start % DISK_CHUNK
        end = min(size, -(-end // DISK_CHUNK) * DISK_CHUNK)
        yield start, end
        pos = end


def cut_disk(path: Path, writer: Writer) -> tuple[list[str], int]:
    """The U image at ``path`` as fixed chunks at fixed offsets, holes and zero chunks left
    out: ``OFFSET:HEX:LEN`` refs and the image's size."""
    refs: list[str] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for start, end in _data_ranges(fd, size):
            for offset in range(start, end, DISK_CHUNK):
                data = os.pread(fd, min(DISK_CHUNK, end - offset), offset)
                if not data or data == _ZERO[: len(data)]:
                    continue
                refs.append(f"{offset}:{writer.put(data)}:{len(data)}")
    finally:
        os.close(fd)
    return refs, size


# -- rebuilding files ------------------------------------------------------------------------
def check_present(store: Store, digests: Iterable[str], where: str) -> None:
    """NotFound naming the missing chunks (the first three and how many) if any is missing."""
    lacking = missing(store, digests)
    if lacking:
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        raise NotFound(
            f"{where}: {len(lacking)} chunk(s) missing from {chunks_dir(store)}: "
            f"{', '.join(lacking[:3])}{more}; copy the snapshot again from a host that has it "
            "('snapshot push') or restore another snapshot"
        )


def build_memory(store: Store, refs: list[tuple[str, int]], out: Path, where: str) -> None:
    with open(out, "wb") as fh:
        for digest, length in refs:
            fh.write(read(store, digest, length, where))


def build_disk(
    store: Store, refs: list[tuple[int, str, int]], size: int, out: Path, where: str
) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        for offset, digest, length in refs:
            data = read(store, digest, length, where)
            view = memoryview(data)
            pos = offset
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        os.fsync(fd)
    finally:
        os.close(fd)


def all_digests(store: Store) -> Iterator[tuple[str, Path]]:
    root = chunks_dir(store)
    if not root.is_dir():
        return
    for sub in root.iterdir():
        if not sub.is_dir():
            continue
        for p in sub.iterdir():
            if p.name.startswith("."):
                continue
            yield p.name, p
