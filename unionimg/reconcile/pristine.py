"""Pristine conffiles read from ``.deb`` packages: the merge ancestor of issue 12, item 4.

When a conffile has no common ancestor in the layer history (the VM installed the package
before the base did, both edited it), dpkg still knows its pristine version: the package's
``.deb`` holds it and B1's status records its md5 (``Conffiles:``). The planner
(:mod:`unionimg.reconcile.plan`, pure) asks for it through its content reader
(``_Content.pristine`` in :mod:`unionimg.reconcile.apply`, which builds a
:class:`PristineFinder`); this module does the reading.

Where, in each tree the executor gives (B1, the VM's upper layer, B0, then up to
:data:`PRISTINE_GENERATIONS` generations between B0 and B1, newest first: the generation
that installed the package has the pristine file itself): the tree's own copy of the file,
then ``/var/cache/apt/archives/PACKAGE_VERSION_ARCH.deb`` (apt's name, an epoch's ``:`` as
``%3a``). The VM's is hostile input: a candidate from anywhere is accepted only when its md5
equals the one in B1's ``Conffiles:`` line (the base is trusted, the VM's status is not), and
the planner checks it again. The pristine conffile of ANOTHER version the VM has (its edit's
ancestor, as on an upgrade) is checked against the md5 of the VM's status, so it is taken
from the base's trees only (``Conffile.base_only``): never from the VM's own cache.

A file ucf manages instead of dpkg (``sshd_config``) has its pristine copy in each tree's
``/var/lib/ucf/cache/`` (``Conffile.cache``), checked against ucf's hashfile md5 the same way.

How: Python only, no program runs on a guest's archive. The ``ar`` container is walked by
its 60-byte headers to the ``data.tar.*`` member, which ``tarfile`` reads as a stream (gzip,
xz, bzip2 or none; zstd is not read). Bounds: the ``.deb`` is opened without following a
symlink anywhere on its path and must be a regular file of at most :data:`MAX_DEB` bytes; the
member must be a regular file (links, symlinks and devices are refused) of at most
:data:`MAX_MEMBER` bytes; the scan stops after :data:`MAX_MEMBERS` tar members or
:data:`MAX_SCAN` bytes of the decompressed stream. Any damage gives ``None`` (no ancestor:
the merge falls back to a whole-file conflict), never an exception.
"""

from __future__ import annotations

import io
import lzma
import os
import stat
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from unionimg.fs import fsops
from unionimg.reconcile.dpkgdb import Conffile, md5_of

__all__ = [
    "ARCHIVES",
    "MAX_DEB",
    "MAX_MEMBER",
    "MAX_MEMBERS",
    "MAX_SCAN",
    "PRISTINE_GENERATIONS",
    "PristineFinder",
    "deb_member",
    "deb_names",
]

ARCHIVES = "/var/cache/apt/archives"
MAX_DEB = 512 << 20  # a .deb larger than this is not opened
MAX_MEMBER = 16 << 20  # a conffile larger than this is not read
MAX_MEMBERS = 200_000  # tar members looked at
MAX_SCAN = 1 << 30  # bytes of the decompressed data.tar looked at
PRISTINE_GENERATIONS = 8  # generations between B0 and B1 searched (each is mounted)
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


def deb_names(package: str, version: str, architecture: str) -> list[str]:
    """The names apt gives ``package`` ``version`` in its cache (with and without epoch)."""
    names = [f"{package}_{version.replace(':', '%3a')}_{architecture}.deb"]
    if ":" in version:
        names.append(f"{package}_{version.split(':', 1)[1]}_{architecture}.deb")
    return [n for n in names if "/" not in n and n not in (".", "..")]


class _Window(io.RawIOBase):
    """``size`` bytes of ``fh`` from its current position, as a read-only stream."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: min(len(buffer), self._left)]
        got = self._fh.readinto(view)  # type: ignore[attr-defined]
        if not got:
            return 0
        self._left -= got
        return int(got)


def _tar_member(stream: BinaryIO, path: str) -> bytes | None:
    want = path.lstrip("/")
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for count, member in enumerate(tar):
            if count >= MAX_MEMBERS or member.offset_data > MAX_SCAN:
                return None
            name = member.name
            while name.startswith("./"):
                name = name[2:]
            if name.strip("/") != want:
                continue
            if not member.isreg() or member.size > MAX_MEMBER:
                return None  # a link, a device, a directory, or too large: refused
            extracted = tar.extractfile(member)
            if extracted is None:
                return None
            data = extracted.read(MAX_MEMBER + 1)
            return data if len(data) == member.size else None
    return None


def deb_member(fh: BinaryIO, size: int, path: str) -> bytes | None:
    """The regular file ``path`` of the ``.deb`` open as ``fh`` (``size`` bytes), else None."""
    try:
        if fh.read(len(_AR_MAGIC)) != _AR_MAGIC:
            return None
        at = len(_AR_MAGIC)
        while at + _AR_HEADER <= size:
            header = fh.read(_AR_HEADER)
            if len(header) != _AR_HEADER or header[58:60] != b"`\n":
                return None
            name = header[:16].rstrip(b" ").rstrip(b"/")
            length = int(header[48:58].strip() or b"-1")
            if length < 0 or at + _AR_HEADER + length > size:
                return None
            at += _AR_HEADER
            if name.startswith(b"data.tar"):
                if name.endswith(b".zst"):
                    return None  # Python 3.11 has no zstd
                return _tar_member(io.BufferedReader(_Window(fh, length)), path)
            at += length + (length & 1)
            fh.seek(at)
        return None
    except (tarfile.TarError, EOFError, OSError, ValueError, lzma.LZMAError, zlib.error):
        return None  # a damaged or hostile archive: no ancestor


def _open_deb(root: Path, path: str) -> tuple[BinaryIO, int] | None:
    """``root``/``path`` opened read-only without following a symlink anywhere (the VM's
    upper is hostile), when it is a regular file of at most :data:`MAX_DEB` bytes."""
    try:
        with fsops.parent_fd(root, path) as (dfd, name):
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd
            )
    except (OSError, ValueError):
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_DEB:
        os.close(fd)
        return None
    return os.fdopen(fd, "rb"), st.st_size


def _file(root: Path, path: str) -> bytes | None:
    """``root``/``path`` when a regular file of at most :data:`MAX_MEMBER` bytes."""
    opened = _open_deb(root, path)
    if opened is None:
        return None
    fh, size = opened
    with fh:
        data = fh.read(MAX_MEMBER + 1) if size <= MAX_MEMBER else None
    return data if data is not None and len(data) <= MAX_MEMBER else None


class PristineFinder:
    """Finds a conffile's pristine content in the trees ``roots`` (in order, consumed lazily:
    a root is mounted only when reached): each tree's own copy, its ucf cache copy
    (``Conffile.cache``), then the package's .deb in its apt cache."""

    def __init__(self, roots: Iterable[tuple[Path, bool]]) -> None:
        self.roots = roots  # (tree, is it the base's)

    def __call__(self, conffile: Conffile) -> bytes | None:
        """The pristine content of ``conffile`` with its md5, else None; a ``base_only``
        conffile (its md5 from the VM's status) only from the base's trees."""
        for root, base in self.roots:
            if conffile.base_only and not base:
                continue
            for where in (conffile.path, conffile.cache):  # its own copy, ucf's pristine one
                data = _file(root, where) if where else None
                if data is not None and md5_of(data) == conffile.md5:
                    return data
            if not conffile.package:
                continue
            for name in deb_names(conffile.package, conffile.version, conffile.architecture):
                opened = _open_deb(root, f"{ARCHIVES}/{name}")
                if opened is None:
                    continue
                fh, size = opened
                with fh:
                    data = deb_member(fh, size, conffile.path)
                if data is not None and md5_of(data) == conffile.md5:
                    return data
        return None
