"""Trees sent by content: scanned into :class:`TreeEntry` manifests on the sender, made again
from a checked manifest and verified contents on the receiver.

The sender's tree is the VM's U file system mounted read-only (the VM stopped): its walk
never follows a symlink, opens files with ``O_NOFOLLOW``, and hashes every file (the U's own
sidecar manifest is guest data and is never trusted for a hash). The receiver makes the tree
below a staging directory from a manifest :func:`unionimg.migrate.plan.check_entries`
accepted (every parent a directory this build made: nothing is written through a symlink),
copies each file's content from a source whose bytes are hashed while they are copied, then
scans what it made and compares it entry by entry (:func:`verify`): content by sha256, type,
mode, owner, mtime, target, device number, xattrs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from unionimg.migrate.plan import MAX_PATH, Refused
from unionimg.store.migrate_records import TreeEntry

CHUNK = 1 << 20
_ZERO = bytes(64 << 10)
_FILE_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode):
        return "chr"
    if stat.S_ISBLK(mode):
        return "blk"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "sock"


def _xattrs(path: bytes) -> tuple[tuple[str, str], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for name in names:
        out.append((name, os.getxattr(path, name, follow_symlinks=False).hex()))
    return tuple(sorted(out))


def hash_file(path: bytes) -> str:
    fd = os.open(path, _FILE_OPEN)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def scan(
    root: Path, *, skip_top: tuple[str, ...] = (), max_bytes: int | None = None
) -> list[TreeEntry]:
    """Every path below ``root`` (not ``root`` itself), parents before children, files
    hashed; ``skip_top``: top-level names left out (``lost+found``). Iterative (a guest's
    deep tree costs no recursion); a path longer than the manifest allows is refused, and
    so are files holding more than ``max_bytes`` together (checked before each is read: a
    guest's huge sparse file is never read whole)."""
    out: list[TreeEntry] = []
    total = 0
    links: dict[tuple[int, int], str] = {}
    base = os.fsencode(root)
    todo: list[bytes] = [b""]
    while todo:
        rel = todo.pop()
        full = os.path.join(base, rel) if rel else base
        subdirs = []
        for name in sorted(os.listdir(full)):
            if not rel and os.fsdecode(name) in skip_top:
                continue
            crel = os.path.join(rel, name) if rel else name
            if len(crel) > MAX_PATH:
                raise Refused(
                    f"path {os.fsdecode(crel[:80])!r}... is longer than {MAX_PATH} bytes; "
                    "it cannot be migrated: shorten it in the VM"
                )
            cpath = os.path.join(base, crel)
            st = os.lstat(cpath)
            kind = _kind(st.st_mode)
            path = os.fsdecode(crel)
            sha = target = link = None
            rdev = None
            size = 0
            if kind == "file":
                size = st.st_size
                if st.st_nlink > 1:
                    first = links.setdefault((st.st_dev, st.st_ino), path)
                    link = first if first != path else None
                if link is None:
                    total += size
                if max_bytes is not None and total > max_bytes:
                    raise Refused(
                        f"the files hold more than {max_bytes} bytes (sparse files count "
                        f"whole), more than the VM's U size; at {path[:80]!r}: remove or "
                        "shrink the largest, then migrate"
                    )
                sha = hash_file(cpath)
            elif kind == "symlink":
                target = os.fsdecode(os.readlink(cpath))
            elif kind in ("chr", "blk"):
                rdev = st.st_rdev
            out.append(
                TreeEntry(
                    path=path,
                    kind=kind,
                    mode=stat.S_IMODE(st.st_mode),
                    uid=st.st_uid,
                    gid=st.st_gid,
                    mtime_ns=st.st_mtime_ns,
                    size=size,
                    sha256=sha,
                    target=target,
                    rdev=rdev,
                    xattrs=_xattrs(cpath),
                    link=link,
                )
            )
            if kind == "dir":
                subdirs.append(crel)
        todo.extend(reversed(subdirs))  # depth first, in name order
    return out


def open_file(root: Path, path: str) -> BinaryIO:
    """``root/path`` opened for reading without following a symlink at its end (the tree
    is a read-only mount whose directories the scan found to be directories)."""
    fd = os.open(os.path.join(os.fsencode(root), os.fsencode(path)), _FILE_OPEN)
    return os.fdopen(fd, "rb", buffering=0)


Source = Callable[[str], Iterator[bytes]]
"""``source(sha256)``: the content's bytes in chunks (the builder hashes them)."""


def _write_sparse(fd: int, chunks: Iterator[bytes], size: int, sha: str, path: str) -> None:
    h = hashlib.sha256()
    pos = 0
    for chunk in chunks:
        h.update(chunk)
        if pos + len(chunk) > size:
            raise Refused(f"content {sha[:16]} for {path!r} is longer than announced")
        view = memoryview(chunk)
        for off in range(0, len(chunk), len(_ZERO)):
            piece = view[off : off + len(_ZERO)]
            if piece == _ZERO[: len(piece)]:
                continue  # a hole: the file stays sparse where the content is zeros
            os.pwrite(fd, piece, pos + off)
        pos += len(chunk)
    if pos != size or h.hexdigest() != sha:
        raise Refused(
            f"migration refused: the content for {path!r} does not match its sha256 "
            f"{sha[:16]}...; nothing was made"
        )
    os.ftruncate(fd, size)


def build(dest: Path, entries: list[TreeEntry], source: Source) -> None:
    """Make ``entries`` (checked by :func:`~unionimg.migrate.plan.check_entries`) below the
    empty directory ``dest``; contents from ``source``, each hashed as it is written."""
    base = os.fsencode(dest)
    for e in entries:
        full = os.path.join(base, os.fsencode(e.path))
        if e.kind == "dir":
            os.mkdir(full, 0o700)
        elif e.kind == "file" and e.link is not None:
            os.link(os.path.join(base, os.fsencode(e.link)), full)
            continue
        elif e.kind == "file":
            assert e.sha256 is not None
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                _write_sparse(fd, source(e.sha256), e.size, e.sha256, e.path)
            finally:
                os.close(fd)
        elif e.kind == "symlink":
            assert e.target is not None
            os.symlink(os.fsencode(e.target), full)
        elif e.kind == "fifo":
            os.mkfifo(full, 0o600)
        else:
            kind = {"chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "sock": stat.S_IFSOCK}[e.kind]
            os.mknod(full, kind | 0o600, e.rdev or 0)
        os.chown(full, e.uid, e.gid, follow_symlinks=False)
        if e.kind != "symlink":
            os.chmod(full, e.mode)
        for name, value in e.xattrs:
            os.setxattr(full, name, bytes.fromhex(value), follow_symlinks=False)
    for e in reversed(entries):  # children first: a directory's mtime set after its content
        if e.link is not None:
            continue
        full = os.path.join(base, os.fsencode(e.path))
        os.utime(full, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def verify(dest: Path, entries: list[TreeEntry]) -> int:
    """Scan what :func:`build` made and compare it with ``entries``, entry by entry (every
    file hashed again); the number of files verified. A difference is refused."""
    made = scan(dest)
    if len(made) != len(entries):
        raise Refused(
            f"migration refused: the tree made holds {len(made)} entries, not {len(entries)}"
        )
    want = {e.path: e for e in entries}
    files = 0
    for got in made:
        exp = want.get(got.path)
        # a hard link's names: the scan names whichever it met first as the group's first
        if exp is None or (
            got.kind, got.mode, got.uid, got.gid, got.size, got.sha256, got.target,
            got.rdev, got.xattrs,
        ) != (
            exp.kind, exp.mode, exp.uid, exp.gid, exp.size, exp.sha256, exp.target,
            exp.rdev, exp.xattrs,
        ):  # fmt: skip
            shown = got.path.encode("utf-8", "surrogateescape")[:120].decode("utf-8", "replace")
            raise Refused(f"migration refused: {shown!r} as made differs from its manifest")
        if exp.link is None and got.mtime_ns != exp.mtime_ns:
            raise Refused(f"migration refused: {got.path[:120]!r}: mtime differs")
        files += got.kind == "file"
    return files


def root_entry(root: Path) -> TreeEntry:
    """The metadata of the tree's root itself (path ``.``)."""
    st = os.lstat(root)
    return TreeEntry(
        path=".",
        kind="dir",
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        xattrs=_xattrs(os.fsencode(root)),
    )


def set_root(root: Path, e: TreeEntry) -> None:
    """Give the tree's root the metadata of ``e`` (checked like any entry's by the caller)."""
    os.chown(root, e.uid, e.gid)
    os.chmod(root, e.mode)
    for name, value in e.xattrs:
        os.setxattr(root, name, bytes.fromhex(value))
    os.utime(root, ns=(e.mtime_ns, e.mtime_ns))
