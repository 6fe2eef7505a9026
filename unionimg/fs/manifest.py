"""Scanning trees into :class:`~unionimg.entries.Entry` records, digests, and the SQLite manifests.

An :class:`Entry` is one path as the guest sees it (``/etc/hostname``) with everything a
filesystem keeps that matters for an OS image: type, full mode (setuid etc.), owner, size,
sha256 of the content, symlink target, device numbers, xattrs, hardlink group. Mercurial
keeps only content, the exec bit and symlinks, so this is also the *sidecar* committed next
to the files (as text, :func:`sidecar_text`).

A base generation's manifest is stored as SQLite (``manifest.sqlite``) keyed by path, so an
instance's upper layer can be checked against the base with indexed lookups: cost grows with
the upper layer, not with the base.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

from unionimg.entries import (
    BLK,
    CHR,
    DIR,
    FIFO,
    FILE,
    OUT_REPOSITORY,
    OVERLAY_XATTR_PREFIXES,
    SOCK,
    SYMLINK,
    WHITEOUT,
    Change,
    Entry,
    hg_unfit,
    join,
)


def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    if stat.S_ISREG(m):
        return FILE
    if stat.S_ISDIR(m):
        return DIR
    if stat.S_ISLNK(m):
        return SYMLINK
    if stat.S_ISCHR(m):
        return WHITEOUT if st.st_rdev == 0 else CHR
    if stat.S_ISBLK(m):
        return BLK
    if stat.S_ISFIFO(m):
        return FIFO
    return SOCK


def _split_xattrs(
    names: Iterable[str], get: Callable[[str], bytes]
) -> tuple[dict[str, bytes], tuple[tuple[str, str], ...]]:
    """(overlay's own xattrs, the rest as sorted (name, hex) pairs)."""
    overlay: dict[str, bytes] = {}
    rest = []
    for name in names:
        try:
            value = get(name)
        except OSError:
            continue
        if name.startswith(OVERLAY_XATTR_PREFIXES):
            overlay[name.split(".", 2)[-1] if name.count(".") >= 2 else name] = value
        else:
            rest.append((name, value.hex()))
    return overlay, tuple(sorted(rest))


def _xattrs_at(dfd: int, name: str) -> tuple[dict[str, bytes], tuple[tuple[str, str], ...]]:
    """The xattrs of ``name`` in the directory ``dfd``, never following a symlink. xattr
    calls take no dir_fd: the path goes through the directory's descriptor under
    /proc/self/fd, so it stays short however deep the directory lies."""
    proc = f"/proc/self/fd/{dfd}/".encode() + os.fsencode(name)
    try:
        names = os.listxattr(proc, follow_symlinks=False)
    except OSError:
        return {}, ()
    return _split_xattrs(names, lambda n: os.getxattr(proc, n, follow_symlinks=False))


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# The digest of a file kept out of Mercurial: sha256 over the file's size (8 bytes, big
# endian) followed by the sha256 of each 4 MiB block (the last one short). Blocks that lie
# in a hole of a sparse file are not read (their digest is the digest of zeros), so the
# cost follows the data the file really holds, not its apparent size: a guest's 16 TiB
# sparse file costs seconds, not hours. Memory: one block.
DIGEST_BLOCK = 4 << 20
DIGEST_KIND = "sha256-4m"
_ZERO_BLOCK = hashlib.sha256(bytes(DIGEST_BLOCK)).digest()


def sparse_digest(fd: int, size: int) -> str:
    """``DIGEST_KIND:hex`` of the first ``size`` bytes of the open file ``fd``."""
    outer = hashlib.sha256(size.to_bytes(8, "big"))
    pos = 0
    data_at = 0  # the first offset >= pos that may hold data
    while pos < size:
        if data_at <= pos:
            try:
                data_at = min(os.lseek(fd, pos, os.SEEK_DATA), size)
            except OSError as exc:  # ENXIO: only a hole is left; else no SEEK_DATA: read
                data_at = size if exc.errno == errno.ENXIO else pos
        if data_at >= pos + DIGEST_BLOCK:  # whole blocks of hole
            count = (min(data_at, size) - pos) // DIGEST_BLOCK
            while count:
                batch = min(count, 1 << 16)
                outer.update(_ZERO_BLOCK * batch)
                count -= batch
                pos += batch * DIGEST_BLOCK
            continue
        length = min(DIGEST_BLOCK, size - pos)
        if data_at >= pos + length:  # the short last block, all hole
            outer.update(hashlib.sha256(bytes(length)).digest())
        else:
            block = os.pread(fd, length, pos)
            if len(block) < length:  # shrank meanwhile: what is gone reads as zeros
                block += bytes(length - len(block))
            outer.update(hashlib.sha256(block).digest())
        pos += length
    return f"{DIGEST_KIND}:{outer.hexdigest()}"


# -- scanning -----------------------------------------------------------------------------
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_FDS_KEPT = 32  # open directory descriptors kept on the way down a deep tree


def _entry_at(
    dfd: int,
    name: str,
    guest_path: str,
    st: os.stat_result,
    *,
    hash_files: bool,
    links: dict[tuple[int, int], str] | None,
    outside: str | None = None,
    digest: bool = False,
) -> Entry:
    """The :class:`Entry` of ``name`` in the directory ``dfd`` (lstat ``st``), shown to the
    guest as ``guest_path``; ``digest``: a regular file gets :func:`sparse_digest`."""
    kind = _kind(st)
    overlay, xattrs = _xattrs_at(dfd, name)
    sha = target = dig = None
    rdev = None
    if kind == FILE:
        if overlay.get("whiteout") is not None and st.st_size == 0:
            kind = WHITEOUT
        elif hash_files or digest:
            fd = os.open(name, _FILE_OPEN, dir_fd=dfd)
            with os.fdopen(fd, "rb", buffering=0) as fh:
                if digest:
                    dig = sparse_digest(fd, st.st_size)
                    os.lseek(fd, 0, os.SEEK_SET)
                if hash_files:
                    sha = hashlib.file_digest(fh, "sha256").hexdigest()
    elif kind == SYMLINK:
        target = os.fsdecode(os.readlink(name, dir_fd=dfd))
    elif kind in (CHR, BLK):
        rdev = st.st_rdev
    link = None
    if links is not None and kind == FILE and st.st_nlink > 1:
        link = links.setdefault((st.st_dev, st.st_ino), guest_path)
    redirect = overlay.get("redirect")
    return Entry(
        path=guest_path,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == FILE else 0,
        sha256=sha,
        target=target,
        rdev=rdev,
        xattrs=xattrs,
        link=link,
        opaque=overlay.get("opaque") in (b"y", b"x"),
        redirect=redirect.decode("utf-8", "surrogateescape") if redirect else None,
        metacopy="metacopy" in overlay,
        outside=outside,
        digest=dig,
    )


def stat_entry(
    real: str,
    guest_path: str,
    st: os.stat_result | None = None,
    *,
    hash_files: bool = True,
    links: dict[tuple[int, int], str] | None = None,
) -> Entry:
    """The :class:`Entry` of the file at host path ``real`` shown to the guest as
    ``guest_path`` (the last component is never followed)."""
    head, tail = os.path.split(os.fspath(real))
    dfd = os.open(head or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if st is None:
            st = os.stat(tail, dir_fd=dfd, follow_symlinks=False)
        return _entry_at(dfd, tail, guest_path, st, hash_files=hash_files, links=links)
    finally:
        os.close(dfd)


@dataclass
class _Frame:
    """A directory on the way down: its descriptor (None while a deep descendant holds
    the walk), identity, paths, why it is outside Mercurial, and the subdirectories left."""

    fd: int | None
    ident: tuple[int, int]
    guest: str
    rel: bytes
    outside: str | None
    index: int  # of its own entry in the output
    todo: list[tuple[str, str, bytes, str | None, int]]  # (name, guest, rel, outside, index)


def scan_tree(
    root: str | os.PathLike[str],
    *,
    hash_files: bool = True,
    skip_top: Iterable[str] = (),
    hg_prefix: str | None = None,
    digests: bool = True,
) -> list[Entry]:
    """Every path below ``root`` (and ``/`` itself), parents before children.

    ``skip_top`` names top-level entries to leave out (e.g. ``.hg`` of a working copy).
    A file is marked as hardlinked (``link``) only when two of its names are in the tree:
    links from outside it (say, a saved copy of an upper layer) are not the tree's concern.

    With ``hg_prefix`` (the tree's path inside a Mercurial working copy, e.g. ``upper``),
    entries Mercurial cannot hold get ``outside`` (:func:`hg_unfit`; everything below such
    a directory too) and, with ``digests``, their regular files a :func:`sparse_digest`.

    The walk goes by directory descriptors, never by long paths, and never follows a
    symlink (``root`` itself included): any depth works, with a bounded number of open
    descriptors, in bounded memory per directory.
    """
    skip = set(skip_top)
    links: dict[tuple[int, int], str] = {}
    names: dict[tuple[int, int], int] = {}
    prefix = os.fsencode(hg_prefix) if hg_prefix is not None else None
    top = os.open(root, _DIR_OPEN)
    head, tail = os.path.split(os.fspath(root).rstrip("/") or "/")
    try:
        top_st = os.fstat(top)
        pfd = os.open(head or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            first = _entry_at(pfd, tail, "/", top_st, hash_files=False, links=None)
        finally:
            os.close(pfd)
    except BaseException:
        os.close(top)
        raise
    out = [first]
    frames = [_Frame(top, (top_st.st_dev, top_st.st_ino), "/", prefix or b"", None, 0, [])]
    try:
        _list_dir(frames[-1], out, skip, prefix, hash_files, digests, links, names)
        while frames:
            frame = frames[-1]
            if not frame.todo:
                frames.pop()
                if frames and frames[-1].fd is None:
                    assert frame.fd is not None
                    frames[-1].fd = _reopen_parent(frame.fd, frames[-1].ident)
                if frame.fd is not None:
                    os.close(frame.fd)
                continue
            name, guest, rel, outside, index = frame.todo.pop()
            assert frame.fd is not None
            fd = os.open(name, _DIR_OPEN, dir_fd=frame.fd)
            st = os.fstat(fd)
            child = _Frame(fd, (st.st_dev, st.st_ino), guest, rel, outside, index, [])
            if len(frames) >= _FDS_KEPT:
                os.close(frame.fd)
                frame.fd = None
            frames.append(child)
            _list_dir(child, out, set(), prefix, hash_files, digests, links, names)
    finally:
        for frame in frames:
            if frame.fd is not None:
                os.close(frame.fd)
    if links:
        shared = {first for key, first in links.items() if names.get(key, 0) > 1}
        out = [e if e.link is None or e.link in shared else replace(e, link=None) for e in out]
    return out


def _reopen_parent(fd: int, ident: tuple[int, int]) -> int:
    parent = os.open("..", _DIR_OPEN, dir_fd=fd)
    st = os.fstat(parent)
    if (st.st_dev, st.st_ino) != ident:
        os.close(parent)
        raise OSError(errno.ESTALE, "a directory moved while it was scanned")
    return parent


def _list_dir(
    frame: _Frame,
    out: list[Entry],
    skip: set[str],
    prefix: bytes | None,
    hash_files: bool,
    digests: bool,
    links: dict[tuple[int, int], str],
    names: dict[tuple[int, int], int],
) -> None:
    """Append the entries of ``frame``'s directory to ``out`` (sorted by name) and queue
    its subdirectories."""
    assert frame.fd is not None
    dfd = frame.fd
    with os.scandir(dfd) as it:
        children = sorted(
            ((c.name, c.stat(follow_symlinks=False)) for c in it if c.name not in skip),
            key=lambda c: os.fsencode(c[0]),
        )
    outside = frame.outside
    nested = any(n == ".hg" and stat.S_ISDIR(s.st_mode) for n, s in children)
    if prefix is not None and outside is None and nested:
        outside = frame.outside = OUT_REPOSITORY
        out[frame.index] = replace(out[frame.index], outside=outside)
    subdirs = []
    for name, st in children:
        guest = join(frame.guest, name)
        bname = os.fsencode(name)
        rel = frame.rel + b"/" + bname
        why = outside
        if prefix is not None and why is None:
            why = hg_unfit(rel, bname, _kind(st), st.st_size)
        entry = _entry_at(
            dfd,
            name,
            guest,
            st,
            hash_files=hash_files,
            links=links,
            outside=why,
            digest=digests and why is not None,
        )
        if entry.link is not None:
            key = (st.st_dev, st.st_ino)
            names[key] = names.get(key, 0) + 1
        out.append(entry)
        if entry.kind == DIR:
            subdirs.append((name, guest, rel, why, len(out) - 1))
    frame.todo = subdirs[::-1]  # popped from the end: visited in name order


# -- SQLite manifests ---------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE entries (
    path BLOB PRIMARY KEY, kind TEXT NOT NULL, mode INTEGER NOT NULL, uid INTEGER NOT NULL,
    gid INTEGER NOT NULL, size INTEGER NOT NULL, sha256 TEXT, target BLOB, rdev INTEGER,
    xattrs TEXT, link BLOB
) WITHOUT ROWID;
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLS = "path, kind, mode, uid, gid, size, sha256, target, rdev, xattrs, link"


def _enc(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _dec(raw: bytes | None) -> str | None:
    return None if raw is None else os.fsdecode(raw)


def _row(e: Entry) -> tuple[object, ...]:
    return (
        _enc(e.path),
        e.kind,
        e.mode,
        e.uid,
        e.gid,
        e.size,
        e.sha256,
        _enc(e.target),
        e.rdev,
        json.dumps(e.xattrs) if e.xattrs else None,
        _enc(e.link),
    )


def _entry(row: tuple[object, ...]) -> Entry:
    # rows come from manifests this module wrote (_row): the casts only name their types
    path, kind, mode, uid, gid, size, sha, target, rdev, xattrs, link = row
    return Entry(
        path=cast(str, _dec(cast(bytes, path))),
        kind=cast(str, kind),
        mode=cast(int, mode),
        uid=cast(int, uid),
        gid=cast(int, gid),
        size=cast(int, size),
        sha256=cast("str | None", sha),
        target=_dec(cast("bytes | None", target)),
        rdev=cast("int | None", rdev),
        xattrs=_xattrs(cast("str | None", xattrs)),
        link=_dec(cast("bytes | None", link)),
    )


def _xattrs(text: str | None) -> tuple[tuple[str, str], ...]:
    return tuple((str(n), str(v)) for n, v in json.loads(text)) if text else ()


def write_manifest(
    entries: Iterable[Entry], db_path: Path, info: dict[str, str] | None = None
) -> int:
    """Write entries to a new SQLite manifest; returns how many."""
    if db_path.exists():
        db_path.unlink()
    conn = sqlite3.connect(db_path)
    try:
        conn.executescript(_SCHEMA)
        count = 0
        batch: list[tuple[object, ...]] = []
        for entry in entries:
            batch.append(_row(entry))
            if len(batch) >= 5000:
                conn.executemany(
                    f"INSERT INTO entries ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", batch
                )
                count += len(batch)
                batch.clear()
        conn.executemany(f"INSERT INTO entries ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", batch)
        count += len(batch)
        conn.executemany("INSERT INTO info VALUES (?, ?)", sorted((info or {}).items()))
        conn.commit()
    finally:
        conn.close()
    os.chmod(db_path, 0o600)
    return count


class Manifest:
    """Read-only, indexed view of a stored manifest."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path
        self._conn = sqlite3.connect(
            f"file:{db_path}?mode=ro&immutable=1", uri=True, check_same_thread=False
        )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str) -> Entry | None:
        row = self._conn.execute(
            f"SELECT {_COLS} FROM entries WHERE path = ?", (_enc(path),)
        ).fetchone()
        return _entry(row) if row else None

    def children(self, directory: str, *, limit: int | None = None) -> list[Entry]:
        """Every entry strictly below ``directory`` (all depths), in path order."""
        if directory == "/":
            lo, hi = b"/", b"0"
            sql = f"SELECT {_COLS} FROM entries WHERE path > ? AND path < ? ORDER BY path"
        else:
            base = os.fsencode(directory)
            lo, hi = base + b"/", base + b"0"
            sql = f"SELECT {_COLS} FROM entries WHERE path >= ? AND path < ? ORDER BY path"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_entry(r) for r in self._conn.execute(sql, (lo, hi))]

    def __iter__(self) -> Iterator[Entry]:
        for row in self._conn.execute(f"SELECT {_COLS} FROM entries ORDER BY path"):
            yield _entry(row)

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def info(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM info").fetchall())


def diff_manifests(old_db: Path, new_db: Path) -> list[Change]:
    """Every path whose entry differs between two stored manifests, in path order.

    Runs inside SQLite (one pass over both indexes); this is the base delta that reconcile
    computes once per pair of generations.
    """
    conn = sqlite3.connect(f"file:{new_db}?mode=ro&immutable=1", uri=True)
    try:
        conn.execute("ATTACH DATABASE ? AS old", (f"file:{old_db}?mode=ro&immutable=1",))
        cols_n = ", ".join(f"n.{c.strip()}" for c in _COLS.split(","))
        cols_o = ", ".join(f"o.{c.strip()}" for c in _COLS.split(","))
        differs = (
            "n.kind IS NOT o.kind OR n.mode IS NOT o.mode OR n.uid IS NOT o.uid OR "
            "n.gid IS NOT o.gid OR n.sha256 IS NOT o.sha256 OR n.target IS NOT o.target "
            "OR n.rdev IS NOT o.rdev OR n.xattrs IS NOT o.xattrs"
        )
        rows = conn.execute(
            f"SELECT {cols_o}, {cols_n} FROM old.entries o LEFT JOIN main.entries n "
            f"ON n.path = o.path WHERE n.path IS NULL OR {differs} "
            f"UNION ALL SELECT {cols_o}, {cols_n} FROM main.entries n "
            "LEFT JOIN old.entries o ON o.path = n.path WHERE o.path IS NULL"
        ).fetchall()
    finally:
        conn.close()
    width = len(_COLS.split(","))
    changes = []
    for row in rows:
        old = _entry(row[:width]) if row[0] is not None else None
        new = _entry(row[width:]) if row[width] is not None else None
        either = old or new
        assert either is not None  # a row has an old or a new side (the SQL's two halves)
        changes.append(Change(either.path, old, new))
    changes.sort(key=lambda c: os.fsencode(c.path))
    return changes
