"""A layer's canonical tar: written from a tree in overlayfs format, read back into one.

A layer is a directory tree in overlayfs's *upper* format: a whiteout is a 0:0 character
device, an opaque directory carries the xattr ``trusted.overlay.opaque=y``. Its identity, the
``diff_id``, is the sha256 of its **canonical uncompressed tar**; its transport blob is that
tar compressed with zstd at :data:`ZSTD_LEVEL`, single-threaded, without a content size (the
tar is streamed), so the same tree gives the same two digests on every host.

The canonical tar (what :func:`write_blob` writes; standard tools read it):

- POSIX pax (ustar headers, ``x`` extended headers only where needed); the root first as
  ``./``, then every entry sorted by its path's bytes (a directory before its children),
  directories named with a trailing ``/``;
- numeric uid/gid (empty user and group names), permission bits with setuid/setgid/sticky,
  mtime in whole seconds, no atime or ctime;
- extended attributes as pax ``SCHILY.xattr.NAME`` records, sorted by name; overlayfs's own
  (``trusted.overlay.*``) are not content and are left out, except what the two markers
  below say; ``redirect`` and ``metacopy`` (which unionimg's overlay options never make)
  cannot be carried and are refused;
- a file with several names in the tree: its first name (in sort order) carries the content,
  the later ones are tar hard links to it;
- a whiteout ``dir/NAME`` is an empty regular file ``dir/.wh.NAME``, an opaque directory
  ``dir`` gets an empty regular file ``dir/.wh..wh..opq`` (OCI's layer changeset
  convention); so a tree entry whose own name starts with ``.wh.`` cannot be carried and is
  refused;
- pax records in each extended header sorted by keyword; ``path``/``linkpath`` there when a
  name is over 100 bytes or not ASCII (with ``hdrcharset=BINARY`` when not UTF-8), ``uid``,
  ``gid``, ``size``, ``mtime`` when the ustar field cannot hold them; the archive ends with
  two zero blocks padded to a 10240-byte record (as GNU tar and Python's tarfile do).

Reading a blob (:func:`read_blob`) trusts nothing in it: the blob's sha256 is computed in the
same read that decompresses it and checked (when the caller knows it) before the extracted
tree is handed back, so nothing extracted is used before its blob is known good; the tar is
parsed by this module's own bounded
reader (header checksums, a pax header of at most 1 MiB, paths of at most 4096 bytes, no
``..``, no absolute path, no global or GNU extension headers, no entry twice), every entry is
created in a fresh directory only beneath directories this reader made itself (never through a
symlink: a path that runs through one is refused), hard links only to regular files extracted
before, device nodes only where :class:`Policy` allows them (whiteouts and FIFOs always; a
MiB of zeros becomes a hole, so a sparse file stays sparse), setuid and
setgid bits only where it allows them; the tar's sha256 (the diff_id) is checked at the end,
over every decompressed byte, and any failure leaves nothing (the caller's staging directory
goes). Errors are one line: :class:`LayerRefused` (exit 8, as guest data refused).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Protocol, cast

import zstandard

from unionimg.entries import BLK, CHR, DIR, FIFO, FILE, OVERLAY_XATTR_PREFIXES, SYMLINK, Entry
from unionimg.errors import GuestDataRefused, StoreFull
from unionimg.fs.manifest import sha256_file, stat_entry
from unionimg.fs.pagecache import Recycler

log = logging.getLogger(__name__)

ZSTD_LEVEL = 3
"""The blob's zstd level: fixed, so a layer's blob digest is the same on every host. Level 3
(zstd's default): on this machine kind a 183 MiB tar of /usr/lib/python3 and /usr/share/doc
takes 2.0 s single-threaded (79 MiB out); level 6 5.6 s (77 MiB), level 9 12.8 s (72 MiB): a
base of 700 MiB would spend 45 s at level 9 to save 9 % of the bytes."""
BLOCK = 512
RECORD = 20 * BLOCK
CHUNK = 1 << 20
#: chunks the decompressing thread may be ahead of the extraction (:class:`_Source`)
READ_AHEAD = 4
PIPE_DEPTH = 64  # tar chunks waiting for the compressing thread (at most 64 MiB)
#: with ``read_blob(uncached=True)``, files of at least this size are written with O_DIRECT
#: (the Debian base: 1,539 of its 9,905 files, 80 % of its bytes)
UNCACHED_MIN = 64 << 10
#: those up to this size by a thread of their own (:meth:`_Uncached.hand_over`), at most
#: HAND_OVER_BYTES of them waiting for it at a time
HAND_OVER_MAX = 8 << 20
HAND_OVER_BYTES = 32 << 20
ALIGN = 4096  # what an O_DIRECT write's length and buffer are a multiple of
WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
MAX_PAX = 1 << 20
MAX_PATH = 4096
MAX_XATTR_VALUE = 64 << 10
MAX_TRAILER = 1 << 20  # bytes after the end-of-archive blocks (tar pads to 10 KiB records)
KINDS = ("base", "snapshot", "delta")


class LayerRefused(GuestDataRefused):
    """A tree that cannot be a layer, or a blob whose tar or digest is not what it must be."""


class BlobDamaged(LayerRefused):
    """A blob whose digest, or whose tar's digest (the diff_id), is not the expected one."""


@dataclass(frozen=True, slots=True)
class Policy:
    """What a layer of a kind may hold beyond files, directories, symlinks and whiteouts."""

    devices: bool = False  # character and block devices other than whiteouts
    setuid: bool = True  # setuid/setgid bits on files


def policy_for(kind: str) -> Policy:
    """``base`` and ``delta`` layers are the admin's whole systems (``/dev/console``,
    ``/dev/null`` in a tree; setuid programs): both allowed. ``snapshot`` layers are a guest's
    upper layer: device nodes refused (a guest's own are on its devtmpfs, never in U), setuid
    kept (the VM's own sudo, passwd, su must keep working on top of its snapshot; every host
    mount of a layer image is ``nosuid,nodev``)."""
    if kind in ("base", "delta"):
        return Policy(devices=True, setuid=True)
    if kind == "snapshot":
        return Policy(devices=False, setuid=True)
    raise ValueError(f"unknown layer kind {kind!r}")


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What writing or reading a blob found: its two digests (``sha256:HEX``) and sizes."""

    diff_id: str
    blob_digest: str
    blob_size: int
    tar_size: int
    entries: int


# -- writing -----------------------------------------------------------------------------------
@dataclass(slots=True)
class _Item:
    path: bytes  # relative, no leading ./, no trailing /
    kind: str  # dir file symlink link whiteout opaque char block fifo
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def _xattrs(path: bytes, rel: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return out
        raise
    for name in sorted(names):
        if name.startswith(("trusted.overlay.", "user.overlay.")):
            suffix = name.split(".overlay.", 1)[1]
            if suffix in ("redirect", "metacopy"):
                raise LayerRefused(
                    f"{_show(rel)} carries overlayfs's {name}, which a layer cannot hold "
                    "(unionimg mounts overlays with redirect_dir=off,metacopy=off): copy the "
                    "file or directory up fully, then retry"
                )
            continue  # origin, impure, nlink, opaque (said by .wh..wh..opq): not content
        try:
            out[name.encode()] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise
    return out


def _show(rel: bytes) -> str:
    return "/" + os.fsdecode(rel).encode("unicode_escape", "backslashreplace").decode("ascii")


def _scan(root: Path, policy: Policy, exclude: frozenset[bytes] = frozenset()) -> list[_Item]:
    """Every entry of ``root`` as tar items, sorted by path (the root first as ``b""``),
    but those in ``exclude`` (relative paths; a directory's whole subtree)."""
    items: list[_Item] = []
    links: dict[tuple[int, int], bytes] = {}
    broot = os.fsencode(root)
    st = os.lstat(broot)
    rootx = _xattrs(broot, b"")
    items.append(
        _Item(
            b"",
            "dir",
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            int(st.st_mtime),
            0,
            xattrs=rootx,
        )
    )
    collected: list[_Item] = []
    if _has_opaque(broot):
        collected.append(_Item(WH_OPAQUE.encode(), "opaque"))
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(broot, rel_dir) if rel_dir else broot
        with os.scandir(full_dir) as it:
            names = sorted(e.name for e in it)
        for name in names:
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if rel in exclude:
                continue
            full = os.path.join(broot, rel)
            st = os.lstat(full)
            mode = st.st_mode
            if name.startswith(WH_PREFIX.encode()):
                raise LayerRefused(
                    f"{_show(rel)}: a name starting with '{WH_PREFIX}' is reserved for whiteouts "
                    "in a layer's tar and cannot be carried; rename it and retry"
                )
            if stat.S_ISCHR(mode) and st.st_rdev == 0:
                parent, _, base = rel.rpartition(b"/")
                wh = (
                    os.path.join(parent, WH_PREFIX.encode() + base)
                    if parent
                    else (WH_PREFIX.encode() + base)
                )
                collected.append(_Item(wh, "whiteout"))
                continue
            item = _Item(rel, "", stat.S_IMODE(mode), st.st_uid, st.st_gid, int(st.st_mtime))
            if stat.S_ISDIR(mode):
                item.kind = "dir"
                item.xattrs = _xattrs(full, rel)
                if _has_opaque(full):
                    collected.append(_Item(os.path.join(rel, WH_OPAQUE.encode()), "opaque"))
                stack.append(rel)
            elif stat.S_ISLNK(mode):
                item.kind = "symlink"
                item.linkname = os.readlink(full)
                item.xattrs = _xattrs(full, rel)
            elif stat.S_ISREG(mode):
                item.kind = "file"
                item.size = st.st_size
                item.xattrs = _xattrs(full, rel)
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    first = links.get(key)
                    if first is None or rel < first:
                        links[key] = rel
                if mode & (stat.S_ISUID | stat.S_ISGID) and not policy.setuid:
                    raise LayerRefused(
                        f"{_show(rel)} is setuid or setgid, which this kind of layer may not "
                        "hold; clear the bit and retry"
                    )
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                # a FIFO opens no device (postfix keeps its own in /var/spool): always carried
                if not policy.devices and not stat.S_ISFIFO(mode):
                    raise LayerRefused(
                        f"{_show(rel)} is a device node, which this kind of layer may not hold "
                        "(only whiteouts); remove it and retry"
                    )
                item.kind = (
                    "char" if stat.S_ISCHR(mode) else "block" if stat.S_ISBLK(mode) else ("fifo")
                )
                item.devmajor, item.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                item.xattrs = _xattrs(full, rel)
            else:  # a socket: nothing a tar (or a booted system) can carry over
                log.warning("layer: leaving out socket %s", _show(rel))
                continue
            if stat.S_ISREG(mode) and st.st_nlink > 1:
                item.linkname = b"\0%d:%d" % (st.st_dev, st.st_ino)  # resolved below
            collected.append(item)
    collected.sort(key=lambda i: i.path)
    for item in collected:
        if item.kind == "file" and item.linkname.startswith(b"\0"):
            dev, ino = (int(x) for x in item.linkname[1:].split(b":"))
            first = links[(dev, ino)]
            if first == item.path:
                item.linkname = b""
            else:
                item.kind, item.linkname, item.size = "link", first, 0
    items.extend(collected)
    return items


def _has_opaque(path: bytes) -> bool:
    try:
        value: bytes = os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False)
    except OSError:
        return False
    return value == b"y"


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n = len(b"%d" % n) + len(body)
    return b"%d" % n + body


_TYPE = {
    "dir": b"5",
    "file": b"0",
    "whiteout": b"0",
    "opaque": b"0",
    "symlink": b"2",
    "link": b"1",
    "char": b"3",
    "block": b"4",
    "fifo": b"6",
}


def _ustar(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes,
    devmajor: int,
    devminor: int,
) -> bytes:
    hdr = bytearray(BLOCK)
    hdr[0:100] = name[:100].ljust(100, b"\0")
    hdr[100:108] = _octal(mode, 8)
    hdr[108:116] = _octal(uid, 8)
    hdr[116:124] = _octal(gid, 8)
    hdr[124:136] = _octal(size, 12)
    hdr[136:148] = _octal(mtime, 12)
    hdr[148:156] = b" " * 8
    hdr[156:157] = typeflag
    hdr[157:257] = linkname[:100].ljust(100, b"\0")
    hdr[257:265] = b"ustar\x0000"
    hdr[329:337] = _octal(devmajor, 8)
    hdr[337:345] = _octal(devminor, 8)
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def _fits(value: int, width: int) -> bool:
    return 0 <= value < 1 << (3 * (width - 1))


def _header(item: _Item) -> bytes:
    if item.path == b"":
        name = b"./"
    elif item.kind == "dir":
        name = item.path + b"/"
    else:
        name = item.path
    pax: dict[bytes, bytes] = {}
    binary = False
    for key, value in ((b"path", name), (b"linkpath", item.linkname)):
        if len(value) > 100 or not value.isascii():
            pax[key] = value
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                binary = True
    if binary:
        pax[b"hdrcharset"] = b"BINARY"
    size = 0 if item.kind in ("dir", "symlink", "link", "whiteout", "opaque") else item.size
    for nkey, number, width in (
        (b"uid", item.uid, 8),
        (b"gid", item.gid, 8),
        (b"size", size, 12),
        (b"mtime", item.mtime, 12),
    ):
        if not _fits(number, width):
            pax[nkey] = b"%d" % number
    for xname, xvalue in item.xattrs.items():
        pax[b"SCHILY.xattr." + xname] = xvalue
    out = b""
    if pax:
        body = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
        base = os.path.basename(item.path.rstrip(b"/")) or b"root"
        out += _ustar(b"PaxHeaders/" + base[:80], 0o644, 0, 0, len(body), 0, b"x", b"", 0, 0)
        out += body + b"\0" * (-len(body) % BLOCK)

    def clamp(value: int, width: int) -> int:
        return value if _fits(value, width) else 0

    mode = 0o644 if item.kind in ("whiteout", "opaque") else item.mode
    out += _ustar(
        name,
        mode,
        clamp(item.uid, 8),
        clamp(item.gid, 8),
        clamp(size, 12),
        clamp(item.mtime, 12),
        _TYPE[item.kind],
        item.linkname,
        item.devmajor,
        item.devminor,
    )
    return out


class Writer(Protocol):
    """Where a blob goes: a file opened ``wb``, or anything with ``write(bytes)``."""

    def write(self, data: bytes, /) -> object: ...


class _Compressor:
    """zstd on a thread of its own (zstd runs without the GIL): the tar's chunks are
    compressed in the order they were written by one single-threaded zstd stream, so the
    blob is byte for byte the one a single thread makes, while the caller reads files and
    hashes the tar on the other core. At most :data:`PIPE_DEPTH`
    chunks wait; an error of ``out`` is raised on the caller's next write or at ``close``."""

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_content_size=False)
        self._zc = cctx.compressobj()
        self._emit = emit
        self._queue: queue.Queue[bytes | None] = queue.Queue(PIPE_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="unionimg-zstd", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            if self._error is None:
                try:
                    self._emit(self._zc.compress(data))
                except BaseException as exc:  # handed to the caller's thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def compress(self, data: bytes) -> None:
        self._raise()
        self._queue.put(data)

    def close(self, *, flush: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()
        if flush:
            self._emit(self._zc.flush())


class _Sink:
    """Tar bytes in: hashed (the diff_id), compressed (on a thread: :class:`_Compressor`),
    the blob hashed and written."""

    def __init__(self, out: Writer | None) -> None:
        self.tar_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self.tar_size = 0
        self.blob_size = 0
        self._out = out
        self._pending = bytearray()  # small writes, handed on a CHUNK at a time (zstd's
        # stream makes the same bytes however its input is cut)
        self._zc = _Compressor(self._emit) if out is not None else None

    def write(self, data: bytes) -> None:
        self.tar_size += len(data)
        if self._pending or len(data) < CHUNK:  # headers and small files: gathered
            self._pending += data
            if len(self._pending) < CHUNK:
                return
            data = bytes(self._pending)
            self._pending.clear()
        self._hand_on(data)

    def _hand_on(self, data: bytes) -> None:
        self.tar_hash.update(data)
        if self._zc is not None:
            self._zc.compress(data)

    def _emit(self, data: bytes) -> None:
        if data and self._out is not None:
            self.blob_hash.update(data)
            self.blob_size += len(data)
            self._out.write(data)

    def close(self) -> None:
        """The end-of-archive padding, the last chunk, the compressor flushed and its thread
        ended — also when the writer's error comes out here (it may reach the caller only
        now: the thread met it after the last chunk of the loop was handed on)."""
        pad = -self.tar_size % RECORD
        if pad < 2 * BLOCK:
            pad += RECORD
        try:
            self.write(b"\0" * pad)
            if self._pending:
                self._hand_on(bytes(self._pending))
                self._pending.clear()
        except BaseException:
            self.abort()
            raise
        if self._zc is not None:
            self._zc.close()  # joins its thread before it raises

    def abort(self) -> None:
        """Stop the compressing thread (an error while the tree was read)."""
        if self._zc is not None:
            with contextlib.suppress(BaseException):
                self._zc.close(flush=False)


def write_blob(
    tree: Path,
    out: Writer | None,
    *,
    kind: str,
    policy: Policy | None = None,
    exclude: frozenset[bytes] = frozenset(),
    max_bytes: int | None = None,
) -> BlobInfo:
    """Write the canonical tar of ``tree`` (a layer in overlayfs format), zstd-compressed,
    to ``out``; its digests. One pass over the tree, memory bounded by one chunk plus the
    list of its entries' metadata. ``out=None``: the diff_id only (no compression; the blob
    digest is empty), for a digest of a big tree whose blob is not needed yet. ``max_bytes``:
    refuse a tree whose files hold more (a guest's 16 TiB sparse file would be read whole)."""
    items = _scan(tree, policy or policy_for(kind), exclude)
    total = sum(i.size for i in items if i.kind == "file")
    if max_bytes is not None and total > max_bytes:  # sparse files count whole in a tar
        raise LayerRefused(
            f"the tree holds {total} bytes of files (a sparse file counts whole), more than "
            f"the {max_bytes} a layer of it may read; remove or shrink the largest sparse files"
        )
    sink = _Sink(out)
    btree = os.fsencode(tree)
    try:
        for item in items:
            sink.write(_header(item))
            if item.kind == "file" and item.size:
                _copy_file(os.path.join(btree, item.path), item, sink)
    except BaseException:
        sink.abort()
        raise
    sink.close()
    return BlobInfo(
        diff_id="sha256:" + sink.tar_hash.hexdigest(),
        blob_digest="sha256:" + sink.blob_hash.hexdigest() if out is not None else "",
        blob_size=sink.blob_size,
        tar_size=sink.tar_size,
        entries=len(items),
    )


def _copy_file(path: bytes, item: _Item, sink: _Sink) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        left = item.size
        while left:
            data = os.read(fd, min(CHUNK, left))
            if not data:
                raise LayerRefused(
                    f"{_show(item.path)} shrank while it was read into a layer; nothing may "
                    "change the tree meanwhile: retry"
                )
            sink.write(data)
            left -= len(data)
    finally:
        os.close(fd)
    pad = -item.size % BLOCK
    if pad:
        sink.write(b"\0" * pad)


# -- reading -----------------------------------------------------------------------------------
class ByteSource(Protocol):
    """What a blob is read from: a file opened ``rb``, or a reader of one as it arrives."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class _Hashed:
    """The blob file as the decompressor reads it, its bytes hashed on the way (the blob
    digest, without a second read of the file)."""

    def __init__(self, raw: ByteSource) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def rest(self) -> str:
        """``sha256:HEX`` of the whole file: what the decompressor left unread hashed too."""
        while data := self._raw.read(CHUNK):
            self.hash.update(data)
            self.size += len(data)
        return "sha256:" + self.hash.hexdigest()


class _Source:
    """The blob's decompressed bytes, hashed as they are read (the diff_id). Small reads
    (headers) are served from the current chunk by offset, never by copying what is left
    of it. The decompression and both digests run in a thread of their own, at most
    :data:`READ_AHEAD` chunks ahead of the extraction (zstd and sha256 release the GIL, so
    they overlap the extraction's writes: 2 cores here); :meth:`close` stops it. ``hash``
    and ``size`` are whole once the end was read (or after :meth:`close`)."""

    def __init__(self, raw: _Hashed) -> None:
        # the decompressor asks only read(n) of its source
        source = cast("IO[bytes]", raw)
        self._reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=CHUNK)
        self.hash = hashlib.sha256()
        self.size = 0
        self._buf = b""
        self._pos = 0
        self._chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(READ_AHEAD)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="unionimg-unzstd", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last: bytes | BaseException | None = None
        try:
            while not self._stop.is_set():
                try:
                    data = self._reader.read(CHUNK)
                except zstandard.ZstdError as exc:
                    last = LayerRefused(f"the blob is not valid zstd ({exc})")
                    break
                if not data:
                    break
                self.hash.update(data)
                self.size += len(data)
                self._put(data)
        except BaseException as exc:  # a read that failed (the blob arriving: given up)
            last = exc
        self._put(last)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _more(self) -> bytes:
        """The next chunk (of at most :data:`CHUNK` bytes); b"" at the end."""
        if self._ended:
            return b""
        item = self._chunks.get()
        if isinstance(item, bytes):
            return item
        self._ended = True
        if item is not None:
            raise item
        return b""

    def close(self) -> None:
        """Stop the decompressing thread (it ends at its next chunk) and wait for it."""
        self._stop.set()
        self._thread.join()

    def read_exact(self, n: int) -> bytes:
        pos, buf = self._pos, self._buf
        if pos + n <= len(buf):  # the common case: inside the current chunk
            self._pos = pos + n
            return buf[pos : pos + n] if n < len(buf) else buf
        parts = [buf[pos:]]
        got = len(parts[0])
        self._buf, self._pos = b"", 0
        while got < n:
            data = self._more()
            if not data:
                raise LayerRefused("the blob's tar is truncated (it ends inside an entry)")
            want = n - got
            if len(data) > want:
                parts.append(data[:want])
                self._buf, self._pos = data, want
                got = n
            else:
                parts.append(data)
                got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def drain(self) -> bytes:
        """Everything left (hashed); returns the first bytes of it that are not zero. At most
        :data:`MAX_TRAILER` bytes may follow the end-of-archive blocks (a zstd frame of
        terabytes of zeros is a few MiB: it is refused, never hashed to its end)."""
        nonzero = self._buf[self._pos :].strip(b"\0")
        self._buf, self._pos = b"", 0
        after = 0
        while True:
            data = self._more()
            if not data:
                return nonzero
            after += len(data)
            if not nonzero:
                nonzero = data.strip(b"\0")
            if after > MAX_TRAILER:
                raise LayerRefused(
                    f"the blob's tar goes on for more than {MAX_TRAILER} bytes after its "
                    "end-of-archive blocks"
                )


def _num(field_: bytes, what: str) -> int:
    if field_ and field_[0] & 0x80:
        raise LayerRefused(f"the blob's tar has a base-256 {what} field, which a layer never has")
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise LayerRefused(f"the blob's tar has a {what} field that is not octal") from None


def _parse_pax(body: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(body):
        if body[pos:].strip(b"\0") == b"":
            break
        sp = body.find(b" ", pos, pos + 20)
        if sp < 0:
            raise LayerRefused("the blob's tar has a malformed pax record")
        try:
            length = int(body[pos:sp])
        except ValueError:
            raise LayerRefused("the blob's tar has a malformed pax record length") from None
        end = pos + length
        if length < 5 or end > len(body) or body[end - 1 : end] != b"\n":
            raise LayerRefused("the blob's tar has a pax record of a wrong length")
        key, eq, value = body[sp + 1 : end - 1].partition(b"=")
        if not eq:
            raise LayerRefused("the blob's tar has a pax record without '='")
        out[key] = value
        pos = end
    return out


@dataclass(slots=True)
class _Entry:
    name: bytes
    typeflag: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]


def _entries(src: _Source) -> Iterator[_Entry]:
    pax: dict[bytes, bytes] = {}
    while True:
        hdr = src.read_exact(BLOCK)
        if hdr == b"\0" * BLOCK:
            if pax:
                raise LayerRefused("the blob's tar ends right after a pax header")
            return
        stored = _num(hdr[148:156], "checksum")
        blank = hdr[:148] + b" " * 8 + hdr[156:]
        if stored != sum(blank):
            raise LayerRefused("the blob's tar has a header with a wrong checksum")
        if hdr[257:263] not in (b"ustar\0", b"ustar "):
            raise LayerRefused("the blob's tar has a header that is not ustar or pax")
        typeflag = hdr[156:157]
        size = _num(hdr[124:136], "size")
        if typeflag == b"x":
            if pax:
                raise LayerRefused("the blob's tar has two pax headers in a row")
            if size > MAX_PAX:
                raise LayerRefused(
                    f"the blob's tar has a pax header of {size} bytes (at most {MAX_PAX})"
                )
            body = src.read_exact(size + (-size % BLOCK))[:size]
            pax = _parse_pax(body)
            if not pax:
                pax = {b"": b""}  # an empty one still must be followed by an entry
            continue
        if typeflag not in b"0123456\0" or len(typeflag) != 1:
            raise LayerRefused(
                f"the blob's tar has an entry of type {typeflag!r} (global pax, GNU or other "
                "extensions), which a layer never has"
            )
        name = hdr[0:100].split(b"\0", 1)[0]
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix and hdr[257:263] == b"ustar\0":
            name = prefix + b"/" + name
        linkname = hdr[157:257].split(b"\0", 1)[0]
        xattrs: dict[str, bytes] = {}
        mtime = _num(hdr[136:148], "mtime")
        uid, gid = _num(hdr[108:116], "uid"), _num(hdr[116:124], "gid")
        for key, value in pax.items():
            if key == b"path":
                name = value
            elif key == b"linkpath":
                linkname = value
            elif key == b"size":
                size = _pax_int(value, "size")
            elif key == b"uid":
                uid = _pax_int(value, "uid")
            elif key == b"gid":
                gid = _pax_int(value, "gid")
            elif key == b"mtime":
                mtime = _pax_int(value.partition(b".")[0] or b"0", "mtime")
            elif key.startswith(b"SCHILY.xattr."):
                xname = key[len(b"SCHILY.xattr.") :]
                if len(value) > MAX_XATTR_VALUE or not xname:
                    raise LayerRefused("the blob's tar has an oversized or nameless xattr")
                try:
                    xattrs[xname.decode("ascii")] = value
                except UnicodeDecodeError:
                    raise LayerRefused(
                        "the blob's tar has an xattr name that is not ASCII"
                    ) from None
        pax = {}
        if typeflag not in (b"0", b"\0") and size:
            raise LayerRefused(
                f"the blob's tar gives a size to {_show(name)}, which is not a regular file"
            )
        yield _Entry(
            name,
            typeflag,
            _num(hdr[100:108], "mode") & 0o7777,
            uid,
            gid,
            size,
            mtime,
            linkname,
            _num(hdr[329:337], "devmajor"),
            _num(hdr[337:345], "devminor"),
            xattrs,
        )


def _pax_int(value: bytes, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise LayerRefused(f"the blob's tar has a pax {what} that is not a number") from None
    if n < 0 and what != "mtime":
        raise LayerRefused(f"the blob's tar has a negative pax {what}")
    return n


def _clean(name: bytes) -> bytes:
    """``name`` as a relative path without ``./`` or a trailing ``/`` (``b""``: the root)."""
    if len(name) > MAX_PATH:
        raise LayerRefused(f"the blob's tar has a path of {len(name)} bytes (at most {MAX_PATH})")
    if name.startswith(b"/"):
        raise LayerRefused(f"the blob's tar has an absolute path {_show(name.lstrip(b'/'))}")
    if b"\0" in name:
        raise LayerRefused("the blob's tar has a path with a NUL byte")
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise LayerRefused(f"the blob's tar has a path with '..': {_show(name)}")
    return b"/".join(parts)


_REC_KIND = {b"2": SYMLINK, b"3": CHR, b"4": BLK, b"6": FIFO}
_ACL_DEFAULT = "system.posix_acl_default"


def _guest(rel: bytes) -> str:
    return "/" + os.fsdecode(rel)


def _scan_key(rel: bytes) -> tuple[tuple[bytes, ...], bytes]:
    """Where :func:`.manifest.scan_tree` puts ``rel``: a directory's entries together, in
    name order, directories visited depth first in name order (the root first)."""
    parent, _, name = rel.rpartition(b"/")
    return (tuple(parent.split(b"/")) if parent else (), name)


def scan_order(path: str) -> tuple[tuple[bytes, ...], bytes]:
    """The sort key that puts manifest paths (``/etc/hostname``) in scan order."""
    return _scan_key(os.fsencode(path[1:]))


class _Record:
    """The manifest entries of what :func:`_extract` makes, from the tar's headers and the
    file bytes as they stream by; ``usable`` False when the tree holds what it does not
    record (then the caller scans)."""

    def __init__(self) -> None:
        self.made: dict[bytes, Entry] = {}
        self.links: dict[bytes, bytes] = {}  # a hard link's name -> the name of the content
        self.restat: set[bytes] = {b""}  # the root, and directories made for their children
        self.acl_dirs: set[bytes] = set()  # directories with a default ACL (their children
        # inherit it: what the kernel made of it is read back, as a scan reads it)
        self.usable = True

    def reads_back(self, rel: bytes) -> bool:
        """Whether :meth:`add` reads the metadata of ``rel`` (no xattrs of its own) back
        from what was made."""
        parent = rel.rpartition(b"/")[0]
        return self.usable and (parent in self.acl_dirs or bool(parent and parent in self.restat))

    def add(self, full: bytes, rel: bytes, ent: _Entry, kind: str, sha: str | None = None) -> None:
        if not self.usable:
            return
        if rel == b"":
            self.usable = not ent.xattrs  # the root: stat_entry at the end
            return
        rdev = None
        if kind in (CHR, BLK):
            rdev = os.makedev(ent.devmajor, ent.devminor)
            if kind == CHR and rdev == 0:  # a whiteout, though not named as one
                self.usable = False
                return
        if any(n.startswith(OVERLAY_XATTR_PREFIXES) for n in ent.xattrs):
            self.usable = False  # overlay's own markers
            return
        parent = rel.rpartition(b"/")[0]
        if ent.xattrs or parent in self.acl_dirs or (parent and parent in self.restat):
            # what the kernel kept of them (ACLs, capabilities) or added (an ACL inherited
            # from the directory's default ACL): read back, as a scan reads it
            entry = stat_entry(os.fsdecode(full), _guest(rel), hash_files=False)
            self.made[rel] = replace(entry, sha256=sha) if sha else entry
            if kind == DIR and any(n == _ACL_DEFAULT for n, _ in entry.xattrs):
                self.acl_dirs.add(rel)
            return
        self.made[rel] = Entry(
            path=_guest(rel),
            kind=kind,
            mode=0o777 if kind == SYMLINK else ent.mode,
            uid=ent.uid,
            gid=ent.gid,
            size=ent.size if kind == FILE else 0,
            sha256=sha,
            target=os.fsdecode(ent.linkname) if kind == SYMLINK else None,
            rdev=rdev,
        )

    def entries(self, root: bytes) -> list[Entry]:
        """Every entry as :func:`.manifest.scan_tree` of the tree gives it with
        ``skip_top=("lost+found",)``, in its order; [] when not ``usable``."""
        if not self.usable:
            return []
        made = dict(self.made)
        for rel in self.restat:
            if rel not in made:
                real = os.path.join(root, rel) if rel else root
                made[rel] = stat_entry(os.fsdecode(real), _guest(rel), hash_files=False)
        if made[b""].xattrs:
            return []
        groups: dict[bytes, list[bytes]] = {}
        for rel, first in self.links.items():
            made[rel] = replace(made[first], path=_guest(rel))
            groups.setdefault(first, [first]).append(rel)
        kept = {r: e for r, e in made.items() if r.split(b"/", 1)[0] != b"lost+found"}
        for names in groups.values():
            names = [n for n in names if n in kept]
            if len(names) > 1:
                link = _guest(min(names, key=_scan_key))
                for n in names:
                    kept[n] = replace(kept[n], link=link)
        return [kept[r] for r in sorted(kept, key=_scan_key)]


def read_blob(
    blob: Path,
    dest: Path,
    *,
    kind: str,
    expected_diff_id: str | None = None,
    expected_blob_digest: str | None = None,
    policy: Policy | None = None,
    manifest: list[Entry] | None = None,
    opener: Callable[[], ByteSource] | None = None,
    uncached: bool = False,
    recycle: Recycler | None = None,
) -> BlobInfo:
    """Extract the layer blob ``blob`` into ``dest`` (a new, empty directory the caller
    owns, removed by the caller on failure) in overlayfs format; its digests, checked against
    the expected ones given. One read of the file: its sha256 is computed as the decompressor
    reads it and checked when the extraction ends (a blob whose tar was refused is refused
    as damaged when its digest is wrong too), so the caller must use nothing of ``dest``
    before this returns. ``policy``: stricter than ``kind``'s, if given. Needs root
    (owners, whiteouts, ``trusted.*`` xattrs).

    ``manifest``: a list that gets the extracted tree's manifest entries (what
    :func:`.manifest.scan_tree` of the tree, or of its image, gives: the sha256 of each file
    computed from the bytes as they are extracted, not read again), appended only once both
    digests were found good; left empty when the tree holds what this reader does not
    record itself (whiteouts, opaque directories, overlay xattrs, xattrs on the root): the
    caller then scans the tree. An entry with xattrs, or in a directory with a default ACL
    (it inherits one), has its metadata read back from what was made.

    ``opener``: where the blob's bytes come from instead of the file ``blob`` (named in
    messages only): a reader of the blob as it arrives (:class:`unionimg.fs.follow.GrowingReader`),
    whose end is the end of the complete file.

    ``uncached``: write the data of files of :data:`UNCACHED_MIN` bytes or more with
    ``O_DIRECT`` (:class:`_Uncached`, most of them by a writing thread of its own) where
    ``dest``'s file system takes it: their bytes go to the disk instead of into new
    page-cache pages (an image the caller syncs and will not read back; ignored where
    ``O_DIRECT`` cannot be had). ``recycle``: with
    ``uncached``, told of every file whose bytes, or last bytes, went through the page
    cache, for the caller to drop them from it once synced (:class:`.pagecache.Recycler`)."""
    policy = policy or policy_for(kind)
    rec = _Record() if manifest is not None else None
    source: ByteSource = opener() if opener is not None else open(blob, "rb")  # noqa: SIM115
    with contextlib.closing(source) as fh:
        raw = _Hashed(fh)
        src = _Source(raw)
        try:
            try:
                with _Uncached.at(dest, recycle) if uncached else contextlib.nullcontext() as out:
                    count = _extract_all(src, dest, policy, rec, out)
            finally:
                src.close()  # before anything else reads the blob or the digests
        except (LayerRefused, StoreFull):
            if expected_blob_digest is not None:  # a damaged blob: say so, not what it broke
                _check_digest(blob, raw.rest(), expected_blob_digest)
            raise
        blob_digest = raw.rest()
    blob_size = raw.size
    if expected_blob_digest is not None:
        _check_digest(blob, blob_digest, expected_blob_digest)
    diff_id = "sha256:" + src.hash.hexdigest()
    if expected_diff_id is not None and diff_id != expected_diff_id:
        raise BlobDamaged(
            f"blob {blob.name} holds a tar of digest {diff_id}, not the expected layer "
            f"{expected_diff_id}: it was damaged or tampered with; fetch it again"
        )
    if rec is not None and manifest is not None:  # only now: both digests are good
        manifest.extend(rec.entries(os.fsencode(dest)))
    return BlobInfo(diff_id, blob_digest, blob_size, src.size, count)


def _check_digest(blob: Path, got: str, expected: str) -> None:
    if got != expected:
        raise BlobDamaged(
            f"blob {blob.name} has digest {got}, not the expected {expected}: "
            "it was damaged or tampered with; fetch it again"
        )


def _extract_all(
    src: _Source,
    dest: Path,
    policy: Policy,
    rec: _Record | None = None,
    out: _Uncached | None = None,
) -> int:
    """:func:`_extract` and the end of the blob checked; an OSError as one line."""
    try:
        count = _extract(src, os.fsencode(dest), policy, rec, out)
    except OSError as exc:  # say, a name longer than 255 bytes: one line, not a traceback
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull(
                f"no space left to extract a layer into {dest}; free space in the store and retry"
            ) from None
        where = (
            _show(os.fsencode(exc.filename).removeprefix(os.fsencode(dest) + b"/"))
            if (exc.filename)
            else ""
        )
        raise LayerRefused(
            f"the blob's tar cannot be extracted: {exc.strerror} {where}".rstrip()
        ) from None
    if src.drain():
        raise LayerRefused("the blob's tar has data after its end-of-archive blocks")
    return count


def file_digest(path: Path) -> str:
    """``sha256:HEX`` of a file, read in chunks."""
    return "sha256:" + sha256_file(path)


def _extract(
    src: _Source,
    root: bytes,
    policy: Policy,
    rec: _Record | None = None,
    out: _Uncached | None = None,
) -> int:
    kinds: dict[bytes, str] = {b"": "dir"}  # what this reader made: path -> dir/file/other
    explicit: set[bytes] = set()  # directories the tar itself named
    dir_times: list[tuple[bytes, int]] = []
    count = 0
    for ent in _entries(src):
        count += 1
        rel = _clean(ent.name)
        parent, _, base = rel.rpartition(b"/")
        for up in _ancestors(parent):
            made = kinds.get(up)
            if made is None:
                os.mkdir(os.path.join(root, up), 0o755)
                kinds[up] = "dir"
                if rec is not None:
                    rec.restat.add(up)
            elif made != "dir":
                raise LayerRefused(
                    f"the blob's tar has {_show(rel)} beneath {_show(up)}, which is not a "
                    "directory in it (a path through a symlink or a file)"
                )
        full = os.path.join(root, rel) if rel else root
        t = ent.typeflag
        sha: str | None = None
        if base.startswith(WH_PREFIX.encode()):
            if t not in (b"0", b"\0") or ent.size:
                raise LayerRefused(f"the blob's tar has a whiteout {_show(rel)} that is not empty")
            if base == WH_OPAQUE.encode():
                _once(kinds, rel, "marker")
                if rec is not None:
                    rec.usable = False  # an opaque directory: what a scan says of it varies
                os.setxattr(
                    os.path.join(root, parent) if parent else root,
                    OPAQUE_XATTR,
                    b"y",
                    follow_symlinks=False,
                )
                continue
            target = (
                os.path.join(parent, base[len(WH_PREFIX) :]) if parent else (base[len(WH_PREFIX) :])
            )
            if not base[len(WH_PREFIX) :] or base[len(WH_PREFIX) :] in (b".", b".."):
                raise LayerRefused(f"the blob's tar has a whiteout {_show(rel)} naming nothing")
            _once(kinds, target, "whiteout")
            if rec is not None:
                rec.usable = False  # a whiteout: a layer over others, never a whole tree
            os.mknod(os.path.join(root, target), stat.S_IFCHR | 0o000, os.makedev(0, 0))
            continue
        if t == b"5":
            if rel in explicit:
                raise LayerRefused(f"the blob's tar has {_show(rel)} twice")
            explicit.add(rel)
            if kinds.get(rel) != "dir":  # not the root, nor a parent made for an earlier entry
                _once(kinds, rel, "dir")
                os.mkdir(full, 0o700)
            _meta(full, ent, policy, rel, is_dir=True)
            dir_times.append((full, ent.mtime))
            if rec is not None:
                rec.add(full, rel, ent, DIR)
            continue
        if rel == b"":
            raise LayerRefused("the blob's tar has the root as something other than a directory")
        if t in (b"0", b"\0"):
            _once(kinds, rel, "file")
            _check_mode(ent, policy, rel, is_dir=False)  # before it is made (and handed over)
            if out is not None and out.takes(ent, rel, rec):
                sha = out.hand_over(src, full, ent, rel, hashed=rec is not None)
                if rec is not None:
                    rec.add(full, rel, ent, FILE, sha)
                continue  # its data, owner, mode and times: the writing thread's
            sha = _write_file(src, full, ent, rel, hashed=rec is not None, out=out)
            if rec is not None:
                rec.add(full, rel, ent, FILE, sha)
            continue  # its owner, xattrs, mode and times: set through its descriptor
        elif t == b"1":
            target = _clean(ent.linkname)
            if kinds.get(target) != "file":
                raise LayerRefused(
                    f"the blob's tar has a hard link {_show(rel)} to {_show(target)}, which is "
                    "not a regular file extracted before it"
                )
            _once(kinds, rel, "file")
            os.link(os.path.join(root, target), full, follow_symlinks=False)
            if rec is not None:
                rec.links[rel] = rec.links.get(target, target)
            continue  # the link shares its target's inode and metadata
        elif t == b"2":
            if not ent.linkname or len(ent.linkname) > MAX_PATH or b"\0" in ent.linkname:
                raise LayerRefused(f"the blob's tar has a symlink {_show(rel)} with a bad target")
            _once(kinds, rel, "symlink")
            os.symlink(ent.linkname, full)
        elif t in (b"3", b"4", b"6"):
            if not policy.devices and t != b"6":
                raise LayerRefused(
                    f"the blob's tar has a device node {_show(rel)}, which this kind of layer "
                    "may not hold (only whiteouts)"
                )
            _once(kinds, rel, "other")
            fmt = stat.S_IFCHR if t == b"3" else stat.S_IFBLK if t == b"4" else stat.S_IFIFO
            os.mknod(full, fmt | 0o600, os.makedev(ent.devmajor, ent.devminor))
        _meta(full, ent, policy, rel, is_dir=False)
        if rec is not None:
            rec.add(full, rel, ent, _REC_KIND[t])
    if out is not None:
        out.drain()  # every file handed over written, or its error raised
    for full, mtime in reversed(dir_times):
        os.utime(full, (mtime, mtime), follow_symlinks=False)
    return count


def _ancestors(parent: bytes) -> list[bytes]:
    if not parent:
        return []
    parts = parent.split(b"/")
    return [b"/".join(parts[: i + 1]) for i in range(len(parts))]


def _once(kinds: dict[bytes, str], rel: bytes, what: str) -> None:
    if rel in kinds:
        raise LayerRefused(f"the blob's tar has {_show(rel)} twice")
    kinds[rel] = what


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_file(
    src: _Source,
    full: bytes,
    ent: _Entry,
    rel: bytes,
    *,
    hashed: bool = False,
    out: _Uncached | None = None,
) -> str | None:
    """Write the file's bytes from the tar, then its owner, xattrs, mode and times through
    its descriptor (:func:`_meta_fd`); their sha256 (hex) with ``hashed``. With ``out``, a
    file of :data:`UNCACHED_MIN` bytes or more is written through it."""
    size = ent.size
    direct = out if out is not None and size >= UNCACHED_MIN else None
    fd = os.open(full, _NEW_FILE | (os.O_DIRECT if direct is not None else 0), 0o600)
    sha = hashlib.sha256() if hashed else None
    try:
        _put_data(fd, _read_parts(src, size, sha), size, rel, direct.buf if direct else None)
        _meta_fd(fd, ent, rel)
    finally:
        os.close(fd)
    if out is not None and out.recycle is not None and size and (not direct or size % ALIGN):
        out.recycle.wrote(full)  # bytes of it in the page cache
    if size % BLOCK:
        src.read_exact(-size % BLOCK)
    return sha.hexdigest() if sha is not None else None


_ZERO_CHUNK = bytes(CHUNK)


def _zeros(data: bytes) -> bool:
    """Whether ``data`` is all zero bytes (a compare with zeros: stops at the first other
    byte, so a chunk of data costs next to nothing)."""
    if len(data) == CHUNK:
        return data == _ZERO_CHUNK
    return data == bytes(len(data))


def _write_all(fd: int, data: bytes | memoryview, rel: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as exc:
            _no_space(exc, rel)
            raise
        view = view[n:]


def _no_space(exc: OSError, rel: bytes) -> None:
    """Raise StoreFull for a write that failed for want of space."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StoreFull(
            f"no space left to extract {_show(rel)} of a layer; free space in the store and retry"
        ) from None


class _Uncached:
    """File data written with ``O_DIRECT``, from one page-aligned buffer straight to the
    file's blocks: no page-cache page is taken for it. A layer's image is written once,
    synced, and read by a guest, not by the host; filling a new page-cache page costs the
    host more than moving the bytes (in a VM whose memory its hypervisor hands out on first
    touch, ~10x more: the Debian base extracted in 3.0-3.75 s this way against 2.6-8.1 s
    through the page cache, 9 ad-hoc runs each on this machine kind, ``docs/scale.md``).
    Each write is a whole :data:`CHUNK` at an offset that is a multiple of it; a file's last
    bytes short of :data:`ALIGN`, and the rest of a write the file system cut short, go
    through the page cache (padding the last block instead made the truncation to the
    file's size read that block back from the disk, file by file).

    Each such write waits for the disk; the files up to :data:`HAND_OVER_MAX` are written
    by a thread of their own (:meth:`hand_over`), so those waits overlap the extraction of
    the files after them (the Debian base into its image: 1.58-1.68 s against 2.1-2.25 s
    written in the extracting thread, three runs each, ad hoc on this machine kind)."""

    def __init__(self, recycle: Recycler | None = None) -> None:
        self.buf = mmap.mmap(-1, CHUNK)  # the extraction thread's (files it writes itself)
        self.recycle = recycle  # told of the files written (partly) through the page cache
        self._jobs: queue.SimpleQueue[_Handed | None] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._waiting = 0  # bytes handed over, not yet written
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    @contextlib.contextmanager
    def at(cls, dest: Path, recycle: Recycler | None = None) -> Iterator[_Uncached | None]:
        """One for files made under ``dest``, or None where its file system refuses
        ``O_DIRECT`` (asked of an unnamed file, ``O_TMPFILE``: nothing to remove)."""
        try:
            probe = os.open(dest, os.O_TMPFILE | os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.debug("no O_DIRECT under %s: %s", dest, exc.strerror)
            yield None
            return
        os.close(probe)
        out = cls(recycle)
        try:
            yield out
        finally:
            out._stop()
            out.buf.close()

    # -- files handed over to the writing thread
    def takes(self, ent: _Entry, rel: bytes, rec: _Record | None) -> bool:
        """Whether the file of ``ent`` is handed over (:meth:`hand_over`): of
        :data:`UNCACHED_MIN` to :data:`HAND_OVER_MAX` bytes, no xattrs, and nothing of its
        metadata read back for the manifest (which needs it made first)."""
        return (
            UNCACHED_MIN <= ent.size <= HAND_OVER_MAX
            and not ent.xattrs
            and (rec is None or not rec.reads_back(rel))
        )

    def hand_over(
        self, src: _Source, full: bytes, ent: _Entry, rel: bytes, *, hashed: bool
    ) -> str | None:
        """Create the file ``full`` (here: a name refused, or taken, is this thread's
        error), read its bytes from the tar, and hand them with the open file to the
        writing thread, which writes them with O_DIRECT and sets the owner, mode and times
        on the descriptor (never by name) while this thread goes on with the tar: the
        writes' waits for the disk overlap the extraction. At most
        :data:`HAND_OVER_BYTES` wait at a time. An error of the writing thread is raised
        by a later call, or by :meth:`drain`. The sha256 (hex) of the bytes with
        ``hashed``."""
        self._raise()
        size = ent.size
        fd = os.open(full, _NEW_FILE | os.O_DIRECT, 0o600)
        try:
            sha = hashlib.sha256() if hashed else None
            parts = list(_read_parts(src, size, sha))
            if size % BLOCK:
                src.read_exact(-size % BLOCK)
            with self._room:
                while self._waiting and self._waiting + size > HAND_OVER_BYTES:
                    self._room.wait()
                self._waiting += size
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="unionimg-write", daemon=True
                )
                self._thread.start()
        except BaseException:
            os.close(fd)
            raise
        self._jobs.put(_Handed(fd, parts, ent, rel, full))
        return sha.hexdigest() if sha is not None else None

    def drain(self) -> None:
        """Wait until every file handed over is written; its first error raised."""
        with self._room:
            while self._waiting:
                self._room.wait()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, _Stopped()
            raise error

    def _run(self) -> None:
        buf: mmap.mmap | None = None
        try:
            buf = mmap.mmap(-1, CHUNK)
        except OSError as exc:  # every file handed over is closed all the same
            self._error = self._error or exc
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None and buf is not None:
                    _write_handed(buf, job)
                    if self.recycle is not None and job.ent.size % ALIGN:
                        self.recycle.wrote(job.full)  # its last bytes: in the page cache
            except BaseException as exc:
                if self._error is None:
                    self._error = exc
            finally:
                os.close(job.fd)
                with self._room:
                    self._waiting -= job.ent.size
                    self._room.notify_all()
        if buf is not None:
            buf.close()

    def _stop(self) -> None:
        """End the writing thread: what it has not written yet is not written (the
        extraction failed), every descriptor closed."""
        if self._thread is None:
            return
        if self._error is None:
            self._error = _Stopped()
        self._jobs.put(None)
        self._thread.join()


class _Stopped(Exception):
    """The writing thread's error was raised already, or the extraction stopped."""


@dataclass(frozen=True)
class _Handed:
    fd: int
    parts: list[bytes]
    ent: _Entry
    rel: bytes
    full: bytes


def _write_handed(buf: mmap.mmap, job: _Handed) -> None:
    """The writing thread's part of a file handed over: its bytes (holes left holes),
    then owner, mode and times, all through its descriptor."""
    fd, ent = job.fd, job.ent
    _put_data(fd, job.parts, ent.size, job.rel, buf)
    _meta_fd(fd, ent, job.rel)


def _read_parts(src: _Source, size: int, sha: hashlib._Hash | None) -> Iterator[bytes]:
    """A file's ``size`` bytes from the tar, a chunk at a time, hashed into ``sha``."""
    left = size
    while left:
        data = src.read_exact(min(CHUNK, left))
        if sha is not None:
            sha.update(data)
        yield data
        left -= len(data)


def _put_data(
    fd: int, parts: Iterable[bytes], size: int, rel: bytes, buf: mmap.mmap | None
) -> None:
    """A new file's ``size`` bytes written from ``parts``: a chunk of zeros left a hole (a
    guest's sparse file stays sparse), the others with O_DIRECT through ``buf`` or, without
    one, through the page cache; the size set where the file ends in a hole."""
    hole = False
    for data in parts:
        hole = _zeros(data)
        if hole:
            os.lseek(fd, len(data), os.SEEK_CUR)
        elif buf is not None:
            _direct(buf, fd, data, rel)
        else:
            _write_all(fd, data, rel)
    if hole:  # each write set the size so far
        os.ftruncate(fd, size)


def _direct(buf: mmap.mmap, fd: int, data: bytes, rel: bytes) -> None:
    """``data`` written at ``fd``'s offset through the aligned ``buf`` with O_DIRECT (what
    is off the alignment through the page cache)."""
    n = len(data)
    aligned = n - n % ALIGN
    buf[:n] = data
    with memoryview(buf) as whole, whole[:n] as view:
        done = 0
        if aligned:
            try:
                done = os.write(fd, view[:aligned])
            except OSError as exc:
                _no_space(exc, rel)
                raise
        if done < n:  # the file's last bytes, or a write cut short: the rest cached
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _write_all(fd, view[done:], rel)


def _check_mode(ent: _Entry, policy: Policy, rel: bytes, *, is_dir: bool) -> None:
    if ent.mode & (stat.S_ISUID | stat.S_ISGID) and not is_dir and not policy.setuid:
        raise LayerRefused(
            f"the blob's tar has a setuid or setgid file {_show(rel)}, which this kind of "
            "layer may not hold"
        )


def _xattrs_of(ent: _Entry, rel: bytes) -> list[tuple[str, bytes]]:
    """The entry's xattrs, in name order; overlayfs's own refused."""
    for name in ent.xattrs:
        if name.startswith(("trusted.overlay.", "user.overlay.")):
            raise LayerRefused(
                f"the blob's tar sets overlayfs's own {name} on {_show(rel)}; a layer says "
                "whiteouts and opaque directories only by .wh. names"
            )
    return sorted(ent.xattrs.items())


def _meta_fd(fd: int, ent: _Entry, rel: bytes) -> None:
    """A regular file's owner, xattrs, mode and times, through its open descriptor (no
    name looked up again; its mode was checked before it was made)."""
    os.chown(fd, ent.uid, ent.gid)
    for name, value in _xattrs_of(ent, rel):
        os.setxattr(fd, name, value)
    os.chmod(fd, ent.mode)  # after chown, which clears setuid and setgid
    os.utime(fd, (ent.mtime, ent.mtime))


def _meta(full: bytes, ent: _Entry, policy: Policy, rel: bytes, *, is_dir: bool) -> None:
    mode = ent.mode
    _check_mode(ent, policy, rel, is_dir=is_dir)
    os.chown(full, ent.uid, ent.gid, follow_symlinks=False)
    for name, value in _xattrs_of(ent, rel):
        os.setxattr(full, name, value, follow_symlinks=False)
    if ent.typeflag != b"2":
        os.chmod(full, mode)
        if not is_dir:
            os.utime(full, (ent.mtime, ent.mtime), follow_symlinks=False)
    else:
        os.utime(full, (ent.mtime, ent.mtime), follow_symlinks=False)


def digest_hex(diff_id: str) -> str:
    """The hex part of ``sha256:HEX`` (checked: 64 lowercase hex digits)."""
    algo, _, hexpart = diff_id.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"not a sha256 digest: {diff_id!r}")
    return hexpart


__all__ = [
    "KINDS",
    "ZSTD_LEVEL",
    "BlobDamaged",
    "BlobInfo",
    "LayerRefused",
    "Policy",
    "digest_hex",
    "file_digest",
    "policy_for",
    "read_blob",
    "scan_order",
    "write_blob",
]
